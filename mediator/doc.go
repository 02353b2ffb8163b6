// Package mediator is the d2m server: it accepts device WebSockets, runs the
// challenge handshake, keeps each device group's in-memory coordination
// state (registered connections, the slot table mirror, the leader, the
// transaction lock) and drives reflection delivery, the chat-server proxy
// and the admin API. It parses no bytes by hand (package d2m does) and
// never touches bbolt (package reflection does); it never sees plaintext.
//
// # Concurrency
//
// Every goroutine has an owner that waits for it. Server.spawn and
// Server.startConn start the server's goroutines (the janitor, the key
// pool, one run per connection) and count them; Shutdown waits for all of
// them and returns ctx.Err() if its deadline passes first, after dropping
// what remains with CloseNow. A connection's run is its reader (handshake,
// then the read loop); it starts the upstream reader and waits for it, and
// waits for the writer (sendLoop), which kicks start only while there is
// something to write, so an idle device costs one goroutine.
//
// Only the writer writes the socket, the handshake frames included. The
// writer is a role (writerRunning): the writer goroutine, or for one send
// round a goroutine that queued frames and holds no lock (flush.go: the
// store's committer at the end of a commit's completions, the upstream
// reader, the read loop's replies, the handshake), which writes only what
// the socket takes at once and hands anything else to a writer goroutine.
// A close is decided once (closeWith, from any goroutine, never blocking)
// and carried out by the writer goroutine in every state of the
// connection: it sends what was queued before the decision, then the
// close frame. Other goroutines reach a connection only through its queues
// with non-blocking sends followed by a kick; a connection that cannot
// keep up is closed, never buffered without bound. The reflection queue in the store is the
// buffer for durable data: memory holds only a bounded window per device.
//
// Per-group state has one owner: group.mu, a mutex with short critical
// sections (chosen over a goroutine per group because most groups are
// idle most of the time and a goroutine each would cost memory for
// nothing). A group's stored state is read once, outside group.mu (load).
// Storage writes are submitted under group.mu, which never blocks (the
// store appends to its pending list under its own short mutex) and fixes
// their order relative to the group's state changes; their completion is
// awaited outside it. The store completes writes on its committer
// goroutine holding none of this package's locks.
//
// # Cluster mode: every group write passes the shard's lifecycle
//
// With a Placement (cluster mode), a group object belongs to the epoch its
// shard was served at when it was made (group.epoch); a shard served here
// again at a later epoch gets new objects. Every write of a group —
// registration, the disconnect record, DropDevice, SetSharedDeviceData,
// transactions, reflections, the janitor's and the admin's writes — first
// passes Placement.Admit with that epoch, outside group.mu: while a
// planned move has frozen the shard it waits; once the shard is handed
// over or lost it is refused and the device is closed with 1001 (the
// reason names the new owner) to redo it there. So a write is
// acknowledged only if the node that serves the shard afterwards has it.
// The exit path's writes (disconnect, ending a transaction) are skipped
// when refused: whoever serves the shard next settles it (slots marked
// disconnected, held reflections released). ReflectedAcks are not
// admitted: a lost ack only re-delivers.
//
// # Lock order
//
// A lock may be taken while holding only locks above it in this table;
// "→" lists every nested acquisition that exists.
//
//	lock                      guards                                    nested acquisitions
//	Server.mu                 groups, conns, closed, goroutine count    → group.mu (maybeEvictLocked)
//	group.mu                  slots, tombstones, conns, leader, txn     → deviceConn.closeMu (closeWith)
//	                                                                    → ctrlQueue.mu (enqueue, enqueueAfter)
//	                                                                    → deviceConn.ephMu (pushEphemeral)
//	                                                                    → Server.flushMu (kick during a commit's completions)
//	                                                                    → the store's submit mutex (every write)
//	Server.flushMu            connections a commit's completions queued none (starts goroutines, no I/O)
//	deviceConn.closeMu        close code and cause                      none
//	deviceConn.hsMu           handshake frames                          none
//	deviceConn.ephMu          ephemeral items                           none
//	deviceConn.inflightMu     Reflected ids in flight                   none
//	ctrlQueue.mu              control frames                            none
//	corkConn.readMu           read chunk vs. the close handshake        → corkConn.mu → corkConn.wmu (the handshake's writes)
//	corkConn.mu               cork state and buffer (no I/O)            → corkConn.wmu
//	corkConn.wmu              order of socket writes                    none; held across one deadline-bounded or non-blocking write
//
// corkConn.wmu is held during I/O as the socket's write order, like the
// lock inside net.Conn, and never while taking another lock. The writer
// goroutine holds corkConn.readMu across the library's close handshake
// (its own timeouts bound it) so that the read loop's wait does not read
// the bytes the handshake reads; the read loop only tries the lock and
// never waits for it.
package mediator
