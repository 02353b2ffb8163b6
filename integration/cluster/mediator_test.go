package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"d2m-mediator/cluster"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/mediator"
	"d2m-mediator/mediator/adminapi"
	"d2m-mediator/mediator/daemon"
	"d2m-mediator/mediator/mediatortest"
	"d2m-mediator/proto/d2mpb"
	"d2m-mediator/reflection"
)

// mediatorNode is one in-process mediator in cluster mode, started
// through daemon.Start exactly as `mediator serve --cluster-etcd …` does.
type mediatorNode struct {
	id     string
	dir    string
	prefix string
	logs   *mediatortest.LogBuffer
	d      *daemon.Daemon
}

var clusterSeq atomic.Int64

// startCluster starts the named mediators (one cluster prefix, data under
// one temporary directory) and waits until every node sees every shard
// served.
func startCluster(t *testing.T, ids ...string) []*mediatorNode {
	t.Helper()
	// A prefix of its own per call: with -count=N every pass shares the
	// etcd, and a pass must not start from the shard map the previous one
	// left (after a drain, every shard is assigned away from m1).
	prefix := fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1))
	base := t.TempDir()
	var nodes []*mediatorNode
	for _, id := range ids {
		nodes = append(nodes, startMediator(t, id, prefix, filepath.Join(base, id)))
	}
	waitUntil(t, 20*time.Second, "every shard served, as every node sees it", func() bool {
		for _, n := range nodes {
			for s := 0; s < cluster.NumShards; s++ {
				if _, _, _, ok := n.d.Cluster.Owner(cluster.Shard(s)); !ok {
					return false
				}
			}
		}
		return true
	})
	return nodes
}

func startMediator(t *testing.T, id, prefix, dir string) *mediatorNode {
	t.Helper()
	return startMediatorVia(t, id, prefix, dir, shared.clients)
}

func startBenchMediator(b *testing.B, id, prefix, dir string) *mediatorNode {
	b.Helper()
	return startMediatorVia(b, id, prefix, dir, shared.clients)
}

// startMediatorVia starts a node that reaches etcd at endpoints (proxies,
// to cut it off).
func startMediatorVia(t testing.TB, id, prefix, dir string, endpoints []string, opts ...func(*daemon.Config)) *mediatorNode {
	t.Helper()
	return startMediatorWith(t, id, prefix, dir, endpoints, func(c *daemon.Config) {
		for _, o := range opts {
			o(c)
		}
	})
}

// startMediatorWith starts a node whose configuration edit changes first.
func startMediatorWith(t testing.TB, id, prefix, dir string, endpoints []string, edit func(*daemon.Config)) *mediatorNode {
	t.Helper()
	logs := mediatortest.NewLogBuffer(4 << 20)
	cfg := daemon.Config{
		Server:       mediator.Config{ShutdownSpread: time.Millisecond},
		DataDir:      dir,
		DeviceListen: "127.0.0.1:0",
		AdminListen:  "127.0.0.1:0",
		AdminToken:   adminToken,
		NoChatStub:   true,
		Logger:       zerolog.New(logs).With().Str("node", id).Timestamp().Logger(),
		Cluster: &daemon.ClusterConfig{
			Etcd:   clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()},
			NodeID: id, Prefix: prefix, LeaseTTL: ttl,
		},
	}
	if edit != nil {
		edit(&cfg)
	}
	d, err := daemon.Start(cfg)
	if err != nil {
		t.Fatalf("start %s: %v", id, err)
	}
	n := &mediatorNode{id: id, dir: dir, prefix: prefix, logs: logs, d: d}
	t.Cleanup(func() {
		n.stop(t)
		if t.Failed() {
			t.Logf("%s log:\n%s", id, tailString(logs.String(), 8<<10))
		}
	})
	return n
}

const adminToken = "cluster-test-token"

