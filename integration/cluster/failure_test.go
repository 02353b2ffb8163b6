package cluster

import (
	"context"
	"errors"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"d2m-mediator/cluster"
)

func TestLeaseExpiryNoAutoFailover(t *testing.T) { testLeaseExpiry(t, false) }
func TestLeaseExpiryAutoFailover(t *testing.T)   { testLeaseExpiry(t, true) }

// testLeaseExpiry freezes node C's traffic to etcd, as SIGSTOP would:
// MayAck turns false for C's shards no later than its last keepalive
// send + TTL − margin, while A and B keep acking; etcd then expires C's
// lease. With AutoFailover off C's shards stay assigned to C and
// unserved; with it on they go to A and B at higher epochs. When C
// resumes it sees every shard lost, its old epoch and old lease no longer
// write anything, and (AutoFailover off) it serves its shards again under
// a new lease and higher epochs.
func testLeaseExpiry(t *testing.T, autoFailover bool) {
	e := newEnv(t, nil, nodeOpts{autoFailover: autoFailover})
	a, b, c := e.start("node-a"), e.start("node-b"), e.start("node-c")
	waitUntil(t, 10*time.Second, "all shards served", func() bool { return allServed(a, b, c) })
	cShards := owned(a)["node-c"]
	oldEpoch := make(map[cluster.Shard]int64)
	for _, s := range cShards {
		ep, ok := c.Owns(s)
		if !ok {
			t.Fatalf("node-c does not own %s", s)
		}
		oldEpoch[s] = ep
	}
	oldLease := c.Fence().Lease

	c.pause(true)
	// Poll MayAck every millisecond until it turns false on every C shard;
	// A and B must keep acking meanwhile.
	var falseAt time.Time
	deadline := time.Now().Add(2 * ttl)
	for falseAt.IsZero() {
		now := time.Now()
		if now.After(deadline) {
			t.Fatal("node-c still acks 2 TTLs after its link to etcd froze")
		}
		stillAcks := false
		for _, s := range cShards {
			stillAcks = stillAcks || c.MayAck(s)
		}
		if !stillAcks {
			falseAt = now
		}
		for _, n := range []*testNode{a, b} {
			s := shardOf(t, n)
			if !n.MayAck(s) {
				t.Fatalf("%s stopped acking %s while node-c was frozen", n.id, s)
			}
		}
		time.Sleep(time.Millisecond)
	}
	st := c.Fence()
	if want := st.LastKeepAliveSent.Add(ttl - margin); !st.OwnedUntil.Equal(want) {
		t.Fatalf("fence until %v, want last send + TTL − margin = %v", st.OwnedUntil, want)
	}
	late := falseAt.Sub(st.OwnedUntil)
	t.Logf("node-c stopped acking %v after last keepalive send (TTL − margin = %v), %v after the fence time", falseAt.Sub(st.LastKeepAliveSent).Round(time.Millisecond), ttl-margin, late.Round(time.Microsecond))
	if late > 50*time.Millisecond {
		t.Fatalf("node-c acked until %v past its fence time", late)
	}

	// etcd expires C's lease.
	waitUntil(t, 3*ttl, "node-c's lease expires", func() bool { return len(a.Members()) == 2 })
	expiredAt := time.Now()
	if autoFailover {
		waitUntil(t, 5*ttl, "node-c's shards failed over", func() bool {
			for _, s := range cShards {
				owner, _, epoch, ok := a.Owner(s)
				if !ok || owner == "node-c" || epoch <= oldEpoch[s] {
					return false
				}
			}
			return allServed(a, b)
		})
		t.Logf("failover of %d shards took %v after the lease expired", len(cShards), time.Since(expiredAt).Round(time.Millisecond))
		counts := owned(a)
		if d := len(counts["node-a"]) - len(counts["node-b"]); d < -1 || d > 1 {
			t.Fatalf("unbalanced after failover: a %d, b %d", len(counts["node-a"]), len(counts["node-b"]))
		}
	} else {
		// Wait until the controller has reconciled the view without C.
		rev := a.Revision()
		waitUntil(t, 5*ttl, "controller pass after the expiry", func() bool {
			return a.ControllerRevision() >= rev || b.ControllerRevision() >= rev
		})
		for _, s := range cShards {
			si := a.Shards()[s]
			if si.Owner != "" || si.Assigned != "node-c" {
				t.Fatalf("shard %s: owner %q, assigned %q: want unserved and still assigned to node-c", s, si.Owner, si.Assigned)
			}
			if _, _, _, ok := b.Owner(s); ok {
				t.Fatalf("shard %s routed while its node is down", s)
			}
		}
	}

	// The operator gives up the data of one of C's shards: it goes to A
	// at once and stays there when C comes back.
	var given cluster.Shard
	if !autoFailover {
		given = cShards[len(cShards)-1]
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		if err := a.Reassign(ctx, given, "node-a", false); !errors.Is(err, cluster.ErrDataLoss) {
			t.Fatalf("reassign without acceptDataLoss: %v", err)
		}
		if err := a.Reassign(ctx, given, "node-x", true); !errors.Is(err, cluster.ErrNodeNotLive) {
			t.Fatalf("reassign to an unknown node: %v", err)
		}
		// node-a holds an old copy of the shard (left by a move that
		// never flipped): it must not serve it as if it were current.
		a.hooks.Put(given, []byte("an old copy"))
		if err := a.Reassign(ctx, given, "node-a", true); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, 5*time.Second, "node-a serves the reassigned shard", func() bool {
			ep, ok := a.Owns(given)
			return ok && ep > oldEpoch[given] && a.MayAck(given)
		})
		if got := a.callsFor(given); got != "reset,settle" {
			t.Fatalf("node-a's calls for the reassigned shard: %q, want reset,settle (served from empty)", got)
		}
		if d, has := a.hooks.Data(given); has {
			t.Fatalf("node-a serves the reassigned shard with an old copy %q", d)
		}
		cShards = cShards[:len(cShards)-1]
	}

	// The stale owner's writes fail: a compare on its old epoch, and any
	// key on its old lease.
	s0 := cShards[0]
	resp, err := e.admin.Txn(t.Context()).
		If(clientv3.Compare(clientv3.ModRevision(e.prefix+"shards/"+s0.String()), "=", oldEpoch[s0])).
		Then(clientv3.OpPut(e.prefix+"shards/"+s0.String(), `{"node":"node-c"}`)).Commit()
	if err != nil || resp.Succeeded {
		t.Fatalf("write fenced by the old epoch: succeeded %v, err %v", resp != nil && resp.Succeeded, err)
	}
	if _, err := e.admin.Put(t.Context(), e.prefix+"shards/"+s0.String(), "x", clientv3.WithLease(oldLease)); err == nil {
		t.Fatal("put with node-c's expired lease succeeded")
	}

	// SIGCONT: C learns that its lease is gone and loses every shard.
	c.pause(false)
	waitUntil(t, 3*ttl, "node-c sees its shards lost", func() bool {
		for _, s := range cShards {
			lost := false
			for _, ev := range c.eventsFor(s) {
				lost = lost || (ev.Kind == cluster.ShardLost && ev.Epoch == oldEpoch[s])
			}
			if !lost {
				return false
			}
		}
		return true
	})
	if autoFailover {
		waitUntil(t, 3*ttl, "node-c rejoined", func() bool { return len(a.Members()) == 3 })
		waitUntil(t, 3*ttl, "node-c's view caught up", func() bool { return c.Revision() >= a.Revision() })
		for _, s := range cShards {
			if _, ok := c.Owns(s); ok || c.MayAck(s) {
				t.Fatalf("node-c owns %s again after it failed over", s)
			}
		}
		if l := c.Fence().Lease; l == oldLease || l == 0 {
			t.Fatalf("node-c lease %x after rejoin (old %x)", l, oldLease)
		}
		return
	}
	waitUntil(t, 3*ttl, "node-c serves its shards again", func() bool {
		for _, s := range cShards {
			ep, ok := c.Owns(s)
			if !ok || ep <= oldEpoch[s] || !c.MayAck(s) {
				return false
			}
		}
		return allServed(a, b, c)
	})
	if owner, _, _, _ := c.Owner(given); owner != "node-a" {
		t.Fatalf("the reassigned shard %s went back to %s", given, owner)
	}
	if _, ok := c.Owns(given); ok {
		t.Fatalf("node-c claims the reassigned shard %s", given)
	}
}

