package pgstore

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"

	"d2m-mediator/internal/pgtest"
	"d2m-mediator/reflection"
	"d2m-mediator/reflection/storetest"
)

// A node whose shard another node claimed with a higher epoch can never
// write (and so never ack) for it again: its next commit is refused by
// the fence statement, in the same transaction as the writes.
func TestFencedCommitIsRefused(t *testing.T) {
	t.Parallel()
	dsn := pgtest.Shared(t).NewDatabase(t)
	ctx := context.Background()
	g := storetest.GID(7)
	var fencedShard, fencedEpoch atomic.Int64
	fencedShard.Store(-1)
	a, err := Open(ctx, dsn, Options{NodeID: "a",
		Epoch: func(s byte) (int64, bool) { return 10, true },
		OnFenced: func(s byte, e int64) {
			fencedShard.Store(int64(s))
			fencedEpoch.Store(e)
		}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	for _, d := range []reflection.DeviceID{1, 2} {
		if err := reflection.Sync(func(done func(error)) { a.PutSlot(g, reflection.Slot{DeviceID: d, CreatedAt: 1}, done) }); err != nil {
			t.Fatal(err)
		}
	}
	res, err := reflection.SyncAppend(func(done func(reflection.AppendResult, error)) {
		a.Append(reflection.AppendRequest{Group: g, Sender: 1, Envelope: []byte("before")}, done)
	})
	if err != nil || len(res.Delivered) != 1 || res.Delivered[0].Seq != 1 {
		t.Fatalf("append before the takeover: %+v %v", res, err)
	}

	// Node b takes the shard over with a higher epoch.
	b, err := Open(ctx, dsn, Options{NodeID: "b", Epoch: func(s byte) (int64, bool) { return 11, s == g[0] }})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if owned, err := b.ensureClaimed(g[0]); err != nil || !owned {
		t.Fatalf("b claiming: %v %v", owned, err)
	}

	_, err = reflection.SyncAppend(func(done func(reflection.AppendResult, error)) {
		a.Append(reflection.AppendRequest{Group: g, Sender: 1, Envelope: []byte("after")}, done)
	})
	if !errors.Is(err, reflection.ErrFenced) {
		t.Fatalf("append by the old owner after the takeover: %v, want ErrFenced", err)
	}
	if fencedShard.Load() != int64(g[0]) || fencedEpoch.Load() != 10 {
		t.Fatalf("OnFenced got shard %d epoch %d, want %d and 10", fencedShard.Load(), fencedEpoch.Load(), g[0])
	}
	// In the database: b's epoch, and only the entry written before.
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var epoch int64
	var owner string
	if err := conn.QueryRow(ctx, `SELECT epoch, owner FROM d2m_shards WHERE shard = $1`, int32(g[0])).Scan(&epoch, &owner); err != nil {
		t.Fatal(err)
	}
	if epoch != 11 || owner != "b" {
		t.Fatalf("d2m_shards: epoch %d owner %q, want 11 and b", epoch, owner)
	}
	var envs [][]byte
	rows, _ := conn.Query(ctx, `SELECT envelope FROM d2m_queue WHERE group_id = $1 ORDER BY seq`, g[:])
	envs, err = pgx.CollectRows(rows, pgx.RowTo[[]byte])
	if err != nil || len(envs) != 1 || string(envs[0]) != "before" {
		t.Fatalf("queue rows %q %v, want only \"before\"", envs, err)
	}
	// The new owner serves the queue from the database.
	es, err := b.ReadQueue(g, 2, 0, 10)
	if err != nil || len(es) != 1 || string(es[0].Envelope) != "before" || es[0].Seq != 1 {
		t.Fatalf("b reads %+v %v", es, err)
	}
	// A claim with a lower epoch than the database's is refused too.
	c, err := Open(ctx, dsn, Options{NodeID: "c", Epoch: func(s byte) (int64, bool) { return 9, true }})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.ensureClaimed(g[0]); !errors.Is(err, reflection.ErrFenced) {
		t.Fatalf("claim with a stale epoch: %v, want ErrFenced", err)
	}
}

// Without a synchronous standby Open refuses, unless AllowAsync.
func TestOpenRefusesAsyncPrimary(t *testing.T) {
	t.Parallel()
	c := pgtest.Start(t, pgtest.Options{})
	dsn := c.NewDatabase(t)
	_, err := Open(context.Background(), dsn, Options{})
	if err == nil || !strings.Contains(err.Error(), "no synchronous standby") || !strings.Contains(err.Error(), "--store-allow-async") {
		t.Fatalf("Open without a standby: %v", err)
	}
	s, err := Open(context.Background(), dsn, Options{AllowAsync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if !strings.Contains(s.Replication, "asynchronous") {
		t.Fatalf("Replication = %q", s.Replication)
	}
}

// Appends write only queue rows, not the slot's counter column; when acks
// delete the rows, the counter must survive them (a Reflected id is never
// reused within a slot's life, docs/protocol.md §5.4).
func TestCounterSurvivesAckedQueue(t *testing.T) {
	t.Parallel()
	dsn := pgtest.Shared(t).NewDatabase(t)
	ctx := context.Background()
	s, err := Open(ctx, dsn, Options{})
	if err != nil {
		t.Fatal(err)
	}
	g := storetest.GID(9)
	for _, d := range []reflection.DeviceID{1, 2} {
		if err := reflection.Sync(func(done func(error)) { s.PutSlot(g, reflection.Slot{DeviceID: d, CreatedAt: 1}, done) }); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		if _, err := reflection.SyncAppend(func(done func(reflection.AppendResult, error)) {
			s.Append(reflection.AppendRequest{Group: g, Sender: 1, Envelope: []byte("x")}, done)
		}); err != nil {
			t.Fatal(err)
		}
	}
	for seq := uint64(1); seq <= 3; seq++ {
		if err := reflection.Sync(func(done func(error)) { s.Ack(g, 2, seq, done) }); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	s, err = Open(ctx, dsn, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if qs, ok := s.QueueStats(g, 2); !ok || qs != (reflection.QueueStats{NextSeq: 4}) {
		t.Fatalf("after acking everything and reopening: %+v %v, want NextSeq 4 and an empty queue", qs, ok)
	}
}
