package reflection

import (
	"errors"
	"fmt"
	"time"

	"go.etcd.io/bbolt"
)

// maxBatch caps the requests per transaction: large enough to amortise the
// two fsyncs of a bbolt commit, small enough to bound one transaction's
// memory and latency.
const maxBatch = 4096

// closeReclaimChunks bounds how many reclaim commits Close spends on dead
// log entries before it gives up and leaves the rest to the next Open.
const closeReclaimChunks = 64

// errRequestFailed aborts a transaction because one request could not be
// applied; commitBatch then re-runs the batch without it.
var errRequestFailed = errors.New("reflection: request failed")

// run is the committer: the only goroutine that writes to bbolt. It blocks
// for work, drains everything already queued (up to maxBatch) without
// waiting, commits it in one db.Update, and completes the requests in FIFO
// order. There is deliberately no timer for writes (unlike bbolt's Batch,
// which waits up to its MaxBatchDelay, 10 ms by default, for more calls and
// so adds that much latency at low load): the next batch is simply what
// arrived during the previous fsync.
//
// The one timer is the lazy flush of acks (and reclaiming of dead log
// entries): once due, it rides along with the next batch's commit, or, if
// the committer is idle, gets a commit of its own. So a commit is never
// spent on acks alone while reflections are arriving.
func (db *DB) run() {
	defer close(db.stopped)
	var batch []*request
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		var closing bool
		batch, closing = db.take(batch[:0])
		if len(batch) > 0 {
			t := time.Now()
			db.commitBatch(batch, db.flushDue())
			db.busy.Add(int64(time.Since(t)))
			clear(batch) // drop references to finished requests
			continue
		}
		if closing {
			db.closeFlush()
			return
		}
		if db.flushDue() {
			t := time.Now()
			err := db.flush(false)
			db.busy.Add(int64(time.Since(t)))
			if err == nil {
				continue
			}
			// On error wait for more work or the next due time rather
			// than spinning on a failing disk.
		}
		if wait, ok := db.flushWait(); ok {
			timer.Reset(wait)
			select {
			case <-db.wake:
			case <-timer.C:
			}
			timer.Stop()
		} else {
			<-db.wake
		}
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

// flushDue: acks or dead entries have waited AckFlushInterval, or there are
// AckFlushAcks acks or DeleteChunk dead entries.
func (db *DB) flushDue() bool {
	if time.Now().Before(db.flushRetry) {
		return false
	}
	m := db.mem
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.workSince.IsZero() {
		return false
	}
	return m.acks >= db.opts.AckFlushAcks || len(m.dead) >= db.opts.DeleteChunk ||
		time.Since(m.workSince) >= db.opts.AckFlushInterval
}

// flushWait returns how long until the flush is due, if there is work.
func (db *DB) flushWait() (time.Duration, bool) {
	m := db.mem
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.workSince.IsZero() {
		return 0, false
	}
	return max(db.opts.AckFlushInterval-time.Since(m.workSince), time.Millisecond), true
}

// commitBatch applies batch in one transaction and completes every request.
// If withFlush, the due lazy flush (cursors changed by acks, one chunk of
// dead log entries) rides along in the same transaction.
//
// Failed-commit policy: if bbolt's Update fails (write or fsync error, or
// the test hook), every request of the batch gets the error and nothing in
// memory changes, because the in-memory index is only published after a
// successful commit (the flush's work is put back); the committer keeps
// running, so a later batch may succeed (e.g. once disk space is back). If
// a single request cannot be applied (a corrupt record), only that request
// fails: the transaction is rolled back and the batch re-run without it,
// which is deterministic because apply depends only on the committed state
// and the batch.
//
// The requests (and the acks a flush made durable) are completed after
// commitMu is released: completions call back into the server, which takes
// its own locks and may read this store.
func (db *DB) commitBatch(batch []*request, withFlush bool) {
	if !withFlush && onlyBarriers(batch) {
		// Every earlier write is already complete: the committer is
		// sequential. No transaction (and no fsync) for nothing.
		for _, r := range batch {
			r.complete(nil)
		}
		return
	}
	fw, failed, err := db.commitBatchLocked(batch, withFlush)
	if fw != nil && err == nil {
		fw.complete()
	}
	h := db.hooks.Load()
	if h != nil {
		h.begin()
		defer h.end()
	}
	for i, r := range batch {
		if e, ok := failed[i]; ok {
			r.complete(e)
		} else {
			r.complete(err)
		}
	}
}

// completionHooks bracket the completion callbacks of one commit.
type completionHooks struct{ begin, end func() }

// SetCompletionHooks makes the committer call begin before the completion
// callbacks of each commit and end after them, on its own goroutine. The
// server uses it to write the frames those callbacks queued from this
// goroutine once, at the end, instead of waking a writer goroutine per
// connection. nil functions remove the hooks.
func (db *DB) SetCompletionHooks(begin, end func()) {
	if begin == nil || end == nil {
		db.hooks.Store(nil)
		return
	}
	db.hooks.Store(&completionHooks{begin, end})
}

func onlyBarriers(batch []*request) bool {
	for _, r := range batch {
		if r.op != opBarrier {
			return false
		}
	}
	return true
}

func (db *DB) commitBatchLocked(batch []*request, withFlush bool) (*flushWork, map[int]error, error) {
	db.commitMu.Lock()
	defer db.commitMu.Unlock()
	start := time.Now()
	now := db.opts.Now().UnixMilli()
	var fw *flushWork
	if withFlush {
		fw = db.takeFlush()
	}
	var failed map[int]error
	var bt *batchTx
	var err error
	for {
		bt = newBatchTx(db, now)
		bad, badErr := -1, error(nil)
		err = db.bolt.Update(func(tx *bbolt.Tx) error {
			bt.begin(tx)
			if fw != nil {
				if err := fw.write(tx); err != nil {
					return err
				}
			}
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
	done := time.Now()
	if err == nil {
		bt.publish()
		for _, r := range batch {
			r.result.CommitStart, r.result.CommitDone = start, done
		}
	} else {
		err = fmt.Errorf("reflection: commit of %d requests: %w", len(batch), err)
		db.log.Error().Err(err).Msg("reflection: commit failed")
	}
	if fw != nil {
		db.finishFlush(fw, err)
	}
	if db.opts.OnCommit != nil {
		db.opts.OnCommit(len(batch), done.Sub(start), err)
	}
	return fw, failed, err
}

// CommitterBusy is how long the committer has been working (committing,
// completing requests) since Open; its rate of increase is the fraction
// of time the committer is busy, which decides how long a write waits
// for its commit.
func (db *DB) CommitterBusy() time.Duration { return time.Duration(db.busy.Load()) }

// commitDirect applies reqs in one transaction of their own, bypassing the
// queue: used at Open (before the committer runs) and by benchmarks.
func (db *DB) commitDirect(reqs ...*request) error {
	err := db.commitDirectLocked(reqs)
	for _, r := range reqs {
		r.complete(err)
	}
	return err
}

func (db *DB) commitDirectLocked(reqs []*request) error {
	db.commitMu.Lock()
	defer db.commitMu.Unlock()
	bt := newBatchTx(db, db.opts.Now().UnixMilli())
	err := db.bolt.Update(func(tx *bbolt.Tx) error {
		bt.begin(tx)
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
	return err
}

// flushWork is one lazy flush taken out of memory: the cursor records of
// the groups whose acks changed (encoded when taken, so they include every
// ack that made one of the dead entries dead), up to DeleteChunk dead log
// entries, and the acks' done callbacks. Rule: a log entry is deleted only
// in a transaction that also writes the cursors that made it dead, or after
// one that did (a drop or purge writes its cursor in its own commit).
type flushWork struct {
	cursors map[GroupID][]byte
	dead    []uint64
	acks    int
	done    []func(error)
	clean   bool // also mark the file as cleanly closed
}

func (db *DB) takeFlush() *flushWork {
	m := db.mem
	m.mu.Lock()
	defer m.mu.Unlock()
	fw := &flushWork{cursors: make(map[GroupID][]byte, len(m.dirty)), acks: m.acks, done: m.ackDone}
	for g := range m.dirty {
		// A group without slots had its cursor record deleted by the
		// commit that dropped them: nothing to write.
		if cs := m.cursors(g); cs != nil {
			fw.cursors[g] = encodeCursors(cs)
		}
	}
	n := min(len(m.dead), db.opts.DeleteChunk)
	fw.dead = append([]uint64(nil), m.dead[:n]...)
	m.dead = append(m.dead[:0], m.dead[n:]...)
	m.dirty = make(map[GroupID]struct{})
	m.acks, m.ackDone = 0, nil
	m.workSince = time.Time{}
	if len(m.dead) > 0 {
		m.noteWork()
	}
	return fw
}

func (fw *flushWork) write(tx *bbolt.Tx) error {
	cb := tx.Bucket(bucketCursors)
	for g, rec := range fw.cursors {
		if err := cb.Put(g[:], rec); err != nil {
			return fmt.Errorf("reflection: put cursors %s: %w", g, err)
		}
	}
	lb := tx.Bucket(bucketLog)
	for _, lsn := range fw.dead {
		if err := lb.Delete(u64key(lsn)); err != nil {
			return fmt.Errorf("reflection: delete log entry %d: %w", lsn, err)
		}
	}
	if fw.clean {
		return tx.Bucket(bucketMeta).Put(keyClean, []byte{1})
	}
	return nil
}

// complete reports the acks of a committed flush durable. Called after
// commitMu is released.
func (fw *flushWork) complete() {
	for _, done := range fw.done {
		done(nil)
	}
}

// finishFlush puts the work of a failed flush back into memory (a
// committed flush is completed by the caller, outside commitMu).
func (db *DB) finishFlush(fw *flushWork, err error) {
	if err == nil {
		return
	}
	m := db.mem
	m.mu.Lock()
	for g := range fw.cursors {
		m.dirty[g] = struct{}{}
	}
	m.dead = append(fw.dead, m.dead...)
	m.acks += fw.acks
	m.ackDone = append(fw.done, m.ackDone...)
	m.noteWork()
	m.mu.Unlock()
}

// flush commits one lazy flush on its own.
func (db *DB) flush(clean bool) error {
	fw, err := db.flushLocked(clean)
	if err == nil {
		fw.complete()
	}
	return err
}

func (db *DB) flushLocked(clean bool) (*flushWork, error) {
	db.commitMu.Lock()
	defer db.commitMu.Unlock()
	start := time.Now()
	fw := db.takeFlush()
	if clean {
		db.mem.mu.RLock()
		fw.clean = len(db.mem.dead) == 0
		db.mem.mu.RUnlock()
	}
	err := db.bolt.Update(func(tx *bbolt.Tx) error {
		if err := fw.write(tx); err != nil {
			return err
		}
		return db.runTestHook(0)
	})
	if err != nil {
		err = fmt.Errorf("reflection: flush: %w", err)
		db.log.Error().Err(err).Msg("reflection: writing acks failed")
		db.flushRetry = time.Now().Add(db.opts.AckFlushInterval)
	}
	db.finishFlush(fw, err)
	if db.opts.OnCommit != nil {
		db.opts.OnCommit(0, time.Since(start), err)
	}
	return fw, err
}

// closeFlush writes every ack still in memory and reclaims dead entries (a
// bounded number of chunks) before the committer exits. The last commit
// marks the file clean if nothing is left to reclaim.
func (db *DB) closeFlush() {
	for range closeReclaimChunks {
		db.mem.mu.RLock()
		more := len(db.mem.dead) > db.opts.DeleteChunk
		db.mem.mu.RUnlock()
		if !more {
			break
		}
		if db.flush(false) != nil {
			break
		}
	}
	if err := db.flush(true); err != nil {
		// Fail the acks' callbacks rather than leave them hanging.
		db.mem.mu.Lock()
		done := db.mem.ackDone
		db.mem.ackDone = nil
		db.mem.mu.Unlock()
		for _, d := range done {
			d(err)
		}
	}
}

func (db *DB) runTestHook(batch int) error {
	if h := db.testHookBeforeCommit.Load(); h != nil {
		return (*h)(batch)
	}
	return nil
}
