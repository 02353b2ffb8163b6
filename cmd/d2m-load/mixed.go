package main

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"d2m-mediator/chatproxy/csp"
	"d2m-mediator/chatproxy/cspclient"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
)

// The mixed scenario: many mostly idle devices doing what real ones do,
// open loop. Each device is one goroutine (plus d2mclient's reader) that
// waits in one select on its timer and its two receive queues, so the
// tool stays light beside the server: there is no goroutine per message
// kind and no lock on a device's state.

// Histograms of the mixed scenario, by kind.
const (
	hEcho = iota
	hAck
	hDeliv
	hTx
	numHists
)

var histNames = [numHists]string{
	hEcho:  "echo round trip",
	hAck:   "ReflectAck",
	hDeliv: "delivery sender→receiver",
	hTx:    "transaction (begin → commit ack)",
}

// hset is one histogram per kind.
type hset [numHists]*hist

func newHset() *hset {
	var h hset
	for i := range h {
		h[i] = newHist(histNames[i])
	}
	return &h
}

// Counters of the mixed scenario.
const (
	cEchoSent = iota
	cEchoAnswered
	cEchoLost
	cReflectSent
	cReflectAcked
	cReflectedRecv
	cTxBegun
	cTxCommitted
	cTxRejected
	cTxSkipped
	cTxEndedSeen
	cLeaders
	cQueueSendComplete
	cIncoming
	numCounters
)

var counterNames = [numCounters]string{
	cEchoSent:          "echoes sent",
	cEchoAnswered:      "echoes answered",
	cEchoLost:          "echoes never answered (a later one was)",
	cReflectSent:       "reflects sent",
	cReflectAcked:      "reflects acked",
	cReflectedRecv:     "Reflected received and acked",
	cTxBegun:           "transactions begun",
	cTxCommitted:       "transactions committed",
	cTxRejected:        "transactions rejected",
	cTxSkipped:         "transactions skipped (previous one still open)",
	cTxEndedSeen:       "TransactionEnded received",
	cLeaders:           "RolePromotedToLeader received",
	cQueueSendComplete: "CSP queue-send-complete received (leaders unblocked)",
	cIncoming:          "CSP incoming messages (acked)",
}

type counters [numCounters]atomic.Int64

func (c *counters) snapshot() [numCounters]int64 {
	var s [numCounters]int64
	for i := range c {
		s[i] = c[i].Load()
	}
	return s
}

func countMap(a, b [numCounters]int64) map[string]int64 {
	m := make(map[string]int64, numCounters)
	for i := range a {
		m[counterNames[i]] = b[i] - a[i]
	}
	return m
}

// mixGroup is one device group: one Threema identity, shared by its
// devices (each with its own csp-device-id), as on real multi-device
// accounts.
type mixGroup struct {
	idx         int
	keys        d2d.Keys
	ident       cspclient.Identity
	serverGroup string
}

// mixDevice is one device. After setup only its own goroutine touches it.
type mixDevice struct {
	idx int // within this shard
	g   *mixGroup
	id  uint64 // device id within the group, 1..size
	txs bool   // runs the group's transactions
	c   *d2mclient.Client
	tr  *proxyTransport
	cl  *cspclient.Client

	nextEcho, nextReflect, nextTx time.Duration // since base
	echoSeq                       uint64
	echoes                        []pendingEcho
	reflID                        uint32
	reflects                      []pendingMixReflect
	txState                       int
	txSched                       time.Duration
	cspBroken                     bool
}

type pendingEcho struct {
	seq   uint64
	sched time.Duration
}

type pendingMixReflect struct {
	id    uint32
	sched time.Duration
	tx    bool
}

const (
	txIdle = iota
	txBegun
	txReflecting
	txCommitting
)

// proxyTransport is the cspclient Transport of a mixed device: the
// device's loop takes a Proxy unit from the queue itself and hands it over
// in pending, so cspclient opens it without a goroutine of its own.
type proxyTransport struct {
	c       *d2mclient.Conn
	pending []byte
}

func (t *proxyTransport) Send(p []byte) error { return t.c.SendProxy(context.Background(), p) }

