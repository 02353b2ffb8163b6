package cluster

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"d2m-mediator/cluster"
)

// TestJoinAssignsAllShardsBalanced: three nodes join; the controller
// assigns all 256 shards, each node claims its own, and the counts differ
// by at most one. Every node's routing view agrees, and each node acks
// exactly for the shards it owns.
func TestJoinAssignsAllShardsBalanced(t *testing.T) {
	e := newEnv(t, nil, nodeOpts{})
	start := time.Now()
	a, b, c := e.start("node-a"), e.start("node-b"), e.start("node-c")
	waitUntil(t, 10*time.Second, "all shards served", func() bool { return allServed(a, b, c) })
	t.Logf("3 nodes joined and served all 256 shards in %v", time.Since(start).Round(time.Millisecond))

	counts := owned(a)
	for _, n := range []*testNode{a, b, c} {
		k := len(counts[n.id])
		if k < 85 || k > 86 {
			t.Fatalf("%s owns %d shards, want 85 or 86 (%v)", n.id, k, counts)
		}
		for i := range cluster.NumShards {
			s := cluster.Shard(i)
			owner, addr, epoch, ok := n.Owner(s)
			_, mine := n.Owns(s)
			if !ok || epoch <= 0 || addr == "" {
				t.Fatalf("%s: Owner(%s) = %q %q %d %v", n.id, s, owner, addr, epoch, ok)
			}
			if mine != (owner == n.id) || n.MayAck(s) != mine {
				t.Fatalf("%s: shard %s owner %s, Owns %v, MayAck %v", n.id, s, owner, mine, n.MayAck(s))
			}
			if mine {
				// Events arrive on the node's event goroutine, after MayAck.
				waitUntil(t, 5*time.Second, n.id+" gained "+s.String(), func() bool {
					ev, ok := n.lastEvent(s)
					return ok && ev.Kind == cluster.ShardGained && ev.Epoch == epoch
				})
				if evs := n.eventsFor(s); len(evs) != 1 {
					t.Fatalf("%s: events for %s: %+v, want one", n.id, s, evs)
				}
			}
		}
	}
	// etcd agrees: assign/ and shards/ name the same node, the owner key
	// is attached to the owner's lease.
	resp, err := e.admin.Get(t.Context(), e.prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	assigned, leases := map[string]string{}, map[string]int64{}
	for _, kv := range resp.Kvs {
		k := strings.TrimPrefix(string(kv.Key), e.prefix)
		switch {
		case strings.HasPrefix(k, "assign/"):
			assigned[k[len("assign/"):]] = string(kv.Value)
			if kv.Lease != 0 {
				t.Fatalf("%s has a lease", k)
			}
		case strings.HasPrefix(k, "nodes/"):
			leases[k[len("nodes/"):]] = kv.Lease
		}
	}
	for _, kv := range resp.Kvs {
		k := strings.TrimPrefix(string(kv.Key), e.prefix)
		if shard, ok := strings.CutPrefix(k, "shards/"); ok {
			owner, _, _, _ := a.Owner(mustShard(t, shard))
			if !strings.Contains(assigned[shard], `"node":"`+owner+`"`) || kv.Lease != leases[owner] || kv.Lease == 0 {
				t.Fatalf("shard %s: owner %s, assign %s, lease %x (node lease %x)", shard, owner, assigned[shard], kv.Lease, leases[owner])
			}
		}
	}
	if len(assigned) != 256 {
		t.Fatalf("%d assign keys", len(assigned))
	}
	// The HAProxy map routes every shard to its owner.
	lines := strings.Split(strings.TrimSpace(a.HAProxyMap()), "\n")
	if len(lines) != 257 {
		t.Fatalf("haproxy map has %d lines", len(lines))
	}
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		owner, _, _, _ := a.Owner(mustShard(t, f[0]))
		if len(f) != 2 || f[1] != owner {
			t.Fatalf("map line %q, owner %s", l, owner)
		}
	}
}

func mustShard(t *testing.T, s string) cluster.Shard {
	t.Helper()
	sh, err := cluster.ParseShard(s)
	if err != nil {
		t.Fatal(err)
	}
	return sh
}

// shardOf returns some shard n owns.
func shardOf(t *testing.T, n *testNode) cluster.Shard {
	t.Helper()
	for i := range cluster.NumShards {
		if _, ok := n.Owns(cluster.Shard(i)); ok {
			return cluster.Shard(i)
		}
	}
	t.Fatalf("%s owns no shard", n.id)
	return 0
}

