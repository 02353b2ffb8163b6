package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// readings are one process's figures: cores over a span (CPU seconds per
// wall second), and RSS, goroutines and open descriptors at its end. -1 is
// "not known".
type readings struct {
	Cores      float64 `json:"cores"`
	RSSMiB     float64 `json:"rss_mib"`
	Goroutines float64 `json:"goroutines"`
	OpenFDs    float64 `json:"open_fds"`
}

// intervalReport is one report interval of a mixed run (a minute by
// default; the ramp's interval ends when the measured phase starts).
type intervalReport struct {
	Phase   string                    `json:"phase"` // ramp, measured
	StartS  float64                   `json:"start_s"`
	EndS    float64                   `json:"end_s"` // seconds since the ramp began
	Devices int64                     `json:"devices"`
	Server  readings                  `json:"server"`
	Chat    *readings                 `json:"chat_server,omitempty"`
	Tool    readings                  `json:"tool"`
	Latency map[string]latencySummary `json:"latency_ms"`
	Counts  map[string]int64          `json:"counts"`
	Errors  map[string]int64          `json:"errors"`
	Hists   map[string]histJSON       `json:"histograms"` // for merging shards
}

// mixedSummary is what a mixed run (one shard) measured, in a form that
// merges: counts add up, histograms carry their buckets.
type mixedSummary struct {
	Shards             []string            `json:"shards"`
	RunID              string              `json:"run_id"`
	DevicesPlanned     int64               `json:"devices_planned"`
	Devices            int64               `json:"devices"` // connected at the end of the measured phase
	SetupFailed        int64               `json:"setup_failed"`
	Disconnected       int64               `json:"disconnected"` // sessions that ended before the teardown
	GroupsBySize       map[string]int64    `json:"groups_by_size"`
	RampS              float64             `json:"ramp_s"`
	MeasuredS          float64             `json:"measured_s"`
	Overload503        int64               `json:"overload_503_retries"`
	ServerRampCPU      float64             `json:"server_ramp_cpu_s"`
	ToolRampCPU        float64             `json:"tool_ramp_cpu_s"`
	Server             readings            `json:"server"` // cores over the measured phase, the rest at its end
	Chat               *readings           `json:"chat_server,omitempty"`
	Tool               readings            `json:"tool"`
	ToolCPUTotal       float64             `json:"tool_cpu_total_s"`
	ToolMaxRSSMiB      float64             `json:"tool_max_rss_mib"`
	Counts             map[string]int64    `json:"counts"`                // in the measured phase
	CountsTotal        map[string]int64    `json:"counts_total"`          // ramp, measured phase and drain
	ServerRSSBeforeMiB float64             `json:"server_rss_before_mib"` // before the ramp
	ToolRSSBeforeMiB   float64             `json:"tool_rss_before_mib"`
	Hists              map[string]histJSON `json:"histograms"`
	SetupHist          histJSON            `json:"setup_histogram"`
	Errors             map[string]int64    `json:"errors"`
	SLOMs              float64             `json:"slo_ms"`
	Intervals          []intervalReport    `json:"intervals"`
}

// histJSON is a hist with its non-empty buckets ([index, count], in
// hist.go's layout), so that shards' histograms can be added.
type histJSON struct {
	Buckets [][2]uint64 `json:"buckets"`
	SumNs   uint64      `json:"sum_ns"`
	MaxNs   int64       `json:"max_ns"`
}

func (h *hist) export() histJSON {
	j := histJSON{SumNs: h.sum.Load(), MaxNs: h.max.Load(), Buckets: [][2]uint64{}}
	for i := range h.counts {
		if c := h.counts[i].Load(); c > 0 {
			j.Buckets = append(j.Buckets, [2]uint64{uint64(i), c})
		}
	}
	return j
}

// absorb adds j's samples to h.
func (h *hist) absorb(j histJSON) {
	for _, b := range j.Buckets {
		if b[0] < histBuckets {
			h.counts[b[0]].Add(b[1])
			h.n.Add(b[1])
		}
	}
	h.sum.Add(j.SumNs)
	if j.MaxNs > h.max.Load() {
		h.max.Store(j.MaxNs)
	}
}

