package cluster

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/url"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"d2m-mediator/cluster"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/internal/faultproxy"
	"d2m-mediator/mediator"
	"d2m-mediator/mediator/daemon"
	"d2m-mediator/proto/d2mpb"
)

// Network faults between the parts of a cluster (issue 22): a fault proxy
// (internal/faultproxy) sits between a node and etcd, a node and the
// PostgreSQL primary, the primary and its standby, a node and the other
// nodes (its advertise address: forwarded devices and shard transfers),
// and a device and a node. Every scenario asserts:
//
//	(a) nothing acknowledged is lost (every acked reflection reaches every
//	    other device of its group);
//	(b) Reflected ids stay consecutive per slot (a redelivery repeats an
//	    id with the same envelope);
//	(c) no ReflectAck for a shard from a node past its fence: no ack on a
//	    session served by the cut-off node for a reflection sent at or
//	    after its fence deadline, and none received later than
//	    fenceTolerance after it;
//	(d) devices keep working, or are closed with a documented code
//	    within a bound the scenario states (and measures);
//	(e) nothing is left behind: the nodes' goroutines return to their
//	    count before the fault, and no connection stays open through the
//	    proxies once the devices are gone.
//
// Timeouts are short so that the whole set runs in seconds: lease TTL 2 s
// (fence at last keepalive sent + 1.6 s), idle timeout 3 s, transfer idle
// timeout 1 s, PostgreSQL statement timeout 1 s.

const (
	faultIdle            = 3 * time.Second // mediator IdleTimeout in these tests
	faultHandshake       = 3 * time.Second
	faultTransferIdle    = time.Second
	faultStatementMillis = 1000
	// fenceTolerance is how long after the fence deadline an ack decided
	// just before it may still arrive (the writer's queue and loopback,
	// under the race detector on a busy machine).
	fenceTolerance = 100 * time.Millisecond
)

// faultNode is an in-process node whose links go through fault proxies.
type faultNode struct {
	*mediatorNode
	etcd []*faultproxy.Proxy // this node → each etcd member
	peer *faultproxy.Proxy   // other nodes → this node's device listener (its advertise address)
	pg   *faultproxy.Proxy   // this node → the PostgreSQL primary (nil with bbolt)
}

type faultOpts struct {
	dsn  string // PostgreSQL store (through a proxy); "" = bbolt
	tune func(*daemon.Config)
}

func startProxyT(t *testing.T, target string) *faultproxy.Proxy {
	t.Helper()
	p, err := faultproxy.Start(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// proxiedDSN returns dsn with its host:port replaced by a proxy's.
func proxiedDSN(t *testing.T, dsn string) (string, *faultproxy.Proxy) {
	t.Helper()
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	p := startProxyT(t, u.Host)
	u.Host = p.Addr()
	q := u.Query()
	q.Set("statement_timeout", fmt.Sprint(faultStatementMillis))
	u.RawQuery = q.Encode()
	return u.String(), p
}

// startFaultNode starts node id with every link through a proxy.
func startFaultNode(t *testing.T, id, prefix, dir string, o faultOpts) *faultNode {
	t.Helper()
	fn := &faultNode{peer: startProxyT(t, "")}
	var eps []string
	for _, c := range shared.clients {
		p := startProxyT(t, c)
		fn.etcd = append(fn.etcd, p)
		eps = append(eps, p.Addr())
	}
	var dsn string
	if o.dsn != "" {
		dsn, fn.pg = proxiedDSN(t, o.dsn)
	}
	fn.mediatorNode = startMediatorWith(t, id, prefix, dir, eps, func(c *daemon.Config) {
		c.Server.IdleTimeout = faultIdle
		c.Server.HandshakeTimeout = faultHandshake
		c.Cluster.Advertise = fn.peer.Addr()
		c.Cluster.TransferIdleTimeout = faultTransferIdle
		c.Cluster.MoveTimeout = 20 * time.Second
		c.Cluster.Etcd.DialTimeout = 2 * time.Second
		if dsn != "" {
			c.StoreDSN = dsn
		}
		if o.tune != nil {
			o.tune(c)
		}
	})
	fn.peer.SetTarget(fn.d.DeviceAddr.String())
	return fn
}

// startFaultCluster starts the named nodes and waits until every shard is
// served, as every node sees it.
func startFaultCluster(t *testing.T, o faultOpts, ids ...string) []*faultNode {
	t.Helper()
	prefix := fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1))
	base := t.TempDir()
	var nodes []*faultNode
	for _, id := range ids {
		nodes = append(nodes, startFaultNode(t, id, prefix, filepath.Join(base, id), o))
	}
	waitUntil(t, 20*time.Second, "every shard served, as every node sees it", func() bool {
		for _, n := range nodes {
			for s := range cluster.NumShards {
				if _, _, _, ok := n.d.Cluster.Owner(cluster.Shard(s)); !ok {
					return false
				}
			}
		}
		return true
	})
	return nodes
}