func (t *proxyTransport) Recv(ctx context.Context) ([]byte, error) {
	if p := t.pending; p != nil {
		t.pending = nil
		return p, nil
	}
	return t.c.RecvProxy(ctx)
}

// mixRun is one run of the scenario (one shard).
type mixRun struct {
	o         *options
	mo        *mixedOptions
	env       *runEnv
	serverKey [32]byte
	filler    []byte // random envelope bytes, read-only

	groups []*mixGroup
	devs   []*mixDevice
	conns  []*d2mclient.Client // by device index; written by its setup goroutine

	cnt       counters
	errs      *errCounter
	setupHist *hist
	cur       atomic.Pointer[hset] // the current report interval
	total     *hset                // the measured phase
	winStart  atomic.Int64         // scheduled times in [winStart, winEnd) count in total
	winEnd    atomic.Int64
	sendUntil atomic.Int64 // nothing scheduled at or after this is sent
	closing   atomic.Bool
	connected atomic.Int64
	failed    atomic.Int64
	dropped   atomic.Int64
	outEcho   atomic.Int64 // sent and not answered yet
	outRefl   atomic.Int64
	outTx     atomic.Int64
	loops     sync.WaitGroup
}

const (
	deviceSetupTimeout = time.Minute
	never              = time.Duration(1<<63 - 1)
)

