package daemon

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"d2m-mediator/cluster"
	"d2m-mediator/mediator"
)

// ClusterConfig turns on cluster mode: placement through etcd, shards =
// the device group id's first byte (package cluster).
type ClusterConfig struct {
	Etcd      clientv3.Config // endpoints, TLS, user and password
	NodeID    string
	Advertise string // host:port other nodes and the load balancer reach DeviceListen at; "" = the listener's address
	Prefix    string
	LeaseTTL  time.Duration
}

// placement adapts a cluster node to the server's Placement. Before Join
// (node nil) it serves nothing. With a shared store, a shard whose commit
// the database fenced is not served at that epoch any more, even while
// this node's view of etcd still says it owns it.
type placement struct {
	node   atomic.Pointer[cluster.Node]
	fenced [cluster.NumShards]atomic.Int64 // epoch the database refused (0: none)
}

// epoch is this node's epoch for the shard, if it owns the shard and the
// database has not refused that epoch.
func (p *placement) epoch(shard byte) (int64, bool) {
	n := p.node.Load()
	if n == nil {
		return 0, false
	}
	e, ok := n.Owns(cluster.Shard(shard))
	if !ok || p.fenced[shard].Load() == e {
		return 0, false
	}
	return e, true
}

func (p *placement) Route(shard byte) mediator.Route {
	n := p.node.Load()
	if n == nil {
		return mediator.Route{}
	}
	s := cluster.Shard(shard)
	if p.MayAck(shard) {
		return mediator.Route{Local: true, Node: n.ID()}
	}
	if _, ok := n.Owns(s); ok {
		// Owned but fenced (a move draining it, a keepalive late, the
		// database refusing our epoch because another node claimed
		// it): neither serve nor forward to ourselves. It settles: the
		// keepalive renews the fence or the lease is lost, the move
		// flips or resumes, etcd tells us the new owner.
		return mediator.Route{Settling: true}
	}
	if n.Incoming(s) {
		// Being moved here: the donor drains it and closes its
		// devices at the flip, possibly before this node has recorded
		// the flip; forwarded to the donor, they would be refused.
		return mediator.Route{Settling: true}
	}
	node, addr, _, ok := n.Owner(s)
	if !ok {
		return mediator.Route{}
	}
	if node == n.ID() {
		// The shard map names this node but the fence has not
		// recorded it yet (the watch saw a flip or claim first):
		// forwarding to ourselves would refuse it as a loop.
		return mediator.Route{Settling: true}
	}
	return mediator.Route{Node: node, Addr: addr}
}

func (p *placement) Draining(shard byte) bool {
	n := p.node.Load()
	return n != nil && n.Draining(cluster.Shard(shard))
}

// MayAck is asked once per ReflectAck: the etcd fence clock (lock-free)
// and, only after the database refused an epoch of this shard (rare), the
// owned epoch, which takes the fence's mutex.
func (p *placement) MayAck(shard byte) bool {
	n := p.node.Load()
	if n == nil || !n.MayAck(cluster.Shard(shard)) {
		return false
	}
	if f := p.fenced[shard].Load(); f != 0 {
		e, _ := n.Owns(cluster.Shard(shard))
		return f != e
	}
	return true
}

// joinCluster connects to etcd and joins the cluster as the node serving
// the already listening device listener.
func (d *Daemon) joinCluster(cc ClusterConfig, s *mediator.Server, p *placement, scheme string) error {
	cli, err := clientv3.New(cc.Etcd)
	if err != nil {
		return fmt.Errorf("etcd client: %w", err)
	}
	advertise := cc.Advertise
	if advertise == "" {
		advertise = d.DeviceAddr.String()
	}
	hooks := newMoveHooks(d)
	keepalive := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "mediator_cluster_keepalive_seconds",
		Help:    "Round trip of the node's etcd lease keepalives; the fence clock counts from their send time.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
	})
	node, err := cluster.New(cli, cluster.Config{
		NodeID: cc.NodeID, Advertise: advertise, Prefix: cc.Prefix, LeaseTTL: cc.LeaseTTL,
		OnKeepAlive: func(_ time.Time, rtt time.Duration) { keepalive.Observe(rtt.Seconds()) },
		Hooks:       hooks,
		// With a replicated store a lost node's shards are served by
		// another node at once: the data is in the database.
		AutoFailover: d.shared,
		Transport:    &httpTransport{scheme: scheme, client: &http.Client{Timeout: 5 * time.Minute}},
		OnEvent: func(ev cluster.Event) {
			if ev.Kind == cluster.ShardLost {
				n := s.CloseShard(byte(ev.Shard))
				d.log.Info().Int("shard", int(ev.Shard)).Int64("epoch", ev.Epoch).Str("reason", ev.Reason).
					Int("devices_closed", n).Msg("cluster: shard lost")
				// Moved (or reassigned) away: the data is the new
				// owner's now. A lost lease keeps it: the shard waits
				// for this node.
				if d.assignedElsewhere(ev.Shard) {
					hooks.handedOver(ev.Shard)
					d.bg.Add(1)
					go func() {
						defer d.bg.Done()
						d.dropMovedShard(s, ev.Shard)
					}()
				}
			} else {
				d.log.Info().Int("shard", int(ev.Shard)).Int64("epoch", ev.Epoch).Msg("cluster: shard gained")
			}
		},
		Log: d.log.With().Str("component", "cluster").Logger(),
	})
	if err != nil {
		cli.Close()
		return err
	}
	p.node.Store(node)
	s.Registry().MustRegister(keepalive, hooks.moves, hooks.moveSeconds, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "mediator_cluster_shards_owned",
		Help: "Shards this node serves and may ack for now.",
	}, func() float64 {
		owned := 0
		for i := 0; i < cluster.NumShards; i++ {
			if node.MayAck(cluster.Shard(i)) {
				owned++
			}
		}
		return float64(owned)
	}))
	registerClusterMetrics(s.Registry(), node)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := node.Join(ctx); err != nil {
		cli.Close()
		return fmt.Errorf("joining the cluster: %w", err)
	}
	d.Cluster, d.etcd = node, cli
	return nil
}

// assignedElsewhere reports whether the cluster has given the shard's
// data to another node.
func (d *Daemon) assignedElsewhere(shard cluster.Shard) bool {
	for _, si := range d.Cluster.Shards() {
		if si.Shard == shard {
			return si.Assigned != "" && si.Assigned != d.Cluster.ID()
		}
	}
	return false
}

// leaveCluster stops acking at once and revokes the node's lease (its
// shards stay assigned to it and wait for its return).
func (d *Daemon) leaveCluster(ctx context.Context) error {
	if d.Cluster == nil {
		return nil
	}
	err := d.Cluster.Close(ctx)
	d.etcd.Close()
	return err
}
