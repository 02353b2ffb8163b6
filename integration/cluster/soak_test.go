package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"image/color"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	clientv3 "go.etcd.io/etcd/client/v3"
	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"

	"d2m-mediator/chatproxy/csp"
	"d2m-mediator/chatproxy/cspclient"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/internal/pgtest"
	"d2m-mediator/proto/d2mpb"
)

// The soak (make soak, not in CI): three `mediator serve` processes and
// three etcd members under a steady mixed workload for SOAK (60m in make
// soak), once with bbolt and once with PostgreSQL (SOAK_STORE=bbolt,
// postgres or both). Meanwhile a planned move every minute, a drain and
// undrain (the node rejoins, auto-rebalance gives it its share back)
// every 15 minutes, and a SIGKILL and restart of one node every 10
// minutes (at minute 7, 17, …); intervals scale with SOAK when shorter.
// Every 30 s it samples per node RSS, goroutines, open file descriptors
// and the bbolt file's size, and the cluster's etcd key count and
// PostgreSQL row counts. At the end: the delivery check (every acked
// reflection reached every other device of its group, in order, ids
// consecutive) and the slope check: over the last 30 minutes (the last
// half of a shorter run) the cluster-wide totals may grow at most by
// soakBounds. Samples, plot and summary go to SOAK_OUT (default a
// temporary directory): soak-<store>.json, .png, .txt.

// soakBound is how much one resource's cluster total may grow over the
// slope window (least-squares slope × window): rel × its mean + abs.
type soakBound struct {
	rel, abs float64
}

var soakBounds = map[string]soakBound{
	"goroutines":        {0.10, 50},         // scales with the connected devices; a leak grows without bound
	"open fds":          {0.10, 20},         // idem
	"RSS MiB":           {0.20, 16},         // the Go heap breathes; restarts reset it
	"bbolt MiB":         {0.25, 1},          // grows to its high-water mark, then reuses free pages
	"etcd keys":         {0, 8},             // nodes, assignments, owners, moves: a fixed set
	"pg rows":           {0.25, 200},        // queues follow the offline devices' backlogs
	"pg dead rows":      {math1e9, math1e9}, // reported, not bounded (autovacuum's business)
	"pg queue rows":     {math1e9, math1e9}, // parts of "pg rows", reported
	"pg slot rows":      {math1e9, math1e9},
	"pg held rows":      {math1e9, math1e9},
	"pg tombstone rows": {math1e9, math1e9},
}

const math1e9 = 1e9

// soakSample is one sampling round.
type soakSample struct {
	T     float64                       `json:"t"` // seconds since start
	Nodes map[string]map[string]float64 `json:"nodes"`
	Total map[string]float64            `json:"total"`
}

// soakEvent is one disturbance and how it went.
type soakEvent struct {
	T      float64 `json:"t"`
	Kind   string  `json:"kind"`
	Detail string  `json:"detail"`
	OK     bool    `json:"ok"`
	Took   float64 `json:"took_s"`
}