func (n *faultNode) cutEtcd(on bool) {
	for _, p := range n.etcd {
		p.Blackhole(on)
	}
}

func (n *faultNode) etcdLatency(d time.Duration) {
	for _, p := range n.etcd {
		p.Latency(faultproxy.Both, d)
	}
}

// groupsOwnedBy returns k groups in k distinct shards that node owns.
func groupsOwnedBy(t *testing.T, node *faultNode, k int) []d2d.Keys {
	t.Helper()
	seen := map[byte]bool{}
	var out []d2d.Keys
	for tries := 0; len(out) < k; tries++ {
		if tries > 100000 {
			t.Fatalf("%s owns too few shards", node.id)
		}
		g := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		s := g.DeviceGroupID()[0]
		if owner, _, _, _ := node.d.Cluster.Owner(cluster.Shard(s)); owner == node.id && !seen[s] {
			seen[s] = true
			out = append(out, g)
		}
	}
	return out
}

// ackRec is one ReflectAck a device received.
type ackRec struct {
	env        string
	sent, recv time.Time
}

// fsession is one connection of a fault device.
type fsession struct {
	url        string
	start, end time.Time
	code       int // close code the device saw (0: its own stop; 1006: no close frame)
	acks       []ackRec
}

// fdev is a device that reflects steadily through a URL its dial function
// picks, reconnecting whenever its connection ends, and records every
// session, ack and delivery.
type fdev struct {
	keys d2d.Keys
	id   uint64
	dial func(attempt int) string // the URL for a connection attempt
	// churn: sessions end after a random 0.5–1.5 × sessionFor, followed
	// by a random pause of up to pauseFor (0: sessions last).
	sessionFor, pauseFor time.Duration

	mu       sync.Mutex
	sessions []*fsession
	acked    []string          // envelopes acked, in order
	received map[string]bool   // envelopes of the others, delivered
	ids      map[uint32]string // Reflected id → envelope
	dialErrs int
}

// fload is fault devices of several groups.
type fload struct {
	groups  []d2d.Keys
	devices []*fdev
	stop    context.CancelFunc
	wg      sync.WaitGroup
}

// startFaultLoad registers three devices per group through via (so every
// slot exists before the first reflection) and runs them, each reflecting
// every interval through the URL dial picks per attempt.
func startFaultLoad(t *testing.T, groups []d2d.Keys, via string, every time.Duration, dial func(d *fdev, attempt int) string) *fload {
	t.Helper()
	createSlots(t, groups, via)
	ctx, stop := context.WithCancel(context.Background())
	l := &fload{groups: groups, stop: stop}
	for _, k := range groups {
		for id := uint64(1); id <= 3; id++ {
			d := &fdev{keys: k, id: id, received: map[string]bool{}, ids: map[uint32]string{}}
			d.dial = func(attempt int) string { return dial(d, attempt) }
			l.devices = append(l.devices, d)
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				d.run(ctx, every)
			}()
		}
	}
	t.Cleanup(func() { l.stop(); l.wg.Wait() })
	return l
}

