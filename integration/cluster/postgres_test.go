package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/internal/pgtest"
	"d2m-mediator/mediator/adminapi"
	"d2m-mediator/proto/d2mpb"
)

// pgCluster is `mediator serve --store postgres://…` processes of one
// cluster prefix sharing one database on a primary with a synchronous
// standby.
type pgCluster struct {
	t            *testing.T
	dsn          string
	prefix, base string
	mu           sync.Mutex
	procs        map[string]*process
	order        []string
}

// startPGCluster starts the named processes on a database of their own and
// waits until every shard is served.
func startPGCluster(t *testing.T, ids ...string) *pgCluster {
	t.Helper()
	pg := pgtest.Shared(t)
	pc := &pgCluster{t: t, dsn: pg.NewDatabase(t), prefix: fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1)), base: t.TempDir(),
		procs: map[string]*process{}, order: ids}
	for _, id := range ids {
		pc.start(id)
	}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		pc.mu.Lock()
		defer pc.mu.Unlock()
		for _, id := range pc.order {
			if p := pc.procs[id]; p != nil {
				for _, l := range p.logLines(`"level":"`) {
					if !strings.Contains(l, `"level":"info"`) && !strings.Contains(l, `"level":"debug"`) {
						t.Logf("%s: %s", id, l)
					}
				}
			}
		}
	})
	waitUntil(t, 30*time.Second, "every shard served", func() bool {
		for _, s := range pc.any().shards(t).Shards {
			if s.Owner == "" {
				return false
			}
		}
		return true
	})
	return pc
}

// start starts (or restarts) node id on the cluster's database.
func (pc *pgCluster) start(id string) *process {
	p := startProcess(pc.t, id, pc.prefix, filepath.Join(pc.base, id), "--store", pc.dsn)
	pc.mu.Lock()
	pc.procs[id] = p
	pc.mu.Unlock()
	return p
}

// live returns the processes not killed, in start order.
func (pc *pgCluster) live() []*process {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	var out []*process
	for _, id := range pc.order {
		if p := pc.procs[id]; p != nil && p.cmd.ProcessState == nil {
			select {
			case <-p.done:
			default:
				out = append(out, p)
			}
		}
	}
	return out
}

func (pc *pgCluster) any() *process { return pc.live()[0] }

func (pc *pgCluster) urls() []string {
	var out []string
	for _, p := range pc.live() {
		out = append(out, p.url)
	}
	return out
}

// kill SIGKILLs node id and forgets it until start.
func (pc *pgCluster) kill(id string) {
	pc.mu.Lock()
	p := pc.procs[id]
	delete(pc.procs, id)
	pc.mu.Unlock()
	p.kill()
}

