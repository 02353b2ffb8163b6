package daemon

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"strconv"
	"sync/atomic"
	"time"

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
	// AdminAdvertise is the host:port other nodes reach the admin listener
	// at (they forward admin requests for this node's shards there); ""
	// = the admin listener's address (on a wildcard address, with the
	// host of Advertise).
	AdminAdvertise string
	Prefix         string
	LeaseTTL       time.Duration
	// RootCAs verifies the other nodes' device listener certificates
	// when they serve TLS (forwarded devices, shard transfers); nil: the
	// system roots.
	RootCAs *x509.CertPool
	// AutoRebalance: the elected controller keeps the shards balanced
	// over the live nodes that are not draining (cluster.Config).
	AutoRebalance bool
	// MaxConcurrentMoves bounds the moves a rebalance or drain makes at
	// once (cluster default 4).
	MaxConcurrentMoves int
	// MoveTimeout bounds a planned move (cluster default 60s).
	MoveTimeout time.Duration
	// TransferIdleTimeout bounds how long a shard transfer may make no
	// progress (DefaultTransferIdleTimeout).
	TransferIdleTimeout time.Duration
}

// placement adapts a cluster node to the server's Placement. Before Join
// (node nil) it serves nothing. It holds no state of its own: what a
// shard is on this node is the node's shard lifecycle (cluster.Node
// Status, Admit, MayAck).
type placement struct {
	node atomic.Pointer[cluster.Node]
	fake shardNode // tests: answers instead of node
}

// shardNode is what placement asks of the cluster node (*cluster.Node);
// its unit tests drive the routing decisions with a fake.
type shardNode interface {
	ID() string
	Status(cluster.Shard) cluster.ShardStatus
	MayAck(cluster.Shard) bool
	Admit(ctx context.Context, s cluster.Shard, epoch int64) error
	Release(cluster.Shard)
	Incoming(cluster.Shard) bool
	Moving(cluster.Shard) bool
	Owner(cluster.Shard) (node, addr string, epoch int64, ok bool)
	Member(id string) (cluster.Member, bool)
}

// get returns the node, nil before Join.
func (p *placement) get() shardNode {
	if p.fake != nil {
		return p.fake
	}
	if n := p.node.Load(); n != nil {
		return n
	}
	return nil
}

// Epoch is the epoch this node serves the shard at (serving, or frozen by
// a planned move).
func (p *placement) Epoch(shard byte) (int64, bool) {
	n := p.get()
	if n == nil {
		return 0, false
	}
	switch st := n.Status(cluster.Shard(shard)); st.Phase {
	case cluster.PhaseServing, cluster.PhaseFrozen:
		return st.Epoch, true
	}
	return 0, false
}

func (p *placement) Admit(ctx context.Context, shard byte, epoch int64) error {
	n := p.get()
	if n == nil {
		return &cluster.ShardGoneError{Shard: cluster.Shard(shard)}
	}
	return n.Admit(ctx, cluster.Shard(shard), epoch)
}

func (p *placement) Release(shard byte) {
	if n := p.get(); n != nil {
		n.Release(cluster.Shard(shard))
	}
}

func (p *placement) Route(shard byte) mediator.Route {
	n := p.get()
	if n == nil {
		return mediator.Route{}
	}
	s := cluster.Shard(shard)
	switch st := n.Status(s); st.Phase {
	case cluster.PhaseServing:
		if n.MayAck(s) {
			return mediator.Route{Local: true, Node: n.ID()}
		}
		// Served, but the fence clock has run out (a keepalive late):
		// the next keepalive renews it, or the lease is lost.
		return mediator.Route{Settling: true}
	case cluster.PhaseFrozen, cluster.PhaseReceiving, cluster.PhaseFenced:
		// A planned move drains it (it thaws, or goes to its new owner),
		// imports it here (the flip follows), or the store refused our
		// epoch (etcd names the new owner soon).
		return mediator.Route{Settling: true}
	}
	if n.Incoming(s) || n.Moving(s) {
		// A planned move is about to change the owner: forwarded to the
		// donor now, the device would arrive while the donor freezes or
		// has just handed the shard over.
		return mediator.Route{Settling: true}
	}
	node, addr, _, ok := n.Owner(s)
	if !ok {
		return mediator.Route{}
	}
	if node == n.ID() {
		// The shard map names this node but the lifecycle has not
		// recorded it yet (the watch saw a flip or claim first):
		// forwarding to ourselves would refuse it as a loop.
		return mediator.Route{Settling: true}
	}
	m, _ := n.Member(node)
	return mediator.Route{Node: node, Addr: addr, TLS: m.TLS}
}

