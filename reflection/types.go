package reflection

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/rs/zerolog"
)

// GroupID identifies a device group (the 32-byte device_group_id of the
// ClientUrlInfo, docs/protocol.md §4.1).
type GroupID [32]byte

// String returns the id in lowercase hex, for logs.
func (g GroupID) String() string { return hex.EncodeToString(g[:]) }

// DeviceID is the random 64-bit D2M device id that names a device slot
// within its group (docs/protocol.md §12).
type DeviceID uint64

// ExpirationPolicy is the slot's expiration policy. The values equal the
// protocol enum so the server can convert without a table.
type ExpirationPolicy uint8

const (
	Volatile   ExpirationPolicy = 0
	Persistent ExpirationPolicy = 1
)

// Slot is one device slot as stored. The store writes it as given; which
// fields to set when is the server's business.
type Slot struct {
	DeviceID         DeviceID
	DeviceInfo       []byte // encrypted, opaque
	Policy           ExpirationPolicy
	CreatedAt        int64 // unix ms
	ConnectedSince   int64 // unix ms; non-zero iff the device is connected
	LastDisconnectAt int64 // unix ms; set when it disconnects
}

// TombstoneReason says why a slot was removed, so a device that comes back
// expecting EXISTING gets the matching close code (docs/protocol.md §18 row 7).
type TombstoneReason uint8

const (
	Dropped    TombstoneReason = 1 // by a device (DropDevice) or an admin
	QueueLimit TombstoneReason = 2 // the reflection queue exceeded its limit
)

// Tombstone remembers a removed slot for a while (§18 row 7: 30 days).
type Tombstone struct {
	DeviceID DeviceID
	Reason   TombstoneReason
	At       int64 // unix ms
}

// GroupState is everything stored about a group except queue contents.
type GroupState struct {
	Slots            []Slot // sorted by DeviceID
	Tombstones       []Tombstone
	SharedDeviceData []byte
}

// QueueStats describes one slot's reflection queue.
type QueueStats struct {
	Length  int    // entries stored (ephemeral reflections are never stored)
	Bytes   int64  // sum of the stored envelopes' lengths
	NextSeq uint64 // the Seq the next reflection for this slot will get
}

// Entry is one stored reflection. Seq is the slot's counter value; the
// Reflected ID on the wire is uint32(Seq) and may wrap (docs/protocol.md §5.4).
type Entry struct {
	Seq       uint64
	Timestamp uint64 // unix ms, the storage time sent in the ReflectAck
	// Envelope is shared with the store's cache: read-only for the caller.
	Envelope []byte
}

// Delivery names one copy of a reflection: the recipient slot and the Seq
// it got from that slot's counter.
type Delivery struct {
	DeviceID DeviceID
	Seq      uint64
}

// AppendRequest is one Reflect to fan out.
type AppendRequest struct {
	Group    GroupID
	Sender   DeviceID
	Envelope []byte // owned by the store until done is called: do not modify
	// Ephemeral: nothing is written except the recipients' advanced counters;
	// every recipient still gets a Seq so the server can deliver the
	// reflection in queue order to the devices that are online (§18 row 4).
	Ephemeral bool
	// Hold: the sender holds the group's transaction lock. The envelope is
	// stored durably in the group's held area and reaches no queue until
	// ReleaseHeld (§10 "During a transaction", §18 row 3).
	Hold bool
}

// AppendResult reports what an Append or ReleaseHeld did.
type AppendResult struct {
	Timestamp uint64     // unix ms at apply time
	Delivered []Delivery // one per stored (or, if ephemeral, numbered) copy
	Dropped   []DeviceID // slots dropped because their queue hit a limit
	// CommitStart and CommitDone bracket the commit that made the write
	// durable (set by the engine, zero if it does not measure them), so
	// the server can split a ReflectAck's latency into waiting for a
	// commit and the commit itself.
	CommitStart, CommitDone time.Time
}