// query runs one query on the cluster's database.
func (pc *pgCluster) query(t *testing.T, sql string, args []any, dest ...any) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, pc.dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if err := conn.QueryRow(ctx, sql, args...).Scan(dest...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// placementLog is the times the test saw placement keys change in etcd.
type placementLog struct {
	mu  sync.Mutex
	evs []placementEvent
}

type placementEvent struct {
	key string
	typ mvccpb.Event_EventType
	at  time.Time
}

// watchPlacement records every change under prefix until the test ends.
func watchPlacement(t *testing.T, prefix string) *placementLog {
	cli, err := clientv3.New(clientv3.Config{Endpoints: shared.clients, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	pl := &placementLog{}
	done := make(chan struct{})
	wc := cli.Watch(ctx, prefix, clientv3.WithPrefix())
	go func() {
		defer close(done)
		for resp := range wc {
			now := time.Now()
			pl.mu.Lock()
			for _, e := range resp.Events {
				pl.evs = append(pl.evs, placementEvent{key: string(e.Kv.Key), typ: e.Type, at: now})
			}
			pl.mu.Unlock()
		}
	}()
	t.Cleanup(func() { cancel(); <-done; cli.Close() })
	return pl
}

// first returns the time of the first event of typ on key after t (t if
// none).
func (pl *placementLog) first(t time.Time, key string, typ mvccpb.Event_EventType) time.Time {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	for _, e := range pl.evs {
		if e.key == key && e.typ == typ && e.at.After(t) {
			return e.at
		}
	}
	return t
}

// firstAcks records, for every connection a load device made, the time of
// its first ReflectAck.
type firstAcks struct {
	mu  sync.Mutex
	evs []firstAck
}

type firstAck struct {
	shard         byte
	connected, at time.Time
}

func (f *firstAcks) add(ev firstAck) {
	f.mu.Lock()
	f.evs = append(f.evs, ev)
	f.mu.Unlock()
}

// after returns, for each shard of shards, the earliest first ack of a
// connection made after t (zero if none yet).
func (f *firstAcks) after(t time.Time, shards []byte) map[byte]time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[byte]time.Time)
	for _, ev := range f.evs {
		if !slices.Contains(shards, ev.shard) || !ev.connected.After(t) {
			continue
		}
		if cur, ok := out[ev.shard]; !ok || ev.at.Before(cur) {
			out[ev.shard] = ev.at
		}
	}
	return out
}

// runAnyNode is run for a cluster whose nodes die: it dials the live nodes
// in turn, retrying at once while none serves the device's shard (a killed
// owner, a failover in progress), and records each connection's first
// ReflectAck.
func (d *loadDevice) runAnyNode(ctx context.Context, urls func() []string, every time.Duration, acks *firstAcks) {
	n, i := 0, int(d.id)
	shard := d.keys.DeviceGroupID()[0]
	for ctx.Err() == nil {
		us := urls()
		if len(us) == 0 {
			time.Sleep(20 * time.Millisecond)
			continue
		}
		u := us[i%len(us)]
		i++
		dctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		c, err := d2mclient.Dial(dctx, d2mclient.Config{URL: u, Keys: d.keys, DeviceID: d.id,
			ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
		cancel()
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
			continue
		}
		connected, first := time.Now(), true
		d.onAck = func() {
			if first {
				first = false
				acks.add(firstAck{shard: shard, connected: connected, at: time.Now()})
			}
		}
		d.sessionOn(ctx, c, every, &n)
	}
}

// startLoadAnyNode is startLoad for runAnyNode.
func startLoadAnyNode(t *testing.T, groups []d2d.Keys, pc *pgCluster, every time.Duration, acks *firstAcks) *load {
	t.Helper()
	createSlots(t, groups, pc.any().url)
	l := startDevices(groups, "", func(ctx context.Context, d *loadDevice) { d.runAnyNode(ctx, pc.urls, every, acks) })
	t.Cleanup(func() { l.stop(); l.wg.Wait() })
	return l
}

// failoverBudget is the time from etcd ending a killed node's lease to
// the first ReflectAck of the shard's new owner.
const failoverBudget = 1500 * time.Millisecond

// TestPostgresSIGKILLUnderLoad: three `mediator serve` processes on one
// PostgreSQL database (primary and synchronous standby) while devices of
// 18 groups in 18 shards reflect every 50 ms. Each round SIGKILLs the node
// serving the most of those shards and restarts it: every one of its
// shards is served again (a reconnected device gets a ReflectAck) within
// failoverBudget of etcd ending the killed node's lease, and at the end nothing acked is lost
// and every slot's Reflected ids are consecutive. Rounds:
// CRASH_CLUSTER_ROUNDS (default 5; make crashtest-cluster runs 50).
func TestPostgresSIGKILLUnderLoad(t *testing.T) {
	rounds := 5
	if v := os.Getenv("CRASH_CLUSTER_ROUNDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("CRASH_CLUSTER_ROUNDS=%q", v)
		}
		rounds = n
	}
	pc := startPGCluster(t, "p1", "p2", "p3")
	groups := keysForShards(18)
	var shards []byte
	for _, k := range groups {
		shards = append(shards, k.DeviceGroupID()[0])
	}
	ev := watchPlacement(t, pc.prefix)
	acks := &firstAcks{}
	ld := startLoadAnyNode(t, groups, pc, 50*time.Millisecond, acks)
	time.Sleep(time.Second) // load before the first kill (its length, not an order)

	var took, sinceLease []time.Duration
	for r := range rounds {
		// The victim: the node serving most of the load's shards.
		byOwner := map[string][]byte{}
		view := pc.any().shards(t)
		for _, s := range shards {
			o := view.Shards[s].Owner
			byOwner[o] = append(byOwner[o], s)
		}
		victim := ""
		for _, p := range pc.live() {
			if victim == "" || len(byOwner[p.id]) > len(byOwner[victim]) {
				victim = p.id
			}
		}
		vs := byOwner[victim]
		killed := time.Now()
		pc.kill(victim)
		var first map[byte]time.Time
		waitUntil(t, 20*time.Second, fmt.Sprintf("round %d: a ReflectAck in each of %s's %d shards", r, victim, len(vs)), func() bool {
			first = acks.after(killed, vs)
			return len(first) == len(vs)
		})
		leaseGone := ev.first(killed, pc.prefix+"nodes/"+victim, mvccpb.DELETE).Sub(killed)
		var claimed time.Duration
		for _, s := range vs {
			claimed = max(claimed, ev.first(killed, fmt.Sprintf("%sshards/%02x", pc.prefix, s), mvccpb.PUT).Sub(killed))
		}
		worst := time.Duration(0)
		for _, s := range vs {
			d := first[s].Sub(killed)
			took, sinceLease = append(took, d), append(sinceLease, d-leaseGone)
			worst = max(worst, d)
			// etcd ends the lease between 2/3 TTL (keepalives go every
			// TTL/3) and TTL + 500 ms (its lessor checks twice a second)
			// after the kill; from there the cluster (reassignment, owner
			// key), the device (reconnect) and the store (claim, commit)
			// get failoverBudget.
			if d-leaseGone > failoverBudget || d > ttl+time.Second/2+failoverBudget {
				t.Errorf("round %d: shard %02x acked again %v after the kill of %s, %v after etcd ended its lease (TTL %v)",
					r, s, d.Round(time.Millisecond), victim, (d - leaseGone).Round(time.Millisecond), ttl)
			}
		}
		t.Logf("round %d: SIGKILL %s serving %d of the load's shards; its lease gone after %v, the last owner key written after %v, served again after at most %v",
			r, victim, len(vs), leaseGone.Round(time.Millisecond), claimed.Round(time.Millisecond), worst.Round(time.Millisecond))
		pc.start(victim)
		time.Sleep(300 * time.Millisecond) // load with the restarted node (its length, not an order)
	}
	slices.Sort(took)
	slices.Sort(sinceLease)
	if len(took) > 0 {
		t.Logf("from etcd ending the lease to the first ReflectAck of the new owner: p50 %v, p99 %v, max %v",
			sinceLease[len(sinceLease)*50/100].Round(time.Millisecond), sinceLease[min(len(sinceLease)-1, len(sinceLease)*99/100)].Round(time.Millisecond),
			sinceLease[len(sinceLease)-1].Round(time.Millisecond))
		t.Logf("failover (SIGKILL to the first ReflectAck of the new owner) over %d shard failovers: p50 %v, p99 %v, max %v",
			len(took), took[len(took)*50/100].Round(time.Millisecond), took[min(len(took)-1, len(took)*99/100)].Round(time.Millisecond),
			took[len(took)-1].Round(time.Millisecond))
	}
	ld.stopAndCheck(t, pc.any().url)
}

// TestPostgresSIGSTOPFencing stops the owner of a shard with SIGSTOP past
// its lease TTL; the other node takes the shard over at once (AutoFailover
// with the shared store) and claims it in the database. After SIGCONT the
// old owner's commits for the shard are refused: the reflection its device
// sent while it was stopped gets no ReflectAck, the device is closed with
// 1001, the database holds the new owner's epoch and no row of that
// reflection; the device reconnects to the new owner, whose ack and
// delivery of the resent reflection follow.
func TestPostgresSIGSTOPFencing(t *testing.T) {
	pc := startPGCluster(t, "p1", "p2")
	p1, p2 := pc.procs["p1"], pc.procs["p2"]
	var k d2d.Keys
	for {
		k = d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		if p1.ownerOf(t, k.DeviceGroupID()[0]) == "p2" {
			break
		}
	}
	shard := k.DeviceGroupID()[0]
	for dev := uint64(1); dev <= 2; dev++ {
		c, err := dialDevice(t, p2.url, k, dev)
		if err != nil {
			t.Fatal(err)
		}
		recvType(t, c, d2m.TypeReflectionQueueDry)
		c.Close()
	}
	c1, err := dialDevice(t, p2.url, k, 1) // directly to the owner
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, c1, d2m.TypeReflectionQueueDry)
	id, _ := c1.Reflect(context.Background(), []byte("before-the-stop"), 0)
	if a, _ := d2m.DecodeReflectAck(recvType(t, c1, d2m.TypeReflectAck).Payload); a.ID != id {
		t.Fatalf("ack %d, want %d", a.ID, id)
	}
	oldEpoch := p1.shards(t).Shards[shard].Epoch

	if err := p2.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	t.Cleanup(func() { p2.cmd.Process.Signal(syscall.SIGCONT) })
	// kill(2) returns before every thread has stopped: a reflection sent
	// at once can still be stored, at the old epoch, before the takeover.
	waitUntil(t, 5*time.Second, "every thread of p2 stopped", func() bool { return allThreadsStopped(t, p2.cmd.Process.Pid) })
	if _, err := c1.Reflect(context.Background(), []byte("during-the-stop"), 0); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 15*time.Second, "p1 serves the stopped node's shard", func() bool { return p1.ownerOf(t, shard) == "p1" })
	newEpoch := p1.shards(t).Shards[shard].Epoch
	t.Logf("p1 took shard %02x over %v after the SIGSTOP (epoch %d → %d)", shard, time.Since(stopped).Round(time.Millisecond), oldEpoch, newEpoch)
	if newEpoch <= oldEpoch {
		t.Fatalf("new epoch %d, old %d", newEpoch, oldEpoch)
	}

	// Device 2 at the new owner: what p2 acked is there; its reflection
	// makes p1 claim the shard in the database.
	c2, err := dialDevice(t, p1.url, k, 2)
	if err != nil {
		t.Fatal(err)
	}
	r, _ := d2m.DecodeReflected(recvType(t, c2, d2m.TypeReflected).Payload)
	if string(r.Envelope) != "before-the-stop" {
		t.Fatalf("device 2 got %q first", r.Envelope)
	}
	c2.AckReflected(context.Background(), r.ID)
	recvType(t, c2, d2m.TypeReflectionQueueDry)
	id2, _ := c2.Reflect(context.Background(), []byte("from-the-new-owner"), 0)
	if a, _ := d2m.DecodeReflectAck(recvType(t, c2, d2m.TypeReflectAck).Payload); a.ID != id2 {
		t.Fatalf("ack %d, want %d", a.ID, id2)
	}
	var dbEpoch int64
	var dbOwner string
	pc.query(t, `SELECT epoch, owner FROM d2m_shards WHERE shard = $1`, []any{int32(shard)}, &dbEpoch, &dbOwner)
	if dbEpoch != newEpoch || dbOwner != "p1" {
		t.Fatalf("d2m_shards for %02x before SIGCONT: epoch %d owner %q, want %d p1", shard, dbEpoch, dbOwner, newEpoch)
	}

	resumed := time.Now()
	if err := p2.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	t.Logf("p2 stopped for %v", resumed.Sub(stopped).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		m, err := c1.Recv(ctx)
		if err != nil {
			break
		}
		if m.Type == d2m.TypeReflectAck {
			t.Fatal("ReflectAck from the old owner after SIGCONT for a reflection sent while it was stopped past its TTL")
		}
	}
	if code := c1.CloseCode(context.Background()); code != int(d2m.CloseGoingAway) {
		t.Fatalf("old owner's device closed with %d, want 1001", code)
	}
	var rows int
	pc.query(t, `SELECT count(*) FROM d2m_queue WHERE envelope = $1`, []any{[]byte("during-the-stop")}, &rows)
	if rows != 0 {
		var dev, seq, ts int64
		pc.query(t, `SELECT device_id, seq, ts FROM d2m_queue WHERE envelope = $1`, []any{[]byte("during-the-stop")}, &dev, &seq, &ts)
		t.Logf("row: device %d seq %d ts %s; SIGSTOP at %s, SIGCONT at %s", dev, seq, time.UnixMilli(ts).Format("15:04:05.000"),
			stopped.Format("15:04:05.000"), resumed.Format("15:04:05.000"))
		for _, p := range []*process{p1, p2} {
			for _, l := range p.logLines(fmt.Sprintf(`"shard":%d`, shard)) {
				t.Logf("%s: %s", p.id, l)
			}
			for _, l := range p.logLines(`"component":"cluster"`) {
				t.Logf("%s: %s", p.id, l)
			}
		}
		t.Fatalf("%d queue rows of the reflection sent to the stopped old owner", rows)
	}
	pc.query(t, `SELECT epoch, owner FROM d2m_shards WHERE shard = $1`, []any{int32(shard)}, &dbEpoch, &dbOwner)
	if dbEpoch != newEpoch || dbOwner != "p1" {
		t.Fatalf("d2m_shards for %02x after SIGCONT: epoch %d owner %q, want %d p1", shard, dbEpoch, dbOwner, newEpoch)
	}
	t.Logf("old owner after SIGCONT: %d \"commit refused by the shard's epoch\", %d \"the database refused this node's epoch\" log lines",
		len(p2.logLines("commit refused by the shard's epoch")), len(p2.logLines("the database refused this node's epoch")))

	// The device reconnects (to the new owner) and resends.
	c1, err = dialDevice(t, p1.url, k, 1)
	if err != nil {
		t.Fatal(err)
	}
	r, _ = d2m.DecodeReflected(recvType(t, c1, d2m.TypeReflected).Payload)
	if string(r.Envelope) != "from-the-new-owner" {
		t.Fatalf("device 1 got %q", r.Envelope)
	}
	c1.AckReflected(context.Background(), r.ID)
	recvType(t, c1, d2m.TypeReflectionQueueDry)
	id, _ = c1.Reflect(context.Background(), []byte("during-the-stop"), 0)
	if a, _ := d2m.DecodeReflectAck(recvType(t, c1, d2m.TypeReflectAck).Payload); a.ID != id {
		t.Fatalf("ack %d, want %d", a.ID, id)
	}
	r, _ = d2m.DecodeReflected(recvType(t, c2, d2m.TypeReflected).Payload)
	if string(r.Envelope) != "during-the-stop" {
		t.Fatalf("device 2 got %q, want the resent reflection", r.Envelope)
	}
}

