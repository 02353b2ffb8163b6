package reflection

import (
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

	index *queueIndex
	// tombMin maps each group with tombstones to its oldest tombstone's At,
	// so PruneTombstones visits only those groups. Guarded by commitMu
	// (in practice only the committer touches it).
	tombMin      map[GroupID]int64
	trashPending atomic.Bool // trash/ may hold queues to delete

	mu       sync.Mutex // guards pending and closed
	pending  []*request
	closed   bool
	wake     chan struct{} // cap 1: "pending changed"
	stopped  chan struct{} // closed when the committer has exited
	maxBatch int

	// commitMu serialises write transactions with their publish step; the
	// committer is normally the only writer, this only matters for Open's
	// recovery and the per-message benchmark baseline.
	commitMu sync.Mutex

	closeOnce sync.Once
	closeErr  error

	testHookBeforeCommit atomic.Pointer[func(batch int) error]
}

var _ Store = (*DB)(nil)

// Open opens (or creates) the database file, repairs what a crash left
// behind and starts the committer. Before it returns:
//   - slots still marked connected (the process died while they were) get
//     ConnectedSince = 0 and LastDisconnectAt = now;
//   - held reflections left on disk (a crash inside a transaction) are
//     released into the other slots' queues (§18 row 3);
//   - queues left in the trash keep being deleted in the background.
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
		index:    newQueueIndex(),
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
	if err := db.bolt.Update(initSchema); err != nil {
		return err
	}
	if err := db.loadIndex(); err != nil {
		return err
	}
	return db.recover()
}

func initSchema(tx *bbolt.Tx) error {
	for _, name := range [][]byte{bucketMeta, bucketGroups, bucketQMeta, bucketQueues, bucketTrash} {
		if _, err := tx.CreateBucketIfNotExists(name); err != nil {
			return fmt.Errorf("reflection: create bucket %s: %w", name, err)
		}
	}
	meta := tx.Bucket(bucketMeta)
	v := meta.Get(keySchema)
	if v == nil {
		return meta.Put(keySchema, u32bytes(schemaVersion))
	}
	if len(v) != 4 || beUint32(v) != schemaVersion {
		return fmt.Errorf("reflection: unsupported schema version %x (want %d)", v, schemaVersion)
	}
	return nil
}

// loadIndex rebuilds the in-memory queue index and tombstone map from the
// persisted queue meta and the tombstones; no queue is read.
func (db *DB) loadIndex() error {
	return db.bolt.View(func(tx *bbolt.Tx) error {
		c := tx.Bucket(bucketGroups).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if v != nil || len(k) != 32 {
				return fmt.Errorf("reflection: unexpected key %x in groups", k)
			}
			g := GroupID(k)
			minAt, err := oldestTombstone(tx.Bucket(bucketGroups).Bucket(k))
			if err != nil {
				return fmt.Errorf("reflection: group %s: %w", g, err)
			}
			if minAt != 0 {
				db.tombMin[g] = minAt
			}
		}
		qc := tx.Bucket(bucketQMeta).Cursor()
		for k, v := qc.First(); k != nil; k, v = qc.Next() {
			m, err := decodeQueueMeta(v)
			if err != nil || len(k) != 40 {
				return fmt.Errorf("reflection: queue meta %x: %w", k, err)
			}
			db.index.m[queueKey{GroupID(k[:32]), DeviceID(beUint64(k[32:]))}] = m
		}
		if k, _ := tx.Bucket(bucketTrash).Cursor().First(); k != nil {
			db.trashPending.Store(true)
		}
		return nil
	})
}

// recover marks slots left "connected" by a crash as disconnected and
// delivers held reflections found on disk, in one transaction.
func (db *DB) recover() error {
	now := db.opts.Now().UnixMilli()
	var reqs []*request
	err := db.bolt.View(func(tx *bbolt.Tx) error {
		c := tx.Bucket(bucketGroups).Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			g := GroupID(k)
			gb := tx.Bucket(bucketGroups).Bucket(k)
			if slots := gb.Bucket(bucketSlots); slots != nil {
				sc := slots.Cursor()
				for sk, sv := sc.First(); sk != nil; sk, sv = sc.Next() {
					s, err := decodeSlot(sk, sv)
					if err != nil {
						return fmt.Errorf("reflection: group %s: %w", g, err)
					}
					if s.ConnectedSince != 0 {
						s.ConnectedSince, s.LastDisconnectAt = 0, now
						reqs = append(reqs, &request{op: opPutSlot, g: g, d: s.DeviceID, slot: s})
					}
				}
			}
			if held := gb.Bucket(bucketHeld); held != nil {
				var last []byte
				hc := held.Cursor()
				for hk, _ := hc.First(); hk != nil; hk, _ = hc.Next() {
					if len(hk) != 16 {
						return fmt.Errorf("reflection: group %s: corrupt held key %x", g, hk)
					}
					if last == nil || string(hk[:8]) != string(last) {
						last = append([]byte(nil), hk[:8]...)
						reqs = append(reqs, &request{op: opReleaseHeld, g: g, d: DeviceID(beUint64(hk))})
					}
				}
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

// Close completes every write already submitted, stops the committer and
// closes the file. Later writes fail with ErrClosed. Deleting dropped queues
// is not finished first: it resumes at the next Open.
func (db *DB) Close() error {
	db.closeOnce.Do(func() {
		db.mu.Lock()
		db.closed = true
		db.mu.Unlock()
		select {
		case db.wake <- struct{}{}:
		default:
		}
		<-db.stopped
		if err := db.bolt.Close(); err != nil {
			db.closeErr = fmt.Errorf("reflection: close: %w", err)
		}
	})
	return db.closeErr
}

// Path returns the database file's path.
func (db *DB) Path() string { return db.bolt.Path() }
