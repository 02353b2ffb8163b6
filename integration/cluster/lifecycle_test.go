package cluster

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"d2m-mediator/cluster"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/mediator/adminapi"
	"d2m-mediator/mediator/daemon"
	"d2m-mediator/proto/d2mpb"
	"d2m-mediator/reflection"
)

// The shard lifecycle with real nodes: every acknowledged write survives a
// move, a late drop never deletes a fresh copy, an aborted move leaves the
// donor whole and the recipient with nothing, and a move outlives the
// request (and the controller) that started it.

// hookedStore is a node's real bbolt store with test hooks on the shard
// operations of a move.
type hookedStore struct {
	*reflection.DB
	dropDelay   atomic.Int64                                      // ns DropShard waits first (a late drop)
	importDelay atomic.Int64                                      // ns ImportShard waits first (a slow move)
	afterImport atomic.Pointer[func(shard byte, gen int64) error] // runs after a real import; its error fails it
	drops       atomic.Int64                                      // DropShard calls that deleted a copy
	kept        atomic.Int64                                      // DropShard calls that kept a newer copy
}

func (h *hookedStore) ImportShard(ctx context.Context, shard byte, gen int64, r io.Reader) (reflection.ShardStats, error) {
	if d := time.Duration(h.importDelay.Load()); d > 0 {
		time.Sleep(d)
	}
	st, err := h.DB.ImportShard(ctx, shard, gen, r)
	if f := h.afterImport.Load(); err == nil && f != nil {
		err = (*f)(shard, gen)
	}
	return st, err
}

func (h *hookedStore) DropShard(ctx context.Context, shard byte, gen int64) (reflection.ShardStats, bool, error) {
	if d := time.Duration(h.dropDelay.Load()); d > 0 {
		time.Sleep(d)
	}
	st, dropped, err := h.DB.DropShard(ctx, shard, gen)
	if dropped {
		h.drops.Add(1)
	} else if err == nil {
		h.kept.Add(1)
	}
	return st, dropped, err
}

// startHookedCluster starts in-process nodes on hooked stores.
func startHookedCluster(t *testing.T, tune func(*daemon.Config), ids ...string) ([]*mediatorNode, map[string]*hookedStore) {
	t.Helper()
	prefix := fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1))
	base := t.TempDir()
	stores := map[string]*hookedStore{}
	var nodes []*mediatorNode
	for _, id := range ids {
		dir := filepath.Join(base, id)
		db, err := reflection.Open(filepath.Join(dir, "mediator.db"), reflection.Options{})
		if err != nil {
			t.Fatal(err)
		}
		hs := &hookedStore{DB: db}
		stores[id] = hs
		// Closed after the node (cleanups run last-registered first).
		t.Cleanup(func() { db.Close() })
		nodes = append(nodes, startMediatorVia(t, id, prefix, dir, shared.clients, func(c *daemon.Config) {
			c.Store = hs
			c.Server.MaxDeviceSlots = 64
			if tune != nil {
				tune(c)
			}
		}))
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
	return nodes, stores
}

// ownerNode returns the node serving shard, and another one.
func ownerNode(t *testing.T, nodes []*mediatorNode, shard byte) (owner, other *mediatorNode) {
	t.Helper()
	id, _, _, ok := nodes[0].d.Cluster.Owner(cluster.Shard(shard))
	if !ok {
		t.Fatalf("shard %02x not served", shard)
	}
	for _, n := range nodes {
		if n.id == id {
			owner = n
		} else if other == nil {
			other = n
		}
	}
	return owner, other
}

// moveShard moves shard to node to through via's admin API and waits
// until every node routes to it.
func moveShard(t *testing.T, via *mediatorNode, nodes []*mediatorNode, shard byte, to string) adminapi.MoveResult {
	t.Helper()
	var raw string
	if code := via.admin(t, "POST", fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=%s", shard, to), &raw); code != 200 {
		t.Fatalf("move of shard %02x to %s: %d %s", shard, to, code, raw)
	}
	var mr adminapi.MoveResult
	if err := json.Unmarshal([]byte(raw), &mr); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		waitUntil(t, 10*time.Second, n.id+" routes to "+to, func() bool {
			owner, _, _, ok := n.d.Cluster.Owner(cluster.Shard(shard))
			return ok && owner == to
		})
	}
	return mr
}