// admin GETs path from the node's admin API.
func (n *mediatorNode) admin(t *testing.T, method, path string, v any) int {
	t.Helper()
	req, _ := http.NewRequest(method, "http://"+n.d.AdminAddr.String()+path, nil)
	req.Header.Set("Authorization", "Bearer "+adminToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if v != nil {
		if s, ok := v.(*string); ok {
			*s = string(body)
		} else if err := json.Unmarshal(body, v); err != nil {
			t.Fatalf("%s %s: %v in %s", method, path, err, body)
		}
	}
	return resp.StatusCode
}

func (n *mediatorNode) stop(t testing.TB) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.d.Shutdown(ctx); err != nil {
		t.Errorf("%s shutdown: %v", n.id, err)
	}
}

func tailString(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// keysForShards makes a device group for each of n distinct shards.
func keysForShards(n int) []d2d.Keys {
	seen := map[byte]bool{}
	var out []d2d.Keys
	for len(out) < n {
		k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		if s := k.DeviceGroupID()[0]; !seen[s] {
			seen[s] = true
			out = append(out, k)
		}
	}
	return out
}

func dialDevice(t *testing.T, url string, k d2d.Keys, dev uint64) (*d2mclient.Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d2mclient.Dial(ctx, d2mclient.Config{URL: url, Keys: k, DeviceID: dev,
		ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
	if err == nil {
		t.Cleanup(func() { c.CloseNow() })
	}
	return c, err
}

// recvType returns the next message of type want, skipping the others.
func recvType(t *testing.T, c *d2mclient.Client, want d2m.PayloadType) d2mclient.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		m, err := c.Recv(ctx)
		if err != nil {
			t.Fatalf("device %d: waiting for %v: %v", c.DeviceID(), want, err)
		}
		if m.Type == want {
			return m
		}
	}
}

func forwarded(n *mediatorNode) float64 { return forwardsBy(n, "forwarded") }

// forwardsBy sums mediator_cluster_forwards_total over outcomes on an
// in-process node.
func forwardsBy(n *mediatorNode, outcomes ...string) float64 {
	sum := 0.0
	mfs, _ := n.d.Server.Registry().Gather()
	for _, mf := range mfs {
		if mf.GetName() != "mediator_cluster_forwards_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "outcome" && slices.Contains(outcomes, l.GetValue()) {
					sum += m.GetCounter().GetValue()
				}
			}
		}
	}
	return sum
}

