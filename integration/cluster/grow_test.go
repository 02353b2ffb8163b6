package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/d2d"
	"d2m-mediator/mediator/adminapi"
	"d2m-mediator/mediator/daemon"
)

// Day 2: a node joins a loaded cluster and takes its share; drained, it
// gives it back. With auto-rebalance (the default of `mediator serve`)
// nothing but starting the node is needed.

// balanced reports whether every node in ids serves within one shard of
// NumShards/len(ids), and every shard is served by one of them.
func balanced(shards []cluster.ShardInfo, ids ...string) (bool, map[string]int) {
	count := map[string]int{}
	for _, si := range shards {
		count[si.Owner]++
	}
	want := cluster.NumShards / len(ids)
	total := 0
	for _, id := range ids {
		if count[id] < want || count[id] > want+1 {
			return false, count
		}
		total += count[id]
	}
	return total == cluster.NumShards, count
}

// refusedOutcomes are the outcomes of mediator_cluster_forwards_total
// that answered an upgrade with 503 while routing.
var refusedOutcomes = []string{"unavailable", "dial_failed", "loop_refused"}

// refusals sums, over the nodes, the upgrades refused with 503.
func refusals(t *testing.T, nodes []*mediatorNode) float64 {
	t.Helper()
	sum := 0.0
	for _, n := range nodes {
		sum += forwardsBy(n, refusedOutcomes...)
	}
	return sum
}

// TestGrowAndShrinkUnderLoad: three nodes with auto-rebalance while 12
// groups × 3 devices reflect every 50 ms (through the first three nodes)
// and 40 offline devices hold 10,000 queued entries spread over 40
// shards. A fourth node starts: within 60 s every node serves 64 ± 1
// shards. Then the fourth node is drained: every shard is back on the
// first three. Throughout: nothing acked lost, ids consecutive, every
// device back on its first reconnect, no 503, no 41xx.
func TestGrowAndShrinkUnderLoad(t *testing.T) {
	auto := func(c *daemon.Config) { c.Cluster.AutoRebalance = true }
	prefix := fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1))
	base := t.TempDir()
	var nodes []*mediatorNode
	for _, id := range []string{"m1", "m2", "m3"} {
		nodes = append(nodes, startMediatorVia(t, id, prefix, filepath.Join(base, id), shared.clients, auto))
	}
	waitUntil(t, 20*time.Second, "three nodes balanced", func() bool {
		ok, _ := balanced(nodes[0].d.Cluster.Shards(), "m1", "m2", "m3")
		return ok
	})

	// Offline devices with queues, in 40 shards.
	queued := keysForShards(40)
	wants := make([][]string, len(queued))
	for i, k := range queued {
		wants[i] = fillQueue(t, nodes[i%3].d.DeviceURL, k, 2, 3, 250)
	}
	// Reflecting devices, through the first three nodes.
	live := keysForShards(12)
	for i, k := range live {
		createSlots(t, []d2d.Keys{k}, nodes[i%3].d.DeviceURL)
	}
	load := startDevices(live, "", func(ctx context.Context, d *loadDevice) {
		d.url = nodes[int(d.keys.DeviceGroupID()[1])%3].d.DeviceURL
		d.run(ctx, t, 50*time.Millisecond)
	})
	time.Sleep(time.Second) // load before the join (its duration, not an order)

	start := time.Now()
	nodes = append(nodes, startMediatorVia(t, "m4", prefix, filepath.Join(base, "m4"), shared.clients, auto))
	var count map[string]int
	waitUntil(t, 60*time.Second, "four nodes balanced (64 ± 1 shards each)", func() bool {
		var ok bool
		ok, count = balanced(nodes[0].d.Cluster.Shards(), "m1", "m2", "m3", "m4")
		return ok
	})
	t.Logf("a fourth node joined under load: balanced in %v (%v)", time.Since(start).Round(time.Millisecond), count)
	time.Sleep(time.Second) // load after the join

	start = time.Now()
	var raw string
	if code := nodes[1].admin(t, "POST", "/api/v1/cluster/nodes/m4/drain", &raw); code != 200 {
		t.Fatalf("drain of m4: %d %s", code, raw)
	}
	var dr adminapi.RebalanceResult
	if err := json.Unmarshal([]byte(raw), &dr); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 60*time.Second, "back on three nodes", func() bool {
		var ok bool
		ok, count = balanced(nodes[0].d.Cluster.Shards(), "m1", "m2", "m3")
		return ok
	})
	t.Logf("the fourth node drained under load: %d moves, back on three in %v (%v)", len(dr.Moves), time.Since(start).Round(time.Millisecond), count)
	time.Sleep(time.Second) // load after the drain

	load.stopAndCheck(t, nodes[0].d.DeviceURL)
	for _, d := range load.devices {
		if d.reconnects > 0 {
			for _, code := range d.closes {
				if code >= 4100 && code < 4200 {
					gid := d.keys.DeviceGroupID()
					t.Errorf("device %d of group %x closed with %d", d.id, gid[:2], code)
				}
			}
		}
	}
	for i, k := range queued {
		sameStrings(t, fmt.Sprintf("offline queue %d", i), drainQueue(t, nodes[i%3].d.DeviceURL, k, 3), wants[i])
	}
	if r := refusals(t, nodes); r != 0 {
		t.Fatalf("%.0f upgrades answered 503 during the join and the drain", r)
	}
}

