package cluster

import (
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
	plan := v.rebalancePlan()
	after := v.load()
	for _, p := range plan {
		if p.shard == 0 || v.owner[p.shard] == nil || v.owner[p.shard].Node != "a" && v.owner[p.shard].Node != "b" {
			t.Fatalf("planned move of shard %s (moving or not served)", p.shard)
		}
		after[v.owner[p.shard].Node]--
		after[p.to]++
	}
	lo, hi := NumShards, 0
	for _, n := range after {
		lo, hi = min(lo, n), max(hi, n)
	}
	if hi-lo > 1 {
		t.Fatalf("after the plan: %v", after)
	}
}
