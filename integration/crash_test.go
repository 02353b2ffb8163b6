package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
	"d2m-mediator/reflection"
)

// TestCrashLoop is the durability promise under fire (after bbolt's
// power-failure test): the real binary, under
// reflect load from every device of a few groups, is killed with SIGKILL
// after a random 50–300 ms, restarted on the same data directory, and the
// devices reconnect; CRASH_ITERATIONS times (20 by default, 3 with -short;
// `make crashtest` runs 200). runCrashLoop says what is asserted.
func TestCrashLoop(t *testing.T) {
	iterations := envIterations("CRASH_ITERATIONS", 20, 3)
	s := startServer(t)
	runCrashLoop(t, s, iterations, "SIGKILLs", s.kill)
}

// envIterations reads a loop count from the environment variable name,
// else def (short with -short).
func envIterations(name string, def, short int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	if testing.Short() {
		return short
	}
	return def
}

// runCrashLoop runs reflect load from every device of a few groups on s,
// crashes the server with crash after a random 50–300 ms (crash must leave
// it stopped, its data where s.start finds it), restarts it and lets the
// devices reconnect, iterations times. It asserts that
//   - every reflection whose ReflectAck a sender received is delivered to
//     every other device of its group, in the sender's order (unacked
//     entries may come again after a crash: de-duplicated by envelope, a
//     redelivery must carry the id of the first delivery);
//   - within a slot, Reflected ids never go backwards: they increase within
//     a connection, and first deliveries are exactly 1, 2, 3, … (no entry
//     that reached a queue is ever skipped);
//   - the devices of a group see the others' reflections in one order;
//   - slots stay intact: every reconnect expects EXISTING and
//     GetDevicesInfo lists the whole group;
//   - after a final clean stop, `mediator db check` passes (on the data
//     directory, or on the --store DSN).
//
// crashes names the crashes in the summary line ("SIGKILLs").
func runCrashLoop(t *testing.T, s *server, iterations int, crashes string, crash func()) {
	const groups, perGroup, window = 2, 3, 8
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 8))

	var devs []*crashDevice
	for gi := 0; gi < groups; gi++ {
		g := newGroup()
		for d := 1; d <= perGroup; d++ {
			devs = append(devs, &crashDevice{t: t, group: gi, keys: g, id: uint64(d), groupSize: perGroup,
				window: window, acked: map[string]bool{}, seen: map[string]uint32{}})
		}
	}

	start := time.Now()
	totalLoad := time.Duration(0)
	for it := 0; it < iterations; it++ {
		var wg sync.WaitGroup
		for _, d := range devs {
			d.connect(s, it > 0)
		}
		for _, d := range devs {
			wg.Add(2)
			go func() { defer wg.Done(); d.receive() }()
			go func() { defer wg.Done(); d.send() }()
		}
		load := time.Duration(50+rng.IntN(251)) * time.Millisecond
		totalLoad += load
		time.Sleep(load)
		crash()
		wg.Wait()
		if t.Failed() {
			t.Fatalf("iteration %d failed", it)
		}
		s.start()
	}

	// Final pass: every device drains its queue (acking everything), the
	// group's slots are all listed, then a clean stop.
	for _, d := range devs {
		d.connect(s, true)
	}
	var wg sync.WaitGroup
	for _, d := range devs {
		wg.Add(1)
		go func() { defer wg.Done(); d.drain() }()
	}
	wg.Wait()
	for _, d := range devs {
		d.conn.Close()
	}
	if t.Failed() {
		t.FailNow()
	}
	s.stop()
	if dsn := s.storeDSN(); dsn != "" {
		pgCheck(t, dsn)
	} else {
		dbCheck(t, s.dataDir)
	}

	// Every acked reflection reached every other device of its group, in
	// its sender's order; the devices of a group agree on the order.
	sent, acked := 0, 0
	for _, sender := range devs {
		sent += sender.nextN
		acked += len(sender.acked)
		for _, r := range devs {
			if r.group != sender.group || r == sender {
				continue
			}
			for env := range sender.acked {
				if _, ok := r.seen[env]; !ok {
					t.Errorf("acked %s never reached device %d", env, r.id)
				}
			}
		}
	}
	for _, r := range devs {
		last := map[uint64]int{}
		for _, env := range r.order {
			from, n := parseCrashEnvelope(t, env)
			if l, ok := last[from]; ok && n <= l {
				t.Errorf("device %d of group %d: %s after #%d of the same sender", r.id, r.group, env, l)
			}
			last[from] = n
		}
	}
	for _, a := range devs {
		for _, b := range devs {
			if a.group != b.group || a.id >= b.id {
				continue
			}
			others := func(d *crashDevice) []string {
				return slices.DeleteFunc(slices.Clone(d.order), func(env string) bool {
					from, _ := parseCrashEnvelope(t, env)
					return from == a.id || from == b.id
				})
			}
			if x, y := others(a), others(b); !slices.Equal(x, y) {
				t.Errorf("group %d: devices %d and %d saw the others' reflections in different orders (%d vs %d entries)",
					a.group, a.id, b.id, len(x), len(y))
			}
		}
	}
	redelivered := 0
	for _, d := range devs {
		redelivered += d.redelivered
	}
	if acked < iterations {
		t.Errorf("only %d reflections acked in %d iterations", acked, iterations)
	}
	if strings.Contains(s.Logs(), "panic") {
		t.Errorf("the server logged a panic:\n%s", tailString(s.Logs(), 8000))
	}
	t.Logf("%d %s in %v (%v of load): %d reflections sent, %d acked, all delivered; %d redeliveries of unacked entries",
		iterations, crashes, time.Since(start).Round(time.Millisecond), totalLoad, sent, acked, redelivered)
}