func TestSoak(t *testing.T) {
	d := os.Getenv("SOAK")
	if d == "" {
		t.Skip("the soak runs only with SOAK set (make soak: SOAK=60m)")
	}
	dur, err := time.ParseDuration(d)
	if err != nil || dur < 2*time.Minute {
		t.Fatalf("SOAK=%q: want a duration of at least 2m", d)
	}
	stores := []string{"bbolt", "postgres"}
	switch s := os.Getenv("SOAK_STORE"); s {
	case "", "both":
	case "bbolt", "postgres":
		stores = []string{s}
	default:
		t.Fatalf("SOAK_STORE=%q: want bbolt, postgres or both", s)
	}
	out := os.Getenv("SOAK_OUT")
	if out == "" {
		out = t.TempDir()
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, store := range stores {
		t.Run(store, func(t *testing.T) { runSoak(t, store, dur, out) })
	}
}

// soakCluster is the three processes of a soak.
type soakCluster struct {
	t      *testing.T
	prefix string
	base   string
	extra  []string
	mu     sync.Mutex
	procs  map[string]*process
	ids    []string
}

func (sc *soakCluster) start(id string) *process {
	p := startProcess(sc.t, id, sc.prefix, filepath.Join(sc.base, id), sc.extra...)
	sc.mu.Lock()
	sc.procs[id] = p
	sc.mu.Unlock()
	return p
}

func (sc *soakCluster) get(id string) *process {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.procs[id]
}

// urls returns the device URLs of the processes running now.
func (sc *soakCluster) urls() []string {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	var out []string
	for _, id := range sc.ids {
		if p := sc.procs[id]; p != nil {
			select {
			case <-p.done:
			default:
				out = append(out, p.url)
			}
		}
	}
	return out
}

func (sc *soakCluster) any() *process {
	for range 100 {
		sc.mu.Lock()
		for _, id := range sc.ids {
			if p := sc.procs[id]; p != nil {
				select {
				case <-p.done:
				default:
					sc.mu.Unlock()
					return p
				}
			}
		}
		sc.mu.Unlock()
		time.Sleep(100 * time.Millisecond)
	}
	sc.t.Fatal("no live node")
	return nil
}

func runSoak(t *testing.T, store string, dur time.Duration, out string) {
	scale := min(1, float64(dur)/float64(time.Hour))
	every := func(d time.Duration) time.Duration { return max(10*time.Second, time.Duration(float64(d)*scale)) }
	sc := &soakCluster{t: t, prefix: fmt.Sprintf("/soak/%s/%d/", store, time.Now().UnixNano()), base: t.TempDir(),
		procs: map[string]*process{}, ids: []string{"s1", "s2", "s3"}}
	var dsn string
	if store == "postgres" {
		dsn = pgtest.Shared(t).NewDatabase(t)
		sc.extra = []string{"--store", dsn}
	}
	for _, id := range sc.ids {
		sc.start(id)
	}
	waitUntil(t, 60*time.Second, "every shard served", func() bool {
		for _, s := range sc.any().shards(t).Shards {
			if s.Owner == "" {
				return false
			}
		}
		return true
	})
	cli := etcdClient(t)

	// The workload: 20 groups × 3 devices reflecting every 250 ms, 10
	// groups × 3 churning devices (sessions of ~20 s, pauses up to 10 s,
	// reflecting every 500 ms), 40 idle single-device groups asking for
	// their devices info every 30 s, 20 single-device groups logged in to
	// the chat server (CSP) through the node, with an echo every 10 s. All dial any live node.
	pick := func(d *fdev, attempt int) string {
		us := sc.urls()
		if len(us) == 0 {
			return sc.any().url
		}
		return us[(int(d.id)+attempt+int(d.keys.DeviceGroupID()[1]))%len(us)]
	}
	steady := keysForShards(20)
	l := startFaultLoad(t, steady, sc.any().url, 250*time.Millisecond, pick)
	churnGroups := keysForShards(10)
	createSlots(t, churnGroups, sc.any().url)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	churn := &fload{groups: churnGroups, stop: stop}
	for _, k := range churnGroups {
		for id := uint64(1); id <= 3; id++ { // every slot createSlots made: none may only pile up
			d := &fdev{keys: k, id: id, received: map[string]bool{}, ids: map[uint32]string{},
				sessionFor: 20 * time.Second, pauseFor: 10 * time.Second}
			d.dial = func(attempt int) string { return pick(d, attempt) }
			churn.devices = append(churn.devices, d)
			churn.wg.Add(1)
			go func() { defer churn.wg.Done(); d.run(ctx, 500*time.Millisecond) }()
		}
	}
	var idleWG sync.WaitGroup
	for range 40 {
		k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		idleWG.Add(1)
		go func() { defer idleWG.Done(); runIdleDevice(ctx, k, sc.urls) }()
	}
	var csps cspStats
	runID := fmt.Sprintf("%c%c", 'A'+rand.N(26), 'A'+rand.N(26))
	for i := range 20 {
		k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		ident, err := cspclient.NewIdentity(fmt.Sprintf("%s%06d", runID, i))
		if err != nil {
			t.Fatal(err)
		}
		idleWG.Add(1)
		go func() { defer idleWG.Done(); runCSPDevice(ctx, k, ident, sc.urls, &csps) }()
	}

	start := time.Now()
	var samples []soakSample
	var events []soakEvent
	var evMu sync.Mutex
	note := func(kind, detail string, ok bool, took time.Duration) {
		evMu.Lock()
		events = append(events, soakEvent{T: time.Since(start).Seconds(), Kind: kind, Detail: detail, OK: ok, Took: took.Seconds()})
		evMu.Unlock()
		t.Logf("%6.0fs %s %s ok=%v (%v)", time.Since(start).Seconds(), kind, detail, ok, took.Round(time.Millisecond))
	}
	sample := func() {
		s := soakSample{T: time.Since(start).Seconds(), Nodes: map[string]map[string]float64{}, Total: map[string]float64{}}
		for _, id := range sc.ids {
			p := sc.get(id)
			if p == nil {
				continue
			}
			m := procSample(p)
			if m == nil {
				continue
			}
			s.Nodes[id] = m
			for k, v := range m {
				s.Total[k] += v
			}
		}
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if r, err := cli.Get(cctx, sc.prefix, clientv3.WithPrefix(), clientv3.WithCountOnly()); err == nil {
			s.Total["etcd keys"] = float64(r.Count)
		}
		cancel()
		if dsn != "" {
			for k, v := range pgRows(dsn) {
				s.Total[k] = v
			}
		}
		samples = append(samples, s)
	}

	moveEvery, drainEvery, killEvery := every(time.Minute), every(15*time.Minute), every(10*time.Minute)
	killOffset := time.Duration(float64(7*time.Minute) * scale)
	sampleEvery := min(30*time.Second, max(5*time.Second, dur/60))
	nextMove, nextDrain, nextKill, nextSample := moveEvery, drainEvery, killOffset, time.Duration(0)
	killNext, drainNext := 0, 1
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for range tick.C {
		el := time.Since(start)
		if el >= dur {
			break
		}
		if el >= nextSample {
			sample()
			nextSample += sampleEvery
		}
		switch {
		case el >= nextKill:
			nextKill += killEvery
			id := sc.ids[killNext%3]
			killNext++
			began := time.Now()
			sc.get(id).kill()
			time.Sleep(time.Second) // down for a second (its length, not an order)
			sc.start(id)
			note("sigkill+restart", id, true, time.Since(began))
		case el >= nextDrain:
			nextDrain += drainEvery
			id := sc.ids[drainNext%3]
			drainNext++
			began := time.Now()
			var raw string
			code := soakPost(sc.any(), "/api/v1/cluster/nodes/"+id+"/drain", &raw)
			note("drain", id, code == 200, time.Since(began))
			began = time.Now()
			code = soakPost(sc.any(), "/api/v1/cluster/nodes/"+id+"/undrain", &raw)
			note("undrain", id, code == 200, time.Since(began))
		case el >= nextMove:
			nextMove += moveEvery
			k := steady[rand.N(len(steady))]
			shard := k.DeviceGroupID()[0]
			owner := sc.any().ownerOf(t, shard)
			var to string
			for _, id := range sc.ids {
				if id != owner {
					to = id
					if rand.N(2) == 0 {
						break
					}
				}
			}
			began := time.Now()
			var raw string
			code := soakPost(sc.any(), fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=%s", shard, to), &raw)
			note("move", fmt.Sprintf("%02x %s→%s: %d %s", shard, owner, to, code, firstLine(raw)), code == 200, time.Since(began))
		}
	}
	sample()

	stop()
	churn.wg.Wait()
	idleWG.Wait()
	url := sc.any().url
	l.stopAndCheck(t, url, 1001, 1006, -1, 1011)
	churn.stopAndCheck(t, url, 1001, 1006, -1, 1011)

	if dsn != "" {
		kind := map[byte]string{}
		for _, k := range steady {
			kind[k.DeviceGroupID()[0]] = "steady"
		}
		for _, k := range churnGroups {
			kind[k.DeviceGroupID()[0]] = "churn"
		}
		time.Sleep(time.Second) // the lazy acks' flush (100 ms), with room
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if conn, err := pgx.Connect(ctx, dsn); err == nil {
			rows, err := conn.Query(ctx, `SELECT group_id, device_id, count(*), min(seq), max(seq) FROM d2m_queue GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 8`)
			if err == nil {
				for rows.Next() {
					var g []byte
					var d, n, lo, hi int64
					rows.Scan(&g, &d, &n, &lo, &hi)
					t.Logf("queue rows left after the final drain: group %x… (%s) device %d: %d rows, seq %d–%d", g[:4], kind[g[0]], d, n, lo, hi)
				}
				rows.Close()
			}
			conn.Close(ctx)
		}
		cancel()
	}

	// The slope check over the last 30 minutes (the last half if shorter).
	window := min(30*time.Minute, dur/2).Seconds()
	end := samples[len(samples)-1].T
	var report strings.Builder
	fmt.Fprintf(&report, "soak %s: %v, 3 nodes (mediator serve) + 3 etcd members; %d samples every %v\n", store, dur, len(samples), sampleEvery)
	okEv := map[string][2]int{}
	for _, e := range events {
		c := okEv[e.Kind]
		c[0]++
		if e.OK {
			c[1]++
		}
		okEv[e.Kind] = c
	}
	kinds := make([]string, 0, len(okEv))
	for k := range okEv {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		fmt.Fprintf(&report, "events: %s %d (%d succeeded)\n", k, okEv[k][0], okEv[k][1])
	}
	fmt.Fprintf(&report, "slope over the last %.0f min (cluster totals; bound: rel × mean + abs):\n", window/60)
	names := make([]string, 0)
	for k := range samples[len(samples)-1].Total {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, name := range names {
		var xs, ys []float64
		for _, s := range samples {
			if v, ok := s.Total[name]; ok && s.T >= end-window {
				xs, ys = append(xs, s.T), append(ys, v)
			}
		}
		slope, mean := fitSlope(xs, ys)
		growth := slope * window
		b, bounded := soakBounds[name]
		limit := b.rel*mean + b.abs
		verdict := "within"
		if bounded && growth > limit {
			verdict = "EXCEEDS"
			t.Errorf("slope check: %s grew %.1f over the last %.0f min (mean %.1f), bound %.1f", name, growth, window/60, mean, limit)
		}
		if b.rel == math1e9 {
			verdict, limit = "reported only", 0
		}
		fmt.Fprintf(&report, "  %-12s mean %10.1f  growth %+10.1f  bound %10.1f  %s\n", name, mean, growth, limit, verdict)
	}
	fmt.Fprintf(&report, "CSP devices (20, echo every 10 s through the mediator to the chat server): %d logins, %d echoes answered within 10 s, %d not (reconnected)\n",
		csps.logins.Load(), csps.answered.Load(), csps.lost.Load())
	fmt.Fprintf(&report, "delivery check: every acked reflection delivered, in order, ids consecutive (%d steady and %d churning devices)\n", len(l.devices), len(churn.devices))
	t.Log("\n" + report.String())
	base := filepath.Join(out, "soak-"+store)
	js, _ := json.MarshalIndent(struct {
		Store   string       `json:"store"`
		Seconds float64      `json:"seconds"`
		Samples []soakSample `json:"samples"`
		Events  []soakEvent  `json:"events"`
	}{store, dur.Seconds(), samples, events}, "", " ")
	if err := os.WriteFile(base+".json", js, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(base+".txt", []byte(report.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := plotSoak(base+".png", store, samples, sc.ids); err != nil {
		t.Fatal(err)
	}
	t.Logf("wrote %s.{json,txt,png}", base)
}

func firstLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	if len(s) > 160 {
		s = s[:160]
	}
	return s
}

// soakPost POSTs to a process's admin API.
func soakPost(p *process, path string, raw *string) int {
	req, _ := http.NewRequest("POST", p.admin+path, nil)
	req.Header.Set("Authorization", "Bearer "+p.token)
	c := &http.Client{Timeout: 5 * time.Minute}
	resp, err := c.Do(req)
	if err != nil {
		*raw = err.Error()
		return 0
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	*raw = string(b)
	return resp.StatusCode
}

// runIdleDevice keeps one device of a single-device group connected to
// any live node, asking for its devices info every 30 s (a frame within
// the idle timeout), reconnecting when it is closed.
func runIdleDevice(ctx context.Context, k d2d.Keys, urls func() []string) {
	for i := 0; ctx.Err() == nil; i++ {
		us := urls()
		if len(us) == 0 {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		c, err := d2mclient.Dial(dctx, d2mclient.Config{URL: us[i%len(us)], Keys: k, DeviceID: 1,
			ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
		cancel()
		if err != nil {
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		tick := time.NewTicker(30 * time.Second)
		for alive := true; alive; {
			select {
			case <-ctx.Done():
				alive = false
			case <-tick.C:
				alive = c.SendMessage(ctx, d2m.TypeGetDevicesInfo, &d2mpb.GetDevicesInfo{}) == nil
			case <-c.Done():
				alive = false
			}
		}
		tick.Stop()
		c.CloseNow()
	}
}

// cspStats counts what the soak's CSP devices saw.
type cspStats struct {
	logins, answered, lost atomic.Int64
}

// runCSPDevice keeps one device logged in to the chat server through any
// live node (docs/protocol.md §9), sending an echo-request every 10 s and
// reconnecting when no echo-response comes within 10 s or the connection
// ends, as the apps do (§9.5).
func runCSPDevice(ctx context.Context, k d2d.Keys, ident cspclient.Identity, urls func() []string, st *cspStats) {
	for i := 0; ctx.Err() == nil; i++ {
		us := urls()
		if len(us) == 0 {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		cspSession(ctx, k, ident, us[i%len(us)], st)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func cspSession(ctx context.Context, k d2d.Keys, ident cspclient.Identity, url string, st *cspStats) {
	dctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	c, err := d2mclient.Dial(dctx, d2mclient.Config{URL: url, Keys: k, DeviceID: 1,
		ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
	if err != nil {
		return
	}
	defer c.CloseNow()
	cl, err := cspclient.Login(dctx, d2mclient.Transport{C: c.Conn}, ident, sharedChatKey, cspclient.LoginOptions{ClientInfo: "soak"})
	if err != nil {
		return
	}
	if cl.Unblock() != nil {
		return
	}
	if _, err := cl.RecvType(dctx, csp.QueueSendComplete); err != nil {
		return
	}
	st.logins.Add(1)
	go func() { // the device's own d2m messages (leader role, queue dry): read and dropped
		for {
			if _, err := c.Recv(ctx); err != nil {
				return
			}
		}
	}()
	for n := 0; ctx.Err() == nil; n++ {
		if cl.Echo([]byte(fmt.Sprint(n))) != nil {
			return
		}
		ectx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err := cl.RecvType(ectx, csp.EchoResponse)
		timedOut := ectx.Err() != nil && ctx.Err() == nil
		cancel()
		if err != nil {
			select {
			case <-c.Done(): // the node closed the connection (a move, a kill): not a lost echo
			default:
				if timedOut {
					st.lost.Add(1)
				}
			}
			return
		}
		st.answered.Add(1)
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Second):
		}
	}
}

// procSample reads one process's resources; nil if it is not running.
func procSample(p *process) map[string]float64 {
	select {
	case <-p.done:
		return nil
	default:
	}
	pid := p.cmd.Process.Pid
	m := map[string]float64{}
	if f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
				kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
				m["RSS MiB"] = kb / 1024
			}
		}
		f.Close()
	}
	if fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		m["open fds"] = float64(len(fds))
	}
	if fi, err := os.Stat(filepath.Join(p.dir, "mediator.db")); err == nil {
		m["bbolt MiB"] = float64(fi.Size()) / (1 << 20)
	}
	req, _ := http.NewRequest("GET", p.admin+"/metrics", nil)
	req.Header.Set("Authorization", "Bearer "+p.token)
	c := &http.Client{Timeout: 5 * time.Second}
	if resp, err := c.Do(req); err == nil {
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			if rest, ok := strings.CutPrefix(sc.Text(), "go_goroutines "); ok {
				m["goroutines"], _ = strconv.ParseFloat(rest, 64)
			}
		}
		resp.Body.Close()
	}
	return m
}

// pgRows counts the rows of the mediator's tables ("pg rows": all of
// them; "pg queue rows" and the others per table) and their dead rows.
func pgRows(dsn string) map[string]float64 {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return nil
	}
	defer conn.Close(context.Background())
	var q, sl, h, tb, sh, dead int64
	if err := conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM d2m_queue), (SELECT count(*) FROM d2m_slots),
		(SELECT count(*) FROM d2m_held), (SELECT count(*) FROM d2m_tombstones), (SELECT count(*) FROM d2m_shards),
		(SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables WHERE relname LIKE 'd2m_%')`).Scan(&q, &sl, &h, &tb, &sh, &dead); err != nil {
		return nil
	}
	return map[string]float64{"pg rows": float64(q + sl + h + tb + sh), "pg queue rows": float64(q), "pg slot rows": float64(sl),
		"pg held rows": float64(h), "pg tombstone rows": float64(tb), "pg dead rows": float64(dead)}
}

// fitSlope returns the least-squares slope of ys over xs and ys's mean.
func fitSlope(xs, ys []float64) (slope, mean float64) {
	n := float64(len(xs))
	if n < 2 {
		return 0, 0
	}
	var sx, sy, sxx, sxy float64
	for i := range xs {
		sx += xs[i]
		sy += ys[i]
		sxx += xs[i] * xs[i]
		sxy += xs[i] * ys[i]
	}
	den := n*sxx - sx*sx
	if den == 0 {
		return 0, sy / n
	}
	return (n*sxy - sx*sy) / den, sy / n
}

// plotSoak draws one panel per resource: a line per node (per-process
// resources) or the cluster's value, over time.
func plotSoak(path, store string, samples []soakSample, ids []string) error {
	perNode := []string{"RSS MiB", "goroutines", "open fds", "bbolt MiB"}
	cluster := []string{"etcd keys", "pg rows", "pg queue rows", "pg dead rows"}
	var panels []*plot.Plot
	add := func(title string, series map[string]plotter.XYs, order []string) error {
		p := plot.New()
		p.Title.Text = fmt.Sprintf("soak (%s): %s", store, title)
		p.X.Label.Text = "minutes since start"
		p.Y.Label.Text = title
		p.Y.Min = 0
		p.Add(plotter.NewGrid())
		top := 0.0
		for i, name := range order {
			pts := series[name]
			if len(pts) == 0 {
				continue
			}
			for _, pt := range pts {
				top = max(top, pt.Y)
			}
			l, err := plotter.NewLine(pts)
			if err != nil {
				return err
			}
			l.Color = plotutil.Color(i)
			l.Width = vg.Points(1.5)
			p.Add(l)
			p.Legend.Add(name, l)
		}
		p.Y.Max = max(top*1.3, 1)
		p.Legend.Top, p.Legend.Left = true, true
		panels = append(panels, p)
		return nil
	}
	for _, r := range perNode {
		series := map[string]plotter.XYs{}
		for _, s := range samples {
			for id, m := range s.Nodes {
				if v, ok := m[r]; ok {
					series[id] = append(series[id], plotter.XY{X: s.T / 60, Y: v})
				}
			}
		}
		if len(series) > 0 {
			if err := add(r+" per node", series, ids); err != nil {
				return err
			}
		}
	}
	for _, r := range cluster {
		var pts plotter.XYs
		for _, s := range samples {
			if v, ok := s.Total[r]; ok {
				pts = append(pts, plotter.XY{X: s.T / 60, Y: v})
			}
		}
		if len(pts) > 0 {
			if err := add(r, map[string]plotter.XYs{r: pts}, []string{r}); err != nil {
				return err
			}
		}
	}
	w, h := 8*vg.Inch, vg.Length(len(panels))*2.6*vg.Inch
	rows := make([][]*plot.Plot, len(panels))
	for i, p := range panels {
		rows[i] = []*plot.Plot{p}
	}
	tiles := draw.Tiles{Rows: len(panels), Cols: 1, PadY: vg.Centimeter / 2, PadTop: vg.Millimeter * 2,
		PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 4}
	c := vgimg.New(w, h)
	dc := draw.New(c)
	dc.SetColor(color.White)
	dc.Fill(dc.Rectangle.Path())
	canvases := plot.Align(rows, tiles, dc)
	for i, p := range panels {
		p.Draw(canvases[i][0])
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: c}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
