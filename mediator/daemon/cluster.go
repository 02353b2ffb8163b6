package daemon

import (
	"context"
	"fmt"
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
// (node nil) it serves nothing.
type placement struct{ node *cluster.Node }

func (p *placement) Route(shard byte) mediator.Route {
	if p.node == nil {
		return mediator.Route{}
	}
	s := cluster.Shard(shard)
	if p.node.MayAck(s) {
		return mediator.Route{Local: true, Node: p.node.ID()}
	}
	if _, ok := p.node.Owns(s); ok {
		// Owned but fenced (a move draining it, a keepalive late):
		// neither serve nor forward to ourselves. It settles: the
		// keepalive renews the fence or the lease is lost, the move
		// flips or resumes.
		return mediator.Route{Settling: true}
	}
	if p.node.Incoming(s) {
		// Being moved here: the donor drains it and closes its
		// devices at the flip, possibly before this node has recorded
		// the flip; forwarded to the donor, they would be refused.
		return mediator.Route{Settling: true}
	}
	node, addr, _, ok := p.node.Owner(s)
	if !ok {
		return mediator.Route{}
	}
	if node == p.node.ID() {
		// The shard map names this node but the fence has not
		// recorded it yet (the watch saw a flip or claim first):
		// forwarding to ourselves would refuse it as a loop.
		return mediator.Route{Settling: true}
	}
	return mediator.Route{Node: node, Addr: addr}
}

func (p *placement) Draining(shard byte) bool {
	return p.node != nil && p.node.Draining(cluster.Shard(shard))
}

func (p *placement) MayAck(shard byte) bool {
	return p.node != nil && p.node.MayAck(cluster.Shard(shard))
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
		Transport:   &httpTransport{scheme: scheme, client: &http.Client{Timeout: 5 * time.Minute}},
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
	p.node = node
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