func runMixed(ctx context.Context, env *runEnv) (*result, error) {
	o, mo := env.o, &env.o.mixed
	keyBytes, err := hex.DecodeString(o.chatServerKey)
	if err != nil || len(keyBytes) != 32 {
		return nil, errors.New("--chat-server-key: want 64 hex digits")
	}
	m := &mixRun{o: o, mo: mo, env: env, filler: randomBytes(max(mo.reflectMax, 64)),
		errs: &errCounter{}, setupHist: newSetupHist("device setup: connect, authenticate, ReflectionQueueDry, CSP login"),
		total: newHset()}
	copy(m.serverKey[:], keyBytes)
	m.cur.Store(newHset())
	m.winStart.Store(int64(never))
	m.winEnd.Store(int64(never))
	m.sendUntil.Store(int64(never))
	res := newResult("mixed", map[string]any{
		"devices": o.devices, "group_mix": mo.groupMixFlag, "ramp": mo.ramp,
		"echo_interval": mo.echoInterval.String(), "echo_jitter": mo.echoJitter.String(),
		"reflect_interval": mo.reflectInterval.String(), "reflect_size": mo.reflectSizeFlag,
		"tx_interval": mo.txInterval.String(), "duration": o.duration.String(),
		"report_interval": mo.reportInterval.String(), "slo": mo.slo.String(), "shard": mo.shardFlag,
		"run_id": mo.runID, "server_groups": mo.serverGroupFlag, "source_addrs": o.sourceAddrs, "url": o.url,
	})

	if err := m.plan(); err != nil {
		return nil, err
	}
	sum := &mixedSummary{Shards: []string{mo.shardFlag}, RunID: mo.runID, DevicesPlanned: int64(len(m.devs)),
		GroupsBySize: map[string]int64{}, SLOMs: ms(mo.slo)}
	for _, g := range m.groups {
		sum.GroupsBySize[strconv.Itoa(len(m.devsOf(g)))]++
	}
	// Whatever way the run ends, no connection and no device loop
	// outlives it.
	defer func() {
		m.closing.Store(true)
		closeAll(m.conns, o.dialWorkers, true)
		m.loops.Wait()
	}()

	rep := newReporter(m)
	repCtx, stopRep := context.WithCancel(context.Background())
	repDone := make(chan struct{})
	go func() { defer close(repDone); rep.run(repCtx) }()
	defer func() { stopRep(); <-repDone }()
	tl := m.startTimeline()

	// Ramp.
	logf("mixed: shard %s: %d devices in %d groups, setting up at %.0f/s", mo.shardFlag, len(m.devs), len(m.groups), mo.ramp/float64(mo.shards))
	rampStart := time.Now()
	serverRamp0, _ := env.probe.read(ctx, false)
	toolRamp0 := selfCPU()
	sum.ServerRSSBeforeMiB = mib(serverRamp0.RSSBytes)
	sum.ToolRSSBeforeMiB = mib(selfRSS())
	rampCtx, cancelRamp := context.WithTimeout(ctx, mo.timeLimit(o)-o.duration-mo.drain-teardownGrace)
	m.ramp(rampCtx)
	cancelRamp()
	sum.RampS = round3(time.Since(rampStart).Seconds())
	serverRamp1, _ := env.probe.read(ctx, false)
	sum.ServerRampCPU = cpuDelta(serverRamp0.CPUSeconds, serverRamp1.CPUSeconds)
	sum.ToolRampCPU = round3(selfCPU() - toolRamp0)
	logf("mixed: %d devices ready in %.1f s (%d failed, %d 503 retries)", m.connected.Load(), sum.RampS, m.failed.Load(), env.dialer.overload.Load())
	if ctx.Err() != nil {
		tl.finish(res)
		return nil, ctx.Err()
	}
	if m.connected.Load() == 0 {
		tl.finish(res)
		res.finish(m.errs)
		return res, errors.New("no device could be set up")
	}
	if mo.startAt > 0 {
		if wait := time.Until(time.Unix(mo.startAt, 0)); wait > 0 {
			logf("mixed: waiting %v for --start-at", wait.Round(time.Second))
			sleepCtx(ctx, time.NewTimer(time.Hour), wait)
		} else {
			logf("mixed: the ramp ended %v after --start-at", (-wait).Round(time.Second))
		}
	}

	// Measured phase.
	rep.phase("measured")
	before, _ := env.probe.read(ctx, false)
	tool0 := selfCPU()
	chat0, _ := chatCPU(mo.chatPIDs)
	cnt0 := m.cnt.snapshot()
	start := time.Now()
	now := sinceBase()
	m.winStart.Store(int64(now))
	m.winEnd.Store(int64(now + o.duration))
	m.sendUntil.Store(int64(now + o.duration))
	sleepCtx(ctx, time.NewTimer(time.Hour), o.duration)
	elapsed := time.Since(start)
	devicesAtEnd := m.connected.Load()
	after, _ := env.probe.read(context.Background(), false)
	tool1 := selfCPU()
	cnt1 := m.cnt.snapshot()
	sum.Server = readings{Cores: -1, RSSMiB: mib(after.RSSBytes), Goroutines: after.Goroutines, OpenFDs: -1}
	if c := cpuDelta(before.CPUSeconds, after.CPUSeconds); c >= 0 {
		sum.Server.Cores = round3(c / after.At.Sub(before.At).Seconds())
	}
	if o.serverPID > 0 {
		sum.Server.OpenFDs = float64(countFDs(o.serverPID))
	} else if v, ok := after.Metrics["process_open_fds"]; ok {
		sum.Server.OpenFDs = v
	}
	sum.Tool = readings{Cores: round3((tool1 - tool0) / elapsed.Seconds()), RSSMiB: mib(selfRSS()), Goroutines: -1, OpenFDs: -1}
	if len(mo.chatPIDs) > 0 {
		sum.Chat = &readings{Cores: -1, RSSMiB: -1, Goroutines: -1, OpenFDs: -1}
		if chat1, err := chatCPU(mo.chatPIDs); err == nil && chat0 >= 0 {
			sum.Chat.Cores = round3((chat1 - chat0) / elapsed.Seconds())
		}
		sum.Chat.RSSMiB, sum.Chat.OpenFDs = chatMemory(mo.chatPIDs)
	}
	m.sendUntil.Store(int64(sinceBase()))
	rep.phase("drain")

	// Drain: what was sent in the window gets its answer.
	drainUntil := time.Now().Add(mo.drain)
	for time.Now().Before(drainUntil) && m.outEcho.Load()+m.outRefl.Load()+m.outTx.Load() > 0 && m.connected.Load() > 0 {
		time.Sleep(20 * time.Millisecond)
	}
	tl.finish(res)
	stopRep()
	<-repDone
	cntEnd := m.cnt.snapshot() // before the teardown's closes promote new leaders
	for k, v := range map[string]int64{"echo unanswered after the drain": m.outEcho.Load(),
		"reflect unacked after the drain": m.outRefl.Load(), "transaction unfinished after the drain": m.outTx.Load()} {
		if v > 0 {
			m.errs.addN(k, v)
		}
	}
	m.closing.Store(true)
	logf("mixed: closing %d connections", m.connected.Load())
	closeAll(m.conns, o.dialWorkers, false)
	m.loops.Wait()

	res.ElapsedS = round3(elapsed.Seconds())
	sum.MeasuredS = res.ElapsedS
	sum.Devices = devicesAtEnd
	sum.SetupFailed = m.failed.Load()
	sum.Disconnected = m.dropped.Load()
	sum.Overload503 = env.dialer.overload.Load()
	sum.Counts = countMap(cnt0, cnt1)
	sum.CountsTotal = countMap([numCounters]int64{}, cntEnd)
	sum.Hists = map[string]histJSON{}
	for _, h := range m.total {
		sum.Hists[h.name] = h.export()
	}
	sum.SetupHist = m.setupHist.export()
	sum.Intervals = rep.intervals
	if env.probe.enabled() {
		res.Server = diffSnapshots(before, after)
	}
	res.Mixed = sum
	res.finish(m.errs)
	sum.ToolCPUTotal = res.Client.CPUSeconds
	sum.ToolMaxRSSMiB = res.Client.MaxRSSMiB
	sum.Errors = res.Errors
	res.deriveMixed()
	return res, nil
}

