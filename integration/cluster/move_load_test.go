package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/mediator/adminapi"
	"d2m-mediator/proto/d2mpb"
)

// loadDevice reflects steadily and records what it sees, reconnecting
// when the server closes it (a move closes with 1001).
type loadDevice struct {
	keys d2d.Keys
	id   uint64
	url  string

	mu         sync.Mutex
	acked      []string          // envelopes this device reflected and got a ReflectAck for
	received   map[string]bool   // envelopes of the others, delivered
	ids        map[uint32]string // Reflected id → envelope (a redelivery repeats both)
	closes     []int
	reconnects int // dials after the first; each must succeed at once
	failedDial error
	onAck      func() // optional: called on every ReflectAck, by the goroutine running session
}

func (d *loadDevice) run(ctx context.Context, t *testing.T, every time.Duration) {
	n := 0
	for ctx.Err() == nil {
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		c, err := d2mclient.Dial(dctx, d2mclient.Config{URL: d.url, Keys: d.keys, DeviceID: d.id,
			ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
		cancel()
		if err != nil {
			if ctx.Err() == nil {
				d.mu.Lock()
				d.failedDial = err
				d.mu.Unlock()
			}
			return
		}
		d.sessionOn(ctx, c, every, &n)
	}
}

// sessionOn runs a session on c, records how it ended and closes c.
func (d *loadDevice) sessionOn(ctx context.Context, c *d2mclient.Client, every time.Duration, n *int) {
	code := d.session(ctx, c, every, n)
	d.mu.Lock()
	d.closes = append(d.closes, code)
	d.reconnects++
	d.mu.Unlock()
	c.CloseNow()
}

// session reflects every interval until the connection ends; returns the
// close code.
func (d *loadDevice) session(ctx context.Context, c *d2mclient.Client, every time.Duration, n *int) int {
	sent := map[uint32]string{}
	tick := time.NewTicker(every)
	defer tick.Stop()
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
		case <-tick.C:
			gid := d.keys.DeviceGroupID()
			env := fmt.Sprintf("g%x-d%d-%05d", gid[:4], d.id, *n)
			id, err := c.Reflect(context.Background(), []byte(env), 0)
			if err == nil {
				sent[id] = env
				*n++
			}
		case m, ok := <-msgs:
			if !ok {
				return c.CloseCode(context.Background())
			}
			switch m.Type {
			case d2m.TypeReflectAck:
				a, _ := d2m.DecodeReflectAck(m.Payload)
				if d.onAck != nil {
					d.onAck()
				}
				d.mu.Lock()
				d.acked = append(d.acked, sent[a.ID])
				d.mu.Unlock()
				delete(sent, a.ID)
			case d2m.TypeReflected:
				r, _ := d2m.DecodeReflected(m.Payload)
				d.mu.Lock()
				d.received[string(r.Envelope)] = true
				if prev, ok := d.ids[r.ID]; ok && prev != string(r.Envelope) {
					d.ids[r.ID] = "CONFLICT " + prev + " / " + string(r.Envelope)
				} else {
					d.ids[r.ID] = string(r.Envelope)
				}
				d.mu.Unlock()
				c.AckReflected(context.Background(), r.ID)
			}
		}
	}
}

// TestMediatorMoveUnderLoad moves a shard while the devices of 12 groups in
// it (3 devices each) reflect: no acked reflection is lost, every slot's
// Reflected ids are consecutive (redeliveries repeat an id with the same
// envelope), no device is closed with 4114 or 4115, and every device gets
// back on its first reconnect.
func TestMediatorMoveUnderLoad(t *testing.T) {
	nodes := startCluster(t, "m1", "m2")
	// 12 groups in one shard.
	first := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	shard := first.DeviceGroupID()[0]
	groups := []d2d.Keys{first}
	for len(groups) < 12 {
		if k := d2d.DeriveKeys(d2d.NewDeviceGroupKey()); k.DeviceGroupID()[0] == shard {
			groups = append(groups, k)
		}
	}
	owner, _, _, _ := nodes[0].d.Cluster.Owner(cluster.Shard(shard))
	donor, recipient := nodes[0], nodes[1]
	if owner == "m2" {
		donor, recipient = nodes[1], nodes[0]
	}

	load := startLoad(t, groups, donor.d.DeviceURL)
	time.Sleep(time.Second) // load before the move (the load's duration, not an order)
	var mr adminapi.MoveResult
	if code := recipient.admin(t, "POST", fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=%s", shard, recipient.id), &mr); code != 200 {
		t.Fatalf("move: %d %+v", code, mr)
	}
	t.Logf("moved shard %02x under load in %.0f ms", shard, mr.Seconds*1000)
	time.Sleep(time.Second) // load after the move
	load.stopAndCheck(t, recipient.d.DeviceURL)
}

