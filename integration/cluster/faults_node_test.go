package cluster

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/d2d"
	"d2m-mediator/internal/faultproxy"
	"d2m-mediator/mediator/adminapi"
)

// goroutinesIn counts the goroutines whose stack contains fn.
func goroutinesIn(fn string) int {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, fn) {
			n++
		}
	}
	return n
}

// groupsInShard returns n groups of shard s.
func groupsInShard(s byte, n int) []d2d.Keys {
	var out []d2d.Keys
	for len(out) < n {
		if k := d2d.DeriveKeys(d2d.NewDeviceGroupKey()); k.DeviceGroupID()[0] == s {
			out = append(out, k)
		}
	}
	return out
}

// TestFaultTransferBlackhole: the link to a move's recipient (its
// advertise address) blackholed while the donor streams a shard holding
// 10,000 queued entries, under load. The donor's transfer makes no
// progress, fails after the transfer idle timeout (1 s here, 30 s by
// default) and the move aborts: within TransferIdleTimeout + 1 s of the
// cut. The donor serves the shard again at once (its writes were frozen
// meanwhile), the recipient frees its half of the transfer within the
// same idle timeout although the link stays silent, nothing is lost, and
// after the heal a retry of the move succeeds over the same link with
// 50 ms of latency each way.
func TestFaultTransferBlackhole(t *testing.T) {
	nodes := startFaultCluster(t, faultOpts{}, "f1", "f2")
	donor, recipient := nodes[0], nodes[1]
	k := groupsOwnedBy(t, donor, 1)[0]
	shard := k.DeviceGroupID()[0]
	queued := fillQueue(t, donor.d.DeviceURL, k, 2, 3, 10000)
	before := mediatorGoroutines()
	l := startFaultLoad(t, groupsInShard(shard, 3), donor.d.DeviceURL, 50*time.Millisecond, func(d *fdev, attempt int) string {
		return nodes[attempt%2].d.DeviceURL
	})
	waitUntil(t, 10*time.Second, "every device acked", func() bool { return l.ackedSince(time.Time{}) })

	// Slow enough that the cut lands in the middle of the stream.
	recipient.peer.Bandwidth(faultproxy.Up, 64<<10)
	type result struct {
		code int
		raw  string
		at   time.Time
	}
	done := make(chan result, 1)
	go func() {
		var raw string
		code := donor.admin(t, "POST", fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=%s", shard, recipient.id), &raw)
		done <- result{code, raw, time.Now()}
	}()
	waitUntil(t, 10*time.Second, "the transfer under way", func() bool { return recipient.peer.Bytes(faultproxy.Up) > 16<<10 })
	cut := time.Now()
	recipient.peer.Blackhole(true)
	var res result
	select {
	case res = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("the move did not end within 30 s of the cut")
	}
	took := res.at.Sub(cut)
	t.Logf("(d) the move ended %v after the cut (transfer idle timeout %v): %d %s", took.Round(time.Millisecond), faultTransferIdle, res.code, strings.TrimSpace(res.raw))
	if res.code == 200 {
		t.Fatalf("the move succeeded through a blackholed link: %s", res.raw)
	}
	if !strings.Contains(res.raw, "aborted") {
		t.Errorf("move answer %d %s, want an aborted move", res.code, res.raw)
	}
	if took > faultTransferIdle+time.Second {
		t.Errorf("(d) the move aborted %v after the cut, want within the transfer idle timeout + 1 s (%v)", took, faultTransferIdle+time.Second)
	}
	// The donor serves the shard again.
	waitUntil(t, 5*time.Second, "the donor acking for the shard again", func() bool {
		return donor.d.Cluster.MayAck(cluster.Shard(shard)) && donor.d.Cluster.Status(cluster.Shard(shard)).Phase == cluster.PhaseServing
	})
	aborted := time.Now()
	waitUntil(t, 10*time.Second, "every device acked after the abort", func() bool { return l.ackedSince(aborted) })
	// The recipient's half of the transfer ends too, though the link is
	// still silent.
	waitUntil(t, faultTransferIdle+2*time.Second, "the recipient to give up the silent transfer", func() bool {
		return goroutinesIn("receiveHandler.func") == 0
	})
	t.Logf("(e) the recipient freed its half of the transfer %v after the cut, the link still blackholed", time.Since(cut).Round(time.Millisecond))

	// Healed, but slow: +50 ms each way on the recipient's link.
	recipient.peer.Heal()
	recipient.peer.Latency(faultproxy.Both, 50*time.Millisecond)
	var mr adminapi.MoveResult
	if code := donor.admin(t, "POST", fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=%s", shard, recipient.id), &mr); code != 200 {
		t.Fatalf("retry of the move after the heal: %d %+v", code, mr)
	}
	t.Logf("(d) the retry after the heal (+50 ms each way on the link) moved the shard in %.0f ms", mr.Seconds*1000)
	time.Sleep(500 * time.Millisecond) // load on the new owner
	l.stopAndCheck(t, recipient.d.DeviceURL, 1001)
	sameStrings(t, "the offline device's queue after the aborted move and the retry", drainQueue(t, recipient.d.DeviceURL, k, 3), queued)
	checkNothingLeft(t, before, nodes, donor.peer, recipient.peer)
}

// TestFaultForwardHop: devices forwarded by one node to the owner of
// their shards, and the hop between the two nodes reset, then
// blackholed. Reset: the forwarding node closes every device with 1001
// at once (within 500 ms) and they land on the owner at their first
// reconnect. Blackholed: the forwarding node closes them with 1001 within
// the idle timeout + 1 s (forwardGrace), the owner frees its side within
// its idle timeout and the close handshake's 5 s, and after the heal the
// devices land on the owner again; nothing acked is lost throughout.
func TestFaultForwardHop(t *testing.T) {
	nodes := startFaultCluster(t, faultOpts{}, "f1", "f2")
	fwd, owner := nodes[0], nodes[1]
	groups := groupsOwnedBy(t, owner, 3)
	before := mediatorGoroutines()
	l := startFaultLoad(t, groups, fwd.d.DeviceURL, 50*time.Millisecond, func(d *fdev, attempt int) string {
		return fwd.d.DeviceURL
	})
	waitUntil(t, 10*time.Second, "every device acked", func() bool { return l.ackedSince(time.Time{}) })

	reset := time.Now()
	if n := owner.peer.Reset(); n < len(l.devices) {
		t.Fatalf("reset %d connections on the hop, want at least %d", n, len(l.devices))
	}
	waitUntil(t, 5*time.Second, "every forwarded device closed after the reset", func() bool {
		return len(l.closedAfter(reset)) == len(l.devices)
	})
	var worst time.Duration
	for d, s := range l.closedAfter(reset) {
		if s.code != 1001 {
			t.Errorf("(d) reset hop: device %d closed with %d, want 1001", d.id, s.code)
		}
		worst = max(worst, s.end.Sub(reset))
	}
	if worst > 500*time.Millisecond {
		t.Errorf("(d) reset hop: devices closed up to %v after the reset, want within 500 ms", worst)
	}
	waitUntil(t, 10*time.Second, "every device acked again after the reset", func() bool { return l.ackedSince(reset) })
	t.Logf("(d) reset hop: every device closed with 1001 within %v, acked by the owner again within %v", worst.Round(time.Millisecond), time.Since(reset).Round(time.Millisecond))

	cut := time.Now()
	owner.peer.Blackhole(true)
	bound := faultIdle + time.Second + 500*time.Millisecond
	waitUntil(t, 3*bound, "every forwarded device closed while the hop is silent", func() bool {
		return len(l.closedAfter(cut)) == len(l.devices)
	})
	worst = 0
	for d, s := range l.closedAfter(cut) {
		if s.code != 1001 {
			t.Errorf("(d) blackholed hop: device %d closed with %d, want 1001", d.id, s.code)
		}
		worst = max(worst, s.end.Sub(cut))
	}
	t.Logf("(d) blackholed hop: every device closed with 1001 within %v (idle timeout %v + 1 s)", worst.Round(time.Millisecond), faultIdle)
	if worst > bound {
		t.Errorf("(d) blackholed hop: devices closed up to %v after the cut, want within %v", worst, bound)
	}
	if n := labelled(fwd.mediatorNode, "mediator_cluster_forwards_total", "outcome", "owner_silent"); n < float64(len(l.devices)) {
		t.Errorf("mediator_cluster_forwards_total{outcome=\"owner_silent\"} = %v on the forwarding node, want at least %d", n, len(l.devices))
	}
	waitUntil(t, faultIdle+7*time.Second, "the owner to free the connections it can no longer reach", func() bool { return openConns(owner.mediatorNode) == 0 })
	t.Logf("(e) the owner freed its side %v after the cut", time.Since(cut).Round(time.Millisecond))
	time.Sleep(time.Until(cut.Add(2 * faultIdle))) // the blackhole's length, not an order
	healed := time.Now()
	owner.peer.Heal()
	waitUntil(t, 15*time.Second, "every device acked again after the heal", func() bool { return l.ackedSince(healed) })
	t.Logf("(d) after the heal every device was acked by the owner again within %v", time.Since(healed).Round(time.Millisecond))
	time.Sleep(300 * time.Millisecond) // load after the heal
	l.stopAndCheck(t, owner.d.DeviceURL, 1001)
	checkNothingLeft(t, before, nodes, fwd.peer, owner.peer)
}

// labelled reads one labelled counter of a node's metrics (0 if absent).
func labelled(n *mediatorNode, name, label, value string) float64 {
	mfs, _ := n.d.Server.Registry().Gather()
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}