func histFrom(name string, j histJSON) *hist {
	h := newHist(name)
	h.absorb(j)
	return h
}

// --- process readings ---

// selfCPU is this process's user+system CPU time in seconds.
func selfCPU() float64 {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// selfRSS is this process's VmRSS in bytes (-1 if unknown).
func selfRSS() float64 {
	v, err := procRSS(os.Getpid())
	if err != nil {
		return -1
	}
	return v
}

func cpuDelta(a, b float64) float64 {
	if a < 0 || b < 0 {
		return -1
	}
	return round3(b - a)
}

func mib(bytes float64) float64 {
	if bytes < 0 {
		return -1
	}
	return round3(bytes / (1 << 20))
}

// countFDs counts /proc/PID/fd (-1 if unreadable): the server's open
// descriptors without asking the server (its /metrics does the same
// count, on the server's CPU).
func countFDs(pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return -1
	}
	defer f.Close()
	n := 0
	for {
		names, err := f.Readdirnames(4096)
		n += len(names)
		if err != nil || len(names) == 0 {
			return n
		}
	}
}

// chatCPU is the chat server processes' CPU seconds together (-1 and an
// error if one is gone).
func chatCPU(pids []int) (float64, error) {
	total := 0.0
	for _, pid := range pids {
		c, err := procCPU(pid)
		if err != nil {
			return -1, err
		}
		total += c
	}
	return total, nil
}

// chatMemory is the chat server processes' RSS in MiB and open
// descriptors together (-1 if unknown).
func chatMemory(pids []int) (rssMiB, fds float64) {
	for _, pid := range pids {
		rss, err := procRSS(pid)
		n := countFDs(pid)
		if err != nil || n < 0 {
			return -1, -1
		}
		rssMiB += rss / (1 << 20)
		fds += float64(n)
	}
	return round3(rssMiB), fds
}

// --- per-interval reports ---

// reporter cuts the run into report intervals. Its goroutine alone reads
// the probes and owns the interval state; phase() asks it to cut early.
type reporter struct {
	m         *mixRun
	reqs      chan phaseReq
	done      chan struct{}
	intervals []intervalReport // read after run has returned

	phaseName string
	t0, start time.Time
	srvCPU    float64
	toolCPU   float64
	chatCPU   float64 // -1: unknown
	cnt       [numCounters]int64
	errs      map[string]int64
}

type phaseReq struct {
	next string
	done chan struct{}
}

func newReporter(m *mixRun) *reporter {
	return &reporter{m: m, reqs: make(chan phaseReq), done: make(chan struct{}), phaseName: "ramp", errs: map[string]int64{}}
}

func (r *reporter) run(ctx context.Context) {
	defer close(r.done)
	r.t0 = time.Now()
	r.start = r.t0
	snap, _ := r.m.env.probe.read(ctx, false)
	r.srvCPU = snap.CPUSeconds
	r.toolCPU = selfCPU()
	r.chatCPU, _ = chatCPU(r.m.mo.chatPIDs)
	every := r.m.mo.reportInterval
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-tick.C:
			r.cut()
		case q := <-r.reqs:
			r.cut()
			r.phaseName = q.next
			tick.Reset(every)
			close(q.done)
		case <-ctx.Done():
			return
		}
	}
}

// phase ends the current interval and starts one of phase next.
func (r *reporter) phase(next string) {
	q := phaseReq{next: next, done: make(chan struct{})}
	select {
	case r.reqs <- q:
		<-q.done
	case <-r.done:
	}
}