// load is devices of several groups reflecting steadily.
type load struct {
	groups  []d2d.Keys
	devices []*loadDevice
	stop    context.CancelFunc
	wg      sync.WaitGroup
}

// startLoad registers 3 devices per group (every slot exists before the
// first reflection: a reflection reaches only the slots that exist when it
// is stored; a new device gets its history through device join) and starts
// them reflecting every 20 ms through url.
func startLoad(t *testing.T, groups []d2d.Keys, url string) *load {
	t.Helper()
	createSlots(t, groups, url)
	return startDevices(groups, url, func(ctx context.Context, d *loadDevice) { d.run(ctx, t, 20*time.Millisecond) })
}

// createSlots connects every device of groups once through url, so that
// every slot exists before the first reflection.
func createSlots(t *testing.T, groups []d2d.Keys, url string) {
	t.Helper()
	for _, k := range groups {
		for id := uint64(1); id <= 3; id++ {
			c, err := dialDevice(t, url, k, id)
			if err != nil {
				t.Fatal(err)
			}
			recvType(t, c, d2m.TypeReflectionQueueDry)
			c.Close()
		}
	}
}

// startDevices runs every device of groups (url: its node, "" when it
// picks one itself) on its own goroutine until the load is stopped.
func startDevices(groups []d2d.Keys, url string, run func(ctx context.Context, d *loadDevice)) *load {
	ctx, stop := context.WithCancel(context.Background())
	l := &load{groups: groups, stop: stop}
	for _, k := range groups {
		for id := uint64(1); id <= 3; id++ {
			d := &loadDevice{keys: k, id: id, url: url, received: map[string]bool{}, ids: map[uint32]string{}}
			l.devices = append(l.devices, d)
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				run(ctx, d)
			}()
		}
	}
	return l
}

// stopAndCheck stops the load, lets every device drain its queue through
// url, and checks: every acked reflection reached every other device of
// its group, Reflected ids consecutive per slot (an id never carries two
// envelopes), no 4114/4115 close, and every reconnect succeeded at once.
func (l *load) stopAndCheck(t *testing.T, url string) { l.stopAndCheckMin(t, url, 1000) }