// plan builds this shard's groups and devices: group g (of the plan for
// all --devices) belongs to shard g mod n.
func (m *mixRun) plan() error {
	sizes := planGroups(m.o.devices, m.mo.groupMix)
	prefix := m.mo.identityPrefix()
	var mine []int
	for g := range sizes {
		if g%m.mo.shards == m.mo.shard {
			mine = append(mine, g)
		}
	}
	if len(sizes) > 1_000_000 {
		return fmt.Errorf("%d groups: identities have six digits", len(sizes))
	}
	logf("mixed: deriving %d group keys and identities", len(mine))
	keys := newGroupKeys(len(mine))
	for i, g := range mine {
		ident, err := cspclient.NewIdentity(fmt.Sprintf("%s%06d", prefix, g))
		if err != nil {
			return err
		}
		grp := &mixGroup{idx: g, keys: keys[i], ident: ident, serverGroup: m.mo.serverGroups[g%len(m.mo.serverGroups)]}
		m.groups = append(m.groups, grp)
		for d := range sizes[g] {
			m.devs = append(m.devs, &mixDevice{idx: len(m.devs), g: grp, id: uint64(d + 1), txs: d == 0})
		}
	}
	m.conns = make([]*d2mclient.Client, len(m.devs))
	return nil
}

func (m *mixRun) devsOf(g *mixGroup) []*mixDevice {
	var out []*mixDevice
	for _, d := range m.devs {
		if d.g == g {
			out = append(out, d)
		}
	}
	return out
}

// ramp starts the devices' setups at --ramp/n per second, at most
// --dial-concurrency at a time, and returns once every setup has ended.
// Each setup goroutine goes on as its device's loop.
func (m *mixRun) ramp(ctx context.Context) {
	per := time.Duration(float64(time.Second) * float64(m.mo.shards) / m.mo.ramp)
	sem := make(chan struct{}, m.o.dialWorkers)
	var setups sync.WaitGroup
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	start := time.Now()
	setupProg := startProgress("setup", m.errs, gauge("ready", "devices", func() float64 { return float64(m.connected.Load()) }),
		gauge("failed", "devices", func() float64 { return float64(m.failed.Load()) }),
		rateOf("503", m.env.dialer.overload.Load))
	defer setupProg.stopOnly()
launch:
	for i, d := range m.devs {
		if !sleepCtx(ctx, timer, time.Until(start.Add(time.Duration(i)*per))) {
			break
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			break launch
		}
		setups.Add(1)
		go func() {
			dctx, cancel := context.WithTimeout(ctx, deviceSetupTimeout)
			err := m.setup(dctx, d)
			cancel()
			<-sem
			if err != nil {
				if ctx.Err() == nil || !errors.Is(err, context.Canceled) {
					m.errs.addKey(err.Error())
				}
				m.failed.Add(1)
				if m.conns[d.idx] != nil {
					m.conns[d.idx].CloseNow()
					m.conns[d.idx] = nil
				}
				setups.Done()
				return
			}
			m.connected.Add(1)
			m.loops.Add(1)
			setups.Done()
			d.loop(m)
		}()
	}
	setups.Wait()
}

