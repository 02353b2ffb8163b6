package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
)

// probe reads the server's resource use: VmRSS and CPU time from
// /proc/PID when --server-pid is given, and the Prometheus series of the
// admin listener when --admin is given.
type probe struct {
	pid   int
	admin string
	token string
	hc    *http.Client
}

func newProbe(pid int, admin, tokenFile string) (*probe, error) {
	p := &probe{pid: pid, admin: strings.TrimRight(admin, "/"), hc: &http.Client{Timeout: 30 * time.Second}}
	if pid > 0 {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d/status", pid)); err != nil {
			return nil, fmt.Errorf("--server-pid %d: %w", pid, err)
		}
	}
	if p.admin != "" {
		if err := checkLoopback(p.admin); err != nil {
			return nil, fmt.Errorf("--admin: %w", err)
		}
		if tokenFile == "" {
			return nil, fmt.Errorf("--admin needs --admin-token-file (the server's <data>/admin.token)")
		}
		b, err := os.ReadFile(tokenFile)
		if err != nil {
			return nil, fmt.Errorf("--admin-token-file: %w", err)
		}
		p.token = strings.TrimSpace(string(b))
	}
	return p, nil
}

func (p *probe) enabled() bool { return p != nil && (p.pid > 0 || p.admin != "") }

// snapshot is one reading of the server. Missing readings are -1.
type snapshot struct {
	At         time.Time          `json:"-"`
	RSSBytes   float64            `json:"rss_bytes"`  // /proc VmRSS, else process_resident_memory_bytes
	HeapInuse  float64            `json:"heap_inuse"` // go_memstats_heap_inuse_bytes
	StackInuse float64            `json:"stack_inuse"`
	Goroutines float64            `json:"goroutines"`
	CPUSeconds float64            `json:"cpu_seconds"` // /proc utime+stime, else process_cpu_seconds_total
	Metrics    map[string]float64 `json:"-"`
}

// procStatus returns VmRSS in bytes.
func procRSS(pid int) (float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			if err != nil {
				return -1, err
			}
			return kb * 1024, nil
		}
	}
	return -1, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// procCPU returns utime+stime of pid in seconds (USER_HZ = 100 on Linux).
func procCPU(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1, err
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return -1, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return -1, fmt.Errorf("/proc/%d/stat: short", pid)
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (u + st) / 100, nil
}

// rss is a cheap RSS reading for sampling (no GC, /proc preferred).
func (p *probe) rss(ctx context.Context) float64 {
	if p.pid > 0 {
		if v, err := procRSS(p.pid); err == nil {
			return v
		}
	}
	if p.admin != "" {
		if m, err := p.metrics(ctx); err == nil {
			if v, ok := m["process_resident_memory_bytes"]; ok {
				return v
			}
		}
	}
	return -1
}

// read takes a snapshot. With gc, it first makes the server collect
// garbage (GET /debug/pprof/heap?gc=1), so heap and RSS readings compare
// live memory rather than GC timing.
func (p *probe) read(ctx context.Context, gc bool) (snapshot, error) {
	s := snapshot{At: time.Now(), RSSBytes: -1, HeapInuse: -1, StackInuse: -1, Goroutines: -1, CPUSeconds: -1}
	var firstErr error
	if p.admin != "" {
		if gc {
			if err := p.get(ctx, "/debug/pprof/heap?gc=1", io.Discard); err != nil {
				firstErr = err
			}
			time.Sleep(200 * time.Millisecond) // let the scavenger return freed pages
		}
		m, err := p.metrics(ctx)
		if err != nil && firstErr == nil {
			firstErr = err
		}
		if m != nil {
			s.Metrics = m
			pick := func(dst *float64, name string) {
				if v, ok := m[name]; ok {
					*dst = v
				}
			}
			pick(&s.RSSBytes, "process_resident_memory_bytes")
			pick(&s.HeapInuse, "go_memstats_heap_inuse_bytes")
			pick(&s.StackInuse, "go_memstats_stack_inuse_bytes")
			pick(&s.Goroutines, "go_goroutines")
			pick(&s.CPUSeconds, "process_cpu_seconds_total")
		}
	}
	if p.pid > 0 {
		if v, err := procRSS(p.pid); err == nil {
			s.RSSBytes = v
		} else if firstErr == nil {
			firstErr = err
		}
		if v, err := procCPU(p.pid); err == nil {
			s.CPUSeconds = v
		}
	}
	return s, firstErr
}

func (p *probe) get(ctx context.Context, path string, w io.Writer) error {
	req, err := http.NewRequestWithContext(ctx, "GET", p.admin+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+p.token)
	resp, err := p.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	_, err = io.Copy(w, resp.Body)
	return err
}