// TestMediatorsServeEveryShardThroughAnyNode: three mediators in cluster
// mode share the 256 shards. Devices of many groups connect to any node
// (round-robin) and are forwarded to the owner; reflections reach the
// group's other device whichever node it dialled. A stopped node's shards
// answer 503 with Retry-After at the other nodes while every other shard
// keeps working; restarted with its data, it serves them again, backlog
// included.
func TestMediatorsServeEveryShardThroughAnyNode(t *testing.T) {
	nodes := startCluster(t, "m1", "m2", "m3")

	// The admin API of any node serves the cluster's view.
	var hmap string
	if code := nodes[1].admin(t, "GET", "/cluster/haproxy.map", &hmap); code != 200 {
		t.Fatalf("haproxy.map: %d", code)
	}
	lines := 0
	for _, l := range strings.Split(strings.TrimSpace(hmap), "\n") {
		if l != "" && !strings.HasPrefix(l, "#") {
			lines++
		}
	}
	if lines != cluster.NumShards {
		t.Fatalf("haproxy.map has %d shard lines, want 256:\n%s", lines, hmap)
	}
	var cn adminapi.ClusterNodes
	nodes[2].admin(t, "GET", "/api/v1/cluster/nodes", &cn)
	if len(cn.Nodes) != 3 {
		t.Fatalf("cluster nodes: %+v", cn)
	}
	var cs adminapi.ClusterShards
	nodes[0].admin(t, "GET", "/api/v1/cluster/shards", &cs)
	if len(cs.Shards) != cluster.NumShards || cs.Node != "m1" {
		t.Fatalf("cluster shards: %d shards from %q", len(cs.Shards), cs.Node)
	}
	var ce struct{ Error string }
	if code := nodes[0].admin(t, "POST", "/api/v1/cluster/shards/00/move?to=nosuchnode", &ce); code != http.StatusNotFound || ce.Error == "" {
		t.Fatalf("move to an unknown node: %d %q", code, ce.Error)
	}
	if code := nodes[0].admin(t, "POST", "/api/v1/cluster/shards/zz/move?to=m2", &ce); code != http.StatusBadRequest {
		t.Fatalf("move of shard zz: %d %q", code, ce.Error)
	}

	groups := keysForShards(24)
	owner := func(k d2d.Keys) string {
		node, _, _, _ := nodes[0].d.Cluster.Owner(cluster.Shard(k.DeviceGroupID()[0]))
		return node
	}
	for i, k := range groups {
		// Device 1 and device 2 of the group dial different nodes.
		a, err := dialDevice(t, nodes[i%3].d.DeviceURL, k, 1)
		if err != nil {
			t.Fatalf("group %d (shard %02x, owner %s) via %s: %v", i, k.DeviceGroupID()[0], owner(k), nodes[i%3].id, err)
		}
		b, err := dialDevice(t, nodes[(i+1)%3].d.DeviceURL, k, 2)
		if err != nil {
			t.Fatalf("group %d device 2: %v", i, err)
		}
		recvType(t, a, d2m.TypeReflectionQueueDry)
		recvType(t, b, d2m.TypeReflectionQueueDry)
		env := []byte(fmt.Sprintf("group-%d", i))
		id, err := a.Reflect(context.Background(), env, 0)
		if err != nil {
			t.Fatal(err)
		}
		if ack, _ := d2m.DecodeReflectAck(recvType(t, a, d2m.TypeReflectAck).Payload); ack.ID != id {
			t.Fatalf("group %d: ReflectAck %d, want %d", i, ack.ID, id)
		}
		r, _ := d2m.DecodeReflected(recvType(t, b, d2m.TypeReflected).Payload)
		if string(r.Envelope) != string(env) {
			t.Fatalf("group %d: Reflected %q, want %q", i, r.Envelope, env)
		}
		b.AckReflected(context.Background(), r.ID)
		a.Close()
		b.Close()
	}
	var total float64
	for _, n := range nodes {
		total += forwarded(n)
	}
	if total < 24 { // 48 connections, two thirds dialled a node that does not own the shard
		t.Fatalf("only %v connections forwarded", total)
	}

	// Stop the owner of one group's shard; queue something for it first.
	k := groups[0]
	victim := nodes[0]
	for _, n := range nodes {
		if n.id == owner(k) {
			victim = n
		}
	}
	var others []*mediatorNode
	for _, n := range nodes {
		if n != victim {
			others = append(others, n)
		}
	}
	a, err := dialDevice(t, others[0].d.DeviceURL, k, 1)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeReflectionQueueDry)
	if _, err := a.Reflect(context.Background(), []byte("while-2-was-away"), 0); err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeReflectAck)
	victim.stop(t)
	shard := cluster.Shard(k.DeviceGroupID()[0])
	waitUntil(t, 10*time.Second, "the stopped node's shard unserved", func() bool {
		_, _, _, ok := others[0].d.Cluster.Owner(shard)
		return !ok
	})
	_, err = dialDevice(t, others[1].d.DeviceURL, k, 2)
	if err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("device of a shard whose node is down: %v, want an HTTP 503", err)
	}
	// A move to the stopped node is refused, clearly, and changes nothing.
	var live byte
	for s := 0; s < cluster.NumShards; s++ {
		if node, _, _, _ := others[0].d.Cluster.Owner(cluster.Shard(s)); node == others[0].id {
			live = byte(s)
			break
		}
	}
	if code := others[0].admin(t, "POST", fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=%s", live, victim.id), &ce); code != http.StatusNotFound || !strings.Contains(ce.Error, "not live") {
		t.Fatalf("move to a stopped node: %d %q", code, ce.Error)
	}
	if node, _, _, _ := others[0].d.Cluster.Owner(cluster.Shard(live)); node != others[0].id {
		t.Fatalf("after the refused move shard %02x is served by %q", live, node)
	}
	// Another group whose shard the stopped node does not own still works.
	for _, g := range groups[1:] {
		if owner(g) != victim.id && owner(g) != "" {
			c, err := dialDevice(t, others[1].d.DeviceURL, g, 3)
			if err != nil {
				t.Fatalf("a shard on a live node: %v", err)
			}
			recvType(t, c, d2m.TypeReflectionQueueDry)
			break
		}
	}

	// Restarted with its data, the node serves its shards again.
	back := startMediator(t, victim.id, victim.prefix, victim.dir)
	waitUntil(t, 20*time.Second, "the shard served again", func() bool {
		node, _, _, ok := others[0].d.Cluster.Owner(shard)
		return ok && node == victim.id
	})
	b, err := dialDevice(t, others[1].d.DeviceURL, k, 2)
	if err != nil {
		t.Fatalf("after the restart: %v", err)
	}
	r, _ := d2m.DecodeReflected(recvType(t, b, d2m.TypeReflected).Payload)
	if string(r.Envelope) != "while-2-was-away" {
		t.Fatalf("backlog after the restart: %q", r.Envelope)
	}
	_ = back
}