// fillQueue creates device offline's slot, then reflects n envelopes
// ("e00000"…) from device sender, each acked: they are queued for offline.
func fillQueue(t *testing.T, url string, k d2d.Keys, sender, offline uint64, n int) []string {
	t.Helper()
	c, err := dialDevice(t, url, k, offline)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, c, d2m.TypeReflectionQueueDry)
	c.Close()
	a, err := dialDevice(t, url, k, sender)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeReflectionQueueDry)
	var envs []string
	for i := 0; i < n; i++ {
		env := fmt.Sprintf("e%05d", i)
		if _, err := a.Reflect(context.Background(), []byte(env), 0); err != nil {
			t.Fatal(err)
		}
		envs = append(envs, env)
		if i%64 == 63 || i == n-1 {
			for j := i - i%64; j <= i; j++ {
				recvType(t, a, d2m.TypeReflectAck)
			}
		}
	}
	a.Close()
	return envs
}

// drainQueue connects device dev through url and returns the envelopes of
// its whole queue, checking that their Reflected ids are consecutive.
func drainQueue(t *testing.T, url string, k d2d.Keys, dev uint64) []string {
	t.Helper()
	c, err := dialDevice(t, url, k, dev)
	if err != nil {
		t.Fatalf("device %d: %v", dev, err)
	}
	defer c.Close()
	if st := c.ServerInfo.DeviceSlotState; st != d2mpb.DeviceSlotState_EXISTING {
		t.Fatalf("device %d: slot %v, want EXISTING", dev, st)
	}
	var envs []string
	var last uint32
	for {
		m := recvAny(t, c)
		if m.Type == d2m.TypeReflectionQueueDry {
			return envs
		}
		if m.Type != d2m.TypeReflected {
			continue
		}
		r, _ := d2m.DecodeReflected(m.Payload)
		if len(envs) > 0 && r.ID != last+1 {
			t.Fatalf("device %d: Reflected id %d after %d (entry %d)", dev, r.ID, last, len(envs))
		}
		last = r.ID
		envs = append(envs, string(r.Envelope))
		c.AckReflected(context.Background(), r.ID)
	}
}

func sameStrings(t *testing.T, what string, got, want []string) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d entries, want %d", what, len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s: entry %d is %q, want %q", what, i, got[i], want[i])
		}
	}
}

// holdsNoCopy reports whether the node's store has nothing of shard.
func holdsNoCopy(hs *hookedStore, shard byte) bool {
	_, has := hs.ShardGeneration(shard)
	return !has
}

// writes is what a writer device got acknowledged, in order.
type writes struct {
	mu         sync.Mutex
	created    []acked         // ServerInfo NEW arrived
	dropped    []acked         // DropDeviceAck arrived
	dropTried  map[uint64]bool // DropDevice sent (acked or not)
	sharedAck  int             // index of the last SetSharedDeviceData followed by a DevicesInfo
	sharedSent int             // index of the last one sent
	ops        atomic.Int64
	closes     []int
}

// acked is a slot whose write was acknowledged, and when.
type acked struct {
	id uint64
	at time.Time
}

// near reports whether t is within a window around one of the moves.
func near(t time.Time, windows [][2]time.Time) bool {
	for _, w := range windows {
		if !t.Before(w[0].Add(-300*time.Millisecond)) && !t.After(w[1].Add(300*time.Millisecond)) {
			return true
		}
	}
	return false
}