func (d *fdev) run(ctx context.Context, every time.Duration) {
	n := 0
	for attempt := 0; ctx.Err() == nil; attempt++ {
		u := d.dial(attempt)
		dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		c, err := d2mclient.Dial(dctx, d2mclient.Config{URL: u, Keys: d.keys, DeviceID: d.id,
			ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
		cancel()
		if err != nil {
			d.mu.Lock()
			d.dialErrs++
			d.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		s := &fsession{url: u, start: time.Now()}
		d.mu.Lock()
		d.sessions = append(d.sessions, s)
		d.mu.Unlock()
		code := d.session(ctx, c, s, every, &n)
		d.mu.Lock()
		s.code, s.end = code, time.Now()
		d.mu.Unlock()
		c.CloseNow()
		if d.pauseFor > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(rand.N(d.pauseFor)):
			}
		}
	}
}

// session reflects every interval until the connection ends; it returns
// the close code the device saw.
func (d *fdev) session(ctx context.Context, c *d2mclient.Client, s *fsession, every time.Duration, n *int) int {
	type pending struct {
		env  string
		sent time.Time
	}
	sent := map[uint32]pending{}
	tick := time.NewTicker(every)
	defer tick.Stop()
	var end <-chan time.Time
	if d.sessionFor > 0 {
		t := time.NewTimer(d.sessionFor/2 + rand.N(d.sessionFor))
		defer t.Stop()
		end = t.C
	}
	msgs := make(chan d2mclient.Message, 64)
	go func() {
		defer close(msgs)
		for {
			m, err := c.Recv(context.Background())
			if err != nil {
				return
			}
			msgs <- m
		}
	}()
	for {
		select {
		case <-ctx.Done():
			c.Close()
			for range msgs {
			}
			return 0
		case <-end:
			c.Close()
			for range msgs {
			}
			return 0
		case <-tick.C:
			gid := d.keys.DeviceGroupID()
			env := fmt.Sprintf("g%x-d%d-%05d", gid[:4], d.id, *n)
			at := time.Now()
			id, err := c.Reflect(context.Background(), []byte(env), 0)
			if err == nil {
				sent[id] = pending{env, at}
				*n++
			}
		case m, ok := <-msgs:
			if !ok {
				return c.CloseCode(context.Background())
			}
			switch m.Type {
			case d2m.TypeReflectAck:
				a, _ := d2m.DecodeReflectAck(m.Payload)
				p := sent[a.ID]
				delete(sent, a.ID)
				d.mu.Lock()
				d.acked = append(d.acked, p.env)
				s.acks = append(s.acks, ackRec{env: p.env, sent: p.sent, recv: time.Now()})
				d.mu.Unlock()
			case d2m.TypeReflected:
				r, _ := d2m.DecodeReflected(m.Payload)
				d.noteReflected(r.ID, string(r.Envelope))
				c.AckReflected(context.Background(), r.ID)
			}
		}
	}
}

func (d *fdev) noteReflected(id uint32, env string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.received[env] = true
	if prev, ok := d.ids[id]; ok && prev != env {
		d.ids[id] = "CONFLICT " + prev + " / " + env
	} else {
		d.ids[id] = env
	}
}

// sessionsSnapshot returns a copy of the device's sessions.
func (d *fdev) sessionsSnapshot() []fsession {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]fsession, len(d.sessions))
	for i, s := range d.sessions {
		out[i] = *s
		out[i].acks = append([]ackRec(nil), s.acks...)
	}
	return out
}

// acksOn returns every ack the load's devices received on sessions whose
// URL is u, between from and to (receipt times).
func (l *fload) acksOn(u string, from, to time.Time) []ackRec {
	var out []ackRec
	for _, d := range l.devices {
		for _, s := range d.sessionsSnapshot() {
			if s.url != u {
				continue
			}
			for _, a := range s.acks {
				if !a.recv.Before(from) && a.recv.Before(to) {
					out = append(out, a)
				}
			}
		}
	}
	return out
}

// closedBetween returns, per device, the end of its first session that
// was open at from and ended after it (with its code); devices whose
// session did not end are missing.
func (l *fload) closedAfter(from time.Time) map[*fdev]fsession {
	out := map[*fdev]fsession{}
	for _, d := range l.devices {
		for _, s := range d.sessionsSnapshot() {
			if s.start.Before(from) && !s.end.IsZero() && s.end.After(from) {
				out[d] = s
				break
			}
		}
	}
	return out
}

// ackedSince reports whether every device got an ack received after t.
func (l *fload) ackedSince(t time.Time) bool {
	for _, d := range l.devices {
		ok := false
		for _, s := range d.sessionsSnapshot() {
			for _, a := range s.acks {
				if a.recv.After(t) {
					ok = true
				}
			}
		}
		if !ok {
			return false
		}
	}
	return true
}

