package reflection

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"go.etcd.io/bbolt"
)

func TestBackupWhileWriting(t *testing.T) {
	db := openAt(t, dbPath(t), Options{})
	g := gid(60)
	putSlots(t, db, g, 1, 2)
	fillQueue(t, db, g, 1, 2000, []byte("payload"))
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(g, []byte("shared"), done) })

	// Keep writing while the backup streams.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
				appendSync(t, db, AppendRequest{Group: g, Sender: 2, Envelope: []byte("live")})
			}
		}
	}()
	var buf bytes.Buffer
	n, err := db.Backup(&buf)
	close(stop)
	wg.Wait()
	if err != nil || n != int64(buf.Len()) {
		t.Fatalf("Backup: %d bytes, %v", n, err)
	}
	backup := filepath.Join(t.TempDir(), "backup.db")
	if err := os.WriteFile(backup, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Check(backup); err != nil {
		t.Fatalf("Check(backup): %v", err)
	}
	bdb := openAt(t, backup, Options{})
	wantStats(t, bdb, g, 2, QueueStats{Length: 2000, Bytes: 2000 * 7, NextSeq: 2001})
	if st, _ := bdb.Group(g); string(st.SharedDeviceData) != "shared" || len(st.Slots) != 2 {
		t.Fatalf("backup group: %+v", st)
	}
}

func TestCompactShrinksAndKeepsCounters(t *testing.T) {
	path := dbPath(t)
	db := openAt(t, path, Options{})
	g := gid(61)
	putSlots(t, db, g, 1, 2)
	fillQueue(t, db, g, 1, 5000, make([]byte, 500))
	for seq := uint64(1); seq <= 5000; seq++ {
		db.Ack(g, 2, seq, nil)
	}
	ack(t, db, g, 2, 5000)
	mustDo(t, func(done func(error)) { db.DeleteSlot(g, 1, nil, done) }) // its queue is empty
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	usage, err := Usage(path)
	if err != nil {
		t.Fatal(err)
	}
	cres, err := Compact(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Compact: %+v → %+v", cres.Before, cres.After)
	if cres.Before != usage {
		t.Fatalf("Compact reports %+v before, Usage measured %+v", cres.Before, usage)
	}
	if cres.After.FileBytes >= cres.Before.FileBytes || cres.After.DataBytes > cres.Before.DataBytes {
		t.Fatalf("Compact did not shrink: %+v → %+v", cres.Before, cres.After)
	}
	// What it reports after is what the file is.
	fi, err := os.Stat(path)
	if err != nil || fi.Size() != cres.After.FileBytes || diskBytes(fi) != cres.After.DiskBytes ||
		cres.After.DataBytes > cres.After.FileBytes || cres.After.DataBytes <= 0 {
		t.Fatalf("after compaction: file %d bytes (%d on disk), reported %+v", fi.Size(), diskBytes(fi), cres.After)
	}
	if err := Check(path); err != nil {
		t.Fatal(err)
	}
	db = openAt(t, path, Options{})
	wantStats(t, db, g, 2, QueueStats{NextSeq: 5001})
	// New slots start at seq 1 and see only their own entries.
	putSlots(t, db, g, 1, 3)
	res := appendSync(t, db, AppendRequest{Group: g, Sender: 2, Envelope: []byte("z")})
	if len(res.Delivered) != 2 || res.Delivered[0] != (Delivery{1, 1}) || res.Delivered[1] != (Delivery{3, 1}) {
		t.Fatalf("delivered %v", res.Delivered)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Check(path); err != nil {
		t.Fatal(err)
	}
}

func TestCheckFindsSchemaProblems(t *testing.T) {
	path := dbPath(t)
	db := openAt(t, path, Options{})
	g := gid(62)
	putSlots(t, db, g, 1, 2)
	appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("a")})
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Check(path); err != nil {
		t.Fatalf("clean file: %v", err)
	}
	b, err := bbolt.Open(path, 0o600, boltOptions(Options{}, false))
	if err != nil {
		t.Fatal(err)
	}
	err = b.Update(func(tx *bbolt.Tx) error {
		other := gid(63)
		if err := tx.Bucket(bucketCursors).Put(other[:], encodeCursors([]slotCursor{{d: 1, counter: 3, acked: 5}})); err != nil {
			return err
		}
		return tx.Bucket(bucketLog).Put(u64key(1<<40), []byte("not a log record"))
	})
	if cerr := b.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	err = Check(path)
	if err == nil || !strings.Contains(err.Error(), "cursor for missing slot 1") || !strings.Contains(err.Error(), "log entry 1099511627776") {
		t.Fatalf("Check: %v", err)
	}
	if err := Check(filepath.Join(t.TempDir(), "missing.db")); err == nil {
		t.Fatal("Check of a missing file succeeded")
	}
}

// A log entry no slot needs is normal after a crash (Open reclaims it) but
// a leak after a clean close.
func TestCheckLeakedAfterCleanClose(t *testing.T) {
	path := dbPath(t)
	db := openAt(t, path, Options{})
	g := gid(64)
	putSlots(t, db, g, 1, 2)
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	res, err := CheckReport(path)
	if err != nil || !res.Clean || res.Slots != 2 {
		t.Fatalf("clean file: %+v %v", res, err)
	}
	dead := encodeLog(1, g, 1, []Delivery{{DeviceID: 9, Seq: 1}}, []byte("x")) // slot 9 does not exist
	put := func(clean bool) {
		b, err := bbolt.Open(path, 0o600, boltOptions(Options{}, false))
		if err != nil {
			t.Fatal(err)
		}
		err = b.Update(func(tx *bbolt.Tx) error {
			if !clean {
				return tx.Bucket(bucketMeta).Delete(keyClean)
			}
			return tx.Bucket(bucketLog).Put(u64key(1000), dead)
		})
		if cerr := b.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	put(true)
	if err := Check(path); err == nil || !strings.Contains(err.Error(), "1 leaked log entries") {
		t.Fatalf("Check after a clean close with a dead entry: %v", err)
	}
	put(false) // as a crash leaves it
	res, err = CheckReport(path)
	if err != nil || res.Reclaimable != 1 {
		t.Fatalf("after a crash: %+v %v", res, err)
	}
	db = openAt(t, path, Options{})
	waitReclaimed(t, db)
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if res, err := CheckReport(path); err != nil || res.Reclaimable != 0 || !res.Clean {
		t.Fatalf("after Open reclaimed it: %+v %v", res, err)
	}
}