// TestCleanLeaveDrains: a node that leaves moves every shard, with its
// data, to the remaining nodes (balanced), then deregisters.
func TestCleanLeaveDrains(t *testing.T) {
	e := newEnv(t, nil, nodeOpts{})
	a, b, c := e.start("node-a"), e.start("node-b"), e.start("node-c")
	waitUntil(t, 10*time.Second, "all shards served", func() bool { return allServed(a, b, c) })
	cShards := owned(a)["node-c"]
	for _, s := range cShards {
		c.hooks.Put(s, []byte("data of shard "+s.String()))
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	start := time.Now()
	if err := c.Leave(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("node-c left: %d shards moved in %v", len(cShards), time.Since(start).Round(time.Millisecond))
	waitUntil(t, 5*time.Second, "node-c deregistered", func() bool { return len(a.Members()) == 2 })
	counts := owned(a)
	if len(counts["node-c"]) != 0 || len(counts["node-a"])+len(counts["node-b"]) != 256 {
		t.Fatalf("after leave: %v", counts)
	}
	if d := len(counts["node-a"]) - len(counts["node-b"]); d < -1 || d > 1 {
		t.Fatalf("unbalanced after leave: a %d, b %d", len(counts["node-a"]), len(counts["node-b"]))
	}
	for _, s := range cShards {
		owner, _, _, _ := a.Owner(s)
		n := map[string]*testNode{"node-a": a, "node-b": b}[owner]
		got, _ := n.hooks.Data(s)
		if string(got) != "data of shard "+s.String() {
			t.Fatalf("shard %s on %s holds %q", s, owner, got)
		}
		if ev, ok := c.lastEvent(s); !ok || ev.Kind != cluster.ShardLost {
			t.Fatalf("node-c's last event for %s: %+v", s, ev)
		}
	}
	if !allServed(a, b) {
		t.Fatal("not every shard served after the leave")
	}
}

// TestEtcdLeaderLoss: stopping the etcd leader member does not touch the
// reflect path (MayAck stays true on every node through the election),
// and placement writes work again afterwards.
func TestEtcdLeaderLoss(t *testing.T) {
	ec, err := startEtcd(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	// Registered first, so it runs after the nodes closed.
	closed := make(chan struct{})
	li := -1
	t.Cleanup(func() {
		for i, m := range ec.members {
			if i != li {
				m.Close()
			}
		}
		if li >= 0 {
			<-closed
		}
	})
	e := newEnv(t, ec, nodeOpts{})
	a, b, c := e.start("node-a"), e.start("node-b"), e.start("node-c")
	nodes := []*testNode{a, b, c}
	waitUntil(t, 10*time.Second, "all shards served", func() bool { return allServed(nodes...) })
	li = ec.leader()
	if li < 0 {
		t.Fatal("no etcd leader")
	}
	killed := ec.members[li]
	start := time.Now()
	killed.Server.HardStop() // raft stops without a leadership transfer, as in a crash
	go func() {
		killed.Close() // its listeners; waits up to ~5 s for open streams
		close(closed)
	}()
	// Three TTLs: every node's lease must have been renewed through the
	// new leader, or MayAck would have turned false.
	for time.Since(start) < 3*ttl {
		for _, n := range nodes {
			for i := range cluster.NumShards {
				s := cluster.Shard(i)
				if _, mine := n.Owns(s); mine && !n.MayAck(s) {
					t.Fatalf("%s stopped acking %s %v after the etcd leader died", n.id, s, time.Since(start).Round(time.Millisecond))
				}
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	newLeader := -1
	for i, m := range ec.members {
		if i != li && m.Server.Leader() == m.Server.MemberID() {
			newLeader = i
		}
	}
	if newLeader < 0 {
		t.Fatal("no new etcd leader among the other members")
	}
	t.Logf("etcd leader m%d stopped; m%d leads; every node kept acking for %v", li, newLeader, time.Since(start).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	s := shardOf(t, a)
	res, err := b.Move(ctx, s, "node-b")
	if err != nil {
		t.Fatalf("placement write after the leader loss: %v", err)
	}
	t.Logf("move after the leader loss took %v", res.Took)
	if res.ToEpoch <= res.FromEpoch {
		t.Fatalf("epochs %d → %d", res.FromEpoch, res.ToEpoch)
	}
	waitUntil(t, 5*time.Second, "all shards served after the move", func() bool { return allServed(nodes...) })
}
