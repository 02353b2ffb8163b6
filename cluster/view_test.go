package cluster

import (
	"strings"
	"testing"

	"go.etcd.io/etcd/api/v3/mvccpb"
)

func kv(key, val string, mod, lease int64) *mvccpb.KeyValue {
	return &mvccpb.KeyValue{Key: []byte(key), Value: []byte(val), ModRevision: mod, Lease: lease}
}

// TestViewApply: each key kind lands in its place; deletions and
// unparsable values clear it; foreign keys are ignored.
func TestViewApply(t *testing.T) {
	k := newKeys("/p/")
	v := newView()
	v.apply(k, kv("/p/nodes/node-a", `{"advertise":"10.0.0.1:443"}`, 5, 0x77), false)
	v.apply(k, kv("/p/assign/2a", `{"node":"node-a","by":"controller"}`, 6, 0), false)
	v.apply(k, kv("/p/shards/2a", `{"node":"node-a","advertise":"10.0.0.1:443"}`, 7, 0x77), false)
	v.apply(k, kv("/p/moves/2a", `{"id":"m1","from":"node-a","to":"node-b","state":"draining","from_epoch":7}`, 8, 0), false)
	v.apply(k, kv("/p/controller/694d", `node-a`, 9, 0x99), false)
	v.apply(k, kv("/p/shards/zz", `{}`, 10, 0), false)
	if n := v.nodes["node-a"]; n.Advertise != "10.0.0.1:443" || n.lease != 0x77 {
		t.Fatalf("node %+v", n)
	}
	if a := v.assign[0x2a]; a == nil || a.Node != "node-a" || a.rev != 6 {
		t.Fatalf("assign %+v", a)
	}
	if o := v.owner[0x2a]; o == nil || o.Node != "node-a" || o.epoch != 7 || o.lease != 0x77 {
		t.Fatalf("owner %+v", o)
	}
	if m := v.moves[0x2a]; m == nil || m.State != StateDraining || m.FromEpoch != 7 || m.shard != 0x2a || m.rev != 8 {
		t.Fatalf("move %+v", m)
	}
	v.apply(k, kv("/p/shards/2a", "", 11, 0), true)
	v.apply(k, kv("/p/moves/2a", "not json", 12, 0), false)
	v.apply(k, kv("/p/nodes/node-a", "", 13, 0), true)
	if v.owner[0x2a] != nil || v.moves[0x2a] != nil || len(v.nodes) != 0 {
		t.Fatal("deleted or unparsable keys still in the view")
	}
}

// TestBalanceLogic: leastLoaded breaks ties by id; load counts moves for
// their recipient and ignores dead nodes; rebalancePlan evens out the
// served shards to within one.
func TestBalanceLogic(t *testing.T) {
	v := newView()
	for _, id := range []string{"a", "b", "c"} {
		v.nodes[id] = nodeEntry{Member: Member{ID: id}}
	}
	for i := range NumShards {
		node := "a"
		if i >= 200 {
			node = "b"
		}
		if i >= 250 {
			node = "dead"
		}
		v.assign[i] = &assignEntry{assignRecord: assignRecord{Node: node}}
		if node != "dead" {
			v.owner[i] = &ownerEntry{ownerRecord: ownerRecord{Node: node}, epoch: 1}
		}
	}
	v.moves[0] = &moveEntry{moveRecord: moveRecord{From: "a", To: "c", State: StateDraining}}
	load := v.load()
	if load["a"] != 199 || load["b"] != 50 || load["c"] != 1 || len(load) != 3 {
		t.Fatalf("load %v", load)
	}
	if id, _ := leastLoaded(map[string]int{"b": 3, "a": 3, "c": 4}, ""); id != "a" {
		t.Fatalf("leastLoaded tie → %s", id)
	}
	if id, _ := leastLoaded(map[string]int{"b": 3, "a": 1}, "a"); id != "b" {
		t.Fatalf("leastLoaded skip → %s", id)
	}
	plan := v.planRebalance(-1)
	after := v.load()
	for _, p := range plan {
		if p.Shard == 0 || v.owner[p.Shard] == nil || v.owner[p.Shard].Node != p.From || p.From != "a" && p.From != "b" {
			t.Fatalf("planned move of shard %s (moving or not served)", p.Shard)
		}
		after[p.From]--
		after[p.To]++
	}
	lo, hi := NumShards, 0
	for _, n := range after {
		lo, hi = min(lo, n), max(hi, n)
	}
	if hi-lo > 1 {
		t.Fatalf("after the plan: %v", after)
	}
}