// TestMediatorFenceWithholdsAcks: a node cut off from etcd (as a paused or
// partitioned process is, for etcd) stops acking reflections of its shards
// at last keepalive sent + TTL − margin, before anyone else can own them:
// its device gets no ReflectAck for a reflection sent after that, only a
// 1001 close.
func TestMediatorFenceWithholdsAcks(t *testing.T) {
	prefix := fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1))
	base := t.TempDir()
	var proxies []*proxy
	var eps []string
	for _, c := range shared.clients {
		p := newProxy(t, c)
		proxies = append(proxies, p)
		eps = append(eps, p.addr())
	}
	cut := startMediatorVia(t, "m1", prefix, filepath.Join(base, "m1"), eps)
	other := startMediator(t, "m2", prefix, filepath.Join(base, "m2"))
	waitUntil(t, 20*time.Second, "every shard served", func() bool {
		for s := 0; s < cluster.NumShards; s++ {
			if _, _, _, ok := other.d.Cluster.Owner(cluster.Shard(s)); !ok {
				return false
			}
		}
		return true
	})
	// A group whose shard the node to be cut off serves.
	var k d2d.Keys
	for {
		k = d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		if cut.d.Cluster.MayAck(cluster.Shard(k.DeviceGroupID()[0])) {
			break
		}
	}
	shard := cluster.Shard(k.DeviceGroupID()[0])
	a, err := dialDevice(t, cut.d.DeviceURL, k, 1)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeReflectionQueueDry)
	id, _ := a.Reflect(context.Background(), []byte("before"), 0)
	if ack, _ := d2m.DecodeReflectAck(recvType(t, a, d2m.TypeReflectAck).Payload); ack.ID != id {
		t.Fatalf("ack %d, want %d", ack.ID, id)
	}

	for _, p := range proxies {
		p.setPaused(true)
	}
	cutAt := time.Now()
	waitUntil(t, 2*ttl, "the fence to close", func() bool { return !cut.d.Cluster.MayAck(shard) })
	if took := time.Since(cutAt); took > ttl {
		t.Fatalf("acks for the shard stopped %v after the cut; the lease TTL is %v", took, ttl)
	}
	if _, err := a.Reflect(context.Background(), []byte("after-the-fence"), 0); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		m, err := a.Recv(ctx)
		if err != nil {
			break
		}
		if m.Type == d2m.TypeReflectAck {
			t.Fatal("ReflectAck for a reflection sent after the fence closed")
		}
	}
	if code := a.CloseCode(context.Background()); code != int(d2m.CloseGoingAway) {
		t.Fatalf("close code %d, want 1001", code)
	}
	for _, p := range proxies {
		p.setPaused(false)
	}
}