// cut closes the current interval: swaps in fresh histograms, reads the
// server, the chat server and this process, prints one line and keeps the
// report. The drain after the measured phase is not reported.
func (r *reporter) cut() {
	m := r.m
	now := time.Now()
	old := m.cur.Swap(newHset())
	dt := now.Sub(r.start).Seconds()
	ir := intervalReport{Phase: r.phaseName, StartS: round3(r.start.Sub(r.t0).Seconds()), EndS: round3(now.Sub(r.t0).Seconds()),
		Devices: m.connected.Load(), Latency: map[string]latencySummary{}, Hists: map[string]histJSON{}}
	r.start = now

	snap, _ := m.env.probe.read(context.Background(), false)
	ir.Server = readings{Cores: -1, RSSMiB: mib(snap.RSSBytes), Goroutines: snap.Goroutines, OpenFDs: -1}
	if c := cpuDelta(r.srvCPU, snap.CPUSeconds); c >= 0 && dt > 0 {
		ir.Server.Cores = round3(c / dt)
	}
	r.srvCPU = snap.CPUSeconds
	if m.o.serverPID > 0 {
		ir.Server.OpenFDs = float64(countFDs(m.o.serverPID))
	} else if v, ok := snap.Metrics["process_open_fds"]; ok {
		ir.Server.OpenFDs = v
	}
	if len(m.mo.chatPIDs) > 0 {
		ch := &readings{Cores: -1, Goroutines: -1}
		c, err := chatCPU(m.mo.chatPIDs)
		if err == nil && r.chatCPU >= 0 && dt > 0 {
			ch.Cores = round3((c - r.chatCPU) / dt)
		}
		r.chatCPU = c
		ch.RSSMiB, ch.OpenFDs = chatMemory(m.mo.chatPIDs)
		ir.Chat = ch
	}
	tc := selfCPU()
	ir.Tool = readings{Cores: round3((tc - r.toolCPU) / dt), RSSMiB: mib(selfRSS()), Goroutines: -1, OpenFDs: -1}
	r.toolCPU = tc

	for _, h := range old {
		if h.Count() > 0 {
			ir.Latency[h.name] = h.Summary()
			ir.Hists[h.name] = h.export()
		}
	}
	cnt := m.cnt.snapshot()
	ir.Counts = countMap(r.cnt, cnt)
	r.cnt = cnt
	ir.Errors = map[string]int64{}
	for k, v := range m.errs.snapshot() {
		if d := v - r.errs[k]; d > 0 {
			ir.Errors[k] = d
		}
		r.errs[k] = v
	}
	if dt < 0.05 {
		return // a phase change right after a tick
	}
	r.intervals = append(r.intervals, ir)
	logf("%s", ir.line())
}

// line is the interval's one-line report.
func (ir *intervalReport) line() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "[mixed %s %s–%s] %d devices | server %s cores, RSS %s MiB, %s goroutines, %s fds",
		ir.Phase, fmtSecs(ir.StartS), fmtSecs(ir.EndS), ir.Devices, fmtKnown(ir.Server.Cores, 2), fmtKnown(ir.Server.RSSMiB, 0),
		fmtKnown(ir.Server.Goroutines, 0), fmtKnown(ir.Server.OpenFDs, 0))
	if ir.Chat != nil {
		fmt.Fprintf(&sb, " | chat %s cores, %s MiB", fmtKnown(ir.Chat.Cores, 2), fmtKnown(ir.Chat.RSSMiB, 0))
	}
	for _, name := range []string{histNames[hEcho], histNames[hAck]} {
		if s, ok := ir.Latency[name]; ok {
			fmt.Fprintf(&sb, " | %s %d p50/p99/p99.9 %.2f/%.2f/%.2f ms", name, s.Count, s.P50Ms, s.P99Ms, s.P999Ms)
		}
	}
	n := int64(0)
	for _, v := range ir.Errors {
		n += v
	}
	fmt.Fprintf(&sb, " | errors %d", n)
	if n > 0 {
		fmt.Fprintf(&sb, " (%s)", fmtErrors(ir.Errors))
	}
	fmt.Fprintf(&sb, " | tool %.2f cores, %.0f MiB", ir.Tool.Cores, ir.Tool.RSSMiB)
	return sb.String()
}

func fmtSecs(s float64) string { return (time.Duration(s*10) * time.Second / 10).String() }

func fmtKnown(v float64, prec int) string {
	if v < 0 {
		return "?"
	}
	return strconv.FormatFloat(v, 'f', prec, 64)
}

func fmtErrors(m map[string]int64) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%d × %s", m[k], k))
	}
	return strings.Join(parts, "; ")
}

