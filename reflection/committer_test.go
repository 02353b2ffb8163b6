package reflection

import (
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/bbolt"
)

// The engine-independent committer tests (done callbacks in submission
// order, Close completing queued writes) are in package storetest's suite;
// these need the bbolt engine's internals: a hook inside its transaction,
// a record corrupted in its file, its lock file and file modes.

// blockFirstBatch installs a hook that holds the committer inside the
// transaction of the next batch until release is called, so the test can
// queue several requests that then form one batch. after runs for every
// later request batch.
func blockFirstBatch(t *testing.T, db *DB, after func(batch int) error) (entered <-chan struct{}, release func()) {
	t.Helper()
	in, gate := make(chan struct{}), make(chan struct{})
	var calls atomic.Int64
	hook := func(batch int) error {
		if batch == 0 {
			return nil // background work
		}
		switch calls.Add(1) {
		case 1:
			close(in)
			<-gate
			return nil
		default:
			return after(batch)
		}
	}
	db.testHookBeforeCommit.Store(&hook)
	t.Cleanup(func() { db.testHookBeforeCommit.Store(nil) })
	return in, func() { close(gate) }
}

func TestFailedCommitFailsWholeBatchAndKeepsMemory(t *testing.T) {
	db := openAt(t, dbPath(t), Options{})
	g := gid(31)
	putSlots(t, db, g, 1, 2)
	appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("a")})
	appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("b")})
	statsBefore, _ := db.QueueStats(g, 2)

	injected := errors.New("injected: disk full")
	var failedBatch atomic.Int64
	var fail atomic.Bool
	fail.Store(true)
	entered, release := blockFirstBatch(t, db, func(batch int) error {
		if fail.Load() {
			failedBatch.Store(int64(batch))
			return injected
		}
		return nil
	})

	warm := make(chan error, 1)
	db.PutSlot(g, Slot{DeviceID: 9}, func(err error) { warm <- err })
	<-entered // the committer now sits inside the warm-up transaction

	errs := make(chan error, 16)
	onErr := func(err error) { errs <- err }
	onRes := func(_ AppendResult, err error) { errs <- err }
	db.Append(AppendRequest{Group: g, Sender: 1, Envelope: []byte("c")}, onRes)
	db.Append(AppendRequest{Group: g, Sender: 1, Envelope: []byte("e"), Ephemeral: true}, onRes)
	db.Append(AppendRequest{Group: g, Sender: 1, Envelope: []byte("h"), Hold: true}, onRes)
	db.PutSlot(g, Slot{DeviceID: 3}, onErr)
	db.DeleteSlot(g, 2, &Tombstone{Reason: Dropped, At: 1}, onErr)
	db.SetSharedDeviceData(g, []byte("s"), onErr)
	const n = 6
	release()
	if err := <-warm; err != nil {
		t.Fatalf("warm-up: %v", err)
	}
	for range n {
		if err := <-errs; !errors.Is(err, injected) {
			t.Fatalf("request error %v, want the injected one", err)
		}
	}
	if got := failedBatch.Load(); got != n {
		t.Fatalf("failed batch had %d requests, want %d (one transaction)", got, n)
	}

	// Memory and disk are as before the failed batch.
	if got, ok := db.QueueStats(g, 2); !ok || got != statsBefore {
		t.Fatalf("QueueStats(2) = %+v %v, want %+v", got, ok, statsBefore)
	}
	if _, ok := db.QueueStats(g, 3); ok {
		t.Fatal("slot 3 from the failed batch is in the index")
	}
	if got := seqs(readAll(t, db, g, 2)); !equalSeqs(got, []uint64{1, 2}) {
		t.Fatalf("queue 2: %v", got)
	}
	st, _ := db.Group(g)
	if len(st.Slots) != 3 || st.SharedDeviceData != nil || st.Tombstones != nil {
		t.Fatalf("group after failed batch: %+v", st)
	}

	// The committer keeps running; the next batch succeeds and the counter
	// was not advanced by the failed one.
	fail.Store(false)
	res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("d")})
	if res.Delivered[0] != (Delivery{2, 3}) {
		t.Fatalf("after recovery delivered %v, want seq 3 for slot 2", res.Delivered)
	}
}

// One request that cannot be applied (a corrupt record) fails alone; the
// rest of its batch commits.
func TestBadRequestFailsAlone(t *testing.T) {
	db := openAt(t, dbPath(t), Options{})
	g := gid(32)
	putSlots(t, db, g, 1, 2)
	// Corrupt held key for sender 5 (9 bytes instead of 16).
	err := db.bolt.Update(func(tx *bbolt.Tx) error {
		return tx.Bucket(bucketHeld).Put(append(heldKey(g, 5, 0)[:40], 'x'), []byte("12345678"))
	})
	if err != nil {
		t.Fatal(err)
	}
	entered, release := blockFirstBatch(t, db, func(int) error { return nil })
	db.SetSharedDeviceData(g, []byte("warm"), nil)
	<-entered
	type out struct {
		res AppendResult
		err error
	}
	outs := make(chan out, 3)
	done := func(res AppendResult, err error) { outs <- out{res, err} }
	db.Append(AppendRequest{Group: g, Sender: 1, Envelope: []byte("A")}, done)
	db.ReleaseHeld(g, 5, done)
	db.Append(AppendRequest{Group: g, Sender: 1, Envelope: []byte("B")}, done)
	release()
	a, rel, b := <-outs, <-outs, <-outs
	if a.err != nil || b.err != nil || rel.err == nil {
		t.Fatalf("errors: A %v, release %v, B %v", a.err, rel.err, b.err)
	}
	envelopesEqual(t, readAll(t, db, g, 2), "A", "B")
	if b.res.Delivered[0].Seq != 2 {
		t.Fatalf("B delivered %v", b.res.Delivered)
	}
}

func TestOpenFailsWhenLocked(t *testing.T) {
	path := dbPath(t)
	openAt(t, path, Options{})
	start := time.Now()
	_, err := Open(path, Options{})
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open: %v, want ErrLocked", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("second Open took %v", took)
	}
	t.Logf("second Open: %v after %v", err, time.Since(start).Round(time.Millisecond))
	if err := Check(path); !errors.Is(err, ErrLocked) {
		t.Fatalf("Check on an open database: %v", err)
	}
	if _, err := Compact(path); !errors.Is(err, ErrLocked) {
		t.Fatalf("Compact on an open database: %v", err)
	}
}

func TestFileModes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "new", "dir", "m.db")
	openAt(t, path, Options{})
	for p, want := range map[string]os.FileMode{filepath.Dir(path): 0o700, path: 0o600} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode().Perm(); got != want {
			t.Fatalf("%s mode %o, want %o", p, got, want)
		}
	}
}
