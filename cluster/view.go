package cluster

import (
	"encoding/json"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// view is a node's copy of the cluster's keys, fed by its watch. The
// watch loop owns it; others read it under Node.mu.
type view struct {
	rev    int64 // etcd revision the view reflects
	nodes  map[string]nodeEntry
	assign [NumShards]*assignEntry
	owner  [NumShards]*ownerEntry
	moves  [NumShards]*moveEntry
	// badMoves holds, per shard, the revision of a move record that
	// cannot be read (0: none). It would block every move and claim of
	// the shard (both compare that no record exists); the controller
	// deletes it.
	badMoves [NumShards]int64
	draining map[string]bool // nodes with a drain mark (drain/<id>)
}

type nodeEntry struct {
	Member
	lease clientv3.LeaseID
}

type assignEntry struct {
	assignRecord
	rev int64
}

type ownerEntry struct {
	ownerRecord
	epoch int64 // ModRevision of the owner key
	lease clientv3.LeaseID
}

type moveEntry struct {
	moveRecord
	shard Shard
	rev   int64
}

func newView() view { return view{nodes: make(map[string]nodeEntry), draining: make(map[string]bool)} }

// snapshot is a copy of the view that the watch loop's later changes do
// not touch: the arrays hold pointers to immutable entries, the maps are
// copied.
func (v *view) snapshot() view {
	c := *v
	c.nodes = make(map[string]nodeEntry, len(v.nodes))
	for k, e := range v.nodes {
		c.nodes[k] = e
	}
	c.draining = make(map[string]bool, len(v.draining))
	for k, d := range v.draining {
		c.draining[k] = d
	}
	return c
}

// apply takes one key's new value (or its deletion) into the view.
// Unparsable values are treated as absent: they cannot be acted on.
func (v *view) apply(k keys, kv *mvccpb.KeyValue, deleted bool) {
	key := string(kv.Key)
	if id, ok := strings.CutPrefix(key, k.nodes()); ok {
		var rec nodeRecord
		if deleted || json.Unmarshal(kv.Value, &rec) != nil {
			delete(v.nodes, id)
			return
		}
		v.nodes[id] = nodeEntry{Member: Member{ID: id, Advertise: rec.Advertise, Started: rec.Started, Admin: rec.Admin, TLS: rec.TLS}, lease: clientv3.LeaseID(kv.Lease)}
		return
	}
	if id, ok := strings.CutPrefix(key, k.drains()); ok {
		if deleted {
			delete(v.draining, id)
		} else {
			v.draining[id] = true
		}
		return
	}
	if s, ok := k.shardSuffix(key, k.assigns()); ok {
		var rec assignRecord
		if deleted || json.Unmarshal(kv.Value, &rec) != nil {
			v.assign[s] = nil
			return
		}
		v.assign[s] = &assignEntry{assignRecord: rec, rev: kv.ModRevision}
		return
	}
	if s, ok := k.shardSuffix(key, k.owners()); ok {
		var rec ownerRecord
		if deleted || json.Unmarshal(kv.Value, &rec) != nil {
			v.owner[s] = nil
			return
		}
		v.owner[s] = &ownerEntry{ownerRecord: rec, epoch: kv.ModRevision, lease: clientv3.LeaseID(kv.Lease)}
		return
	}
	if s, ok := k.shardSuffix(key, k.moves()); ok {
		var rec moveRecord
		v.badMoves[s] = 0
		if deleted {
			v.moves[s] = nil
			return
		}
		if json.Unmarshal(kv.Value, &rec) != nil || rec.ID == "" {
			v.moves[s] = nil
			v.badMoves[s] = kv.ModRevision
			return
		}
		v.moves[s] = &moveEntry{moveRecord: rec, shard: s, rev: kv.ModRevision}
	}
}

// load counts, per live node, the shards assigned to it (moves in flight
// count for their recipient).
func (v *view) load() map[string]int {
	load := make(map[string]int, len(v.nodes))
	for id := range v.nodes {
		load[id] = 0
	}
	for s := range NumShards {
		node := ""
		if a := v.assign[s]; a != nil {
			node = a.Node
		}
		if m := v.moves[s]; m != nil && !m.finished() {
			node = m.To
		}
		if _, live := load[node]; live {
			load[node]++
		}
	}
	return load
}

// leastLoaded picks the live node with the fewest shards (ties: smallest
// id), excluding skip.
func leastLoaded(load map[string]int, skip string) (string, bool) {
	best, bestN := "", 0
	for id, n := range load {
		if id == skip {
			continue
		}
		if best == "" || n < bestN || (n == bestN && id < best) {
			best, bestN = id, n
		}
	}
	return best, best != ""
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only plain structs are marshalled here
	}
	return string(b)
}