// setupError is a failed setup, keyed by its stage and the kind of error
// (not the device), so that failures add up by kind.
type setupError struct {
	stage string
	err   error
}

func (e *setupError) Error() string { return "setup " + e.stage + ": " + errorKey(e.err) }
func (e *setupError) Unwrap() error { return e.err }

// setup connects one device, waits for ReflectionQueueDry and logs in to
// the chat server through the mediator.
func (m *mixRun) setup(ctx context.Context, d *mixDevice) error {
	t0 := time.Now()
	cfg := m.env.dialer.deviceConfig(d.g.keys, d.id)
	cfg.ServerGroup = d.g.serverGroup
	c, err := m.env.dialer.dial(ctx, cfg)
	if err != nil {
		return &setupError{"connect", err}
	}
	d.c = c
	m.conns[d.idx] = c
	if _, err := readyDevice(ctx, c, nil); err != nil {
		return &setupError{"ReflectionQueueDry", err}
	}
	d.tr = &proxyTransport{c: c.Conn}
	cl, err := cspclient.Login(ctx, d.tr, d.g.ident, m.serverKey, cspclient.LoginOptions{ClientInfo: "d2m-load mixed"})
	if err != nil {
		if inner := errors.Unwrap(err); inner != nil {
			err = inner // without the identity, so failures add up
		}
		if errors.Is(err, d2mclient.ErrClosed) {
			err = connEnd(c.Conn)
		}
		return &setupError{"CSP login", err}
	}
	d.cl = cl
	m.setupHist.Record(time.Since(t0))
	return nil
}

// record adds one latency, measured from the scheduled time sched, to the
// current report interval and, if sched is in the measured window, to the
// run's total.
func (m *mixRun) record(kind int, sched, now time.Duration) {
	lat := now - sched
	m.cur.Load()[kind].Record(lat)
	if int64(sched) >= m.winStart.Load() && int64(sched) < m.winEnd.Load() {
		m.total[kind].Record(lat)
	}
}

// sendErr counts a failed write unless the run is closing.
func (m *mixRun) sendErr(what string, err error) {
	if !m.closing.Load() {
		m.errs.addKey("send " + what + ": " + errorKey(err))
	}
}

// loop is the device's life after setup: send what is due, handle what
// arrives, until the connection ends.
func (d *mixDevice) loop(m *mixRun) {
	defer m.loops.Done()
	mo := m.mo
	now := sinceBase()
	d.nextEcho, d.nextReflect, d.nextTx = never, never, never
	if mo.echoInterval > 0 {
		d.nextEcho = now + time.Duration(rand.Int64N(int64(mo.echoInterval+mo.echoJitter)))
	}
	if mo.reflectInterval > 0 {
		d.nextReflect = now + time.Duration(rand.Int64N(int64(mo.reflectInterval)))
	}
	if mo.txInterval > 0 && d.txs {
		d.nextTx = now + time.Duration(rand.Int64N(int64(mo.txInterval)))
	}
	msgs, proxy := d.c.Incoming()
	timer := time.NewTimer(d.untilNext(m))
	defer timer.Stop()
	for {
		select {
		case <-timer.C:
			d.fire(m)
			timer.Reset(d.untilNext(m))
		case msg := <-msgs:
			d.handle(m, msg)
		case u := <-proxy:
			d.handleCSP(m, u)
		case <-d.c.Done():
			m.connected.Add(-1)
			if !m.closing.Load() {
				m.dropped.Add(1)
				m.errs.addKey("session: " + errorKey(connEnd(d.c.Conn)))
			}
			return
		}
	}
}

