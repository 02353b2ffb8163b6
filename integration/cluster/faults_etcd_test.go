package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"d2m-mediator/cluster"
	"d2m-mediator/internal/pgtest"
)

// ownerLog records every change of the shards/<NN> keys under a prefix:
// which node the owner key named, and when the test saw it.
type ownerLog struct {
	mu  sync.Mutex
	evs []ownerEvent
}

type ownerEvent struct {
	shard byte
	node  string // "" for a delete
	at    time.Time
}

func watchOwners(t *testing.T, prefix string) *ownerLog {
	cli := etcdClient(t)
	ctx, cancel := context.WithCancel(context.Background())
	ol := &ownerLog{}
	done := make(chan struct{})
	wc := cli.Watch(ctx, prefix+"shards/", clientv3.WithPrefix())
	go func() {
		defer close(done)
		for resp := range wc {
			now := time.Now()
			ol.mu.Lock()
			for _, e := range resp.Events {
				var s byte
				fmt.Sscanf(strings.TrimPrefix(string(e.Kv.Key), prefix+"shards/"), "%02x", &s)
				ev := ownerEvent{shard: s, at: now}
				if e.Type == clientv3.EventTypePut {
					var rec struct{ Node string }
					json.Unmarshal(e.Kv.Value, &rec)
					ev.node = rec.Node
				}
				ol.evs = append(ol.evs, ev)
			}
			ol.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return ol
}

// firstPut returns when an owner key of shard naming node (any node but
// not, if node starts with "!") first appeared after t.
func (ol *ownerLog) firstPut(shard byte, after time.Time, node string) (time.Time, string, bool) {
	ol.mu.Lock()
	defer ol.mu.Unlock()
	for _, e := range ol.evs {
		if e.shard != shard || e.node == "" || !e.at.After(after) {
			continue
		}
		if strings.HasPrefix(node, "!") && e.node != node[1:] || e.node == node {
			return e.at, e.node, true
		}
	}
	return time.Time{}, "", false
}

// firstDelete returns when shard's owner key was first deleted after t.
func (ol *ownerLog) firstDelete(shard byte, after time.Time) (time.Time, bool) {
	ol.mu.Lock()
	defer ol.mu.Unlock()
	for _, e := range ol.evs {
		if e.shard == shard && e.node == "" && e.at.After(after) {
			return e.at, true
		}
	}
	return time.Time{}, false
}

// TestFaultEtcdBlackholeBbolt: etcd blackholed from the owner of four
// loaded shards for 2 × TTL, then healed, with the bbolt store. The owner
// stops acking at its fence (last keepalive sent + TTL − TTL/5, under
// 1.6 s after the cut) and closes its devices with 1001 at their next
// reflect; etcd ends its lease and, the data being on its disk only, the
// shards wait unserved (503 at the other nodes); after the heal the node
// learns its lease is gone, rejoins under a new one and serves its shards
// again at a higher epoch, and no other node ever owned them.
func TestFaultEtcdBlackholeBbolt(t *testing.T) { testFaultEtcdBlackhole(t, false) }

// TestFaultEtcdBlackholePostgres: the same with the PostgreSQL store:
// another node takes the shards over once etcd ended the owner's lease,
// after the owner's fence deadline; the cut-off node's commits are
// refused by the database's epoch, and after the heal it rejoins without
// taking them back.
func TestFaultEtcdBlackholePostgres(t *testing.T) { testFaultEtcdBlackhole(t, true) }

func testFaultEtcdBlackhole(t *testing.T, postgres bool) {
	var o faultOpts
	if postgres {
		o.dsn = pgtest.Shared(t).NewDatabase(t)
	}
	nodes := startFaultCluster(t, o, "f1", "f2", "f3")
	v, others := nodes[0], nodes[1:]
	groups := groupsOwnedBy(t, v, 4)
	shards := shardsOf(groups)
	before := mediatorGoroutines()
	owners := watchOwners(t, v.prefix)
	fl := sampleFence(v)
	defer fl.close()
	// The first connection of every device goes to the owner itself (its
	// acks are the ones the fence must stop); later ones to the others,
	// which forward or answer 503.
	l := startFaultLoad(t, groups, v.d.DeviceURL, 50*time.Millisecond, func(d *fdev, attempt int) string {
		if attempt == 0 {
			return v.d.DeviceURL
		}
		return others[attempt%2].d.DeviceURL
	})
	waitUntil(t, 10*time.Second, "every device acked", func() bool { return l.ackedSince(time.Time{}) })

	cut := time.Now()
	v.cutEtcd(true)
	waitUntil(t, 2*ttl, "the fence to close", func() bool {
		for _, s := range shards {
			if v.d.Cluster.MayAck(cluster.Shard(s)) {
				return false
			}
		}
		return true
	})
	fenceClosed := time.Now()
	deadline := v.d.Cluster.Fence().OwnedUntil
	if d := deadline.Sub(cut); d > ttl-margin {
		t.Errorf("fence deadline %v after the cut, want at most TTL − margin = %v", d, ttl-margin)
	}
	t.Logf("(d) fence: deadline %v after the cut, acks refused from %v after it", deadline.Sub(cut).Round(time.Millisecond), fenceClosed.Sub(cut).Round(time.Millisecond))
	// Every device on the owner is closed with 1001 at its first reflect
	// after the deadline.
	var closedBy time.Duration
	waitUntil(t, 5*time.Second, "every device on the cut-off owner closed", func() bool {
		return len(l.closedAfter(cut)) == len(l.devices)
	})
	for d, s := range l.closedAfter(cut) {
		if s.code != 1001 {
			t.Errorf("(d) device %d on the cut-off owner closed with %d, want 1001", d.id, s.code)
		}
		closedBy = max(closedBy, s.end.Sub(deadline))
	}
	t.Logf("(d) every device on the cut-off owner closed with 1001 within %v of its fence deadline", closedBy.Round(time.Millisecond))
	if closedBy > time.Second {
		t.Errorf("(d) devices closed up to %v after the fence deadline, want within 1 s (a reflect every 50 ms)", closedBy)
	}

	var takeover time.Duration
	if postgres {
		// Another node serves the shards once etcd ended the lease, never
		// before the owner's fence deadline.
		var gone, claimed time.Duration
		for _, s := range shards {
			var at time.Time
			var who string
			waitUntil(t, 3*ttl, fmt.Sprintf("shard %02x taken over", s), func() bool {
				var ok bool
				at, who, ok = owners.firstPut(s, cut, "!"+v.id)
				return ok
			})
			if !at.After(deadline) {
				t.Errorf("(c) shard %02x: %s's owner key appeared at %s, before %s's fence deadline %s", s, who, at.Format("15:04:05.000"), v.id, deadline.Format("15:04:05.000"))
			}
			claimed = max(claimed, at.Sub(cut))
			if del, ok := owners.firstDelete(s, cut); ok {
				gone = max(gone, del.Sub(cut))
			}
		}
		t.Logf("(c) the owner's keys expired %v after the cut, %v after its fence deadline; the new owners' keys appeared %v after the cut",
			gone.Round(time.Millisecond), (cut.Add(gone)).Sub(deadline).Round(time.Millisecond), claimed.Round(time.Millisecond))
		waitUntil(t, 10*time.Second, "every device acked by the new owners", func() bool { return l.ackedSince(cut.Add(ttl)) })
		for _, d := range l.devices {
			first := time.Time{}
			for _, s := range d.sessionsSnapshot() {
				if s.url == v.d.DeviceURL {
					continue // the cut-off owner's own acks
				}
				for _, a := range s.acks {
					if a.recv.After(cut) && (first.IsZero() || a.recv.Before(first)) {
						first = a.recv
					}
				}
			}
			takeover = max(takeover, first.Sub(cut))
		}
		// The bound: etcd ends the lease within TTL of the last keepalive
		// (before the cut), the new owner claims at once; but a device
		// that reconnected meanwhile was forwarded to the cut-off node
		// (the others' map still named it), which holds an upgrade for a
		// shard whose fence ran out for up to 3 s (mediator's
		// settleWait, hoping for a late keepalive) before its 503.
		bound := ttl + 3*time.Second + time.Second
		t.Logf("(d) takeover: every device acked by a new owner within %v of the cut (bound TTL + settle wait 3 s + 1 s = %v)", takeover.Round(time.Millisecond), bound)
		if takeover > bound {
			t.Errorf("(d) takeover took %v, want within %v", takeover, bound)
		}
	}
	time.Sleep(time.Until(cut.Add(2 * ttl))) // the blackhole's length, not an order
	if !postgres {
		// The shards wait: nobody serves them, the assignment stays.
		for _, n := range others {
			for _, s := range shards {
				if who, _, _, ok := n.d.Cluster.Owner(cluster.Shard(s)); ok {
					t.Errorf("shard %02x served by %s while its bbolt owner is cut off", s, who)
				}
			}
		}
	}
	healed := time.Now()
	v.cutEtcd(false)
	if !postgres {
		waitUntil(t, 5*ttl, "the owner serving its shards again", func() bool {
			for _, s := range shards {
				if !v.d.Cluster.MayAck(cluster.Shard(s)) {
					return false
				}
			}
			return true
		})
		back := time.Since(healed)
		waitUntil(t, 10*time.Second, "every device acked again", func() bool { return l.ackedSince(healed) })
		t.Logf("(d) after the heal: %s serves its shards again within %v; every device acked again within %v", v.id, back.Round(time.Millisecond), time.Since(healed).Round(time.Millisecond))
		for _, s := range shards {
			if at, who, ok := owners.firstPut(s, cut, "!"+v.id); ok {
				t.Errorf("shard %02x owned by %s at %s while its data was on %s", s, who, at.Format("15:04:05.000"), v.id)
			}
		}
	} else {
		waitUntil(t, 5*ttl, "the healed node registered again", func() bool {
			m, ok := others[0].d.Cluster.Member(v.id)
			return ok && m.Started.After(cut)
		})
		for _, s := range shards {
			if v.d.Cluster.MayAck(cluster.Shard(s)) {
				t.Errorf("shard %02x: the healed node acks for a shard taken over", s)
			}
		}
	}
	checkAcksWithinFence(t, l, v, fl, cut, healed)
	time.Sleep(500 * time.Millisecond) // load after the heal
	l.stopAndCheck(t, others[0].d.DeviceURL, 1001)
	checkNothingLeft(t, before, nodes, others[0].peer, others[1].peer, v.peer)
}

// TestFaultEtcdLatency: latency added on every link between the owner of
// four loaded shards and etcd. +250 ms each way (500 ms on the round
// trip, below TTL/3 = 667 ms) for 3 × TTL: the fence never lapses (the
// keepalive goes every TTL/3 and its reply comes well before last send +
// TTL − TTL/5), no ack is withheld, no device is closed. +750 ms each way
// (1.5 s round trip, above TTL/3) for 2 × TTL: keepalive replies come too
// late for the fence, which closes cleanly: acks are withheld, devices
// are closed with 1001, and no ack arrives past the deadline in force;
// once the latency is gone, acks resume.
func TestFaultEtcdLatency(t *testing.T) {
	nodes := startFaultCluster(t, faultOpts{}, "f1", "f2")
	v, other := nodes[0], nodes[1]
	groups := groupsOwnedBy(t, v, 4)
	shards := shardsOf(groups)
	before := mediatorGoroutines()
	fl := sampleFence(v)
	defer fl.close()
	l := startFaultLoad(t, groups, v.d.DeviceURL, 50*time.Millisecond, func(d *fdev, attempt int) string {
		return v.d.DeviceURL
	})
	waitUntil(t, 10*time.Second, "every device acked", func() bool { return l.ackedSince(time.Time{}) })

	// Watch MayAck closely while the latency is on.
	var lapses sync.Map
	watch := func(until time.Time) {
		for time.Now().Before(until) {
			for _, s := range shards {
				if !v.d.Cluster.MayAck(cluster.Shard(s)) {
					lapses.Store(time.Now(), s)
				}
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	refusals := counter(v.mediatorNode, "mediator_cluster_fence_refusals_total")
	start := time.Now()
	v.etcdLatency(250 * time.Millisecond)
	watch(start.Add(3 * ttl))
	n := 0
	lapses.Range(func(k, _ any) bool { n++; return true })
	if n > 0 {
		t.Errorf("(d) +500 ms round trip: the fence lapsed %d times", n)
	}
	if got := counter(v.mediatorNode, "mediator_cluster_fence_refusals_total") - refusals; got != 0 {
		t.Errorf("(d) +500 ms round trip: %v acks withheld", got)
	}
	if c := l.closedAfter(start); len(c) > 0 {
		t.Errorf("(d) +500 ms round trip: %d devices closed", len(c))
	}
	t.Logf("(d) +500 ms on the etcd round trip for %v: no fence lapse, no ack withheld, no device closed", 3*ttl)

	slow := time.Now()
	v.etcdLatency(750 * time.Millisecond)
	watch(slow.Add(2 * ttl))
	lapsed := 0
	lapses.Range(func(k, _ any) bool { lapsed++; return true })
	withheld := counter(v.mediatorNode, "mediator_cluster_fence_refusals_total") - refusals
	closed := l.closedAfter(slow)
	for d, s := range closed {
		if s.code != 1001 {
			t.Errorf("(d) +1.5 s round trip: device %d closed with %d, want 1001", d.id, s.code)
		}
	}
	t.Logf("(d) +1.5 s on the etcd round trip for %v: the fence lapsed (%d samples), %v acks withheld, %d devices closed with 1001", 2*ttl, lapsed, withheld, len(closed))
	if lapsed == 0 || withheld == 0 || len(closed) == 0 {
		t.Errorf("(d) +1.5 s round trip: the fence did not close (lapses %d, withheld %v, closed %d)", lapsed, withheld, len(closed))
	}
	healed := time.Now()
	v.etcdLatency(0)
	waitUntil(t, 10*time.Second, "every device acked again after the latency is gone", func() bool { return l.ackedSince(healed.Add(1500 * time.Millisecond)) })
	t.Logf("(d) latency gone: every device acked again within %v", time.Since(healed).Round(time.Millisecond))
	checkAcksWithinFence(t, l, v, fl, start, time.Now())
	for _, s := range shards {
		if owner, _, _, _ := other.d.Cluster.Owner(cluster.Shard(s)); owner != v.id {
			t.Errorf("shard %02x moved to %q: the lease should have survived the latency", s, owner)
		}
	}
	l.stopAndCheck(t, v.d.DeviceURL, 1001)
	checkNothingLeft(t, before, nodes, v.peer, other.peer)
}