// TestPlannedMove: a move goes through draining, exported and handed-over;
// the donor drains and exports, the recipient imports the same bytes;
// ownership flips to a higher epoch; the donor loses the shard, the
// recipient gains it, and every node routes to the recipient.
func TestPlannedMove(t *testing.T) {
	e := newEnv(t, nil, nodeOpts{})
	a, b, c := e.start("node-a"), e.start("node-b"), e.start("node-c")
	waitUntil(t, 10*time.Second, "all shards served", func() bool { return allServed(a, b, c) })
	s := shardOf(t, a)
	fromEpoch, _ := a.Owns(s)
	data := bytes.Repeat([]byte("queued reflection "), 1000)
	a.hooks.Put(s, data)

	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	res, err := c.Move(ctx, s, "node-b") // any node may start a move
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("move of shard %s took %v", s, res.Took)
	var states []string
	for _, sc := range res.States {
		states = append(states, string(sc.State))
	}
	if got := strings.Join(states, " "); got != "draining exported handed-over" {
		t.Fatalf("states %q", got)
	}
	if res.From != "node-a" || res.To != "node-b" || res.FromEpoch != fromEpoch || res.ToEpoch <= fromEpoch {
		t.Fatalf("result %+v (from epoch %d)", res, fromEpoch)
	}
	// The donor's copy goes once the recipient has it (by generation).
	waitUntil(t, 5*time.Second, "donor dropped its copy", func() bool { return a.callsFor(s) == "settle,drain,export,drop" })
	if _, has := a.hooks.Data(s); has {
		t.Fatal("donor still holds the shard's data after the hand-over")
	}
	if got := b.callsFor(s); got != "import" {
		t.Fatalf("recipient calls %q", got)
	}
	if got, _ := b.hooks.Data(s); !bytes.Equal(got, data) {
		t.Fatalf("recipient holds %d bytes, want %d", len(got), len(data))
	}
	// The caller's watch may see handed-over before the recipient has
	// recorded its flip.
	waitUntil(t, 5*time.Second, "recipient acks", func() bool {
		ep, ok := b.Owns(s)
		return ok && ep == res.ToEpoch && b.MayAck(s)
	})
	waitUntil(t, 5*time.Second, "donor lost the shard", func() bool {
		ev, ok := a.lastEvent(s)
		return ok && ev.Kind == cluster.ShardLost
	})
	if ev, _ := a.lastEvent(s); ev.Epoch != fromEpoch || ev.Cause != cluster.CauseMovedAway || ev.To != "node-b" || ev.Move != res.ID || a.MayAck(s) {
		t.Fatalf("donor event %+v, MayAck %v", ev, a.MayAck(s))
	}
	waitUntil(t, 5*time.Second, "recipient's gained event", func() bool { return len(b.eventsFor(s)) > 0 })
	if evs := b.eventsFor(s); len(evs) != 1 || evs[0].Kind != cluster.ShardGained || evs[0].Epoch != res.ToEpoch {
		t.Fatalf("recipient events %+v, want one gained at %d", evs, res.ToEpoch)
	}
	for _, n := range []*testNode{a, b, c} {
		waitUntil(t, 5*time.Second, n.id+" routes to node-b", func() bool {
			owner, _, epoch, ok := n.Owner(s)
			return ok && owner == "node-b" && epoch == res.ToEpoch
		})
	}
	// The finished move record is cleaned up by the controller, so the
	// shard can move again.
	waitUntil(t, 5*time.Second, "move record removed", func() bool { return a.Shards()[s].Move == cluster.StateServing })
	if _, err := a.Move(ctx, s, "node-a"); err != nil {
		t.Fatalf("move back: %v", err)
	}
}