// dbCheck runs `mediator db check --data DIR` on the stopped server's
// directory (reflection.Check in-process where the binary has no such
// command).
func dbCheck(t *testing.T, dir string) {
	t.Helper()
	out, code := runMediator(t, nil, "db", "check", "--data", dir)
	if code == 0 {
		t.Logf("mediator db check: %s", strings.TrimSpace(out))
		return
	}
	if strings.Contains(out, "unknown command") {
		if err := reflection.Check(filepath.Join(dir, "mediator.db")); err != nil {
			t.Fatalf("reflection.Check: %v", err)
		}
		return
	}
	t.Fatalf("mediator db check: exit %d:\n%s", code, out)
}

func parseCrashEnvelope(t *testing.T, env string) (from uint64, n int) {
	var g int
	if _, err := fmt.Sscanf(env, "g%d-d%d-%d", &g, &from, &n); err != nil {
		t.Fatalf("envelope %q: %v", env, err)
	}
	return from, n
}

// crashDevice is one device across all server lives.
type crashDevice struct {
	t         *testing.T
	group     int
	keys      *group
	id        uint64
	groupSize int
	window    int

	conn      *d2mclient.Client
	sem       chan struct{} // Reflects awaiting their ReflectAck (this connection)
	askedInfo bool          // sent GetDevicesInfo on this connection

	mu          sync.Mutex
	nextN       int               // next envelope number (across connections)
	ids         map[uint32]string // this connection's Reflect id → envelope
	nextID      uint32
	acked       map[string]bool   // envelopes whose ReflectAck arrived
	seen        map[string]uint32 // received envelope → its Reflected id
	order       []string          // first deliveries, in order
	lastNewID   uint32            // id of the last first delivery
	connLastID  uint32            // last Reflected id on this connection
	redelivered int
}

