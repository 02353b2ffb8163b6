package cluster

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"d2m-mediator/cluster"
	"d2m-mediator/cluster/clusterfake"
	"d2m-mediator/internal/pgtest"
)

const (
	ttl    = 2 * time.Second
	margin = 400 * time.Millisecond
)

// etcdCluster is three embedded etcd members on loopback.
type etcdCluster struct {
	members []*embed.Etcd
	clients []string // client URLs host:port, by member
}

// startEtcd starts three members in dir with a 50 ms heartbeat and a
// 250 ms election timeout, so lease TTLs of 1–2 s work. The ports are
// picked free and released before etcd binds them, so another process
// can take one meanwhile: a failed start is retried with new ports.
func startEtcd(dir string) (*etcdCluster, error) {
	var err error
	for attempt := range 3 {
		var ec *etcdCluster
		if ec, err = startEtcdOnce(fmt.Sprintf("%s/try%d", dir, attempt)); err == nil {
			return ec, nil
		}
	}
	return nil, err
}

func startEtcdOnce(dir string) (*etcdCluster, error) {
	const n = 3
	var peers, clients []*url.URL
	for range 2 * n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		u, _ := url.Parse("http://" + ln.Addr().String())
		ln.Close()
		if len(peers) < n {
			peers = append(peers, u)
		} else {
			clients = append(clients, u)
		}
	}
	var initial []string
	for i := range n {
		initial = append(initial, fmt.Sprintf("m%d=%s", i, peers[i]))
	}
	ec := &etcdCluster{}
	for i := range n {
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i)
		cfg.Dir = fmt.Sprintf("%s/m%d", dir, i)
		cfg.ListenPeerUrls = []url.URL{*peers[i]}
		cfg.AdvertisePeerUrls = []url.URL{*peers[i]}
		cfg.ListenClientUrls = []url.URL{*clients[i]}
		cfg.AdvertiseClientUrls = []url.URL{*clients[i]}
		cfg.InitialCluster = strings.Join(initial, ",")
		cfg.InitialClusterToken = "d2m-test"
		cfg.TickMs, cfg.ElectionMs = 50, 250
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		cfg.ListenMetricsUrls = nil
		e, err := embed.StartEtcd(cfg)
		if err != nil {
			ec.close()
			return nil, err
		}
		ec.members = append(ec.members, e)
		ec.clients = append(ec.clients, clients[i].Host)
	}
	for _, e := range ec.members {
		select {
		case <-e.Server.ReadyNotify():
		case <-time.After(20 * time.Second):
			ec.close()
			return nil, errors.New("etcd cluster not ready after 20 s")
		}
	}
	return ec, nil
}

func (ec *etcdCluster) close() {
	for _, e := range ec.members {
		e.Close()
	}
}

// leader returns the index of the member that is the raft leader.
func (ec *etcdCluster) leader() int {
	for i, e := range ec.members {
		if e.Server.Leader() == e.Server.MemberID() {
			return i
		}
	}
	return -1
}

var shared *etcdCluster

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(runHelperNode())
	}
	dir, err := os.MkdirTemp("", "d2m-etcd-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	start := time.Now()
	shared, err = startEtcd(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "start etcd:", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "etcd: 3 members ready in %v\n", time.Since(start).Round(time.Millisecond))
	code := m.Run()
	pgtest.StopShared()
	if p50, p99, n := keepalives.percentiles(); n > 0 {
		fmt.Fprintf(os.Stderr, "lease keepalive round trip over %d keepalives: p50 %v, p99 %v\n", n, p50, p99)
	}
	shared.close()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proxy forwards TCP to one etcd member and can hold every byte in both
// directions: a node behind paused proxies is, for etcd, a stopped
// process (SIGSTOP), while its own goroutines and clock keep running.
type proxy struct {
	ln     net.Listener
	target string

	mu     sync.Mutex
	cond   *sync.Cond
	paused bool
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

func newProxy(t *testing.T, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target, conns: make(map[net.Conn]struct{})}
	p.cond = sync.NewCond(&p.mu)
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			up.Close()
			return
		}
		p.conns[c], p.conns[up] = struct{}{}, struct{}{}
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(c, up)
		go p.pipe(up, c)
	}
}

func (p *proxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			for p.paused && !p.closed {
				p.cond.Wait()
			}
			p.mu.Unlock()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *proxy) setPaused(v bool) {
	p.mu.Lock()
	p.paused = v
	p.cond.Broadcast()
	p.mu.Unlock()
}

func (p *proxy) close() {
	p.ln.Close()
	p.mu.Lock()
	p.closed = true
	for c := range p.conns {
		c.Close()
	}
	p.cond.Broadcast()
	p.mu.Unlock()
	p.wg.Wait()
}

// testNode is a cluster.Node with its own client (through proxies), fake
// hooks and an event log.
type testNode struct {
	*cluster.Node
	id      string
	cli     *clientv3.Client
	proxies []*proxy
	hooks   *clusterfake.Hooks

	mu     sync.Mutex
	events []cluster.Event
}