// startTimeline samples rates and resource use for the plot, silently,
// every few seconds.
func (m *mixRun) startTimeline() *progress {
	every := min(5*time.Second, max(time.Second, m.mo.reportInterval/2))
	defs := []series{
		rateOf("echoes answered", m.cnt[cEchoAnswered].Load),
		rateOf("reflects acked", m.cnt[cReflectAcked].Load),
		rateOf("Reflected received", m.cnt[cReflectedRecv].Load),
		gauge("devices connected", "devices", func() float64 { return float64(m.connected.Load()) }),
		gauge("tool", "cores", coresGauge(func() float64 { return selfCPU() })),
		gauge("tool RSS", "MiB", func() float64 { return mib(selfRSS()) }),
	}
	if pid := m.o.serverPID; pid > 0 {
		defs = append(defs,
			gauge("server", "cores", coresGauge(func() float64 { c, _ := procCPU(pid); return c })),
			gauge("server RSS", "MiB", func() float64 { v, _ := procRSS(pid); return mib(v) }))
	}
	return startProgressEvery("mixed", every, true, m.errs, defs...)
}

// coresGauge turns a CPU-seconds reading into cores used since the last
// call (one caller: the progress goroutine).
func coresGauge(cpu func() float64) func() float64 {
	last, at := cpu(), time.Now()
	return func() float64 {
		c, now := cpu(), time.Now()
		dt := now.Sub(at).Seconds()
		v := 0.0
		if dt > 0 {
			v = (c - last) / dt
		}
		last, at = c, now
		return math.Round(v*1000) / 1000
	}
}

// --- summary table ---

// deriveMixed fills the table's metrics and latencies from r.Mixed (also
// after a merge of shards).
func (r *result) deriveMixed() {
	s := r.Mixed
	if s == nil {
		return
	}
	r.Metrics = nil
	r.Latency = map[string]latencySummary{}
	r.hists = nil
	for _, name := range histNames {
		if j, ok := s.Hists[name]; ok {
			r.addHist(histFrom(name, j))
		}
	}
	setup := histFrom("device setup: connect, authenticate, ReflectionQueueDry, CSP login", s.SetupHist)
	setup.setup = true
	r.addHist(setup)

	per := func(v float64, n int64, scale float64) float64 {
		if v < 0 || n <= 0 {
			return -1
		}
		return round3(v * scale / float64(n))
	}
	var groups []string
	for size := 1; size <= maxGroupSize; size++ {
		if n := s.GroupsBySize[strconv.Itoa(size)]; n > 0 {
			groups = append(groups, fmt.Sprintf("%d×%d", n, size))
		}
	}
	r.note("groups by size: %s; shards: %s", strings.Join(groups, " "), strings.Join(s.Shards, " "))
	r.add("devices planned", float64(s.DevicesPlanned), "")
	r.add("devices connected at the end of the measured phase", float64(s.Devices), "")
	r.add("setup failures", float64(s.SetupFailed), "")
	r.add("sessions ended early (not by the teardown)", float64(s.Disconnected), "")
	r.add("ramp: duration", s.RampS, "s")
	r.add("ramp: devices set up per second", per(float64(s.DevicesPlanned-s.SetupFailed), 1, 1/max(s.RampS, 1e-9)), "/s")
	r.add("ramp: 503 retries", float64(s.Overload503), "")
	r.add("ramp: server CPU per device set up", per(s.ServerRampCPU, s.DevicesPlanned-s.SetupFailed, 1000), "ms")
	r.add("ramp: tool CPU per device set up", per(s.ToolRampCPU, s.DevicesPlanned-s.SetupFailed, 1000), "ms")
	secs := max(s.MeasuredS, 1e-9)
	for _, c := range []struct {
		name string
		idx  int
	}{{"echoes answered/s", cEchoAnswered}, {"reflects acked/s", cReflectAcked}, {"Reflected received/s", cReflectedRecv}, {"transactions committed/s", cTxCommitted}} {
		r.add(c.name, round3(float64(s.Counts[counterNames[c.idx]])/secs), "/s")
	}
	for i := range counterNames {
		r.add(counterNames[i]+" (measured phase)", float64(s.Counts[counterNames[i]]), "")
	}
	for _, i := range []int{cLeaders, cQueueSendComplete} {
		r.add(counterNames[i]+" (whole run)", float64(s.CountsTotal[counterNames[i]]), "")
	}
	r.add("server cores (measured phase)", s.Server.Cores, "cores")
	r.add("server RSS", s.Server.RSSMiB, "MiB")
	growth := func(after, before float64) float64 {
		if after < 0 || before < 0 {
			return -1
		}
		return after - before
	}
	r.add("server RSS growth per device (since before the ramp)", per(growth(s.Server.RSSMiB, s.ServerRSSBeforeMiB), s.Devices, 1024), "KiB")
	r.add("server goroutines", s.Server.Goroutines, "")
	r.add("server open descriptors", s.Server.OpenFDs, "")
	r.add("server CPU per device", per(s.Server.Cores, s.Devices, 1e6), "µs/s")
	if s.Chat != nil {
		r.add("chat server cores (not the mediator's)", s.Chat.Cores, "cores")
		r.add("chat server RSS", s.Chat.RSSMiB, "MiB")
	}
	r.add("tool cores (measured phase)", s.Tool.Cores, "cores")
	r.add("tool RSS", s.Tool.RSSMiB, "MiB")
	r.add("tool RSS growth per device (since before the ramp)", per(growth(s.Tool.RSSMiB, s.ToolRSSBeforeMiB), s.Devices, 1024), "KiB")
	dpc, _ := s.devicesPerCore()
	r.add(fmt.Sprintf("devices per core at p99 ≤ %v ms (-1: missed)", s.SLOMs), dpc, "")
}

