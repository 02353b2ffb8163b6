package daemon

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"d2m-mediator/cluster"
)

// registerClusterMetrics adds the gauges the cluster alerts and dashboard
// panels read (deploy/prometheus/mediator-rules.yml,
// deploy/grafana/mediator-dashboard.json). Each is computed at scrape
// time from the node's in-memory view of the shard map and its fence, so
// a scrape costs no etcd request. Every node reports the map as it sees
// it: the rules take the maximum over the nodes.
func registerClusterMetrics(reg prometheus.Registerer, node *cluster.Node) {
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mediator_cluster_shards_unserved",
			Help: "Shards assigned to a node that has no live owner key, as this node sees the map: their devices get 503 until the node is back (bbolt) or the shard is failed over.",
		}, func() float64 { return float64(unservedShards(node.Shards())) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mediator_cluster_moves_in_flight",
			Help: "Planned shard moves in the map that have not ended (draining or exported).",
		}, func() float64 {
			n, _ := unfinishedMoves(node.Shards(), time.Now())
			return float64(n)
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mediator_cluster_move_oldest_seconds",
			Help: "Age of the oldest unfinished planned move in the map (0 without one); a move is aborted after its 5 min timeout.",
		}, func() float64 {
			_, oldest := unfinishedMoves(node.Shards(), time.Now())
			return oldest.Seconds()
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "mediator_cluster_fence_window_seconds",
			Help: "How long after a keepalive's send time the node may ack without a newer successful keepalive: lease TTL minus the fence margin (0 without a lease).",
		}, func() float64 {
			st := node.Fence()
			if st.Lease == 0 || st.OwnedUntil.IsZero() {
				return 0
			}
			return st.OwnedUntil.Sub(st.LastKeepAliveSent).Seconds()
		}),
	)
}

// unservedShards counts shards that are assigned but have no owner: the
// owner key lives on the owner's lease, so a missing one means no live
// node serves the shard.
func unservedShards(shards []cluster.ShardInfo) int {
	n := 0
	for _, s := range shards {
		if s.Assigned != "" && s.Owner == "" {
			n++
		}
	}
	return n
}

// unfinishedMoves counts the moves still draining or exported and returns
// the age of the oldest.
func unfinishedMoves(shards []cluster.ShardInfo, now time.Time) (n int, oldest time.Duration) {
	for _, s := range shards {
		if s.Move != cluster.StateDraining && s.Move != cluster.StateExported {
			continue
		}
		n++
		if !s.MoveStarted.IsZero() {
			oldest = max(oldest, now.Sub(s.MoveStarted))
		}
	}
	return n, oldest
}
