package reflection_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"d2m-mediator/reflection"
	"d2m-mediator/reflection/storetest"
)

// The model-based test of the bbolt engine: package storetest's model,
// with restarts and crashes on the file (a crash leaves the file as of the
// last commit) and shard moves by export and import through a peer file.

type boltEngine struct {
	path string
	opts reflection.Options
	peer *reflection.DB
	gen  int64 // generation of the last move's export
}

func (e *boltEngine) Open(t testing.TB, opts reflection.Options) reflection.Store {
	e.opts = opts
	db, err := reflection.Open(e.path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = db.Close() })
	return db
}

func (e *boltEngine) Stop(t testing.TB, s reflection.Store, crash bool) {
	db := s.(*reflection.DB)
	var image []byte
	if crash {
		var err error
		if image, err = db.CrashImage(); err != nil {
			t.Fatal(err)
		}
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if crash {
		if err := os.WriteFile(e.path, image, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func (e *boltEngine) Stored(t testing.TB, g reflection.GroupID, d reflection.DeviceID) []uint64 {
	seqs, err := reflection.StoredSeqs(e.path, g, d)
	if err != nil {
		t.Fatal(err)
	}
	return seqs
}

func (e *boltEngine) Check(t testing.TB) {
	if err := reflection.Check(e.path); err != nil {
		t.Fatalf("Check: %v", err)
	}
}

// Move exports the shard, imports it on the peer (replacing what an
// earlier move left there), drops it here, exports it from the peer and
// imports it here again. For the model a move loses nothing and adds
// nothing, except that the import releases held reflections.
func (e *boltEngine) Move(t testing.TB, s reflection.Store, g reflection.GroupID) (bool, bool) {
	db, ctx, shard := s.(*reflection.DB), context.Background(), g[0]
	if e.peer == nil {
		peer, err := reflection.Open(filepath.Join(t.TempDir(), "peer.db"), e.opts)
		if err != nil {
			t.Fatal(err)
		}
		e.peer = peer
		t.Cleanup(func() { _ = peer.Close() })
	}
	var out, back bytes.Buffer
	if _, err := db.ExportShard(ctx, shard, &out); err != nil {
		t.Fatal(err)
	}
	// Generations as a cluster gives them: each export's revision is
	// higher than the last.
	e.gen++
	there := e.gen
	if _, err := e.peer.ImportShard(ctx, shard, there, bytes.NewReader(out.Bytes())); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := db.DropShard(ctx, shard, there); err != nil || !ok {
		t.Fatalf("DropShard: dropped %v, %v", ok, err)
	}
	if st, err := db.Group(g); err != nil || len(st.Slots)+len(st.Tombstones)+len(st.SharedDeviceData) != 0 {
		t.Fatalf("group %x after DropShard: %+v %v", shard, st, err)
	}
	if _, err := e.peer.ExportShard(ctx, shard, &back); err != nil {
		t.Fatal(err)
	}
	e.gen++
	if _, err := db.ImportShard(ctx, shard, e.gen, &back); err != nil {
		t.Fatal(err)
	}
	// The import released held reflections (their transaction ended with
	// the holder's connection on the donor).
	return true, false
}

// ReclaimPending and StoredLog make the suite check the deletion of dead
// log records, which bbolt does in the background (storetest.Reclaimer).
func (e *boltEngine) ReclaimPending(s reflection.Store) bool {
	return s.(*reflection.DB).ReclaimPending()
}

func (e *boltEngine) StoredLog(t testing.TB) (live, dead int) {
	res, err := reflection.CheckReport(e.path)
	if err != nil {
		t.Fatal(err)
	}
	return res.LogEntries, res.Reclaimable
}

// ForEachPage makes the suite walk more than two of ForEachGroup's pages.
func (e *boltEngine) ForEachPage() int { return reflection.ForEachPage }

func newBoltEngine(t testing.TB) *boltEngine {
	return &boltEngine{path: filepath.Join(t.TempDir(), "data", "mediator.db")}
}

// TestStoreSuite runs the engine-independent store tests on bbolt; the
// tests of its internals stay in package reflection.
func TestStoreSuite(t *testing.T) {
	storetest.Run(t, func(t *testing.T) storetest.Engine { return newBoltEngine(t) })
}

func runBoltModel(t testing.TB, ops []byte) {
	storetest.RunModel(t, newBoltEngine(t), ops, func(s reflection.Store, g reflection.GroupID, d reflection.DeviceID) {
		if err := s.(*reflection.DB).CheckAckRanges(g, d); err != nil {
			t.Fatal(err)
		}
	})
}

func TestModel(t *testing.T) {
	steps := 400
	if testing.Short() {
		steps = 100
	}
	storetest.Seeds(t, 8, steps, func(t *testing.T, ops []byte) { runBoltModel(t, ops) })
}

func FuzzModel(f *testing.F) {
	for _, s := range storetest.FuzzSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, ops []byte) {
		if len(ops) > 4*300 {
			ops = ops[:4*300]
		}
		runBoltModel(t, ops)
	})
}