// untilNext is the wait for the next due event (an hour once sending
// has stopped: the loop then only receives).
func (d *mixDevice) untilNext(m *mixRun) time.Duration {
	next := min(d.nextEcho, d.nextReflect, d.nextTx)
	if int64(next) >= m.sendUntil.Load() {
		return time.Hour
	}
	return max(0, next-sinceBase())
}

// fire sends every event that is due, each stamped with its scheduled
// time: a late loop catches up instead of dropping arrivals, so latency
// includes the lateness (no coordinated omission).
func (d *mixDevice) fire(m *mixRun) {
	mo := m.mo
	now := sinceBase()
	until := time.Duration(m.sendUntil.Load())
	for d.nextEcho <= now && d.nextEcho < until {
		d.sendEcho(m, d.nextEcho)
		d.nextEcho += mo.echoInterval + time.Duration(rand.Int64N(int64(mo.echoJitter)+1))
	}
	for d.nextReflect <= now && d.nextReflect < until {
		d.sendReflect(m, d.nextReflect, false)
		d.nextReflect += jitterGap(mo.reflectInterval)
	}
	for d.nextTx <= now && d.nextTx < until {
		d.beginTx(m, d.nextTx)
		d.nextTx += jitterGap(mo.txInterval)
	}
}

// jitterGap is uniform in [0.5, 1.5) × mean.
func jitterGap(mean time.Duration) time.Duration {
	return mean/2 + time.Duration(rand.Int64N(int64(mean)))
}

func (d *mixDevice) sendEcho(m *mixRun, sched time.Duration) {
	if d.cspBroken {
		return
	}
	d.echoSeq++
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], d.echoSeq)
	d.echoes = append(d.echoes, pendingEcho{seq: d.echoSeq, sched: sched})
	m.outEcho.Add(1)
	m.cnt[cEchoSent].Add(1)
	if err := d.cl.Echo(b[:]); err != nil {
		m.sendErr("echo", err)
	}
}

// sendReflect sends an envelope of a random size whose first 12 bytes
// carry the scheduled time and the sender, for the delivery latency.
func (d *mixDevice) sendReflect(m *mixRun, sched time.Duration, tx bool) {
	size := m.mo.reflectMin + rand.IntN(m.mo.reflectMax-m.mo.reflectMin+1)
	env := make([]byte, size)
	copy(env, m.filler)
	binary.LittleEndian.PutUint64(env, uint64(sched))
	binary.LittleEndian.PutUint32(env[8:], uint32(d.idx))
	d.reflID++
	d.reflects = append(d.reflects, pendingMixReflect{id: d.reflID, sched: sched, tx: tx})
	m.outRefl.Add(1)
	m.cnt[cReflectSent].Add(1)
	if err := d.c.ReflectWithID(context.Background(), d.reflID, env, 0); err != nil {
		m.sendErr("reflect", err)
	}
}

// beginTx starts a transaction as clients do for a settings change:
// BeginTransaction, one reflect once it is granted, CommitTransaction
// after that reflect's ack. The encrypted scope is opaque to the server.
func (d *mixDevice) beginTx(m *mixRun, sched time.Duration) {
	if d.txState != txIdle {
		m.cnt[cTxSkipped].Add(1)
		return
	}
	d.txState, d.txSched = txBegun, sched
	m.outTx.Add(1)
	m.cnt[cTxBegun].Add(1)
	if err := d.c.SendMessage(context.Background(), d2m.TypeBeginTransaction,
		&d2mpb.BeginTransaction{EncryptedScope: m.filler[:42]}); err != nil {
		m.sendErr("BeginTransaction", err)
	}
}

func (d *mixDevice) endTx(m *mixRun) {
	d.txState = txIdle
	m.outTx.Add(-1)
}