// MayAck is asked once per ReflectAck: lock-free.
func (p *placement) MayAck(shard byte) bool {
	n := p.get()
	return n != nil && n.MayAck(cluster.Shard(shard))
}

// joinCluster connects to etcd and joins the cluster as the node serving
// the already listening device listener.
func (d *Daemon) joinCluster(cc ClusterConfig, s *mediator.Server, p *placement, deviceTLS bool) error {
	cli, err := clientv3.New(cc.Etcd)
	if err != nil {
		return fmt.Errorf("etcd client: %w", err)
	}
	advertise := cc.Advertise
	if advertise == "" {
		advertise = d.DeviceAddr.String()
	}
	adminAdvertise := cc.AdminAdvertise
	if adminAdvertise == "" && d.AdminAddr != nil {
		adminAdvertise = defaultAdminAdvertise(advertise, d.AdminAddr)
	}
	d.transferIdle = cc.TransferIdleTimeout
	if d.transferIdle <= 0 {
		d.transferIdle = DefaultTransferIdleTimeout
	}
	hooks := newMoveHooks(d)
	events := newEventLog(d, s, hooks)
	plannedMoves := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "mediator_cluster_planned_moves_total",
		Help: "Moves this node planned and started (a rebalance, a drain, the controller's auto-rebalance), by outcome: handed_over, failed.",
	}, []string{"outcome"})
	keepalive := prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "mediator_cluster_keepalive_seconds",
		Help:    "Round trip of the node's etcd lease keepalives; the fence clock counts from their send time.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
	})
	node, err := cluster.New(cli, cluster.Config{
		NodeID: cc.NodeID, Advertise: advertise, Prefix: cc.Prefix, LeaseTTL: cc.LeaseTTL,
		AutoRebalance: cc.AutoRebalance, MaxConcurrentMoves: cc.MaxConcurrentMoves, MoveTimeout: cc.MoveTimeout,
		OnPlannedMove: func(pm cluster.PlannedMove, err error) {
			outcome := "handed_over"
			if err != nil {
				outcome = "failed"
			}
			plannedMoves.WithLabelValues(outcome).Inc()
		},
		AdminAdvertise: adminAdvertise, DeviceTLS: deviceTLS,
		OnKeepAlive: func(_ time.Time, rtt time.Duration) { keepalive.Observe(rtt.Seconds()) },
		Hooks:       hooks,
		// With a replicated store a lost node's shards are served by
		// another node at once: the data is in the database, and a move
		// hands over only the epoch.
		AutoFailover: d.shared,
		SharedStore:  d.shared,
		Transport:    newHTTPTransport(nodeTLS(cc.RootCAs), cc.TransferIdleTimeout, func() []byte { return p.node.Load().Secret() }),
		OnEvents:     events.handle,
		Log:          d.log.With().Str("component", "cluster").Logger(),
	})
	if err != nil {
		cli.Close()
		return err
	}
	p.node.Store(node)
	s.Registry().MustRegister(keepalive, plannedMoves, events.moves, events.moveSeconds, prometheus.NewGaugeFunc(prometheus.GaugeOpts{
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

// defaultAdminAdvertise is where other nodes reach the admin listener
// when no address is configured: the listener's address, but on a
// wildcard address (0.0.0.0, ::) the host other nodes reach the device
// listener at, with the admin listener's port.
func defaultAdminAdvertise(deviceAdvertise string, admin net.Addr) string {
	tcp, ok := admin.(*net.TCPAddr)
	if !ok || !tcp.IP.IsUnspecified() {
		return admin.String()
	}
	host, _, err := net.SplitHostPort(deviceAdvertise)
	if err != nil {
		return admin.String()
	}
	return net.JoinHostPort(host, strconv.Itoa(tcp.Port))
}

// nodeTLS is the client TLS configuration for connections to other
// nodes' device listeners: their certificates are verified against
// roots (nil: the system roots), for the host of the address dialled.
func nodeTLS(roots *x509.CertPool) *tls.Config {
	return &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
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