// post POSTs path to the process's admin API and decodes the answer.
func (p *process) post(t *testing.T, path string, v any) int {
	t.Helper()
	req, _ := http.NewRequest("POST", p.admin+path, nil)
	req.Header.Set("Authorization", "Bearer "+p.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("POST %s: %v in %s", path, err, body)
	}
	return resp.StatusCode
}

// TestPostgresDrainUnderLoad drains a node of a PostgreSQL cluster while
// devices of 12 groups in 12 of its shards reflect through both nodes: a
// move with a shared store hands over only the epoch (no data streams),
// every shard ends at the other node, the database holds the new owner's
// epoch for each, and nothing acked is lost.
func TestPostgresDrainUnderLoad(t *testing.T) {
	pc := startPGCluster(t, "p1", "p2")
	p1, p2 := pc.procs["p1"], pc.procs["p2"]
	view := p2.shards(t)
	seen := map[byte]bool{}
	var groups []d2d.Keys
	for len(groups) < 12 {
		k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		if s := k.DeviceGroupID()[0]; view.Shards[s].Owner == "p1" && !seen[s] {
			seen[s] = true
			groups = append(groups, k)
		}
	}
	ld := startLoadAnyNode(t, groups, pc, 50*time.Millisecond, &firstAcks{})
	time.Sleep(time.Second) // load before the drain (its length, not an order)
	var dr adminapi.RebalanceResult
	start := time.Now()
	if code := p2.post(t, "/api/v1/cluster/nodes/p1/drain", &dr); code != 200 {
		t.Fatalf("drain: %d %+v", code, dr)
	}
	t.Logf("drained p1 under load: %d shards in %v", len(dr.Moves), time.Since(start).Round(time.Millisecond))
	time.Sleep(time.Second) // load after the drain
	view = p1.shards(t)
	for i, si := range view.Shards {
		if si.Owner != "p2" {
			t.Fatalf("after the drain shard %02x is served by %q", i, si.Owner)
		}
	}
	for s := range seen {
		var epoch int64
		var owner string
		pc.query(t, `SELECT epoch, owner FROM d2m_shards WHERE shard = $1`, []any{int32(s)}, &epoch, &owner)
		if epoch != view.Shards[s].Epoch || owner != "p2" {
			t.Errorf("d2m_shards for %02x: epoch %d owner %q; etcd: epoch %d owner p2", s, epoch, owner, view.Shards[s].Epoch)
		}
	}
	ld.stopAndCheck(t, p2.url)
}

// allThreadsStopped reports whether every thread of process pid is in
// state T (stopped), from /proc.
func allThreadsStopped(t *testing.T, pid int) bool {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	if err != nil || len(tasks) == 0 {
		t.Fatalf("threads of %d: %v", pid, err)
	}
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			return false
		}
		// pid (comm) state …: comm may hold spaces and parentheses.
		i := strings.LastIndexByte(string(b), ')')
		if i < 0 || i+2 >= len(b) || b[i+2] != 'T' {
			return false
		}
	}
	return true
}