// stopAndCheck stops the load, drains every device's queue through url
// and checks (a) and (b), and that no device was closed with a code
// outside allowed (0 is the load's own stop; 1006 a connection lost
// without a close frame).
func (l *fload) stopAndCheck(t *testing.T, url string, allowed ...int) {
	t.Helper()
	l.stop()
	l.wg.Wait()
	for _, d := range l.devices {
		c, err := dialDevice(t, url, d.keys, d.id)
		if err != nil {
			t.Fatalf("final drain of device %d: %v", d.id, err)
		}
		if st := c.ServerInfo.DeviceSlotState; st != d2mpb.DeviceSlotState_EXISTING {
			t.Errorf("device %d: slot %v at the end, want EXISTING", d.id, st)
		}
		for {
			m := recvAny(t, c)
			if m.Type == d2m.TypeReflectionQueueDry {
				break
			}
			if m.Type == d2m.TypeReflected {
				r, _ := d2m.DecodeReflected(m.Payload)
				d.noteReflected(r.ID, string(r.Envelope))
				c.AckReflected(context.Background(), r.ID)
			}
		}
		c.Close()
	}
	total := 0
	codes := map[int]int{}
	for gi, k := range l.groups {
		var ds []*fdev
		for _, d := range l.devices {
			if d.keys.DeviceGroupID() == k.DeviceGroupID() {
				ds = append(ds, d)
			}
		}
		for _, d := range ds {
			for _, s := range d.sessions {
				codes[s.code]++
				ok := s.code == 0
				for _, a := range allowed {
					ok = ok || s.code == a
				}
				if !ok {
					t.Errorf("group %d device %d: closed with %d", gi, d.id, s.code)
				}
			}
			var ids []int
			for id, env := range d.ids {
				if strings.HasPrefix(env, "CONFLICT") {
					t.Errorf("group %d device %d: id %d carried two envelopes: %s", gi, d.id, id, env)
				}
				ids = append(ids, int(id))
			}
			sort.Ints(ids)
			for i := 1; i < len(ids); i++ {
				if ids[i] != ids[i-1]+1 {
					t.Errorf("group %d device %d: Reflected ids jump from %d to %d", gi, d.id, ids[i-1], ids[i])
					break
				}
			}
			idOf := make(map[string]uint32, len(d.ids))
			for id, env := range d.ids {
				if old, ok := idOf[env]; !ok || id < old {
					idOf[env] = id
				}
			}
			for _, o := range ds {
				if o == d {
					continue
				}
				var last uint32
				for i, env := range o.acked {
					total++
					if !d.received[env] {
						t.Errorf("group %d: %q acked to device %d never reached device %d", gi, env, o.id, d.id)
						continue
					}
					// In order: device o's acked reflections carry
					// increasing Reflected ids at d.
					if id := idOf[env]; i > 0 && id <= last {
						t.Errorf("group %d: %q acked to device %d reached device %d as id %d, after id %d", gi, env, o.id, d.id, id, last)
					} else {
						last = id
					}
				}
			}
		}
	}
	t.Logf("(a)(b): %d acked copies delivered, ids consecutive, over %d devices; sessions by close code: %v", total, len(l.devices), codes)
	if total < 100 {
		t.Fatalf("only %d acked copies: the load did not run", total)
	}
}

// mediatorGoroutines counts the goroutines running code of the mediator's
// own packages (server, cluster node, stores, daemon), the ones a node
// must end: the test's own and etcd's are not counted.
func mediatorGoroutines() int {
	buf := make([]byte, 8<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "d2m-mediator/integration/") || strings.Contains(g, "d2m-mediator/internal/") {
			continue
		}
		if strings.Contains(g, "d2m-mediator/") || strings.Contains(g, "jackc/pgx") {
			n++
		}
	}
	return n
}

// openConns is the device connections a node's server holds (handshake
// and authenticated).
func openConns(n *mediatorNode) float64 {
	var total float64
	mfs, _ := n.d.Server.Registry().Gather()
	for _, mf := range mfs {
		if mf.GetName() == "mediator_connections" {
			for _, m := range mf.GetMetric() {
				total += m.GetGauge().GetValue()
			}
		}
	}
	return total
}

