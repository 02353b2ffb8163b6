package reflection

import (
	"runtime"
	"testing"
)

// TestBacklogMemory measures what a 25,000-entry backlog costs in memory
// (the in-memory queue and the log entries' reference counts; the record
// cache is disabled, it is bounded separately by CacheBytes). After a
// restart the same state is rebuilt from the log.
//
//	go test -run TestBacklogMemory -v ./reflection/
func TestBacklogMemory(t *testing.T) {
	path := dbPath(t)
	opts := Options{CacheBytes: -1}
	db := openAt(t, path, opts)
	g := gid(70)
	putSlots(t, db, g, 1, 2)
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	fillQueue(t, db, g, 1, DefaultMaxQueueLength, make([]byte, 100))
	after := heap()
	perEntry := float64(int64(after)-int64(before)) / DefaultMaxQueueLength
	t.Logf("25,000-entry backlog: %.0f KiB heap, %.0f B per entry", float64(int64(after)-int64(before))/1024, perEntry)
	if perEntry > 200 {
		t.Fatalf("%.0f B of heap per queued entry", perEntry)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	before = heap()
	db = openAt(t, path, opts)
	after = heap()
	t.Logf("after a restart: %.0f KiB heap for the rebuilt index", float64(int64(after)-int64(before))/1024)
	wantStats(t, db, g, 2, QueueStats{Length: DefaultMaxQueueLength, Bytes: 100 * DefaultMaxQueueLength, NextSeq: DefaultMaxQueueLength + 1})
}
