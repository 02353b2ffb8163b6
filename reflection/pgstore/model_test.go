package pgstore

import (
	"context"
	"math"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5"

	"d2m-mediator/internal/pgtest"
	"d2m-mediator/reflection"
	"d2m-mediator/reflection/storetest"
)

// The model-based test of the PostgreSQL engine: package storetest's
// model against a real primary with a synchronous standby. A crash stops
// the committer without writing its lazy acks; a move is another node
// claiming the shard with a higher epoch and this node claiming it back.

type pgEngine struct {
	dsn string
	// single: Open runs a single node (no Epoch), which claims every
	// shard, as the store test suite expects; Move is then not possible.
	single bool

	mu     sync.Mutex
	epochs [256]int64 // this node's epoch per shard
	// stored: the queues as a move found them before the peer's claim
	// released held reflections into them (what the lost acks left).
	stored map[slotRef][]uint64
}

func newPGEngine(t testing.TB) *pgEngine {
	e := &pgEngine{dsn: pgtest.Shared(t).NewDatabase(t)}
	for i := range e.epochs {
		e.epochs[i] = 1
	}
	return e
}

func (e *pgEngine) epoch(sh byte) (int64, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.epochs[sh], true
}

func (e *pgEngine) Open(t testing.TB, opts reflection.Options) reflection.Store {
	// A new process gets new epochs, as a node re-joining a cluster does.
	e.mu.Lock()
	for i := range e.epochs {
		e.epochs[i] += 2
	}
	e.mu.Unlock()
	o := Options{Store: opts, Epoch: e.epoch, NodeID: "model"}
	if e.single {
		o.Epoch, o.NodeID = nil, "suite"
	}
	s, err := Open(context.Background(), e.dsn, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	if e.single {
		return s
	}
	// A fresh node claims every shard before serving it; the model's
	// groups are two shards, claimed here so held reflections are
	// released at "open" as the model expects.
	for _, g := range []byte{1, 2} {
		if _, err := s.ensureClaimed(g); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

func (e *pgEngine) Stop(t testing.TB, st reflection.Store, crash bool) {
	e.stored = nil
	s := st.(*Store)
	if crash {
		s.mu.Lock()
		s.closed, s.abandoned = true, true
		s.mu.Unlock()
		s.poke()
		<-s.stopped
		s.pool.Close()
		return
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

func (e *pgEngine) Stored(t testing.TB, g reflection.GroupID, d reflection.DeviceID) []uint64 {
	if e.stored != nil {
		return e.stored[slotRef{g, d}]
	}
	return e.read(t, g, d)
}

func (e *pgEngine) read(t testing.TB, g reflection.GroupID, d reflection.DeviceID) []uint64 {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, e.dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, _ := conn.Query(ctx, `SELECT seq FROM d2m_queue WHERE group_id = $1 AND device_id = $2 ORDER BY seq`, g[:], int64(d))
	seqs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (uint64, error) {
		var s int64
		err := r.Scan(&s)
		return uint64(s), err
	})
	if err != nil {
		t.Fatal(err)
	}
	return seqs
}

func (e *pgEngine) Check(t testing.TB) {
	if _, err := Check(context.Background(), e.dsn); err != nil {
		t.Fatal(err)
	}
}

// Move: this node loses the shard (its epoch moves on, so nothing more
// of the shard is written from here), a peer claims it, and this node
// claims it back with a newer epoch. The peer's claim delivers held
// reflections; acks not yet written here are lost.
func (e *pgEngine) Move(t testing.TB, st reflection.Store, g reflection.GroupID) (bool, bool) {
	if e.single {
		t.Fatal("pgEngine: Move needs epochs per shard, not a single node")
	}
	sh := g[0]
	e.mu.Lock()
	peerEpoch := e.epochs[sh] + 1
	e.epochs[sh] += 2
	e.mu.Unlock()
	// From here this node writes nothing of the shard (a batch that
	// starts now leaves its acks out); a barrier through the committer
	// waits for a batch already under way. Then take what is stored
	// before the peer's claim changes it.
	if err := reflection.Sync(func(done func(error)) { st.PruneTombstones(math.MinInt64, done) }); err != nil {
		t.Fatal(err)
	}
	e.stored = make(map[slotRef][]uint64)
	for _, d := range []reflection.DeviceID{1, 2, 3, 4} {
		e.stored[slotRef{g, d}] = e.read(t, g, d)
	}
	peer, err := Open(context.Background(), e.dsn, Options{
		Store:  reflection.Options{Now: st.(*Store).so.Now, MaxQueueLength: st.(*Store).so.MaxQueueLength, MaxQueueBytes: st.(*Store).so.MaxQueueBytes},
		NodeID: "peer",
		Epoch: func(s byte) (int64, bool) {
			if s == sh {
				return peerEpoch, true
			}
			return 0, false
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if owned, err := peer.ensureClaimed(sh); err != nil || !owned {
		t.Fatalf("peer claiming shard %x: %v %v", sh, owned, err)
	}
	if err := peer.Close(); err != nil {
		t.Fatal(err)
	}
	return true, true
}

// TestStoreSuite runs the engine-independent store tests on PostgreSQL,
// each on a database of its own, in parallel.
func TestStoreSuite(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T) storetest.Engine {
		t.Parallel()
		e := newPGEngine(t)
		e.single = true
		return e
	})
}

func runPGModel(t testing.TB, ops []byte) {
	storetest.RunModel(t, newPGEngine(t), ops, nil)
}

func TestModel(t *testing.T) {
	t.Parallel()
	steps := 300
	if testing.Short() {
		steps = 100
	}
	storetest.Seeds(t, 4, steps, func(t *testing.T, ops []byte) {
		t.Parallel()
		runPGModel(t, ops)
	})
}

func FuzzModel(f *testing.F) {
	for _, s := range storetest.FuzzSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, ops []byte) {
		if len(ops) > 4*200 {
			ops = ops[:4*200]
		}
		runPGModel(t, ops)
	})
}
