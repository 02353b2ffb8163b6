// Package chatproxy owns one device connection's link to the chat server:
// dialing it, writing the device's CSP bytes to it verbatim, and cutting the
// server's TCP byte stream back into exact CSP units (docs/protocol.md §9).
//
// The mediator cannot decrypt CSP, so this package only counts bytes: the
// first 80 bytes are the server-hello, the next 32 the login-ack, and every
// unit after that is a u16-le length followed by that many bytes, returned
// with its length prefix (§9.2). Each unit becomes exactly one Proxy message,
// because the Android, iOS and desktop clients all break when units are
// coalesced or split.
//
// It must not import d2m, mediator or any other package of this module: it
// deals in []byte CSP units, and the mediator wraps them. Errors are sentinel
// values (ErrDial, ErrClosed, ErrFrameTooLarge, ErrWriteTimeout) so the
// mediator can map them to close codes 4001, 4000 and 4009 (§13) without
// parsing messages. The CSP crypto, the stand-in chat server and the device
// client live in the subpackages csp, chatstub and cspclient so that the
// mediator's hot path does not carry them.
package chatproxy
