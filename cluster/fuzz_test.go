package cluster

import (
	"testing"

	"go.etcd.io/etcd/api/v3/mvccpb"
)

// FuzzViewApply: any key and value under the prefix, put or deleted,
// leaves the view usable (values that do not parse are treated as absent).
func FuzzViewApply(f *testing.F) {
	f.Add("nodes/node-a", `{"advertise":"10.0.0.1:443","started":"2026-01-01T00:00:00Z"}`, false)
	f.Add("assign/2a", `{"node":"node-a","by":"controller"}`, false)
	f.Add("shards/ff", `{"node":"node-b","advertise":"x:1"}`, true)
	f.Add("moves/00", `{"id":"m","from":"a","to":"b","state":"exported","from_epoch":-1}`, false)
	f.Add("moves/0", `{`, false)
	f.Add("controller/abc", `node-a`, false)
	f.Add("drain/node-a", `{"since":"2026-01-01T00:00:00Z"}`, false)
	k := newKeys("/p/")
	f.Fuzz(func(t *testing.T, key, val string, deleted bool) {
		v := newView()
		v.apply(k, &mvccpb.KeyValue{Key: []byte("/p/" + key), Value: []byte(val), ModRevision: 3}, deleted)
		_ = v.load()
		_ = v.planRebalance(-1)
		_ = v.shardInfos()
		_, _ = ParseShard(key)
	})
}
