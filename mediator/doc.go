// Package mediator is the d2m server: it accepts device WebSockets, runs the
// challenge handshake, keeps each device group's in-memory coordination
// state (registered connections, the slot table mirror, the leader, the
// transaction lock) and drives reflection delivery, the chat-server proxy
// and the admin API. It parses no bytes by hand (package d2m does) and
// never touches bbolt (package reflection does); it never sees plaintext.
//
// # Concurrency
//
// The HTTP handler runs a device's handshake and returns; the connection
// then has a reader goroutine (live), a sender (sendLoop, the only writer of
// the socket, running only while there is something to write, so an idle
// device costs one goroutine) and, once it proxies, an upstream reader.
// Everything else talks to a connection only through its queues with
// non-blocking sends followed by a kick that starts sendLoop if needed; a
// connection that cannot keep up is closed, never buffered without bound. The reflection queue on disk is the
// buffer for durable data: memory holds only a bounded window per device.
//
// Per-group state has one owner: group.mu, a mutex with short critical
// sections and no I/O under it (chosen over a goroutine per group because
// most groups are idle most of the time and a goroutine each would cost
// memory for nothing). Storage writes are *submitted* under group.mu, which
// never blocks and fixes their order relative to the group's state changes,
// but their completion is awaited outside it.
//
// Lock order: Server.mu → group.mu → deviceConn.inflightMu. The storage
// committer calls back into this package holding none of its own locks.
package mediator
