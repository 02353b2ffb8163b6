package reflection

import (
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fillQueue appends n reflections from sender through the normal API,
// submitted all at once so they commit in a few maxBatch-sized batches.
func fillQueue(t testing.TB, db *DB, g GroupID, sender DeviceID, n int, env []byte) {
	t.Helper()
	var wg sync.WaitGroup
	var failed atomic.Int64
	wg.Add(n)
	for range n {
		db.Append(AppendRequest{Group: g, Sender: sender, Envelope: env}, func(res AppendResult, err error) {
			if err != nil || len(res.Dropped) != 0 {
				failed.Add(1)
			}
			wg.Done()
		})
	}
	wg.Wait()
	if failed.Load() != 0 {
		t.Fatalf("%d appends failed or dropped", failed.Load())
	}
}

// Dropping a slot with a full (25,000-entry) queue must not stall other
// groups: the queue is deleted DeleteChunk keys per commit, interleaved
// with normal batches.
func TestChunkedDeleteDoesNotStallOtherGroups(t *testing.T) {
	var chunks atomic.Int64
	var chunkTime atomic.Int64
	var counting atomic.Bool
	path := dbPath(t)
	db := openAt(t, path, Options{OnCommit: func(batch int, took time.Duration, err error) {
		// Reclaiming rides along with batches or commits on its own:
		// count every commit while it runs.
		if counting.Load() && err == nil {
			chunks.Add(1)
			chunkTime.Add(int64(took))
		}
	}})
	big, other := gid(40), gid(41)
	putSlots(t, db, big, 1, 2)
	putSlots(t, db, other, 1, 2)
	fillQueue(t, db, big, 1, DefaultMaxQueueLength, make([]byte, 100))
	wantStats(t, db, big, 2, QueueStats{Length: DefaultMaxQueueLength, Bytes: 100 * DefaultMaxQueueLength, NextSeq: DefaultMaxQueueLength + 1})

	counting.Store(true)
	mustDo(t, func(done func(error)) { db.DeleteSlot(big, 2, &Tombstone{Reason: Dropped, At: 1}, done) })
	var during []time.Duration
	for db.reclaimPending() {
		start := time.Now()
		appendSync(t, db, AppendRequest{Group: other, Sender: 1, Envelope: []byte("hello")})
		took := time.Since(start)
		if db.reclaimPending() { // still deleting when the append completed
			during = append(during, took)
		}
	}
	if len(during) == 0 {
		t.Fatal("the queue was deleted before any append could overlap; test proves nothing")
	}
	slices.Sort(during)
	t.Logf("%d appends to another group during the deletion: median %v, max %v; deletion took %d chunk commits, %v in total",
		len(during), during[len(during)/2], during[len(during)-1], chunks.Load(), time.Duration(chunkTime.Load()))
	// Deleted in one commit, the queue would hold an append for the whole
	// deletion; chunked, an append waits for one chunk at most. Compared
	// with the deletion's own total, not with a fixed time, so a loaded
	// machine (which slows both alike) does not fail it.
	total := time.Duration(chunkTime.Load())
	if worst := during[len(during)-1]; worst >= total/2 {
		t.Fatalf("an append to another group took %v while a queue was being deleted (the deletion's commits took %v in all)", worst, total)
	}
	if got := chunks.Load(); got < DefaultMaxQueueLength/DefaultDeleteChunk {
		t.Fatalf("only %d chunk commits for %d keys", got, DefaultMaxQueueLength)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Check(path); err != nil {
		t.Fatal(err)
	}
}

// Reclaiming dropped and purged queues continues after a restart.
func TestReclaimResumesAfterRestart(t *testing.T) {
	path := dbPath(t)
	db := openAt(t, path, Options{DeleteChunk: 100})
	paused := func(batch int) error {
		if batch == 0 {
			return errors.New("paused")
		}
		return nil
	}
	db.testHookBeforeCommit.Store(&paused)
	g := gid(42)
	putSlots(t, db, g, 1, 2, 3)
	fillQueue(t, db, g, 1, 1000, []byte("x"))
	mustDo(t, func(done func(error)) { db.DeleteSlot(g, 2, nil, done) })
	mustDo(t, func(done func(error)) { db.PurgeQueue(g, 3, done) })
	wantStats(t, db, g, 3, QueueStats{NextSeq: 1001})
	if !db.reclaimPending() {
		t.Fatal("nothing to reclaim")
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db = openAt(t, path, Options{DeleteChunk: 100})
	if !db.reclaimPending() {
		t.Fatal("dead entries not found at Open")
	}
	waitReclaimed(t, db)
	// PurgeQueue kept the counter.
	res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("y")})
	if len(res.Delivered) != 1 || res.Delivered[0] != (Delivery{3, 1001}) {
		t.Fatalf("after purge delivered %v", res.Delivered)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Check(path); err != nil {
		t.Fatal(err)
	}
}
