package reflection

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"go.etcd.io/bbolt"
	bberrors "go.etcd.io/bbolt/errors"
)

// DB is the bbolt implementation of Store.
type DB struct {
	bolt *bbolt.DB
	opts Options
	log  zerolog.Logger

	mem *memIndex
	// tombMin maps each group with tombstones to its oldest tombstone's At,
	// so PruneTombstones visits only those groups. nextLSN is the next log
	// position. Both are owned by whoever holds commitMu (the committer;
	// Open before the committer starts).
	tombMin map[GroupID]int64
	nextLSN uint64
	// shardGen is each shard's copy generation (ShardStore): written by
	// publish after the commit that recorded it, read by anyone.
	shardGen [256]atomic.Int64
	// flushRetry: after a failed flush, no flush of its own before this
	// (committer only), so a failing disk is not hammered.
	flushRetry time.Time

	mu       sync.Mutex // guards pending and closed
	pending  []*request
	closed   bool
	wake     chan struct{} // cap 1: "pending changed" or "acks waiting"
	stopped  chan struct{} // closed when the committer has exited
	maxBatch int

	// commitMu serialises write transactions with their publish step; the
	// committer is normally the only writer, this only matters for Open's
	// recovery and the per-message benchmark baseline.
	commitMu sync.Mutex

	closeOnce sync.Once
	closeErr  error

	// busy is the committer's working time in nanoseconds (commits and
	// completions, not waiting for work): CommitterBusy.
	busy atomic.Int64
	// hooks bracket the completions of each commit (SetCompletionHooks).
	hooks atomic.Pointer[completionHooks]

	testHookBeforeCommit atomic.Pointer[func(batch int) error]
}

var _ Store = (*DB)(nil)

// Open opens (or creates) the database file, migrates a schema-1 file,
// rebuilds the in-memory index, repairs what a crash left behind and starts
// the committer. Before it returns:
//   - slots still marked connected (the process died while they were) get
//     ConnectedSince = 0 and LastDisconnectAt = now;
//   - held reflections left on disk (a crash inside a transaction) are
//     released into the other slots' queues (§18 row 3);
//   - log entries no slot needs any more (acks and drops not yet reclaimed)
//     are deleted in the background, DeleteChunk per commit.
//
// If another process holds the file, Open fails after about a second with
// an error wrapping ErrLocked instead of hanging.
func Open(path string, opts Options) (*DB, error) {
	opts = opts.withDefaults()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("reflection: create directory: %w", err)
	}
	b, err := bbolt.Open(path, 0o600, boltOptions(opts, false))
	if err != nil {
		if errors.Is(err, bberrors.ErrTimeout) {
			return nil, fmt.Errorf("%w: %s", ErrLocked, path)
		}
		return nil, fmt.Errorf("reflection: open %s: %w", path, err)
	}
	db := &DB{
		bolt:     b,
		opts:     opts,
		log:      opts.Logger,
		mem:      newMemIndex(opts.CacheBytes),
		tombMin:  make(map[GroupID]int64),
		wake:     make(chan struct{}, 1),
		stopped:  make(chan struct{}),
		maxBatch: maxBatch,
	}
	if err := db.prepare(); err != nil {
		_ = b.Close()
		return nil, fmt.Errorf("reflection: open %s: %w", path, err)
	}
	go db.run()
	return db, nil
}

func boltOptions(opts Options, readOnly bool) *bbolt.Options {
	return &bbolt.Options{
		// Without a timeout bbolt waits for the flock forever.
		Timeout:      time.Second,
		FreelistType: bbolt.FreelistMapType,
		// The freelist is rebuilt by scanning at open instead of being
		// written on every commit: fewer pages per commit (§5.a).
		NoFreelistSync:  true,
		ReadOnly:        readOnly,
		InitialMmapSize: opts.InitialMmapSize,
	}
}

func (db *DB) prepare() error {
	if err := migrate(db.bolt, db.opts, db.log); err != nil {
		return err
	}
	if err := db.bolt.Update(initSchema); err != nil {
		return err
	}
	var res rebuildResult
	err := db.bolt.View(func(tx *bbolt.Tx) error {
		var err error
		if res, err = rebuild(tx, db.mem); err != nil {
			return err
		}
		if err := loadTombMin(tx, db.tombMin); err != nil {
			return err
		}
		return db.loadShardGens(tx)
	})
	if err != nil {
		return err
	}
	for _, f := range res.findings {
		db.log.Warn().Err(f).Msg("reflection: inconsistency found while loading (see mediator db check)")
	}
	db.nextLSN = res.nextLSN
	if n := len(db.mem.dead); n > 0 {
		db.mem.noteWork()
		db.log.Info().Int("entries", n).Msg("reflection: reclaiming log entries left by the last run")
	}
	return db.recover()
}