// TestMoveRefusals: a second move of a shard while one runs, a move to an
// unknown node, to a dead node, to the owner itself, and reassigning a
// served shard are refused with clear errors; a move whose import fails
// is aborted and the donor serves the shard again.
func TestMoveRefusals(t *testing.T) {
	e := newEnv(t, nil, nodeOpts{})
	a, b, c := e.start("node-a"), e.start("node-b"), e.start("node-c")
	waitUntil(t, 10*time.Second, "all shards served", func() bool { return allServed(a, b, c) })
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	s := shardOf(t, a)

	release := a.hooks.Block(s)
	first := make(chan error, 1)
	go func() {
		_, err := b.Move(ctx, s, "node-b")
		first <- err
	}()
	// The donor's Drain hook runs once the shard is frozen: new writes
	// wait (what was admitted before is part of the export, so its acks
	// stay allowed).
	waitUntil(t, 5*time.Second, "donor draining", func() bool { return slices.Contains(a.hooks.Calls(), "drain "+s.String()) })
	epoch, _ := a.Owns(s)
	if st := a.Status(s); st.Phase != cluster.PhaseFrozen || st.To != "node-b" {
		t.Fatalf("donor's shard is %+v while draining", st)
	}
	wctx, wcancel := context.WithTimeout(ctx, 100*time.Millisecond)
	if err := a.Admit(wctx, s, epoch); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a write into a frozen shard: %v (want it held until the move ends)", err)
	}
	wcancel()
	waitUntil(t, 5*time.Second, "node-c sees the move", func() bool { return c.Shards()[s].Move == cluster.StateDraining })
	_, err := c.Move(ctx, s, "node-c")
	if !errors.Is(err, cluster.ErrMoveInProgress) || !strings.Contains(err.Error(), "node-b") {
		t.Fatalf("concurrent move: %v", err)
	}
	t.Logf("concurrent move refused: %v", err)
	release()
	if err := <-first; err != nil {
		t.Fatalf("first move: %v", err)
	}

	s2 := shardOf(t, c)
	if _, err := a.Move(ctx, s2, "node-x"); !errors.Is(err, cluster.ErrNodeNotLive) {
		t.Fatalf("move to unknown node: %v", err)
	}
	if _, err := a.Move(ctx, s2, "node-c"); !errors.Is(err, cluster.ErrAlreadyOwner) {
		t.Fatalf("move to owner: %v", err)
	}
	if err := a.Reassign(ctx, s2, "node-a", true); !errors.Is(err, cluster.ErrOwnerLive) {
		t.Fatalf("reassign served shard: %v", err)
	}
	if err := a.Reassign(ctx, s2, "node-a", false); !errors.Is(err, cluster.ErrDataLoss) {
		t.Fatalf("reassign without acceptDataLoss: %v", err)
	}

	// An import that fails aborts the move: the donor thaws the shard
	// and keeps its copy, the recipient discards what it may have
	// written.
	b.hooks.Fail("import", s2)
	if _, err := a.Move(ctx, s2, "node-b"); !errors.Is(err, cluster.ErrMoveAborted) || !strings.Contains(err.Error(), "import") {
		t.Fatalf("move with failing import: %v", err)
	}
	waitUntil(t, 5*time.Second, "donor thaws", func() bool {
		ev, _ := c.lastEvent(s2)
		return c.Status(s2).Phase == cluster.PhaseServing && c.MayAck(s2) && ev.Kind == cluster.ShardThawed
	})
	if got := c.callsFor(s2); got != "settle,drain,export" {
		t.Fatalf("donor calls %q", got)
	}
	waitUntil(t, 5*time.Second, "recipient discards", func() bool { return b.callsFor(s2) == "import,drop" })
	if owner, _, _, _ := a.Owner(s2); owner != "node-c" {
		t.Fatalf("owner after aborted move: %s", owner)
	}

	// A caller that stops waiting does not stop the move; an explicit
	// abort does, and the donor serves the shard again.
	s3 := shardOf(t, b)
	release3 := b.hooks.Block(s3)
	defer release3()
	short, cancelShort := context.WithTimeout(ctx, 500*time.Millisecond)
	res3, err := a.Move(short, s3, "node-a")
	cancelShort()
	if !errors.Is(err, cluster.ErrMoveRunning) || res3.State != cluster.StateDraining {
		t.Fatalf("move whose caller stopped waiting: %+v, %v", res3, err)
	}
	if st := b.Status(s3); st.Phase != cluster.PhaseFrozen || st.Move != res3.ID {
		t.Fatalf("the move stopped with its caller: donor's shard %+v", st)
	}
	if err := a.AbortMove(ctx, s3, res3.ID, "test"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "donor thaws after the abort", func() bool {
		return b.MayAck(s3) && b.Status(s3).Phase == cluster.PhaseServing
	})
	if owner, _, _, _ := a.Owner(s3); owner != "node-b" {
		t.Fatalf("owner after the aborted move: %s", owner)
	}
	if err := a.AbortMove(ctx, s3, res3.ID, "again"); !errors.Is(err, cluster.ErrMoveFinished) && !errors.Is(err, cluster.ErrNoSuchMove) {
		t.Fatalf("abort of an ended move: %v", err)
	}

	// A node that closed is not live: moves to it are refused.
	dead := e.start("node-d")
	if err := dead.Close(ctx); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "node-d gone", func() bool { return len(a.Members()) == 3 })
	if _, err := a.Move(ctx, shardOf(t, b), "node-d"); !errors.Is(err, cluster.ErrNodeNotLive) {
		t.Fatalf("move to dead node: %v", err)
	}
}

// TestAutoRebalanceOnJoin: with AutoRebalance, a fourth node joining a
// running cluster receives shards by planned moves (data included) until
// all four are within one of each other.
func TestAutoRebalanceOnJoin(t *testing.T) {
	e := newEnv(t, nil, nodeOpts{autoRebalance: true})
	a, b, c := e.start("node-a"), e.start("node-b"), e.start("node-c")
	waitUntil(t, 10*time.Second, "all shards served", func() bool { return allServed(a, b, c) })
	for _, n := range []*testNode{a, b, c} {
		for i := range cluster.NumShards {
			if _, ok := n.Owns(cluster.Shard(i)); ok {
				n.hooks.Put(cluster.Shard(i), []byte{byte(i)})
			}
		}
	}
	start := time.Now()
	d := e.start("node-d")
	all := []*testNode{a, b, c, d}
	waitUntil(t, 30*time.Second, "four nodes balanced", func() bool {
		counts := owned(a)
		for _, n := range all {
			if len(counts[n.id]) != 64 { // 256 / 4
				return false
			}
		}
		return allServed(all...)
	})
	t.Logf("node-d received %d shards by rebalancing in %v", len(owned(a)["node-d"]), time.Since(start).Round(time.Millisecond))
	for _, s := range owned(a)["node-d"] {
		if got, _ := d.hooks.Data(s); len(got) != 1 || got[0] != byte(s) {
			t.Fatalf("shard %s on node-d holds %v", s, got)
		}
	}
}