// devicesPerCore is the run's capacity figure: devices connected at the
// end of the measured phase divided by the server cores used over it,
// reported only if the ReflectAck p99 and the echo round-trip p99 of the
// measured phase are both within the SLO; else -1 and why.
func (s *mixedSummary) devicesPerCore() (float64, string) {
	p99 := func(name string) (float64, bool) {
		j, ok := s.Hists[name]
		if !ok {
			return 0, false
		}
		h := histFrom(name, j)
		if h.Count() == 0 {
			return 0, false
		}
		return ms(h.Quantile(0.99)), true
	}
	var missed, within []string
	for _, name := range []string{histNames[hAck], histNames[hEcho]} {
		v, ok := p99(name)
		switch {
		case !ok:
			missed = append(missed, "no "+name+" samples")
		case v > s.SLOMs:
			missed = append(missed, fmt.Sprintf("%s p99 %.2f ms > %v ms", name, v, s.SLOMs))
		default:
			within = append(within, fmt.Sprintf("%s p99 %.2f ms", name, v))
		}
	}
	cores := s.Server.Cores
	ratio := -1.0
	if cores > 0 {
		ratio = math.Round(float64(s.Devices) / cores)
	}
	detail := fmt.Sprintf("%d devices / %s server cores", s.Devices, fmtKnown(cores, 3))
	if len(within) > 0 {
		detail += "; " + strings.Join(within, ", ")
	}
	if n := sumErrors(s.Errors); n > 0 {
		detail += fmt.Sprintf("; %d errors", n)
	} else {
		detail += "; 0 errors"
	}
	switch {
	case len(missed) > 0:
		return -1, fmt.Sprintf("not reached: %s (%s%s)", strings.Join(missed, ", "), detail, ratioNote(ratio))
	case ratio < 0:
		return -1, "not known: no server CPU reading (--server-pid or --admin)"
	}
	return ratio, fmt.Sprintf("%.0f (%s)", ratio, detail)
}

func ratioNote(ratio float64) string {
	if ratio < 0 {
		return ""
	}
	return fmt.Sprintf("; %.0f devices per core at that latency", ratio)
}

func sumErrors(m map[string]int64) int64 {
	n := int64(0)
	for _, v := range m {
		n += v
	}
	return n
}

// printMixedVerdict writes the closing line of a mixed run.
func (r *result) printMixedVerdict(w io.Writer) {
	if r.Mixed == nil {
		return
	}
	_, text := r.Mixed.devicesPerCore()
	fmt.Fprintf(w, "devices per core at p99 ≤ %v ms: %s\n", r.Mixed.SLOMs, text)
}