func (d *crashDevice) connect(s *server, existing bool) {
	cfg := d.keys.config(s, d.id)
	if existing {
		cfg.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	c, err := d2mclient.Dial(ctx, cfg)
	if err != nil {
		code := -1
		if c != nil {
			code = c.CloseCode(ctx)
		}
		d.t.Fatalf("group %d device %d: reconnect failed: %v (close %d): slot lost?", d.group, d.id, err, code)
	}
	d.conn = c
	d.sem = make(chan struct{}, d.window)
	d.mu.Lock()
	d.ids = map[uint32]string{}
	d.nextID = 0
	d.connLastID = 0
	d.mu.Unlock()
	d.askedInfo = existing && d.id == 1
	if d.askedInfo {
		// One device per group checks the slot table at every restart.
		c.SendMessage(ctx, d2m.TypeGetDevicesInfo, &d2mpb.GetDevicesInfo{})
	}
}

// send reflects with up to window Reflects in flight until the connection
// dies.
func (d *crashDevice) send() {
	ctx := context.Background()
	for {
		select {
		case d.sem <- struct{}{}:
		case <-d.conn.Done():
			return
		}
		d.mu.Lock()
		d.nextID++
		id := d.nextID
		env := fmt.Sprintf("g%d-d%d-%07d", d.group, d.id, d.nextN)
		d.nextN++
		d.ids[id] = env
		d.mu.Unlock()
		if err := d.conn.ReflectWithID(ctx, id, []byte(env), 0); err != nil {
			return
		}
	}
}

// receive handles everything the server sends until the connection dies.
func (d *crashDevice) receive() {
	for {
		m, err := d.conn.Recv(context.Background())
		if err != nil {
			return
		}
		d.handle(m)
	}
}

// drain handles messages until ReflectionQueueDry (and the DevicesInfo
// answer, for device 1), then a short quiet period.
func (d *crashDevice) drain() {
	dry, info := false, !d.askedInfo
	for !dry || !info {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		m, err := d.conn.Recv(ctx)
		cancel()
		if err != nil {
			d.t.Errorf("group %d device %d: final drain: %v", d.group, d.id, err)
			return
		}
		d.handle(m)
		dry = dry || m.Type == d2m.TypeReflectionQueueDry
		info = info || m.Type == d2m.TypeDevicesInfo
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	for {
		m, err := d.conn.Recv(ctx)
		if err != nil {
			return
		}
		d.handle(m)
	}
}

func (d *crashDevice) handle(m d2mclient.Message) {
	t := d.t
	switch m.Type {
	case d2m.TypeReflectAck:
		a, err := d2m.DecodeReflectAck(m.Payload)
		if err != nil {
			t.Errorf("ReflectAck: %v", err)
			return
		}
		d.mu.Lock()
		env, ok := d.ids[a.ID]
		if ok {
			d.acked[env] = true
			delete(d.ids, a.ID)
		}
		d.mu.Unlock()
		if !ok {
			t.Errorf("group %d device %d: ReflectAck for unknown id %d", d.group, d.id, a.ID)
			return
		}
		<-d.sem
	case d2m.TypeReflected:
		r, err := d2m.DecodeReflected(m.Payload)
		if err != nil {
			t.Errorf("Reflected: %v", err)
			return
		}
		env := string(r.Envelope)
		from, _ := parseCrashEnvelope(t, env)
		d.mu.Lock()
		switch {
		case from == d.id:
			t.Errorf("group %d device %d: got its own reflection %s", d.group, d.id, env)
		case !strings.HasPrefix(env, fmt.Sprintf("g%d-", d.group)):
			t.Errorf("group %d device %d: got another group's reflection %s", d.group, d.id, env)
		case r.ID <= d.connLastID:
			t.Errorf("group %d device %d: Reflected id %d after %d on one connection", d.group, d.id, r.ID, d.connLastID)
		}
		d.connLastID = r.ID
		if first, ok := d.seen[env]; ok {
			d.redelivered++
			if first != r.ID {
				t.Errorf("group %d device %d: %s redelivered as id %d, first as %d", d.group, d.id, env, r.ID, first)
			}
		} else {
			if r.ID != d.lastNewID+1 {
				t.Errorf("group %d device %d: new entry %s has id %d after %d: an entry was skipped or an id went backwards",
					d.group, d.id, env, r.ID, d.lastNewID)
			}
			d.lastNewID = r.ID
			d.seen[env] = r.ID
			d.order = append(d.order, env)
		}
		d.mu.Unlock()
		d.conn.AckReflected(context.Background(), r.ID)
	case d2m.TypeDevicesInfo:
		info, err := d2m.DecodeDevicesInfo(m.Payload)
		if err != nil {
			t.Errorf("DevicesInfo: %v", err)
			return
		}
		for id := uint64(1); id <= uint64(d.groupSize); id++ {
			if _, ok := info.AugmentedDeviceInfo[id]; !ok {
				t.Errorf("group %d: slot %d missing from DevicesInfo (%d slots)", d.group, id, len(info.AugmentedDeviceInfo))
			}
		}
		if len(info.AugmentedDeviceInfo) != d.groupSize {
			t.Errorf("group %d: %d slots, want %d", d.group, len(info.AugmentedDeviceInfo), d.groupSize)
		}
	case d2m.TypeReflectionQueueDry, d2m.TypeRolePromotedToLeader:
	default:
		t.Errorf("group %d device %d: unexpected %v", d.group, d.id, m.Type)
	}
}
