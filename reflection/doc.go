// Package reflection owns all persistent state of the mediator: device
// groups, device slots, tombstones, shared device data, each slot's durable
// reflection queue and the reflections a transaction holder keeps back until
// its transaction ends. Everything lives in one bbolt file, and every write
// goes through one group-commit goroutine (the committer) that drains all
// pending requests into a single bbolt transaction, so one pair of fsyncs is
// shared by many messages (measurements.md §0, §3.3).
//
// The package stores opaque bytes plus ids. It must not know about
// WebSockets, d2m framing, close codes, leaders, transaction locks or which
// devices are online: the mediator keeps that in memory and tells this
// package what to write. It never decrypts anything.
//
// Reads (Group, ReadQueue, ForEachGroup, Backup) use short bbolt read
// transactions and never wait for the committer; QueueStats is answered from
// an in-memory index that is updated only after a commit succeeded.
//
// Durability contract: a write's done(nil) means its transaction is on disk
// (bbolt fsyncs data and meta pages before Commit returns). If a commit
// fails, every request of that batch gets the error and memory is left as
// it was; the committer keeps going. Files: layout.go (buckets), committer.go
// (the writer loop and failure policy), apply*.go (what each write does),
// trash.go (chunked deletion of dropped queues), offline.go (Check,
// Compact).
package reflection
