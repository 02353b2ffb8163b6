// Package cspclient is a device-side chat-server protocol (CSP) client: it
// performs the CSP login (docs/protocol.md §9.3) with a proper vouch and then
// sends and receives frames (§9.4). Tests, the device simulator and the load
// tool use it to talk to the stand-in chat server (chatstub), either directly
// over TCP or through the mediator's Proxy messages.
//
// It owns the client side of the handshake and a small helper API (echo,
// unblock, messages, acks). It works over any Transport whose received units
// are exactly one CSP unit each, which is what the mediator promises for
// Proxy messages (§9.2). It must never be imported by the mediator or the
// stand-in server: it is test and tooling code, and it pulls in d2d/blake2b
// for the vouch.
package cspclient