// Store is what the server uses. *DB (bbolt, this package) and
// *pgstore.Store (PostgreSQL) implement it; package storetest holds the
// tests both pass.
//
// Writes are queued to one committer and applied in submission order,
// except Ack, which takes effect in memory at once (see Ack). done
// (may be nil) is called on the committer goroutine, in submission order,
// after the transaction holding the write is durable (err == nil) or failed;
// it must not block. After Close, done is called with ErrClosed on a new
// goroutine, so a caller that holds a lock done also takes cannot deadlock.
type Store interface {
	// Group returns the stored state; an unknown group yields an empty
	// state and a nil error.
	Group(g GroupID) (GroupState, error)
	// QueueStats answers from memory where it can (bbolt always, in O(1);
	// the PostgreSQL engine for groups it has loaded, else with a query);
	// ok is false if the slot does not exist (as of the last successful
	// commit).
	QueueStats(g GroupID, d DeviceID) (QueueStats, bool)
	// ReadQueue returns up to max entries with Seq > afterSeq, in order.
	// An unknown slot yields no entries and a nil error.
	ReadQueue(g GroupID, d DeviceID, afterSeq uint64, max int) ([]Entry, error)
	// ForEachGroup calls fn for every stored group, in id order. Each group
	// is read consistently; the walk as a whole is not a snapshot.
	ForEachGroup(fn func(g GroupID, st GroupState) error) error

	PutSlot(g GroupID, s Slot, done func(error))
	DeleteSlot(g GroupID, d DeviceID, t *Tombstone, done func(error))
	SetSharedDeviceData(g GroupID, data []byte, done func(error))
	Append(r AppendRequest, done func(AppendResult, error))
	ReleaseHeld(g GroupID, sender DeviceID, done func(AppendResult, error))
	// Ack removes an entry. It takes effect for QueueStats and ReadQueue
	// before it returns; the engine may persist it later (done then fires
	// once it is durable), because losing an ack only re-delivers.
	Ack(g GroupID, d DeviceID, seq uint64, done func(error))
	PurgeQueue(g GroupID, d DeviceID, done func(error))
	PruneTombstones(olderThan int64, done func(error))
	// Barrier calls done once every write submitted before it is durable
	// (or failed). It writes nothing: a cluster node uses it to wait for
	// the writes of a shard it has frozen before exporting it.
	Barrier(done func(error))
	Close() error
}

// Options configures Open. Zero values select the defaults.
type Options struct {
	MaxQueueLength int   // default 25000 (docs/protocol.md §18 row 9)
	MaxQueueBytes  int64 // default 64 MiB (§18 row 9)
	DeleteChunk    int   // log entries deleted per commit when reclaiming; default 1000
	// Lazy acks: an Ack changes memory at once and is written with the
	// next commit after AckFlushInterval (default 100 ms) or AckFlushAcks
	// acks (default 1000), whichever comes first. A crash loses at most
	// that window of acks: those entries are delivered again (docs/protocol.md
	// §10 "Re-delivery").
	AckFlushInterval time.Duration
	AckFlushAcks     int
	// CacheBytes bounds the cache of recent log records that ReadQueue
	// serves without a read transaction; default 64 MiB, < 0 disables it.
	CacheBytes int64
	// OnCommit is a metrics hook called on the committer goroutine after
	// every bbolt write transaction: batch is the number of requests in it
	// (0 for background work such as deleting dropped queues).
	OnCommit func(batch int, took time.Duration, err error)
	Logger   zerolog.Logger
	Now      func() time.Time // for tests; default time.Now
	// InitialMmapSize is passed to bbolt. A long read transaction (Backup)
	// blocks the writer whenever bbolt has to grow its memory map, so a
	// production server should set this above the expected file size.
	InitialMmapSize int
}

const (
	DefaultMaxQueueLength = 25000
	DefaultMaxQueueBytes  = 64 << 20
	DefaultDeleteChunk    = 1000

	DefaultAckFlushInterval = 100 * time.Millisecond
	DefaultAckFlushAcks     = 1000
	DefaultCacheBytes       = 64 << 20
)