// handle takes one d2m message.
func (d *mixDevice) handle(m *mixRun, msg d2mclient.Message) {
	now := sinceBase()
	switch msg.Type {
	case d2m.TypeReflectAck:
		ra, err := d2m.DecodeReflectAck(msg.Payload)
		if err != nil {
			m.errs.add(err)
			return
		}
		i := 0
		for i < len(d.reflects) && d.reflects[i].id != ra.ID {
			i++
		}
		if i == len(d.reflects) {
			m.errs.addKey("ReflectAck for an unknown id")
			return
		}
		if i > 0 {
			m.errs.addKey("ReflectAck out of order")
		}
		p := d.reflects[i]
		d.reflects = append(d.reflects[:i], d.reflects[i+1:]...)
		m.outRefl.Add(-1)
		m.cnt[cReflectAcked].Add(1)
		m.record(hAck, p.sched, now)
		if p.tx && d.txState == txReflecting {
			d.txState = txCommitting
			if err := d.c.SendMessage(context.Background(), d2m.TypeCommitTransaction, &d2mpb.CommitTransaction{}); err != nil {
				m.sendErr("CommitTransaction", err)
			}
		}
	case d2m.TypeReflected:
		r, err := d2m.DecodeReflected(msg.Payload)
		if err != nil {
			m.errs.add(err)
			return
		}
		if len(r.Envelope) >= 12 {
			m.record(hDeliv, time.Duration(binary.LittleEndian.Uint64(r.Envelope)), now)
		}
		m.cnt[cReflectedRecv].Add(1)
		if err := d.c.AckReflected(context.Background(), r.ID); err != nil {
			m.sendErr("ReflectedAck", err)
		}
	case d2m.TypeRolePromotedToLeader:
		m.cnt[cLeaders].Add(1)
		// The leader lets the chat server deliver (protocol: unblock
		// after login and promotion); queue-send-complete follows.
		if !d.cspBroken {
			if err := d.cl.Unblock(); err != nil {
				m.sendErr("unblock", err)
			}
		}
	case d2m.TypeBeginTransactionAck:
		if d.txState == txBegun {
			d.txState = txReflecting
			d.sendReflect(m, now, true)
		}
	case d2m.TypeTransactionRejected:
		// Only one device per group begins transactions: a rejection
		// means the lock was held by something else.
		m.cnt[cTxRejected].Add(1)
		m.errs.addKey("transaction rejected")
		if d.txState == txBegun {
			d.endTx(m)
		}
	case d2m.TypeCommitTransactionAck:
		if d.txState == txCommitting {
			m.record(hTx, d.txSched, now)
			m.cnt[cTxCommitted].Add(1)
			d.endTx(m)
		}
	case d2m.TypeTransactionEnded:
		m.cnt[cTxEndedSeen].Add(1)
	}
}

// handleCSP takes one Proxy unit: one CSP frame from the chat server.
func (d *mixDevice) handleCSP(m *mixRun, unit []byte) {
	if d.cspBroken {
		return
	}
	d.tr.pending = unit
	typ, data, err := d.cl.Recv(context.Background())
	if err != nil {
		// The nonce counters are out of step: the session is lost.
		d.cspBroken = true
		m.errs.addKey("csp: " + errorKey(err))
		return
	}
	switch typ {
	case csp.EchoResponse:
		if len(data) != 8 {
			m.errs.addKey("csp: echo-response of the wrong length")
			return
		}
		seq := binary.LittleEndian.Uint64(data)
		i := 0
		for i < len(d.echoes) && d.echoes[i].seq != seq {
			i++
		}
		if i == len(d.echoes) {
			m.errs.addKey("csp: echo-response for an unknown request")
			return
		}
		// Echoes are answered in order: the ones before this one are
		// lost.
		if i > 0 {
			m.cnt[cEchoLost].Add(int64(i))
			m.errs.addKey("csp: echo never answered (a later one was)")
		}
		m.outEcho.Add(-int64(i + 1))
		m.cnt[cEchoAnswered].Add(1)
		m.record(hEcho, d.echoes[i].sched, sinceBase())
		d.echoes = d.echoes[i+1:]
	case csp.QueueSendComplete:
		m.cnt[cQueueSendComplete].Add(1)
	case csp.IncomingMessage:
		m.cnt[cIncoming].Add(1)
		if msg, err := cspclient.ParseMessage(data); err == nil {
			if err := d.cl.AckIncoming(msg.Sender, msg.MessageID); err != nil {
				m.sendErr("csp ack", err)
			}
		}
	case csp.CloseErrorType:
		m.errs.addKey("csp close-error")
	}
}
