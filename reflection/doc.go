// Package reflection owns all persistent state of the mediator: device
// groups, device slots, tombstones, shared device data, each slot's durable
// reflection queue and the reflections a transaction holder keeps back until
// its transaction ends (reflection/pgstore keeps the same in PostgreSQL
// behind the same Store interface). Here everything lives in one bbolt
// file (schema 2, layout.go), and every write goes through one
// group-commit goroutine (the
// committer) that drains all pending requests into a single bbolt
// transaction, so one pair of fsyncs is shared by many messages
// (BENCHMARKS.md, "Reflection store v2").
//
// The package stores opaque bytes plus ids. It must not know about
// WebSockets, d2m framing, close codes, leaders, transaction locks or which
// devices are online: the mediator keeps that in memory and tells this
// package what to write. It never decrypts anything.
//
// Layout in one sentence: a durable reflection is one record in an
// append-only log (envelope stored once, with its recipients and their
// Seqs); per group, one cursor record holds every slot's counter and ack
// state; per-slot queues exist only in memory (mem.go) and are rebuilt at
// Open by scanning the log (rebuild.go). A log entry is deleted once no
// slot needs it. A schema-1 file is migrated on the first Open
// (migrate.go).
//
// Reads: Group and ForEachGroup use short bbolt read transactions and never
// wait for the committer; QueueStats and ReadQueue answer from memory (a
// bounded cache of recent log records; older entries cost one read
// transaction). Memory is updated only after a commit succeeded.
//
// Durability contract: a write's done(nil) means its transaction is on disk
// (bbolt fsyncs data and meta pages before Commit returns). If a commit
// fails, every request of that batch gets the error and memory is left as
// it was; the committer keeps going.
//
// Lazy acks: Ack is the exception. It takes effect in memory before it
// returns and is written with the next commit once AckFlushInterval
// (100 ms) has passed or AckFlushAcks (1000) acks are waiting, riding along
// with a batch if one is being committed. The same flush deletes the log
// entries those acks made dead, never before the cursors that made them
// dead are written. A crash loses at most that window of acks, which only
// delivers those entries again (docs/protocol.md §10 "Re-delivery"). Dead
// entries of dropped or purged queues are deleted DeleteChunk per commit,
// and after a crash Open finds them again by recounting references.
//
// Shard moves: a shard is the groups whose id starts with one byte; all
// their keys are one range per bucket. ExportShard writes a shard's state
// (slots with counters, tombstones, shared data, held reflections and
// every entry not yet acked, lazy acks included) as a checksummed stream,
// snapshotted under commitMu so it holds exactly the commits completed
// before it; ImportShard checks a whole stream and then replaces the
// shard in one request through the committer, so in one fsynced
// transaction ordered with every other write; DropShard removes a moved
// shard from the donor. Imported entries get new log positions but keep
// their Seqs and timestamps, and counters continue where they were.
// *DB offers this as the optional ShardStore interface.
//
// Files: layout.go (buckets), codec.go (records), mem.go (the in-memory
// index), rebuild.go (Open's scan), committer.go (the writer loop, lazy
// flush and failure policy), apply*.go (what each write does), reads.go,
// migrate.go (schema 1 → 2), offline.go (Check, Compact), shard.go,
// shard_codec.go and apply_shard.go (shard export, import and drop).
package reflection