// runWriter makes group writes as fast as they are answered, through url
// (a moved shard's devices reconnect there): a new slot (NEW acked), a
// DropDevice of the previous new slot (DropDeviceAck), a
// SetSharedDeviceData confirmed by a DevicesInfo (frames are handled in
// order). What is acknowledged is recorded; a write whose answer never
// came is not.
func runWriter(ctx context.Context, url string, k d2d.Keys, w *writes) {
	next, prev := uint64(1000), uint64(0)
	for ctx.Err() == nil {
		dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		a, err := d2mclient.Dial(dctx, d2mclient.Config{URL: url, Keys: k, DeviceID: 1, ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
		cancel()
		if err != nil {
			if a != nil {
				a.CloseNow()
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		for ctx.Err() == nil {
			// A new slot.
			dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			c, err := d2mclient.Dial(dctx, d2mclient.Config{URL: url, Keys: k, DeviceID: next, ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
			cancel()
			if err == nil {
				if c.ServerInfo.DeviceSlotState == d2mpb.DeviceSlotState_NEW {
					w.mu.Lock()
					w.created = append(w.created, acked{next, time.Now()})
					w.mu.Unlock()
				}
				c.Close()
			} else if c != nil {
				c.CloseNow()
			}
			created := err == nil
			// Drop the previous one.
			if prev != 0 {
				w.mu.Lock()
				w.dropTried[prev] = true
				w.mu.Unlock()
				if a.SendMessage(ctx, d2m.TypeDropDevice, &d2mpb.DropDevice{DeviceId: prev}) != nil || !waitFor(ctx, a, d2m.TypeDropDeviceAck) {
					break
				}
				w.mu.Lock()
				w.dropped = append(w.dropped, acked{prev, time.Now()})
				w.mu.Unlock()
			}
			if created {
				prev = next
			} else {
				prev = 0
			}
			next++
			// Shared data, confirmed by the DevicesInfo answered after it.
			w.mu.Lock()
			w.sharedSent++
			n := w.sharedSent
			w.mu.Unlock()
			if a.SendMessage(ctx, d2m.TypeSetSharedDeviceData, &d2mpb.SetSharedDeviceData{EncryptedSharedDeviceData: []byte(fmt.Sprintf("shared-%06d", n))}) != nil ||
				a.SendMessage(ctx, d2m.TypeGetDevicesInfo, &d2mpb.GetDevicesInfo{}) != nil || !waitFor(ctx, a, d2m.TypeDevicesInfo) {
				break
			}
			w.mu.Lock()
			w.sharedAck = n
			w.mu.Unlock()
			w.ops.Add(1)
		}
		if ctx.Err() != nil {
			a.CloseNow()
			return
		}
		w.mu.Lock()
		w.closes = append(w.closes, closeCode(a))
		w.mu.Unlock()
		a.CloseNow()
	}
}

// waitFor reads until a message of type want (true) or the connection or
// ctx ends (false).
func waitFor(ctx context.Context, c *d2mclient.Client, want d2m.PayloadType) bool {
	for {
		m, err := c.Recv(ctx)
		if err != nil {
			return false
		}
		if m.Type == want {
			return true
		}
	}
}

// TestMoveFreezesEveryWrite moves a shard back and forth four times while
// the devices of four other groups in it reflect every 20 ms and a device
// keeps writing to its group: new slots, DropDevice, SetSharedDeviceData. A move freezes every group write of the shard, not
// only ReflectAcks, so every acknowledged effect is on the node that
// serves the shard afterwards: a dropped device gets 4113, a new slot is
// EXISTING, the shared data is the last one confirmed (or one sent after
// it), and the queue of an offline device (10,000 entries, which make
// each move take tens of milliseconds) arrives whole and in order.
func TestMoveFreezesEveryWrite(t *testing.T) {
	nodes, _ := startHookedCluster(t, nil, "m1", "m2")
	k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	shard := k.DeviceGroupID()[0]
	owner, other := ownerNode(t, nodes, shard)
	queued := fillQueue(t, owner.d.DeviceURL, k, 2, 3, 10000)
	others := []d2d.Keys{}
	for len(others) < 4 {
		if o := d2d.DeriveKeys(d2d.NewDeviceGroupKey()); o.DeviceGroupID()[0] == shard {
			others = append(others, o)
		}
	}
	load := startLoad(t, others, owner.d.DeviceURL)

	ctx, stop := context.WithCancel(context.Background())
	w := &writes{dropTried: map[uint64]bool{}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runWriter(ctx, owner.d.DeviceURL, k, w)
	}()
	waitUntil(t, 10*time.Second, "writes before the moves", func() bool { return w.ops.Load() >= 5 })
	to := other
	var windows [][2]time.Time
	for i := range 4 {
		before := w.ops.Load()
		start := time.Now()
		mr := moveShard(t, nodes[i%2], nodes, shard, to.id)
		windows = append(windows, [2]time.Time{start, time.Now()})
		t.Logf("move %d to %s took %.0f ms", i+1, to.id, mr.Seconds*1000)
		waitUntil(t, 10*time.Second, "writes after the move", func() bool { return w.ops.Load() >= before+5 })
		if to == other {
			to = owner
		} else {
			to = other
		}
	}
	stop()
	<-done
	final, _ := ownerNode(t, nodes, shard)
	url := final.d.DeviceURL
	load.stopAndCheckMin(t, url, 100)

	w.mu.Lock()
	defer w.mu.Unlock()
	refused := counter(nodes[0], "mediator_cluster_writes_refused_total") + counter(nodes[1], "mediator_cluster_writes_refused_total")
	t.Logf("%d acknowledged rounds; %d slots created, %d dropped; writer closes %v; writes refused at a hand-over: %.0f",
		w.ops.Load(), len(w.created), len(w.dropped), w.closes, refused)
	// Every acknowledged write near a move is checked (those far from
	// any move prove nothing more, and each check is a handshake).
	dropped := map[uint64]bool{}
	checked := 0
	for _, d := range w.dropped {
		dropped[d.id] = true
		if !near(d.at, windows) {
			continue
		}
		checked++
		id := d.id
		c, err := d2mclient.Dial(context.Background(), d2mclient.Config{URL: url, Keys: k, DeviceID: id,
			ExpectedState: d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)})
		if err == nil {
			c.Close()
			t.Fatalf("device %d, dropped with a DropDeviceAck, connected again after the moves", id)
		}
		if code := closeCode(c); code != int(d2m.CloseDropped) {
			t.Fatalf("device %d, dropped with a DropDeviceAck: close %d after the moves, want 4113 (%v)", id, code, err)
		}
	}
	for _, cr := range w.created {
		id := cr.id
		if dropped[id] || w.dropTried[id] || !near(cr.at, windows) {
			continue // a drop sent but not answered: either way is right
		}
		c, err := d2mclient.Dial(context.Background(), d2mclient.Config{URL: url, Keys: k, DeviceID: id,
			ExpectedState: d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)})
		if err != nil {
			t.Fatalf("slot %d, created with ServerInfo NEW, after the moves: %v (close %d)", id, err, closeCode(c))
		}
		c.Close()
		checked++
	}
	t.Logf("%d acknowledged slot writes near the moves checked", checked)
	if checked == 0 {
		t.Fatal("no acknowledged slot write near a move: the test did not exercise what it is for")
	}
	c, err := dialDevice(t, url, k, 1)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if _, err := fmt.Sscanf(string(c.ServerInfo.EncryptedSharedDeviceData), "shared-%06d", &n); err != nil || n < w.sharedAck || n > w.sharedSent {
		t.Fatalf("shared data %q after the moves; last confirmed %d, last sent %d", c.ServerInfo.EncryptedSharedDeviceData, w.sharedAck, w.sharedSent)
	}
	c.Close()
	sameStrings(t, "offline device's queue", drainQueue(t, url, k, 3), queued)
}

func closeCode(c *d2mclient.Client) int {
	if c == nil {
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return c.CloseCode(ctx)
}

// TestMoveBackAndForth moves a shard X→Y and at once Y→X, 20 times, with
// every drop of a donor's copy delayed past the next move (so X's drop of
// the copy it gave away arrives after X imported the shard again) and a
// device on the shard that completed its handshake but never reads (it
// never answers the close). Each drop goes by generation: the late one
// keeps the fresh copy; nothing acknowledged is lost and the node serving
// the shard serves the whole queue; afterwards the other node holds no
// copy.
func TestMoveBackAndForth(t *testing.T) {
	nodes, stores := startHookedCluster(t, nil, "m1", "m2")
	for _, hs := range stores {
		hs.dropDelay.Store(int64(300 * time.Millisecond))
	}
	k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	shard := k.DeviceGroupID()[0]
	x, y := ownerNode(t, nodes, shard)
	want := fillQueue(t, x.d.DeviceURL, k, 2, 3, 200)
	// Device 4 completes its handshake on X and then never reads.
	stuck, err := dialDevice(t, x.d.DeviceURL, k, 4)
	if err != nil {
		t.Fatal(err)
	}
	_ = stuck
	for round := range 20 {
		moveShard(t, x, nodes, shard, y.id)
		moveShard(t, y, nodes, shard, x.id)
		// Five more, acked, on X again.
		a, err := dialDevice(t, x.d.DeviceURL, k, 2)
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		for i := range 5 {
			env := fmt.Sprintf("r%02d-%d", round, i)
			if _, err := a.Reflect(context.Background(), []byte(env), 0); err != nil {
				t.Fatal(err)
			}
			recvType(t, a, d2m.TypeReflectAck)
			want = append(want, env)
		}
		a.Close()
	}
	waitUntil(t, 10*time.Second, "the late drops done", func() bool {
		return stores[x.id].drops.Load()+stores[x.id].kept.Load() >= 20 && stores[y.id].drops.Load()+stores[y.id].kept.Load() >= 20
	})
	t.Logf("drops on %s: %d deleted, %d kept a newer copy; on %s: %d deleted, %d kept",
		x.id, stores[x.id].drops.Load(), stores[x.id].kept.Load(), y.id, stores[y.id].drops.Load(), stores[y.id].kept.Load())
	if stores[x.id].kept.Load() == 0 {
		t.Fatal("no late drop met a newer copy: the test did not exercise what it is for")
	}
	sameStrings(t, "queue after 20 rounds", drainQueue(t, x.d.DeviceURL, k, 3), want)
	waitUntil(t, 10*time.Second, y.id+" holds no copy", func() bool { return holdsNoCopy(stores[y.id], shard) })
}

// TestMoveAbortAfterImport: the recipient imports the copy, then its
// store reports a failure (the move cannot flip). The move aborts; the
// donor thaws and serves everything; the recipient discards the copy it
// had written; the offline device gets its whole queue with consecutive
// ids from the donor. A donor that dropped its copy before the recipient
// confirmed the import would fail this test.
func TestMoveAbortAfterImport(t *testing.T) {
	nodes, stores := startHookedCluster(t, nil, "m1", "m2")
	k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	shard := k.DeviceGroupID()[0]
	donor, recipient := ownerNode(t, nodes, shard)
	want := fillQueue(t, donor.d.DeviceURL, k, 2, 3, 2000)
	imported := make(chan int64, 1)
	fail := func(s byte, gen int64) error {
		if s != shard {
			return nil
		}
		imported <- gen
		return errors.New("test: the store fails after the import")
	}
	stores[recipient.id].afterImport.Store(&fail)

	var body struct{ Error string }
	code := donor.admin(t, "POST", fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=%s", shard, recipient.id), &body)
	if code != 409 {
		t.Fatalf("move with a failing import: %d %q, want 409 (aborted)", code, body.Error)
	}
	t.Logf("aborted: %s", body.Error)
	select {
	case gen := <-imported:
		t.Logf("the recipient had imported generation %d", gen)
	default:
		t.Fatal("the recipient's import never ran")
	}
	waitUntil(t, 5*time.Second, "the donor serves the shard again", func() bool {
		return donor.d.Cluster.Status(cluster.Shard(shard)).Phase == cluster.PhaseServing && donor.d.Cluster.MayAck(cluster.Shard(shard))
	})
	if owner, _, _, _ := recipient.d.Cluster.Owner(cluster.Shard(shard)); owner != donor.id {
		t.Fatalf("owner after the aborted move: %s", owner)
	}
	waitUntil(t, 10*time.Second, "the recipient discards its copy", func() bool { return holdsNoCopy(stores[recipient.id], shard) })
	sameStrings(t, "queue on the donor after the abort", drainQueue(t, donor.d.DeviceURL, k, 3), want)
	// The donor kept everything, and goes on: a later move succeeds.
	stores[recipient.id].afterImport.Store(nil)
	moveShard(t, recipient, nodes, shard, recipient.id)
	if got := drainQueue(t, recipient.d.DeviceURL, k, 3); len(got) != 0 {
		t.Fatalf("queue after the acks and the move: %d entries", len(got))
	}
}

// TestMoveRecipientKilled: the recipient process is SIGKILLed while the
// move carries a shard of 10,000 queued entries to it (as soon as the
// donor recorded the export). The move aborts; the donor serves the shard
// with its whole queue; the recipient, restarted on its data, holds no
// copy of the shard.
func TestMoveRecipientKilled(t *testing.T) {
	prefix := fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1))
	base := t.TempDir()
	p1 := startProcess(t, "p1", prefix, filepath.Join(base, "p1"), "--cluster-auto-rebalance=false")
	p2 := startProcess(t, "p2", prefix, filepath.Join(base, "p2"), "--cluster-auto-rebalance=false")
	waitUntil(t, 30*time.Second, "every shard served", func() bool {
		for _, s := range p1.shards(t).Shards {
			if s.Owner == "" {
				return false
			}
		}
		return true
	})
	k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	shard := k.DeviceGroupID()[0]
	donor, recipient := p1, p2
	if p1.ownerOf(t, shard) == "p2" {
		donor, recipient = p2, p1
	}
	want := fillQueue(t, donor.url, k, 2, 3, 10000)

	cli, err := clientv3.New(clientv3.Config{Endpoints: shared.clients, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	wctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	exported := make(chan struct{})
	go func() {
		for resp := range cli.Watch(wctx, fmt.Sprintf("%smoves/%02x", prefix, shard)) {
			for _, ev := range resp.Events {
				if bytes.Contains(ev.Kv.Value, []byte(`"state":"exported"`)) {
					close(exported)
					return
				}
			}
		}
	}()
	moved := make(chan int, 1)
	go func() {
		req, _ := http.NewRequest("POST", donor.admin+fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=%s", shard, recipient.id), nil)
		req.Header.Set("Authorization", "Bearer "+donor.token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			moved <- 0
			return
		}
		resp.Body.Close()
		moved <- resp.StatusCode
	}()
	select {
	case <-exported:
	case <-wctx.Done():
		t.Fatal("the move never recorded its export")
	}
	recipient.kill()
	if code := <-moved; code != 409 {
		t.Fatalf("move to a killed recipient: %d, want 409 (aborted)", code)
	}
	waitUntil(t, 10*time.Second, "the donor serves the shard", func() bool {
		st := donor.shards(t).Shards[shard]
		return st.Owner == donor.id && st.Move != "draining" && st.Move != "exported"
	})
	sameStrings(t, "queue on the donor", drainQueue(t, donor.url, k, 3), want)

	// Restarted on its data, the recipient drops whatever it wrote of the
	// shard (a copy of a shard assigned to another node), then stops.
	dir := filepath.Join(base, recipient.id)
	again := startProcess(t, recipient.id, prefix, dir, "--cluster-auto-rebalance=false")
	waitUntil(t, 20*time.Second, "the restarted recipient serves its shards", func() bool {
		for _, s := range again.shards(t).Shards {
			if s.Owner == "" {
				return false
			}
		}
		return true
	})
	time.Sleep(500 * time.Millisecond) // a stray drop runs in the background; its outcome is checked below
	if err := again.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	<-again.done
	db, err := reflection.Open(filepath.Join(dir, "mediator.db"), reflection.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if gen, has := db.ShardGeneration(shard); has {
		t.Fatalf("the killed recipient still holds a copy of shard %02x (generation %d)", shard, gen)
	}
	t.Logf("recipient log: %d stray drops", len(again.logLines("dropped this node's copy")))
}

// TestMoveOutlivesItsCaller: `mediator cluster move` is SIGKILLed while
// the move runs (the recipient's import is slow); the move completes.
func TestMoveOutlivesItsCaller(t *testing.T) {
	nodes, stores := startHookedCluster(t, nil, "m1", "m2")
	k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	shard := k.DeviceGroupID()[0]
	donor, recipient := ownerNode(t, nodes, shard)
	want := fillQueue(t, donor.d.DeviceURL, k, 2, 3, 500)
	stores[recipient.id].importDelay.Store(int64(time.Second))

	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(adminToken), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(mediatorBinary(t), "cluster", "move", fmt.Sprintf("%02x", shard), recipient.id,
		"--admin", donor.d.AdminAddr.String(), "--admin-token-file", tokenFile)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "the move started", func() bool { return donor.d.Cluster.Moving(cluster.Shard(shard)) })
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	if donor.d.Cluster.Status(cluster.Shard(shard)).Phase != cluster.PhaseFrozen {
		t.Logf("the move was past the freeze when the CLI died")
	}
	waitUntil(t, 15*time.Second, "the move completes without its caller", func() bool {
		owner, _, _, ok := donor.d.Cluster.Owner(cluster.Shard(shard))
		return ok && owner == recipient.id && recipient.d.Cluster.MayAck(cluster.Shard(shard))
	})
	sameStrings(t, "queue on the recipient", drainQueue(t, recipient.d.DeviceURL, k, 3), want)
	t.Logf("CLI output before it was killed: %q", out.String())
}

// TestDrainSurvivesControllerReelection drains a node of three (imports
// slowed so the drain takes seconds) while the controller, which with
// auto-rebalance also moves shards, is deposed mid-drain: its election key
// is deleted, another node is elected. The drain completes: the drained
// node serves nothing, every shard is served, and the new controller
// does not give shards back to the draining node.
func TestDrainSurvivesControllerReelection(t *testing.T) {
	nodes, stores := startHookedCluster(t, func(c *daemon.Config) {
		c.Cluster.AutoRebalance = true
	}, "m1", "m2", "m3")
	for _, hs := range stores {
		hs.importDelay.Store(int64(150 * time.Millisecond))
	}
	// Some data in the drained node's shards.
	var groups []d2d.Keys
	for _, k := range keysForShards(40) {
		if owner, _, _, _ := nodes[0].d.Cluster.Owner(cluster.Shard(k.DeviceGroupID()[0])); owner == "m1" {
			groups = append(groups, k)
		}
	}
	wants := map[int][]string{}
	for i, k := range groups {
		wants[i] = fillQueue(t, nodes[0].d.DeviceURL, k, 2, 3, 20)
	}

	drained := make(chan int, 1)
	var res adminapi.RebalanceResult
	go func() { drained <- nodes[1].admin(t, "POST", "/api/v1/cluster/nodes/m1/drain", &res) }()
	waitUntil(t, 10*time.Second, "the drain under way", func() bool {
		for _, si := range nodes[1].d.Cluster.Shards() {
			if si.Owner != "" && si.Owner != "m1" && si.Assigned != "" && si.Move == cluster.StateHandedOver {
				return true
			}
		}
		return counter(nodes[0], "mediator_cluster_moves_total") > 0
	})
	cli, err := clientv3.New(clientv3.Config{Endpoints: shared.clients, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, nodes[0].prefix+"controller", clientv3.WithPrefix(),
		clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend), clientv3.WithLimit(1))
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("controller key: %v %v", resp, err)
	}
	before := string(resp.Kvs[0].Value)
	if _, err := cli.Delete(ctx, string(resp.Kvs[0].Key)); err != nil {
		t.Fatal(err)
	}
	t.Logf("deposed controller %s mid-drain", before)

	if code := <-drained; code != 200 {
		t.Fatalf("drain: %d %+v", code, res)
	}
	t.Logf("drain: %d planned, %d moved by this drain", len(res.Plan), len(res.Moves))
	waitUntil(t, 20*time.Second, "m1 serves nothing and every shard is served", func() bool {
		for _, si := range nodes[1].d.Cluster.Shards() {
			if si.Owner == "" || si.Owner == "m1" {
				return false
			}
		}
		return true
	})
	// The controllers (old and new) do not bring shards back to m1.
	time.Sleep(time.Second) // a few controller passes; checked below
	for _, si := range nodes[2].d.Cluster.Shards() {
		if si.Owner == "m1" || si.MoveTo == "m1" {
			t.Fatalf("shard %s given back to the draining node: %+v", si.Shard, si)
		}
	}
	for i, k := range groups {
		sameStrings(t, fmt.Sprintf("group %d's queue after the drain", i), drainQueue(t, nodes[1].d.DeviceURL, k, 3), wants[i])
	}
	var members adminapi.ClusterNodes
	nodes[2].admin(t, "GET", "/api/v1/cluster/nodes", &members)
	for _, m := range members.Nodes {
		if m.ID == "m1" && !m.Draining {
			t.Fatalf("m1 not marked draining: %+v", m)
		}
	}
}

// TestShardTransferNeedsTheClusterSecret: a shard stream posted to a
// node's transfer endpoint without the cluster's signature, with a wrong
// one, or with a body that does not match its signature is refused with
// 403 before anything is imported, and the node holds no copy afterwards.
func TestShardTransferNeedsTheClusterSecret(t *testing.T) {
	nodes, stores := startHookedCluster(t, nil, "m1", "m2")
	k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	shard := k.DeviceGroupID()[0]
	owner, other := ownerNode(t, nodes, shard)
	fillQueue(t, owner.d.DeviceURL, k, 2, 3, 10)
	var stream bytes.Buffer
	if _, err := stores[owner.id].ExportShard(context.Background(), shard, &stream); err != nil {
		t.Fatal(err)
	}

	cli, err := clientv3.New(clientv3.Config{Endpoints: shared.clients, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	resp, err := cli.Get(context.Background(), owner.prefix+"secret")
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("cluster secret: %v %v", resp, err)
	}
	secret, err := base64.StdEncoding.DecodeString(string(resp.Kvs[0].Value))
	if err != nil {
		t.Fatal(err)
	}
	_, _, epoch, _ := owner.d.Cluster.Owner(cluster.Shard(shard))
	id := "0123456789abcdef"
	identity := []byte("d2m-mediator shard transfer v1")
	for _, f := range []string{id, fmt.Sprintf("%02x", shard), owner.id, other.id, fmt.Sprint(epoch)} {
		identity = append(append(identity, 0), f...)
	}
	mac := func(key []byte, parts ...[]byte) string {
		m := hmac.New(sha256.New, key)
		for _, p := range parts {
			m.Write(p)
		}
		return hex.EncodeToString(m.Sum(nil))
	}
	post := func(header, trailer string) (int, string) {
		u := fmt.Sprintf("%s/_cluster/v1/moves/%s?shard=%02x&from=%s&to=%s&from_epoch=%d",
			strings.Replace(other.d.DeviceURL, "ws://", "http://", 1), id, shard, owner.id, other.id, epoch)
		tr := http.Header{"D2m-Move-Mac": nil}
		req, _ := http.NewRequest("POST", u, io.MultiReader(bytes.NewReader(stream.Bytes()), trailerSetter{tr, trailer}))
		req.ContentLength = -1
		req.Trailer = tr
		if header != "" {
			req.Header.Set("D2m-Move-Auth", header)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	sum := sha256.Sum256(stream.Bytes())
	goodHeader := mac(secret, []byte("header"), identity)
	goodBody := mac(secret, []byte("body"), identity, sum[:])
	wrong := []byte("not the cluster's secret, 32 byt")
	for name, c := range map[string][2]string{
		"no signature":            {"", ""},
		"another secret":          {mac(wrong, []byte("header"), identity), mac(wrong, []byte("body"), identity, sum[:])},
		"body not as signed":      {goodHeader, mac(secret, []byte("body"), identity, make([]byte, 32))},
		"no stream signature":     {goodHeader, ""},
		"garbage header":          {"zz", goodBody},
		"header for another move": {mac(secret, []byte("header"), append(identity, 'x')), goodBody},
	} {
		if code, body := post(c[0], c[1]); code != http.StatusForbidden {
			t.Fatalf("%s: %d %q, want 403", name, code, body)
		}
	}
	if !holdsNoCopy(stores[other.id], shard) {
		t.Fatal("a refused transfer left data on the node")
	}
	// Correctly signed, the request gets past the signature check and is
	// refused only because etcd knows no such move.
	if code, body := post(goodHeader, goodBody); code != http.StatusConflict || !strings.Contains(body, "no such move") {
		t.Fatalf("signed transfer of a move etcd does not hold: %d %q, want 409 no such move", code, body)
	}
	if !holdsNoCopy(stores[other.id], shard) {
		t.Fatal("a transfer of an unknown move left data on the node")
	}
}

// trailerSetter sets the trailer value once the body before it is read.
type trailerSetter struct {
	tr  http.Header
	val string
}

func (s trailerSetter) Read([]byte) (int, error) {
	if s.val != "" {
		s.tr.Set("D2m-Move-Mac", s.val)
	}
	return 0, io.EOF
}
