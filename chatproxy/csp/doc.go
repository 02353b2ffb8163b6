// Package csp holds the chat-server protocol (CSP) wire pieces that both ends
// of a CSP connection need: sizes, payload types, nonces, the handshake
// messages (client-hello, server-hello, login-data, extensions, login-ack),
// frame and container encoding, the per-connection box Session, and the
// message, message-ack and close-error payloads (docs/protocol.md §9.3, §9.4).
//
// It is shared by the stand-in chat server (chatstub) and the device-side
// client (cspclient). It owns bytes ↔ values and the NaCl box calls only: no
// sockets, goroutines or logging. The mediator must not import it; the
// mediator never decrypts CSP and needs only chatproxy's byte counting.
//
// Every parser returns an error wrapping ErrMalformed (a *FormatError) for
// malformed input, or ErrDecrypt when a box does not open, and never panics;
// parsed slices alias the input.
package csp