// TestMediatorPlannedMove moves a shard with its data while its devices
// are connected: the recipient imports the shard (10,000 entries queued for
// an offline device among it), ownership flips to a higher epoch, the
// donor closes the devices with 1001, they reconnect on their first attempt
// and land on the new owner, and the queue continues exactly: every entry
// arrives in order with consecutive Reflected ids, and new reflections get
// the next ids.
func TestMediatorPlannedMove(t *testing.T) {
	nodes := startCluster(t, "m1", "m2")
	k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	shard := cluster.Shard(k.DeviceGroupID()[0])
	from, _, fromEpoch, _ := nodes[0].d.Cluster.Owner(shard)
	donor, recipient := nodes[0], nodes[1]
	if from == "m2" {
		donor, recipient = nodes[1], nodes[0]
	}

	// Device 3 goes offline; device 1 fills its queue.
	c3, err := dialDevice(t, donor.d.DeviceURL, k, 3)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, c3, d2m.TypeReflectionQueueDry)
	c3.Close()
	a, err := dialDevice(t, donor.d.DeviceURL, k, 1)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeReflectionQueueDry)
	const queued = 10000
	for i := 0; i < queued; i++ {
		if _, err := a.Reflect(context.Background(), []byte(fmt.Sprintf("e%05d", i)), 0); err != nil {
			t.Fatal(err)
		}
		if i%64 == 63 || i == queued-1 {
			for j := i - i%64; j <= i; j++ {
				recvType(t, a, d2m.TypeReflectAck)
			}
		}
	}

	// A transaction is in progress during the move: its reflection is
	// acked and held.
	if err := a.SendMessage(context.Background(), d2m.TypeBeginTransaction, &d2mpb.BeginTransaction{EncryptedScope: []byte("scope")}); err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeBeginTransactionAck)
	if _, err := a.Reflect(context.Background(), []byte("held-in-transaction"), 0); err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeReflectAck)

	// The move, through the admin API of the node that does not own it.
	var mr adminapi.MoveResult
	start := time.Now()
	if code := recipient.admin(t, "POST", fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=%s", byte(shard), recipient.id), &mr); code != 200 {
		t.Fatalf("move: %d %+v", code, mr)
	}
	t.Logf("moved shard %02x with %d queued entries in %v (%v as the cluster measured)", byte(shard), queued, time.Since(start), time.Duration(mr.Seconds*float64(time.Second)))
	if mr.To != recipient.id || mr.ToEpoch <= fromEpoch {
		t.Fatalf("move result %+v (from epoch %d)", mr, fromEpoch)
	}
	// The connected device was closed with 1001 and reconnects once, to
	// the donor's address: it is forwarded to the new owner.
	if code := a.CloseCode(context.Background()); code != int(d2m.CloseGoingAway) {
		t.Fatalf("device on the donor: close %d, want 1001", code)
	}
	a, err = dialDevice(t, donor.d.DeviceURL, k, 1)
	if err != nil {
		t.Fatalf("first reconnect after the move: %v", err)
	}
	recvType(t, a, d2m.TypeReflectionQueueDry)
	// The offline device finds its whole queue on the new owner, in order.
	c3, err = dialDevice(t, recipient.d.DeviceURL, k, 3)
	if err != nil {
		t.Fatal(err)
	}
	if st := c3.ServerInfo.DeviceSlotState; st != d2mpb.DeviceSlotState_EXISTING || c3.ServerInfo.ReflectionQueueLength != queued+1 {
		t.Fatalf("after the move: slot %v, queue %d", st, c3.ServerInfo.ReflectionQueueLength)
	}
	var lastID uint32
	for i := 0; i < queued; i++ {
		r, _ := d2m.DecodeReflected(recvType(t, c3, d2m.TypeReflected).Payload)
		if want := fmt.Sprintf("e%05d", i); string(r.Envelope) != want {
			t.Fatalf("entry %d: %q, want %q", i, r.Envelope, want)
		}
		if i > 0 && r.ID != lastID+1 {
			t.Fatalf("entry %d: id %d after %d", i, r.ID, lastID)
		}
		lastID = r.ID
		c3.AckReflected(context.Background(), r.ID)
	}
	// The transaction ended with the move: its held reflection follows.
	r, _ := d2m.DecodeReflected(recvType(t, c3, d2m.TypeReflected).Payload)
	if string(r.Envelope) != "held-in-transaction" || r.ID != lastID+1 {
		t.Fatalf("after the queue: %q id %d, want the held reflection with id %d", r.Envelope, r.ID, lastID+1)
	}
	lastID = r.ID
	c3.AckReflected(context.Background(), r.ID)
	recvType(t, c3, d2m.TypeReflectionQueueDry)
	if _, err := a.Reflect(context.Background(), []byte("after-the-move"), 0); err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeReflectAck)
	r, _ = d2m.DecodeReflected(recvType(t, c3, d2m.TypeReflected).Payload)
	if string(r.Envelope) != "after-the-move" || r.ID != lastID+1 {
		t.Fatalf("after the move: %q id %d, want id %d", r.Envelope, r.ID, lastID+1)
	}
	// The donor deleted its copy once the shard's devices were gone.
	gid := reflection.GroupID(k.DeviceGroupID())
	waitUntil(t, 10*time.Second, "the donor's copy deleted", func() bool {
		st, err := donor.d.Store.Group(gid)
		return err == nil && len(st.Slots) == 0
	})
	if qs, ok := donor.d.Store.QueueStats(gid, 3); ok {
		t.Fatalf("the donor still has device 3's queue: %+v", qs)
	}
	if v := counter(donor, "mediator_cluster_moves_total"); v != 1 {
		t.Errorf("mediator_cluster_moves_total on the donor = %v, want 1", v)
	}
	// To an unknown node a move is refused.
	var ce struct{ Error string }
	if code := donor.admin(t, "POST", fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=nosuch", byte(shard)), &ce); code != http.StatusNotFound {
		t.Fatalf("move to an unknown node: %d %q", code, ce.Error)
	}
}

