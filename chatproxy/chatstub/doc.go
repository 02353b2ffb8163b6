// Package chatstub is a stand-in chat server for development and tests. It
// speaks the server side of the chat-server protocol for real (docs/protocol.md
// §9.3–§9.5): handshake with a long-term key pair, login with extensions,
// echo, outgoing-message acks, in-memory per-identity message queues,
// unblock-incoming-messages with queue-send-complete, and close-error on
// malformed input. The mediator starts it in-process when no chat server is
// configured; cmd/chatstub runs it alone.
//
// It owns CSP sessions and the in-memory queues. It must not be mistaken for
// a real chat server: it keeps nothing on disk but its key, has no identity
// directory and therefore does not verify vouches, sends no push
// notifications and enforces no idle timeout. It must not import the mediator,
// d2m, d2d or cspclient, so that embedding it keeps the mediator binary free
// of device-side code.
//
// Concurrency: one mutex guards the mailboxes (queued messages and the
// logged-in connections of each identity); it is held only for slice and map
// work, never for I/O. Each connection has a reader goroutine (the handshake,
// then frames) and a writer goroutine that alone seals and writes frames, so
// the server's nonce sequence always matches the order on the wire. Other
// connections hand frames to the writer through a bounded outbox; a
// connection whose outbox overflows is closed as a slow consumer, and its
// unacknowledged messages stay queued for the next connection.
package chatstub
