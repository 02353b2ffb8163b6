package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"
)

// result is what a scenario reports: the summary table, --json and --plot
// are all drawn from it.
type result struct {
	Scenario string                    `json:"scenario"`
	Params   map[string]any            `json:"params"`
	Machine  machine                   `json:"machine"`
	Started  time.Time                 `json:"started"`
	ElapsedS float64                   `json:"elapsed_s"` // the measured phase
	Metrics  []metric                  `json:"metrics"`
	Latency  map[string]latencySummary `json:"latency_ms"`
	Errors   map[string]int64          `json:"errors"`
	Server   *serverDelta              `json:"server,omitempty"`
	Client   clientUse                 `json:"client"`
	Timeline timeline                  `json:"timeline"`
	Notes    []string                  `json:"notes,omitempty"`
	Mixed    *mixedSummary             `json:"mixed,omitempty"`

	hists []*hist
}

type metric struct {
	Name  string  `json:"name"`
	Value float64 `json:"value"`
	Unit  string  `json:"unit,omitempty"`
}

type machine struct {
	CPUs         int     `json:"cpus"`
	GoVersion    string  `json:"go_version"`
	MemTotalGiB  float64 `json:"mem_total_gib"`
	LoadAvgStart string  `json:"loadavg_start"`
	LoadAvgEnd   string  `json:"loadavg_end"`
	NoFileLimit  uint64  `json:"nofile_limit"`
}

// clientUse is the load tool's own resource use over the whole run.
type clientUse struct {
	CPUSeconds float64 `json:"cpu_seconds"`
	MaxRSSMiB  float64 `json:"max_rss_mib"`
}

type timeline struct {
	T      []float64       `json:"t_s"`
	Series []timelineSerie `json:"series"`
}

type timelineSerie struct {
	Name   string    `json:"name"`
	Unit   string    `json:"unit"`
	Values []float64 `json:"values"`
}

func newResult(scenario string, params map[string]any) *result {
	return &result{
		Scenario: scenario, Params: params, Started: time.Now(),
		Latency: map[string]latencySummary{}, Errors: map[string]int64{},
		Machine: machine{
			CPUs: runtime.NumCPU(), GoVersion: runtime.Version(),
			MemTotalGiB: memTotalGiB(), LoadAvgStart: loadAvg(),
		},
	}
}

func (r *result) add(name string, v float64, unit string) {
	r.Metrics = append(r.Metrics, metric{Name: name, Value: v, Unit: unit})
}

func (r *result) addHist(h *hist) {
	if h.Count() == 0 {
		return
	}
	r.hists = append(r.hists, h)
	r.Latency[h.name] = h.Summary()
}

func (r *result) note(format string, args ...any) {
	r.Notes = append(r.Notes, fmt.Sprintf(format, args...))
}

func (r *result) finish(errs *errCounter) {
	r.Machine.LoadAvgEnd = loadAvg()
	if errs != nil {
		for k, v := range errs.snapshot() {
			r.Errors[k] += v
		}
	}
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		r.Client.CPUSeconds = round3(float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9)
		r.Client.MaxRSSMiB = round3(float64(ru.Maxrss) / 1024)
	}
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

func memTotalGiB() float64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	var kb float64
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			fmt.Sscanf(strings.TrimSpace(v), "%f", &kb)
		}
	}
	return math.Round(kb/1024/1024*10) / 10
}