// TestMediatorForwardedSession: through a forwarding node the whole d2m
// session works (transaction lock, devices info, leader), and an upgrade
// that already carries the forwarding header for a shard the node does not
// own is refused with 503 instead of being forwarded again.
func TestMediatorForwardedSession(t *testing.T) {
	nodes := startCluster(t, "m1", "m2")
	// A group owned by m1, dialled through m2.
	var k d2d.Keys
	for {
		k = d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		if node, _, _, _ := nodes[0].d.Cluster.Owner(cluster.Shard(k.DeviceGroupID()[0])); node == "m1" {
			break
		}
	}
	via := nodes[1].d.DeviceURL
	a, err := dialDevice(t, via, k, 1)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeReflectionQueueDry)
	recvType(t, a, d2m.TypeRolePromotedToLeader)
	b, err := dialDevice(t, via, k, 2)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, b, d2m.TypeReflectionQueueDry)
	ctx := context.Background()
	if err := a.SendMessage(ctx, d2m.TypeBeginTransaction, &d2mpb.BeginTransaction{EncryptedScope: []byte("scope")}); err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeBeginTransactionAck)
	if err := b.SendMessage(ctx, d2m.TypeBeginTransaction, &d2mpb.BeginTransaction{EncryptedScope: []byte("other")}); err != nil {
		t.Fatal(err)
	}
	recvType(t, b, d2m.TypeTransactionRejected)
	if err := a.SendMessage(ctx, d2m.TypeCommitTransaction, &d2mpb.CommitTransaction{}); err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeCommitTransactionAck)
	recvType(t, b, d2m.TypeTransactionEnded)
	if err := b.SendMessage(ctx, d2m.TypeGetDevicesInfo, &d2mpb.GetDevicesInfo{}); err != nil {
		t.Fatal(err)
	}
	info, err := d2m.DecodeDevicesInfo(recvType(t, b, d2m.TypeDevicesInfo).Payload)
	if err != nil || len(info.AugmentedDeviceInfo) != 2 {
		t.Fatalf("devices info through the forward: %v %v", info, err)
	}

	// A forwarded upgrade arriving at a node that does not own the shard
	// (its shard moved on meanwhile) is forwarded once more, to the
	// owner; one that has made its two hops already is refused.
	path := "/" + d2mclient.URLFor(via, k, "7f")[len(via)+1:]
	upgrade := func(hops string) *http.Response {
		req, _ := http.NewRequest("GET", "http://"+nodes[1].d.DeviceAddr.String()+path, nil)
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", "websocket")
		req.Header.Set("Sec-WebSocket-Version", "13")
		req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
		req.Header.Set(mediator.ForwardedHeader, "elsewhere")
		req.Header.Set(mediator.ForwardHopsHeader, hops)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	if resp := upgrade("1"); resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade forwarded once for a foreign shard: %d, want 101 from the owner", resp.StatusCode)
	}
	resp := upgrade("2")
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
		t.Fatalf("forwarded upgrade for a foreign shard: %d (Retry-After %q), want 503", resp.StatusCode, resp.Header.Get("Retry-After"))
	}
}
