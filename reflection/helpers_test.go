package reflection

import (
	"bytes"
	"fmt"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// clock is a settable Options.Now.
type clock struct{ ms atomic.Int64 }

func newClock(ms int64) *clock {
	c := &clock{}
	c.ms.Store(ms)
	return c
}
func (c *clock) now() time.Time { return time.UnixMilli(c.ms.Load()) }
func (c *clock) set(ms int64)   { c.ms.Store(ms) }

func gid(n byte) GroupID {
	var g GroupID
	for i := range g {
		g[i] = n
	}
	return g
}

func dbPath(t testing.TB) string { return filepath.Join(t.TempDir(), "data", "mediator.db") }

// openAt opens path and closes it at the end of the test (a second Close
// by the test itself is harmless).
func openAt(t testing.TB, path string, opts Options) *DB {
	t.Helper()
	db, err := Open(path, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func mustDo(t testing.TB, fn func(done func(error))) {
	t.Helper()
	if err := Sync(fn); err != nil {
		t.Fatal(err)
	}
}

func putSlots(t testing.TB, db *DB, g GroupID, ids ...DeviceID) {
	t.Helper()
	for _, d := range ids {
		s := Slot{DeviceID: d, DeviceInfo: []byte(fmt.Sprintf("info-%d", d)), Policy: Persistent, CreatedAt: 1}
		mustDo(t, func(done func(error)) { db.PutSlot(g, s, done) })
	}
}

func appendSync(t testing.TB, db *DB, r AppendRequest) AppendResult {
	t.Helper()
	res, err := SyncAppend(func(done func(AppendResult, error)) { db.Append(r, done) })
	if err != nil {
		t.Fatalf("Append: %v", err)
	}
	return res
}

func releaseSync(t testing.TB, db *DB, g GroupID, sender DeviceID) AppendResult {
	t.Helper()
	res, err := SyncAppend(func(done func(AppendResult, error)) { db.ReleaseHeld(g, sender, done) })
	if err != nil {
		t.Fatalf("ReleaseHeld: %v", err)
	}
	return res
}

func ack(t testing.TB, db *DB, g GroupID, d DeviceID, seq uint64) {
	t.Helper()
	db.Ack(g, d, seq, nil) // takes effect in memory before it returns
}

func readAll(t testing.TB, db *DB, g GroupID, d DeviceID) []Entry {
	t.Helper()
	es, err := db.ReadQueue(g, d, 0, 1<<30)
	if err != nil {
		t.Fatalf("ReadQueue: %v", err)
	}
	return es
}

func seqs(es []Entry) []uint64 {
	out := make([]uint64, len(es))
	for i, e := range es {
		out[i] = e.Seq
	}
	return out
}

func equalSeqs(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func wantStats(t testing.TB, db *DB, g GroupID, d DeviceID, want QueueStats) {
	t.Helper()
	got, ok := db.QueueStats(g, d)
	if !ok {
		t.Fatalf("QueueStats(%d): slot missing", d)
	}
	if got != want {
		t.Fatalf("QueueStats(%d) = %+v, want %+v", d, got, want)
	}
}

func envelopesEqual(t testing.TB, es []Entry, want ...string) {
	t.Helper()
	if len(es) != len(want) {
		t.Fatalf("got %d entries, want %d", len(es), len(want))
	}
	for i := range es {
		if !bytes.Equal(es[i].Envelope, []byte(want[i])) {
			t.Fatalf("entry %d = %q, want %q", i, es[i].Envelope, want[i])
		}
	}
}

// waitReclaimed waits until the committer has deleted every dead log entry.
func waitReclaimed(t testing.TB, db *DB) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for db.reclaimPending() {
		if time.Now().After(deadline) {
			t.Fatal("dead log entries not reclaimed")
		}
		time.Sleep(2 * time.Millisecond)
	}
}