// printTable writes the human summary.
func (r *result) printTable(w io.Writer) {
	fmt.Fprintf(w, "\n== %s: %.1f s measured, %d CPUs, %s, load %s → %s\n",
		r.Scenario, r.ElapsedS, r.Machine.CPUs, r.Machine.GoVersion, r.Machine.LoadAvgStart, r.Machine.LoadAvgEnd)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	keys := make([]string, 0, len(r.Params))
	for k := range r.Params {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var ps []string
	for _, k := range keys {
		ps = append(ps, fmt.Sprintf("%s=%v", k, r.Params[k]))
	}
	fmt.Fprintf(tw, "params\t%s\n", strings.Join(ps, " "))
	for _, m := range r.Metrics {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", m.Name, fmtNum(m.Value), m.Unit)
	}
	if len(r.hists) > 0 {
		fmt.Fprintf(tw, "\nlatency (ms)\tcount\tp50\tp90\tp99\tp99.9\tmax\n")
		for _, h := range r.hists {
			s := r.Latency[h.name]
			fmt.Fprintf(tw, "%s\t%d\t%.3f\t%.3f\t%.3f\t%.3f\t%.3f\n", h.name, s.Count, s.P50Ms, s.P90Ms, s.P99Ms, s.P999Ms, s.MaxMs)
		}
	}
	if s := r.Server; s != nil {
		fmt.Fprintf(tw, "\nserver\t\n")
		fmt.Fprintf(tw, "cpu\t%.2f s (%.2f cores)\n", s.CPUSeconds, s.CPUUtilization)
		if s.Commits > 0 {
			fmt.Fprintf(tw, "group commits\t%s (avg batch %.1f, avg %.2f ms, p50 ≤ %.2f ms, p99 ≤ %.2f ms)\n",
				fmtNum(s.Commits), s.AvgCommitBatch, s.AvgCommitMs, s.CommitP50Ms, s.CommitP99Ms)
		}
		if s.RSSBefore >= 0 {
			fmt.Fprintf(tw, "rss\t%.1f → %.1f MiB\n", s.RSSBefore/(1<<20), s.RSSAfter/(1<<20))
		}
		if s.HeapInuseBefore >= 0 {
			fmt.Fprintf(tw, "heap in use\t%.1f → %.1f MiB\n", s.HeapInuseBefore/(1<<20), s.HeapInuseAfter/(1<<20))
		}
		if s.Overload503 > 0 {
			fmt.Fprintf(tw, "503 overload\t%s\n", fmtNum(s.Overload503))
		}
	}
	fmt.Fprintf(tw, "\nclient (this tool)\t%.2f s CPU, max RSS %.0f MiB\n", r.Client.CPUSeconds, r.Client.MaxRSSMiB)
	if len(r.Errors) == 0 {
		fmt.Fprintf(tw, "errors\tnone\n")
	} else {
		ek := make([]string, 0, len(r.Errors))
		for k := range r.Errors {
			ek = append(ek, k)
		}
		sort.Strings(ek)
		for _, k := range ek {
			fmt.Fprintf(tw, "error\t%d × %s\n", r.Errors[k], k)
		}
	}
	tw.Flush()
	for _, n := range r.Notes {
		fmt.Fprintf(w, "note: %s\n", n)
	}
}

func fmtNum(v float64) string {
	if v == math.Trunc(v) && math.Abs(v) < 1e15 {
		return fmt.Sprintf("%.0f", v)
	}
	if math.Abs(v) >= 100 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.3f", v)
}

func (r *result) writeJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

// --- progress ---

// series is one line of the per-second progress: a rate of a cumulative
// counter, or a gauge.
type series struct {
	name string
	unit string // "/s" for rates
	get  func() float64
	rate bool
}

func rateOf(name string, get func() int64) series {
	return series{name: name, unit: "/s", get: func() float64 { return float64(get()) }, rate: true}
}

func gauge(name, unit string, get func() float64) series {
	return series{name: name, unit: unit, get: get}
}

// progress prints one line per second to stderr and keeps the values for
// the timeline and the plot.
type progress struct {
	label  string
	defs   []series
	errs   *errCounter
	start  time.Time
	every  time.Duration
	silent bool // keep the values, print nothing

	mu   sync.Mutex
	t    []float64
	vals [][]float64
	done chan struct{}
	stop context.CancelFunc
}

func startProgress(label string, errs *errCounter, defs ...series) *progress {
	return startProgressEvery(label, time.Second, false, errs, defs...)
}

// startProgressEvery samples every interval, and prints unless silent.
func startProgressEvery(label string, every time.Duration, silent bool, errs *errCounter, defs ...series) *progress {
	ctx, cancel := context.WithCancel(context.Background())
	p := &progress{label: label, defs: defs, errs: errs, start: time.Now(), every: every, silent: silent,
		vals: make([][]float64, len(defs)), done: make(chan struct{}), stop: cancel}
	go p.run(ctx)
	return p
}

func (p *progress) run(ctx context.Context) {
	defer close(p.done)
	prev := make([]float64, len(p.defs))
	for i, d := range p.defs {
		if d.rate {
			prev[i] = d.get()
		}
	}
	prevT := p.start
	tick := time.NewTicker(p.every)
	defer tick.Stop()
	sample := func(now time.Time, print bool) {
		dt := now.Sub(prevT).Seconds()
		prevT = now
		var sb strings.Builder
		fmt.Fprintf(&sb, "[%s] %5.1fs", p.label, now.Sub(p.start).Seconds())
		p.mu.Lock()
		p.t = append(p.t, math.Round(now.Sub(p.start).Seconds()*10)/10)
		for i, d := range p.defs {
			v := d.get()
			out := v
			if d.rate {
				out = (v - prev[i]) / dt
				prev[i] = v
			}
			p.vals[i] = append(p.vals[i], roundTimeline(out))
			if d.rate {
				fmt.Fprintf(&sb, "  %s=%s/s", d.name, fmtNum(math.Round(out)))
			} else {
				fmt.Fprintf(&sb, "  %s=%s %s", d.name, fmtNum(math.Round(out)), d.unit)
			}
		}
		p.mu.Unlock()
		if p.errs != nil {
			fmt.Fprintf(&sb, "  errors=%d", p.errs.n.Load())
		}
		if print {
			fmt.Fprintln(stderrProgress, sb.String())
		}
	}
	for {
		select {
		case <-ctx.Done():
			// A last, partial interval, so that short phases have a
			// point too.
			if now := time.Now(); now.Sub(prevT) >= 200*time.Millisecond {
				sample(now, false)
			}
			return
		case now := <-tick.C:
			sample(now, !p.silent)
		}
	}
}

// roundTimeline keeps a timeline value short: one decimal, three below 10
// (cores, small rates).
func roundTimeline(v float64) float64 {
	if math.Abs(v) < 10 {
		return math.Round(v*1000) / 1000
	}
	return math.Round(v*10) / 10
}

// finish stops the ticker and stores the timeline in r.
func (p *progress) finish(r *result) {
	p.stop()
	<-p.done
	p.mu.Lock()
	defer p.mu.Unlock()
	r.Timeline.T = append(r.Timeline.T, p.t...)
	for i, d := range p.defs {
		r.Timeline.Series = append(r.Timeline.Series, timelineSerie{Name: d.name, Unit: d.unit, Values: p.vals[i]})
	}
}

// stop ends a progress display without keeping its timeline.
func (p *progress) stopOnly() {
	p.stop()
	<-p.done
}