func (o Options) withDefaults() Options {
	if o.MaxQueueLength <= 0 {
		o.MaxQueueLength = DefaultMaxQueueLength
	}
	if o.MaxQueueBytes <= 0 {
		o.MaxQueueBytes = DefaultMaxQueueBytes
	}
	if o.DeleteChunk <= 0 {
		o.DeleteChunk = DefaultDeleteChunk
	}
	if o.AckFlushInterval <= 0 {
		o.AckFlushInterval = DefaultAckFlushInterval
	}
	if o.AckFlushAcks <= 0 {
		o.AckFlushAcks = DefaultAckFlushAcks
	}
	if o.CacheBytes == 0 {
		o.CacheBytes = DefaultCacheBytes
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

var (
	// ErrClosed is passed to done for writes submitted after Close.
	ErrClosed = errors.New("reflection: store is closed")
	// ErrLocked wraps the error of Open when another process has the file.
	ErrLocked = errors.New("reflection: database is locked by another process")
	// ErrFenced is passed to done when a replicated store refused a write
	// because this node no longer owns the group's shard (another node
	// raised the shard's epoch): the write did not happen, nothing may be
	// acked, and the shard's devices belong to the new owner.
	ErrFenced = errors.New("reflection: shard fenced: another node owns it now")
)

// Sync submits one write and waits for its done. Example:
//
//	err := reflection.Sync(func(done func(error)) { st.Ack(g, d, seq, done) })
//
// It must not be called from a done callback: that runs on the committer,
// which would then wait for itself.
func Sync(fn func(done func(error))) error {
	ch := make(chan error, 1)
	fn(func(err error) { ch <- err })
	return <-ch
}

// SyncAppend is Sync for Append and ReleaseHeld.
func SyncAppend(fn func(done func(AppendResult, error))) (AppendResult, error) {
	type out struct {
		res AppendResult
		err error
	}
	ch := make(chan out, 1)
	fn(func(res AppendResult, err error) { ch <- out{res, err} })
	o := <-ch
	return o.res, o.err
}

// String names the policy as the admin API and the CLI show it.
func (p ExpirationPolicy) String() string {
	switch p {
	case Volatile:
		return "volatile"
	case Persistent:
		return "persistent"
	}
	return fmt.Sprintf("unknown(%d)", uint8(p))
}

// String names the reason as the admin API and the CLI show it.
func (r TombstoneReason) String() string {
	switch r {
	case Dropped:
		return "dropped"
	case QueueLimit:
		return "queue_limit"
	}
	return fmt.Sprintf("unknown(%d)", uint8(r))
}

// ShardStore is implemented by stores that hold a shard (the groups whose
// id starts with one byte) on this node only, and so must hand it to
// another node in a planned move; the mediator type-asserts it. *DB
// implements it (shard.go).
//
// Every copy of a shard carries a generation, chosen by the cluster: the
// etcd revision at which the copy was exported for the move that brought
// it here (0 for a copy that was never moved). Generations only grow, so
// an operation for an older copy can tell it is too late: a drop that
// arrives after the shard came back (A→B→A) keeps the newer copy.
type ShardStore interface {
	// ExportShard writes a consistent snapshot of the shard's state.
	ExportShard(ctx context.Context, shard byte, w io.Writer) (ShardStats, error)
	// ImportShard checks a whole stream, then, in one fsynced
	// transaction, replaces the shard's state with it, records gen as
	// its generation and settles it for this node: no device of it is
	// connected here yet (slots marked disconnected now) and no
	// transaction is open (held reflections released into the other
	// queues). On error nothing changed.
	ImportShard(ctx context.Context, shard byte, gen int64, r io.Reader) (ShardStats, error)
	// DropShard deletes the shard's state if the copy held is of
	// generation gen or older; a newer copy is kept (dropped false).
	DropShard(ctx context.Context, shard byte, gen int64) (st ShardStats, dropped bool, err error)
	// ResetShard deletes whatever the store holds of the shard and
	// records gen: the cluster gave this node the shard to serve from
	// empty (an operator accepted the loss of its data).
	ResetShard(ctx context.Context, shard byte, gen int64) (ShardStats, error)
	// SettleShard marks the shards' slots disconnected and releases their
	// held reflections: before a node serves shards it held before.
	SettleShard(ctx context.Context, shards ...byte) error
	// ShardGeneration returns the generation of the copy held (0 if none
	// was ever recorded) and whether the store holds any data of the shard.
	ShardGeneration(shard byte) (gen int64, hasData bool)
}

var _ ShardStore = (*DB)(nil)