// checkNothingLeft is (e): after the devices are gone, the mediator's
// goroutines come back to at most before (counted with the nodes up and
// no device connected), no node holds a device connection, and no
// connection stays open through the given proxies.
func checkNothingLeft(t *testing.T, before int, nodes []*faultNode, proxies ...*faultproxy.Proxy) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		g := mediatorGoroutines()
		conns, through := 0.0, 0
		for _, n := range nodes {
			conns += openConns(n.mediatorNode)
		}
		for _, p := range proxies {
			through += p.Conns()
		}
		if g <= before && conns == 0 && through == 0 {
			t.Logf("(e): %d mediator goroutines (%d before the fault), no device connection on the nodes or through the proxies", g, before)
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 8<<20)
			buf = buf[:runtime.Stack(buf, true)]
			var extra []string
			for _, s := range strings.Split(string(buf), "\n\n") {
				if strings.Contains(s, "d2m-mediator/") && !strings.Contains(s, "d2m-mediator/integration/") && !strings.Contains(s, "d2m-mediator/internal/") {
					extra = append(extra, s)
				}
			}
			t.Fatalf("(e): after the fault %d mediator goroutines (before: %d), %v device connections on the nodes, %d connections through the proxies; goroutines:\n%s",
				g, before, conns, through, tailString(strings.Join(extra, "\n\n"), 12<<10))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// fenceLog samples a node's fence clock, so an ack can be compared with
// the deadline in force when it arrived.
type fenceLog struct {
	mu      sync.Mutex
	samples []fenceSample
	stop    chan struct{}
	done    chan struct{}
}

type fenceSample struct {
	at, until time.Time
}

func sampleFence(n *faultNode) *fenceLog {
	fl := &fenceLog{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(fl.done)
		t := time.NewTicker(2 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-fl.stop:
				return
			case now := <-t.C:
				st := n.d.Cluster.Fence()
				fl.mu.Lock()
				fl.samples = append(fl.samples, fenceSample{at: now, until: st.OwnedUntil})
				fl.mu.Unlock()
			}
		}
	}()
	return fl
}

func (fl *fenceLog) close() {
	close(fl.stop)
	<-fl.done
}

// untilAt is the fence deadline sampled first at or after t (the fence
// only moves forward within a lease, so a later sample is the generous
// one); zero if none.
func (fl *fenceLog) untilAt(t time.Time) time.Time {
	fl.mu.Lock()
	defer fl.mu.Unlock()
	i := sort.Search(len(fl.samples), func(i int) bool { return !fl.samples[i].at.Before(t) })
	if i == len(fl.samples) {
		return time.Time{}
	}
	return fl.samples[i].until
}

// checkAcksWithinFence is (c) for the acks of sessions served by node
// (devices dialled it directly): none received later than fenceTolerance
// past the deadline in force at its receipt. It returns the latest
// receipt relative to its deadline.
func checkAcksWithinFence(t *testing.T, l *fload, node *faultNode, fl *fenceLog, from, to time.Time) time.Duration {
	t.Helper()
	worst := -time.Hour
	n := 0
	for _, a := range l.acksOn(node.d.DeviceURL, from, to) {
		until := fl.untilAt(a.recv.Add(20 * time.Millisecond))
		if until.IsZero() {
			continue
		}
		n++
		late := a.recv.Sub(until)
		worst = max(worst, late)
		if late > fenceTolerance {
			t.Errorf("(c): %s acked %q (sent %s) at %s, %v after its fence deadline %s",
				node.id, a.env, a.sent.Format("15:04:05.000"), a.recv.Format("15:04:05.000"), late, until.Format("15:04:05.000"))
		}
	}
	t.Logf("(c): %d acks of %s checked against its fence; the latest arrived %v after the deadline in force (tolerance %v)", n, node.id, worst, fenceTolerance)
	return worst
}

// shardsOf returns the shards of groups.
func shardsOf(groups []d2d.Keys) []byte {
	var out []byte
	for _, k := range groups {
		out = append(out, k.DeviceGroupID()[0])
	}
	return out
}

// urlsOf returns the device URLs of nodes.
func urlsOf(nodes []*faultNode) []string {
	var out []string
	for _, n := range nodes {
		out = append(out, n.d.DeviceURL)
	}
	return out
}

// etcdClient is a client of its own straight to etcd.
func etcdClient(t *testing.T) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: shared.clients, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

var (
	_ = net.Dial
	_ = mediator.ForwardedHeader
)