// stopAndCheckMin is stopAndCheck with the number of acked copies that
// shows the load ran.
func (l *load) stopAndCheckMin(t *testing.T, url string, least int) {
	t.Helper()
	l.stop()
	l.wg.Wait()
	for _, d := range l.devices {
		c, err := dialDevice(t, url, d.keys, d.id)
		if err != nil {
			t.Fatalf("final drain of device %d: %v", d.id, err)
		}
		for {
			m := recvAny(t, c)
			if m.Type == d2m.TypeReflectionQueueDry {
				break
			}
			if m.Type == d2m.TypeReflected {
				r, _ := d2m.DecodeReflected(m.Payload)
				d.received[string(r.Envelope)] = true
				if prev, ok := d.ids[r.ID]; ok && prev != string(r.Envelope) {
					t.Fatalf("device %d: id %d was %q, now %q", d.id, r.ID, prev, r.Envelope)
				}
				d.ids[r.ID] = string(r.Envelope)
				c.AckReflected(context.Background(), r.ID)
			}
		}
		c.Close()
	}
	total := 0
	for gi, k := range l.groups {
		var ds []*loadDevice
		for _, d := range l.devices {
			if d.keys.DeviceGroupID() == k.DeviceGroupID() {
				ds = append(ds, d)
			}
		}
		for _, d := range ds {
			if d.failedDial != nil {
				t.Errorf("group %d device %d: a reconnect failed: %v", gi, d.id, d.failedDial)
			}
			for _, code := range d.closes {
				if code == int(d2m.CloseQueueLimit) || code == int(d2m.CloseSlotStateMismatch) {
					t.Errorf("group %d device %d closed with %d", gi, d.id, code)
				}
			}
			var ids []int
			for id, env := range d.ids {
				if len(env) > 8 && env[:8] == "CONFLICT" {
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
			for _, o := range ds {
				if o == d {
					continue
				}
				for _, env := range o.acked {
					total++
					if !d.received[env] {
						t.Errorf("group %d: %q acked to device %d never reached device %d", gi, env, o.id, d.id)
					}
				}
			}
		}
	}
	t.Logf("%d acked copies checked over %d devices", total, len(l.devices))
	if total < least {
		t.Fatalf("only %d acked copies: the load did not run", total)
	}
}

// TestMediatorDrainUnderLoad drains a node while devices of 12 groups in
// 12 of its shards reflect: every shard moves, nothing acked is lost.
func TestMediatorDrainUnderLoad(t *testing.T) {
	nodes := startCluster(t, "m1", "m2")
	seen := map[byte]bool{}
	var groups []d2d.Keys
	for len(groups) < 12 {
		k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		s := k.DeviceGroupID()[0]
		if node, _, _, _ := nodes[0].d.Cluster.Owner(cluster.Shard(s)); node == "m1" && !seen[s] {
			seen[s] = true
			groups = append(groups, k)
		}
	}
	load := startLoad(t, groups, nodes[1].d.DeviceURL)
	time.Sleep(time.Second) // load before the drain
	var raw string
	start := time.Now()
	if code := nodes[1].admin(t, "POST", "/api/v1/cluster/nodes/m1/drain", &raw); code != 200 {
		t.Fatalf("drain: %d %s", code, raw)
	}
	var dr adminapi.RebalanceResult
	if err := json.Unmarshal([]byte(raw), &dr); err != nil {
		t.Fatal(err)
	}
	t.Logf("drained m1 under load: %d shards in %v", len(dr.Moves), time.Since(start))
	for s := 0; s < cluster.NumShards; s++ {
		if node, _, _, _ := nodes[1].d.Cluster.Owner(cluster.Shard(s)); node != "m2" {
			t.Fatalf("after the drain shard %02x is served by %q", s, node)
		}
	}
	time.Sleep(time.Second) // load after the drain
	load.stopAndCheck(t, nodes[1].d.DeviceURL)
}

// recvAny returns the next message.
func recvAny(t *testing.T, c *d2mclient.Client) d2mclient.Message {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	m, err := c.Recv(ctx)
	if err != nil {
		t.Fatalf("device %d: %v", c.DeviceID(), err)
	}
	return m
}

// TestMediatorEtcdLeaderLossUnderLoad kills the etcd leader (a crash,
// without leadership transfer) while devices reflect through two mediators:
// the reflect path does not notice (no fence refusal, every acked
// reflection delivered, no device closed), and placement writes resume (a
// planned move afterwards succeeds).
func TestMediatorEtcdLeaderLossUnderLoad(t *testing.T) {
	ec, err := startEtcd(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	li := -1
	t.Cleanup(func() { // registered first: runs after the mediators stopped
		for i, m := range ec.members {
			if i != li {
				m.Close()
			}
		}
		if li >= 0 {
			<-closed
		}
	})
	prefix := fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1))
	base := t.TempDir()
	nodes := []*mediatorNode{
		startMediatorVia(t, "m1", prefix, filepath.Join(base, "m1"), ec.clients),
		startMediatorVia(t, "m2", prefix, filepath.Join(base, "m2"), ec.clients),
	}
	waitUntil(t, 20*time.Second, "every shard served", func() bool {
		for _, n := range nodes {
			for s := 0; s < cluster.NumShards; s++ {
				if _, _, _, ok := n.d.Cluster.Owner(cluster.Shard(s)); !ok {
					return false
				}
			}
		}
		return true
	})
	groups := keysForShards(12)
	load := startLoad(t, groups, nodes[0].d.DeviceURL)
	time.Sleep(500 * time.Millisecond) // load before the kill
	li = ec.leader()
	if li < 0 {
		t.Fatal("no etcd leader")
	}
	killed := ec.members[li]
	killed.Server.HardStop()
	go func() {
		killed.Close()
		close(closed)
	}()
	time.Sleep(3 * ttl) // load through the election and past a TTL
	load.stopAndCheck(t, nodes[0].d.DeviceURL)
	for _, d := range load.devices {
		for _, code := range d.closes {
			if code != 0 { // 0: the load's own stop
				t.Errorf("device %d was closed with %d while etcd elected a new leader", d.id, code)
			}
		}
	}
	for _, n := range nodes {
		if v := counter(n, "mediator_cluster_fence_refusals_total"); v != 0 {
			t.Errorf("%s withheld %v ReflectAcks during the etcd election", n.id, v)
		}
	}
	// Placement writes work again.
	moveToOther(t, nodes[0], groups[0].DeviceGroupID()[0])
}

// moveToOther moves shard between m1 and m2 (to whichever does not own
// it) through n's admin API and returns where it went.
func moveToOther(t *testing.T, n *mediatorNode, shard byte) string {
	t.Helper()
	owner, _, _, _ := n.d.Cluster.Owner(cluster.Shard(shard))
	to := "m1"
	if owner == "m1" {
		to = "m2"
	}
	var mr adminapi.MoveResult
	if code := n.admin(t, "POST", fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=%s", shard, to), &mr); code != 200 {
		t.Fatalf("move of shard %02x to %s: %d %+v", shard, to, code, mr)
	}
	return to
}

// counter reads an unlabelled counter of a node's metrics.
func counter(n *mediatorNode, name string) float64 {
	mfs, _ := n.d.Server.Registry().Gather()
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	return 0
}