// metrics fetches /metrics and returns every sample by its full name
// including labels, e.g. `mediator_handshakes_total{outcome="ok"}`.
func (p *probe) metrics(ctx context.Context) (map[string]float64, error) {
	var sb strings.Builder
	if err := p.get(ctx, "/metrics", &sb); err != nil {
		return nil, err
	}
	return parseProm(sb.String()), nil
}

func parseProm(text string) map[string]float64 {
	m := map[string]float64{}
	for _, line := range strings.Split(text, "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m[line[:i]] = v
	}
	return m
}

// serverDelta summarizes what the server did between two snapshots.
type serverDelta struct {
	CPUSeconds      float64 `json:"cpu_seconds"`
	CPUUtilization  float64 `json:"cpu_cores_used"` // CPU seconds per wall second
	Commits         float64 `json:"commits,omitempty"`
	AvgCommitBatch  float64 `json:"avg_commit_batch,omitempty"`
	AvgCommitMs     float64 `json:"avg_commit_ms,omitempty"`
	CommitP50Ms     float64 `json:"commit_p50_ms,omitempty"` // from the histogram buckets (upper bound)
	CommitP99Ms     float64 `json:"commit_p99_ms,omitempty"`
	HandshakesOK    float64 `json:"handshakes_ok,omitempty"`
	Overload503     float64 `json:"overload_503,omitempty"`
	ReflectedSent   float64 `json:"reflected_sent,omitempty"`
	RSSBefore       float64 `json:"rss_before_bytes"`
	RSSAfter        float64 `json:"rss_after_bytes"`
	HeapInuseBefore float64 `json:"heap_inuse_before_bytes"`
	HeapInuseAfter  float64 `json:"heap_inuse_after_bytes"`
	GoroutinesAfter float64 `json:"goroutines_after"`
	SlowConsumers   float64 `json:"slow_consumers,omitempty"`
}

func diffSnapshots(a, b snapshot) *serverDelta {
	d := &serverDelta{
		RSSBefore: a.RSSBytes, RSSAfter: b.RSSBytes,
		HeapInuseBefore: a.HeapInuse, HeapInuseAfter: b.HeapInuse,
		GoroutinesAfter: b.Goroutines,
	}
	if a.CPUSeconds >= 0 && b.CPUSeconds >= 0 {
		d.CPUSeconds = b.CPUSeconds - a.CPUSeconds
		if wall := b.At.Sub(a.At).Seconds(); wall > 0 {
			d.CPUUtilization = round3(d.CPUSeconds / wall)
		}
	}
	if a.Metrics != nil && b.Metrics != nil {
		delta := func(name string) float64 { return b.Metrics[name] - a.Metrics[name] }
		d.Commits = delta("mediator_commit_seconds_count")
		if d.Commits > 0 {
			d.AvgCommitBatch = round3(delta("mediator_commit_batch_size_sum") / d.Commits)
			d.AvgCommitMs = round3(1000 * delta("mediator_commit_seconds_sum") / d.Commits)
			d.CommitP50Ms = round3(1000 * histQuantile(a.Metrics, b.Metrics, "mediator_commit_seconds", 0.5))
			d.CommitP99Ms = round3(1000 * histQuantile(a.Metrics, b.Metrics, "mediator_commit_seconds", 0.99))
		}
		d.HandshakesOK = delta(`mediator_handshakes_total{outcome="ok"}`)
		d.Overload503 = delta(`mediator_handshakes_total{outcome="overload"}`)
		d.ReflectedSent = delta("mediator_reflected_sent_total")
		d.SlowConsumers = delta("mediator_slow_consumers_total")
	}
	return d
}

func round3(v float64) float64 { return float64(int64(v*1000+0.5)) / 1000 }

// histQuantile returns the upper bound of the Prometheus histogram bucket
// that holds quantile q of the observations made between two scrapes.
func histQuantile(a, b map[string]float64, name string, q float64) float64 {
	type bucket struct{ le, n float64 }
	var bs []bucket
	prefix := name + `_bucket{le="`
	for k, v := range b {
		rest, ok := strings.CutPrefix(k, prefix)
		if !ok {
			continue
		}
		le, err := strconv.ParseFloat(strings.TrimSuffix(rest, `"}`), 64)
		if err != nil {
			continue // +Inf
		}
		bs = append(bs, bucket{le, v - a[k]})
	}
	sort.Slice(bs, func(i, j int) bool { return bs[i].le < bs[j].le })
	total := b[name+"_count"] - a[name+"_count"]
	if total <= 0 {
		return 0
	}
	for _, x := range bs {
		if x.n >= q*total {
			return x.le
		}
	}
	return -1 // beyond the largest finite bucket (JSON has no +Inf)
}
