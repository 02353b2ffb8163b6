package reflection

import (
	"errors"
	"fmt"
	"time"

	"go.etcd.io/bbolt"
)

// maxBatch caps the requests per transaction, as in the measured loop
// (measurements.md §5.a): large enough to amortise the two fsyncs of a bbolt
// commit, small enough to bound one transaction's memory and latency.
const maxBatch = 4096

// errRequestFailed aborts a transaction because one request could not be
// applied; commitBatch then re-runs the batch without it.
var errRequestFailed = errors.New("reflection: request failed")

// run is the committer: the only goroutine that writes to bbolt. It blocks
// for work, drains everything already queued (up to maxBatch) without
// waiting, commits it in one db.Update, completes the requests in FIFO
// order, and between batches deletes one chunk of dropped queues. There is
// deliberately no timer (unlike bbolt's Batch, whose 10 ms timer dominated
// latency at low load, measurements.md §0): the next batch is simply what
// arrived during the previous fsync.
func (db *DB) run() {
	defer close(db.stopped)
	var batch []*request
	for {
		var closing bool
		batch, closing = db.take(batch[:0])
		if len(batch) > 0 {
			db.commitBatch(batch)
			clear(batch) // drop references to finished requests
		}
		if db.trashPending.Load() && !closing {
			if err := db.collectTrash(); err == nil {
				continue
			}
			// On error fall through: retry when more work arrives rather
			// than spinning on a failing disk.
		}
		if len(batch) > 0 {
			continue
		}
		if closing {
			return
		}
		<-db.wake
	}
}

// take moves up to maxBatch pending requests into buf. closing reports that
// Close was called; the committer exits once nothing is left.
func (db *DB) take(buf []*request) ([]*request, bool) {
	db.mu.Lock()
	defer db.mu.Unlock()
	n := min(len(db.pending), db.maxBatch)
	buf = append(buf, db.pending[:n]...)
	m := copy(db.pending, db.pending[n:])
	clear(db.pending[m:])
	db.pending = db.pending[:m]
	return buf, db.closed
}

// commitBatch applies batch in one transaction and completes every request.
//
// Failed-commit policy: if bbolt's Update fails (write or fsync error, or
// the test hook), every request of the batch gets the error and nothing in
// memory changes, because the in-memory index is only published after a
// successful commit; the committer keeps running, so a later batch may
// succeed (e.g. once disk space is back). If a single request cannot be
// applied (a corrupt record), only that request fails: the transaction is
// rolled back and the batch re-run without it, which is deterministic
// because apply depends only on the committed state and the batch.
func (db *DB) commitBatch(batch []*request) {
	db.commitMu.Lock()
	defer db.commitMu.Unlock()
	start := time.Now()
	now := db.opts.Now().UnixMilli()
	var failed map[int]error
	var bt *batchTx
	var err error
	for {
		bt = newBatchTx(db, now)
		bad, badErr := -1, error(nil)
		err = db.bolt.Update(func(tx *bbolt.Tx) error {
			bt.tx = tx
			for i, r := range batch {
				if _, skip := failed[i]; skip {
					continue
				}
				if err := bt.apply(r); err != nil {
					bad, badErr = i, err
					return errRequestFailed
				}
			}
			if err := bt.flush(); err != nil {
				return err
			}
			return db.runTestHook(len(batch))
		})
		if bad < 0 {
			break
		}
		if failed == nil {
			failed = make(map[int]error)
		}
		failed[bad] = badErr
		db.log.Error().Err(badErr).Int("op", int(batch[bad].op)).Msg("reflection: request failed, re-running batch without it")
	}
	if err == nil {
		bt.publish()
	} else {
		err = fmt.Errorf("reflection: commit of %d requests: %w", len(batch), err)
		db.log.Error().Err(err).Msg("reflection: commit failed")
	}
	if db.opts.OnCommit != nil {
		db.opts.OnCommit(len(batch), time.Since(start), err)
	}
	for i, r := range batch {
		if e, ok := failed[i]; ok {
			r.complete(e)
		} else {
			r.complete(err)
		}
	}
}

// commitDirect applies reqs in one transaction of their own, bypassing the
// queue: used at Open (before the committer runs) and by the one-Update-
// per-message benchmark baseline.
func (db *DB) commitDirect(reqs ...*request) error {
	db.commitMu.Lock()
	defer db.commitMu.Unlock()
	bt := newBatchTx(db, db.opts.Now().UnixMilli())
	err := db.bolt.Update(func(tx *bbolt.Tx) error {
		bt.tx = tx
		for _, r := range reqs {
			if err := bt.apply(r); err != nil {
				return err
			}
		}
		return bt.flush()
	})
	if err == nil {
		bt.publish()
	} else {
		err = fmt.Errorf("reflection: commit: %w", err)
	}
	for _, r := range reqs {
		r.complete(err)
	}
	return err
}

func (db *DB) runTestHook(batch int) error {
	if h := db.testHookBeforeCommit.Load(); h != nil {
		return (*h)(batch)
	}
	return nil
}
