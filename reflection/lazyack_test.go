package reflection

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// crashImage returns a copy of the file as of the last commit, as a crash
// at this moment would leave it (no commit is in progress under commitMu).
func crashImage(t *testing.T, db *DB) string {
	t.Helper()
	db.commitMu.Lock()
	raw, err := os.ReadFile(db.Path())
	db.commitMu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "crash.db")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// An ack changes memory at once; until it is flushed a crash brings the
// entry back (re-delivery), after its done fired it never does.
func TestLazyAckVisibleAtOnceDurableAfterDone(t *testing.T) {
	path := dbPath(t)
	db := openAt(t, path, Options{AckFlushInterval: time.Hour, AckFlushAcks: 1 << 20})
	g := gid(80)
	putSlots(t, db, g, 1, 2)
	appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("a")})
	appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("b")})

	done := make(chan error, 1)
	db.Ack(g, 2, 1, func(err error) { done <- err })
	wantStats(t, db, g, 2, QueueStats{Length: 1, Bytes: 1, NextSeq: 3})
	envelopesEqual(t, readAll(t, db, g, 2), "b")
	select {
	case err := <-done:
		t.Fatalf("ack done fired before any flush: %v", err)
	default:
	}

	// Crash now: the ack is lost, the entry is delivered again.
	img := openAt(t, crashImage(t, db), Options{})
	envelopesEqual(t, readAll(t, img, g, 2), "a", "b")
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}

	// Close flushes it.
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	re := openAt(t, path, Options{})
	envelopesEqual(t, readAll(t, re, g, 2), "b")
}

// AckFlushAcks acks make the flush due without waiting for the interval:
// the done of the last one fires although the interval is an hour.
func TestLazyAckFlushByCount(t *testing.T) {
	db := openAt(t, dbPath(t), Options{AckFlushInterval: time.Hour, AckFlushAcks: 3})
	g := gid(81)
	putSlots(t, db, g, 1, 2)
	for range 3 {
		appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("x")})
	}
	db.Ack(g, 2, 1, nil)
	db.Ack(g, 2, 3, nil) // out of order: kept as a run above the watermark
	mustDo(t, func(done func(error)) { db.Ack(g, 2, 2, done) })
	img := openAt(t, crashImage(t, db), Options{})
	wantStats(t, img, g, 2, QueueStats{NextSeq: 4})
}

// After the interval the flush happens on its own (the committer is idle),
// and with it the dead log entries are deleted.
func TestLazyAckFlushByTime(t *testing.T) {
	db := openAt(t, dbPath(t), Options{AckFlushInterval: 20 * time.Millisecond})
	g := gid(82)
	putSlots(t, db, g, 1, 2, 3)
	res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("x")})
	db.Ack(g, 2, res.Delivered[0].Seq, nil)
	if db.reclaimPending() {
		t.Fatal("entry dead while slot 3 still needs it")
	}
	start := time.Now()
	mustDo(t, func(done func(error)) { db.Ack(g, 3, res.Delivered[1].Seq, done) })
	t.Logf("ack durable after %v", time.Since(start).Round(time.Millisecond))
	if db.reclaimPending() {
		t.Fatal("the flush left the dead entry")
	}
	img := crashImage(t, db)
	res2, err := CheckReport(img)
	if err != nil || res2.LogEntries != 0 || res2.Reclaimable != 0 {
		t.Fatalf("crash image: %+v %v", res2, err)
	}
}