// TestPlanRebalance: a node that joins and a node that drains are the
// same case; the plan moves only the excess, never a moving or unserved
// shard, and never more than its budget.
func TestPlanRebalance(t *testing.T) {
	mk := func(nodes ...string) *view {
		v := new(view)
		*v = newView()
		for _, id := range nodes {
			v.nodes[id] = nodeEntry{Member: Member{ID: id}}
		}
		for i := range NumShards {
			node := nodes[i%3] // the first three share everything
			v.assign[i] = &assignEntry{assignRecord: assignRecord{Node: node}}
			v.owner[i] = &ownerEntry{ownerRecord: ownerRecord{Node: node}, epoch: 1}
		}
		return v
	}
	count := func(v *view, plan []PlannedMove) map[string]int {
		c := v.load()
		for _, p := range plan {
			c[p.From]--
			c[p.To]++
		}
		return c
	}
	// A fourth node joins: exactly the excess moves to it, 64 each after.
	v := mk("a", "b", "c", "d")
	plan := v.planRebalance(-1)
	if got := count(v, plan); got["a"] != 64 || got["b"] != 64 || got["c"] != 64 || got["d"] != 64 || len(plan) != 64 {
		t.Fatalf("join: %d moves, after %v", len(plan), got)
	}
	seen := map[Shard]bool{}
	for _, p := range plan {
		if p.To != "d" || seen[p.Shard] || !strings.HasPrefix(p.Reason, "balance: ") {
			t.Fatalf("join plan: %+v", p)
		}
		seen[p.Shard] = true
	}
	// With a budget, the same plan's first moves.
	if b := v.planRebalance(4); len(b) != 4 || b[0] != plan[0] || b[3] != plan[3] {
		t.Fatalf("budget 4: %+v", b)
	}
	if b := v.planRebalance(0); len(b) != 0 {
		t.Fatalf("budget 0: %+v", b)
	}
	// A moving shard, an unreadable move record and an unserved shard
	// stay where they are.
	v.moves[3] = &moveEntry{moveRecord: moveRecord{From: "a", To: "b", State: StateDraining}}
	v.badMoves[6] = 9
	v.owner[9] = nil
	for _, p := range v.planRebalance(-1) {
		if p.Shard == 3 || p.Shard == 6 || p.Shard == 9 {
			t.Fatalf("planned %+v", p)
		}
	}
	// Node c drains: its shards go first, to the least loaded, and c
	// ends with none; the rest stay within one.
	v = mk("a", "b", "c")
	v.draining["c"] = true
	plan = v.planRebalance(-1)
	got := count(v, plan)
	if got["c"] != 0 || got["a"]+got["b"] != NumShards || got["a"]-got["b"] > 1 || got["b"]-got["a"] > 1 {
		t.Fatalf("drain: after %v", got)
	}
	for i, p := range plan {
		if p.From != "c" || p.Reason != "drain c" {
			t.Fatalf("drain plan move %d: %+v", i, p)
		}
	}
	// Everyone draining: nowhere to go.
	v.draining["a"], v.draining["b"] = true, true
	if p := v.planRebalance(-1); len(p) != 0 {
		t.Fatalf("all draining: %+v", p)
	}
}