type nodeOpts struct {
	autoFailover  bool
	autoRebalance bool
	noController  bool
	advertise     map[string]string // node id → advertise address (default: a placeholder)
}

// env is one test's cluster: an etcd, a key prefix of its own, nodes.
type env struct {
	t         *testing.T
	ec        *etcdCluster
	prefix    string
	transport *clusterfake.Transport
	opts      nodeOpts
	admin     *clientv3.Client // direct client for assertions
}

func newEnv(t *testing.T, ec *etcdCluster, opts nodeOpts) *env {
	if ec == nil {
		ec = shared
	}
	e := &env{t: t, ec: ec, prefix: fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1)), transport: clusterfake.NewTransport(), opts: opts}
	e.admin = e.client(ec.clients)
	return e
}

func (e *env) client(endpoints []string) *clientv3.Client {
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { cli.Close() })
	return cli
}

// start creates and joins a node.
func (e *env) start(id string) *testNode {
	e.t.Helper()
	tn := &testNode{id: id, hooks: clusterfake.NewHooks()}
	var eps []string
	for _, c := range e.ec.clients {
		p := newProxy(e.t, c)
		tn.proxies = append(tn.proxies, p)
		eps = append(eps, p.addr())
	}
	tn.cli = e.client(eps)
	n, err := cluster.New(tn.cli, cluster.Config{
		NodeID:        id,
		Advertise:     cmp.Or(e.opts.advertise[id], "127.0.0.1:9"),
		Prefix:        e.prefix,
		LeaseTTL:      ttl,
		FenceMargin:   margin,
		AutoFailover:  e.opts.autoFailover,
		AutoRebalance: e.opts.autoRebalance,
		NoController:  e.opts.noController,
		SettleDelay:   200 * time.Millisecond,
		Hooks:         tn.hooks,
		Transport:     e.transport,
		OnKeepAlive:   func(_ time.Time, rtt time.Duration) { keepalives.add(rtt) },
		OnEvents: func(evs []cluster.Event) {
			tn.mu.Lock()
			tn.events = append(tn.events, evs...)
			tn.mu.Unlock()
		},
	})
	if err != nil {
		e.t.Fatal(err)
	}
	tn.Node = n
	e.transport.Add(n)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.Join(ctx); err != nil {
		e.t.Fatalf("join %s: %v", id, err)
	}
	e.t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = n.Close(ctx)
	})
	return tn
}

func (tn *testNode) pause(v bool) {
	for _, p := range tn.proxies {
		p.setPaused(v)
	}
}

// eventsFor returns the node's events for shard s.
func (tn *testNode) eventsFor(s cluster.Shard) []cluster.Event {
	tn.mu.Lock()
	defer tn.mu.Unlock()
	var out []cluster.Event
	for _, ev := range tn.events {
		if ev.Shard == s {
			out = append(out, ev)
		}
	}
	return out
}

// callsFor returns the node's hook calls that name shard s, in order
// ("settle" at a claim, "drain", "export", "import", "drop", "reset").
func (tn *testNode) callsFor(s cluster.Shard) string {
	var out []string
	for _, c := range tn.hooks.Calls() {
		if strings.HasSuffix(c, " "+s.String()) {
			out = append(out, strings.TrimSuffix(c, " "+s.String()))
		}
	}
	return strings.Join(out, ",")
}

// lastEvent returns the node's last event for s.
func (tn *testNode) lastEvent(s cluster.Shard) (cluster.Event, bool) {
	evs := tn.eventsFor(s)
	if len(evs) == 0 {
		return cluster.Event{}, false
	}
	return evs[len(evs)-1], true
}

// waitUntil polls cond until it holds or timeout passes.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// owned returns the shards each node serves, as seen by node v.
func owned(v *testNode) map[string][]cluster.Shard {
	out := make(map[string][]cluster.Shard)
	for _, si := range v.Shards() {
		if si.Owner != "" {
			out[si.Owner] = append(out[si.Owner], si.Shard)
		}
	}
	return out
}

// allServed reports whether every node sees all 256 shards owned, and
// every owner acks for exactly its own shards.
func allServed(nodes ...*testNode) bool {
	byID := make(map[string]*testNode)
	for _, n := range nodes {
		byID[n.id] = n
	}
	for _, v := range nodes {
		for i := range cluster.NumShards {
			s := cluster.Shard(i)
			owner, _, _, ok := v.Owner(s)
			if !ok || byID[owner] == nil || !byID[owner].MayAck(s) {
				return false
			}
		}
	}
	return true
}

// rttLog collects keepalive round trips of every node of every test.
type rttLog struct {
	mu   sync.Mutex
	rtts []time.Duration
}

var keepalives rttLog

func (l *rttLog) add(d time.Duration) {
	l.mu.Lock()
	l.rtts = append(l.rtts, d)
	l.mu.Unlock()
}

func (l *rttLog) percentiles() (p50, p99 time.Duration, n int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n = len(l.rtts)
	if n == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(l.rtts)
	slices.Sort(s)
	return s[n*50/100], s[min(n-1, n*99/100)], n
}
