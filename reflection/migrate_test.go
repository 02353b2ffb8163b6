package reflection

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"go.etcd.io/bbolt"
)

// copyFixture copies testdata/v1.db (written by the schema-1 code, see
// fixture_test.go) to a temporary path.
func copyFixture(t *testing.T) string {
	t.Helper()
	raw, err := os.ReadFile("testdata/v1.db")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "mediator.db")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func expectedV1(t *testing.T) storeDump {
	t.Helper()
	raw, err := os.ReadFile("testdata/v1.expected.json")
	if err != nil {
		t.Fatal(err)
	}
	var want storeDump
	if err := json.Unmarshal(raw, &want); err != nil {
		t.Fatal(err)
	}
	entries := 0
	for _, g := range want.Groups {
		for _, q := range g.Queues {
			entries += len(q.Entries)
		}
	}
	if len(want.Groups) != 4 || entries < 40 {
		t.Fatalf("expected state has %d groups, %d entries", len(want.Groups), entries)
	}
	return want
}

// compareDump compares what the store reads back with what the schema-1
// code read from the same file: every slot, tombstone and shared-data
// value, every queue entry (seq, timestamp, envelope) and every counter.
func compareDump(t *testing.T, db *DB, want storeDump) {
	t.Helper()
	got := dumpStore(t, db)
	// Round-trip through JSON so nil and empty slices compare equal.
	raw, err := json.Marshal(got)
	if err != nil {
		t.Fatal(err)
	}
	got = storeDump{}
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatal(err)
	}
	if len(got.Groups) != len(want.Groups) {
		t.Fatalf("%d groups, want %d", len(got.Groups), len(want.Groups))
	}
	for i := range want.Groups {
		if !reflect.DeepEqual(got.Groups[i], want.Groups[i]) {
			g, _ := json.MarshalIndent(got.Groups[i], "", " ")
			w, _ := json.MarshalIndent(want.Groups[i], "", " ")
			t.Fatalf("group %d differs:\ngot  %s\nwant %s", i, g, w)
		}
	}
}

func schemaOf(t *testing.T, path string) (uint32, bool) {
	t.Helper()
	b, err := bbolt.Open(path, 0o600, boltOptions(Options{}, true))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var v uint32
	var migrating bool
	_ = b.View(func(tx *bbolt.Tx) error {
		v = beUint32(tx.Bucket(bucketMeta).Get(keySchema))
		migrating = tx.Bucket(bucketMeta).Get(keyMigrating) != nil
		return nil
	})
	return v, migrating
}

func TestMigrateV1Fixture(t *testing.T) {
	path := copyFixture(t)
	if v, _ := schemaOf(t, path); v != 1 {
		t.Fatalf("fixture has schema %d", v)
	}
	db := openAt(t, path, Options{Now: newClock(fixtureReopenMs).now, MaxQueueLength: 40, DeleteChunk: 7})
	compareDump(t, db, expectedV1(t))
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if v, m := schemaOf(t, path); v != schemaVersion || m {
		t.Fatalf("after migration: schema %d, migrating %v", v, m)
	}
	if err := Check(path); err != nil {
		t.Fatalf("Check after migration: %v", err)
	}
	// Reopened as schema 2, the state is the same, and the store works:
	// counters continue, the re-created slot keeps only its own entry.
	db = openAt(t, path, Options{Now: newClock(fixtureReopenMs).now, MaxQueueLength: 40})
	compareDump(t, db, expectedV1(t))
	g4 := gid(4)
	res := appendSync(t, db, AppendRequest{Group: g4, Sender: 1, Envelope: []byte("after")})
	if len(res.Delivered) != 1 || res.Delivered[0] != (Delivery{2, 2}) {
		t.Fatalf("delivered %v", res.Delivered)
	}
	envelopesEqual(t, readAll(t, db, g4, 2), "g4-new-incarnation", "after")
	g1 := gid(1)
	res = appendSync(t, db, AppendRequest{Group: g1, Sender: 10, Envelope: []byte("x")})
	if res.Delivered[0] != (Delivery{20, 12}) || res.Delivered[1] != (Delivery{30, 12}) {
		t.Fatalf("delivered %v", res.Delivered)
	}
}

// A migration killed half-way (here: a chunk transaction fails) leaves a
// file the next Open finishes; nothing is lost or duplicated.
func TestMigrateResumesAfterFailure(t *testing.T) {
	path := copyFixture(t)
	injected := errors.New("injected: killed")
	chunks := 0
	testHookMigrateChunk = func(chunk int) error {
		chunks++
		if chunk == 3 {
			return injected
		}
		return nil
	}
	t.Cleanup(func() { testHookMigrateChunk = nil })
	opts := Options{Now: newClock(fixtureReopenMs).now, MaxQueueLength: 40, DeleteChunk: 5}
	if _, err := Open(path, opts); !errors.Is(err, injected) {
		t.Fatalf("Open: %v, want the injected failure", err)
	}
	if v, m := schemaOf(t, path); v != 1 || !m {
		t.Fatalf("after the failed migration: schema %d, migrating %v", v, m)
	}
	if err := Check(path); err == nil {
		t.Fatal("Check passed a half-migrated file")
	}
	testHookMigrateChunk = nil
	db := openAt(t, path, opts)
	compareDump(t, db, expectedV1(t))
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Check(path); err != nil {
		t.Fatal(err)
	}
}
