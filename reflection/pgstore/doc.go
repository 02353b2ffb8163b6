// Package pgstore keeps the mediator's state in PostgreSQL: the same
// reflection.Store as the bbolt file (device groups, slots, tombstones,
// shared device data, reflection queues, held reflections), for operators
// who need a node's loss to lose nothing. It owns the schema and its
// migrations (migrations/, schema.go), the commit path and the in-memory
// index of the shards this node serves, and nothing about WebSockets,
// devices online, leaders or transactions, which stay the mediator's.
//
// Durability: a write's done(nil) means its transaction committed and,
// with a synchronous standby (which Open requires unless AllowAsync), that
// the standby has it on disk. Open refuses a standby, and a primary whose
// commits would not wait for one.
//
// Writes: one committer goroutine drains what is pending into one
// transaction, sent as one pipeline of array-valued statements (sql.go):
// a batch costs one round trip and a fixed number of statements however
// many reflections it carries. The batch's effect is computed in memory
// first (batch.go, an overlay over the index, like the bbolt engine's) and
// published to the index only after the commit. Acks are lazy, as in the
// bbolt engine: in memory at once, deleted with the next batch.
//
// Shards and epochs: a shard is the groups whose id starts with one byte.
// d2m_shards holds, per shard, the epoch of the node allowed to write it.
// A node claims a shard before it reads or writes it (raising the epoch to
// its own, from the cluster placement; a single node takes one above the
// current), and every batch checks and bumps the row of every shard it
// writes in the same transaction (the fence), so a node that lost a shard
// can never commit for it again. The index of a shard is valid only while
// this node's claim stands: a new claim forgets it and it is read again
// from the database.
//
// Failures: a commit the server refused changes nothing and fails its
// batch; a commit without an answer (timeout, lost connection: it may
// still commit, e.g. once a standby is back) is settled before the next
// batch by terminating its backend, after which its shards are read again
// once the synchronous standby has confirmed a probe commit (until then
// nothing of them is loaded from the database, which may show what the
// standby lacks; committer.go). Every connection the pool opens is checked
// for synchronous replication as Open checks the first, so a failover to
// a primary without a synchronous standby fails writes instead of acking
// them (store.go, replicationGuard).
//
// Files: store.go (Open, options, the write API), committer.go (the
// writer loop, claims, settling, loading), batch.go (what a batch does),
// sql.go (its statements), reads.go (Group, ForEachGroup, QueueStats,
// ReadQueue), mem.go (the index), schema.go (migrations), check.go
// (mediator db check).
package pgstore