// initSchema creates the buckets of a new file and checks an existing
// one's version. It also removes the clean-shutdown mark: from now on the
// file may be left by a crash.
func initSchema(tx *bbolt.Tx) error {
	for _, name := range rootBuckets {
		if _, err := tx.CreateBucketIfNotExists(name); err != nil {
			return fmt.Errorf("reflection: create bucket %s: %w", name, err)
		}
	}
	meta := tx.Bucket(bucketMeta)
	if v := meta.Get(keySchema); v == nil {
		if err := meta.Put(keySchema, u32bytes(schemaVersion)); err != nil {
			return err
		}
	} else if len(v) != 4 || beUint32(v) != schemaVersion {
		return fmt.Errorf("reflection: unsupported schema version %x (want %d)", v, schemaVersion)
	}
	if meta.Get(keyClean) != nil {
		return meta.Delete(keyClean)
	}
	return nil
}

// loadTombMin computes the oldest tombstone per group.
func loadTombMin(tx *bbolt.Tx, into map[GroupID]int64) error {
	c := tx.Bucket(bucketTombs).Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		t, err := decodeTombstone(k, v)
		if err != nil || len(k) != 40 {
			return fmt.Errorf("reflection: tombstone %x: %v", k, err)
		}
		g := GroupID(k[:32])
		// At 0 would read as "none": clamp, it is older than anything anyway.
		at := max(t.At, 1)
		if m, ok := into[g]; !ok || at < m {
			into[g] = at
		}
	}
	return nil
}

// recover marks slots left "connected" by a crash as disconnected and
// delivers held reflections found on disk, in one transaction.
func (db *DB) recover() error {
	now := db.opts.Now().UnixMilli()
	var reqs []*request
	err := db.bolt.View(func(tx *bbolt.Tx) error {
		c := tx.Bucket(bucketSlots).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			g, s, _, err := decodeSlot(k, v)
			if err != nil {
				return err
			}
			if s.ConnectedSince != 0 {
				s.ConnectedSince, s.LastDisconnectAt = 0, now
				reqs = append(reqs, &request{op: opPutSlot, g: g, d: s.DeviceID, slot: s})
			}
		}
		var last []byte
		hc := tx.Bucket(bucketHeld).Cursor()
		for k, _ := hc.First(); k != nil; k, _ = hc.Next() {
			if len(k) != 48 {
				return fmt.Errorf("reflection: corrupt held key %x", k)
			}
			if last == nil || !bytes.Equal(k[:40], last) {
				last = append(last[:0], k[:40]...)
				reqs = append(reqs, &request{op: opReleaseHeld, g: GroupID(k[:32]), d: DeviceID(beUint64(k[32:]))})
			}
		}
		return nil
	})
	if err != nil || len(reqs) == 0 {
		return err
	}
	released, dropped := 0, 0
	for _, r := range reqs {
		if r.op == opReleaseHeld {
			r.doneAppend = func(res AppendResult, err error) {
				released += len(res.Delivered)
				dropped += len(res.Dropped)
			}
		}
	}
	if err := db.commitDirect(reqs...); err != nil {
		return fmt.Errorf("reflection: recovery: %w", err)
	}
	db.log.Info().Int("requests", len(reqs)).Int("held_copies_delivered", released).
		Int("slots_dropped", dropped).Msg("reflection: recovered state left by an unclean shutdown")
	return nil
}

// Close completes every write already submitted, writes the acks not yet
// on disk, stops the committer and closes the file. Later writes fail with
// ErrClosed. Reclaiming log entries of a large dropped queue is not
// finished first: it resumes at the next Open.
func (db *DB) Close() error {
	db.closeOnce.Do(func() {
		db.mu.Lock()
		db.closed = true
		db.mu.Unlock()
		db.poke()
		<-db.stopped
		if err := db.bolt.Close(); err != nil {
			db.closeErr = fmt.Errorf("reflection: close: %w", err)
		}
	})
	return db.closeErr
}

// Path returns the database file's path.
func (db *DB) Path() string { return db.bolt.Path() }

func (db *DB) poke() {
	select {
	case db.wake <- struct{}{}:
	default:
	}
}