// TestGrowAndShrinkPostgres is the same with `mediator serve` processes on
// one PostgreSQL database: moves hand over only the epoch.
func TestGrowAndShrinkPostgres(t *testing.T) {
	pc := startPGCluster(t, "p1", "p2", "p3")
	shardsOf := func() []cluster.ShardInfo {
		var out []cluster.ShardInfo
		for _, s := range pc.any().shards(t).Shards {
			sh, _ := cluster.ParseShard(s.Shard)
			out = append(out, cluster.ShardInfo{Shard: sh, Owner: s.Owner})
		}
		return out
	}
	waitUntil(t, 30*time.Second, "three nodes balanced", func() bool {
		ok, _ := balanced(shardsOf(), "p1", "p2", "p3")
		return ok
	})
	groups := keysForShards(12)
	acks := &firstAcks{}
	load := startLoadAnyNode(t, groups, pc, 50*time.Millisecond, acks)
	time.Sleep(time.Second)

	start := time.Now()
	pc.start("p4")
	var count map[string]int
	waitUntil(t, 60*time.Second, "four nodes balanced (64 ± 1 shards each)", func() bool {
		var ok bool
		ok, count = balanced(shardsOf(), "p1", "p2", "p3", "p4")
		return ok
	})
	t.Logf("a fourth node joined under load: balanced in %v (%v)", time.Since(start).Round(time.Millisecond), count)
	time.Sleep(time.Second)

	start = time.Now()
	var dr adminapi.RebalanceResult
	if code := pc.procs["p1"].post(t, "/api/v1/cluster/nodes/p4/drain", &dr); code != 200 {
		t.Fatalf("drain of p4: %d %+v", code, dr)
	}
	waitUntil(t, 60*time.Second, "back on three nodes", func() bool {
		var ok bool
		ok, count = balanced(shardsOf(), "p1", "p2", "p3")
		return ok
	})
	t.Logf("the fourth node drained under load: %d moves, back on three in %v (%v)", len(dr.Moves), time.Since(start).Round(time.Millisecond), count)
	time.Sleep(time.Second)
	load.stopAndCheck(t, pc.any().url)
	for _, d := range load.devices {
		for _, code := range d.closes {
			if code >= 4100 && code < 4200 {
				t.Errorf("device %d closed with %d", d.id, code)
			}
		}
	}
	total := 0.0
	for _, p := range pc.live() {
		total += processRefusals(t, p)
	}
	if total != 0 {
		t.Fatalf("%.0f upgrades answered 503 during the join and the drain", total)
	}
	// Every move succeeded: none may have logged an ERROR (a recipient's
	// request cancelled after its flip committed once did).
	for id, p := range pc.procs {
		if errs := p.logLines(`"level":"error"`); len(errs) > 0 {
			t.Errorf("%s logged %d errors during the join and the drain, first: %s", id, len(errs), errs[0])
		}
	}
}

// processRefusals is refusals for a `mediator serve` process, from its
// /metrics.
func processRefusals(t *testing.T, p *process) float64 {
	t.Helper()
	sum := 0.0
	for _, o := range refusedOutcomes {
		v, _ := strconv.ParseFloat(p.forwardsOf(t, o), 64)
		sum += v
	}
	return sum
}
