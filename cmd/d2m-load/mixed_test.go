package main

import (
	"bytes"
	"context"
	"encoding/json"
	"math"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestPlanGroups(t *testing.T) {
	mix, err := parseGroupMix("1:0.2,2:0.5,3:0.3")
	if err != nil {
		t.Fatal(err)
	}
	const n = 30_000
	sizes := planGroups(n, mix)
	if again := planGroups(n, mix); len(again) != len(sizes) || again[len(again)/2] != sizes[len(sizes)/2] {
		t.Fatal("the plan is not deterministic")
	}
	total, by := 0, map[int]int{}
	for _, s := range sizes {
		total += s
		by[s]++
	}
	if total != n {
		t.Fatalf("%d devices planned, want %d", total, n)
	}
	for size, want := range map[int]float64{1: 0.2, 2: 0.5, 3: 0.3} {
		if got := float64(by[size]) / float64(len(sizes)); math.Abs(got-want) > 0.02 {
			t.Errorf("size %d: share %.3f, want %.2f", size, got, want)
		}
	}
	o := &options{devices: n, mixed: mixedOptions{groupMix: mix, shards: 3}}
	sum := 0
	for i := range 3 {
		o.mixed.shard = i
		sum += o.mixed.shareOf(n)
	}
	if sum != n {
		t.Fatalf("shards hold %d devices, want %d", sum, n)
	}
	if got := planGroups(5, []float64{0, 0, 1, 0, 0}); len(got) != 2 || got[0] != 3 || got[1] != 2 {
		t.Fatalf("5 devices in threes: %v", got)
	}
}

func TestMixedFlags(t *testing.T) {
	var sink bytes.Buffer
	key := "--chat-server-key=" + strings.Repeat("ab", 32)
	for _, bad := range [][]string{
		{"--scenario", "mixed"}, // no chat server key
		{"--scenario", "mixed", key, "--group-mix", "4:1,6:1"},
		{"--scenario", "mixed", key, "--group-mix", "1:0"},
		{"--scenario", "mixed", key, "--group-mix", "2"},
		{"--scenario", "mixed", key, "--reflect-size", "8-100"},
		{"--scenario", "mixed", key, "--reflect-size", "200-100"},
		{"--scenario", "mixed", key, "--shard", "2/2"},
		{"--scenario", "mixed", key, "--shard", "x"},
		{"--scenario", "mixed", key, "--server-groups", "7f,g-1"},
		{"--scenario", "mixed", key, "--ramp", "0"},
		{"--scenario", "mixed", key, "--chat-pid", "12,x"},
		{"--scenario", "mixed", key, "--url", "ws://[::1]:8765"},
		{"--scenario", "mixed", key, "--source-addrs", "5000"},
		{"--scenario", "mixed", key, "--devices", "2", "--group-mix", "3:1", "--shard", "1/2"}, // an empty shard
	} {
		if _, err := parseFlags(bad, &sink); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	o, err := parseFlags([]string{"--scenario", "mixed", key}, &sink)
	if err != nil {
		t.Fatal(err)
	}
	if o.devices != 2000 || o.sourceAddrs != 16 || o.mixed.shards != 1 || o.mixed.reflectMin != 100 || o.mixed.reflectMax != 2048 ||
		o.mixed.runID == "" || o.mixed.reportInterval != time.Minute || o.mixed.slo != 10*time.Millisecond {
		t.Fatalf("defaults: %+v", o)
	}
	if o, _ := parseFlags([]string{"--scenario", "reflect"}, &sink); o.sourceAddrs != 0 {
		t.Fatalf("reflect binds to %d source addresses by default", o.sourceAddrs)
	}
}

// TestSourceDialer: connections leave from 127.1.0.1, 127.1.0.2, … in turn.
func TestSourceDialer(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	dial := sourceDialer(3)
	for i, want := range []string{"127.1.0.1", "127.1.0.2", "127.1.0.3", "127.1.0.1"} {
		c, err := dial(context.Background(), "tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		s, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		if got := s.RemoteAddr().(*net.TCPAddr).IP.String(); got != want {
			t.Errorf("connection %d from %s, want %s", i, got, want)
		}
		s.Close()
		c.Close()
	}
	if got := sourceAddr(254).String(); got != "127.1.1.1" {
		t.Errorf("source 254 = %s", got)
	}
}

// mixedArgs are the flags of a tiny, fast mixed run against s.
func mixedArgs(s *testServer, extra ...string) []string {
	return append([]string{"--scenario", "mixed", "--url", s.url, "--json", "--quiet",
		"--admin", s.admin, "--admin-token-file", s.tokenFile, "--server-pid", strconv.Itoa(os.Getpid()),
		"--chat-pid", strconv.Itoa(os.Getpid()), "--chat-server-key", s.chatKey,
		"--server-groups", strings.Join(s.serverGroups, ","), "--source-addrs", "4",
		"--ramp", "200", "--report-interval", "1s", "--echo-interval", "150ms", "--echo-jitter", "100ms",
		"--reflect-interval", "200ms", "--tx-interval", "500ms", "--drain", "5s"}, extra...)
}

func runMixedJSON(t *testing.T, args []string) (*result, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	if code := run(args, &out, &errOut); code != 0 {
		t.Fatalf("exit %d:\n%s", code, errOut.String())
	}
	var res result
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		t.Fatalf("json: %v\n%s", err, out.String())
	}
	if res.Mixed == nil {
		t.Fatalf("no mixed section:\n%s", out.String())
	}
	return &res, errOut.String()
}

// TestMixedScenario runs the production-shape scenario at a tiny size and
// short intervals against a real mediator whose upstreams go to a chat
// server on two ports (chosen by each device's server group), and checks
// that every kind of traffic flowed and was answered, and that the report
// intervals carry the server, chat-server and tool figures.
func TestMixedScenario(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a server and runs the mixed scenario")
	}
	s := startTestServerChat(t, 2)
	plot := filepath.Join(t.TempDir(), "mixed.svg")
	res, stderr := runMixedJSON(t, mixedArgs(s, "--devices", "20", "--duration", "2500ms", "--plot", plot))
	mx := res.Mixed
	if len(res.Errors) > 0 {
		t.Errorf("errors: %v", res.Errors)
	}
	if mx.Devices != 20 || mx.DevicesPlanned != 20 || mx.SetupFailed != 0 {
		t.Errorf("devices %d of %d, %d failed", mx.Devices, mx.DevicesPlanned, mx.SetupFailed)
	}
	groups := int64(0)
	for _, n := range mx.GroupsBySize {
		groups += n
	}
	for name, want := range map[string]int64{
		"echoes answered": 1, "reflects acked": 1, "Reflected received and acked": 1, "transactions committed": 1, "TransactionEnded received": 1,
	} {
		if mx.Counts[name] < want {
			t.Errorf("%s in the measured phase: %d", name, mx.Counts[name])
		}
	}
	if mx.Counts["echoes answered"] != mx.Counts["echoes sent"] && mx.Counts["echoes answered"] < mx.Counts["echoes sent"]*9/10 {
		t.Errorf("echoes: %d sent, %d answered", mx.Counts["echoes sent"], mx.Counts["echoes answered"])
	}
	// Every group's leader was promoted and unblocked its CSP session.
	for _, name := range []string{"RolePromotedToLeader received", "CSP queue-send-complete received (leaders unblocked)"} {
		if mx.CountsTotal[name] != groups {
			t.Errorf("%s: %d, want one per group (%d)", name, mx.CountsTotal[name], groups)
		}
	}
	// Both chat-server ports got upstreams: one per device, spread by server group.
	for i, n := range s.accepted {
		if n.Load() == 0 {
			t.Errorf("chat listener %d accepted no upstream", i)
		}
	}
	if got := s.accepted[0].Load() + s.accepted[1].Load(); got != 20 {
		t.Errorf("%d upstream connections, want 20", got)
	}
	for _, name := range []string{"echo round trip", "ReflectAck", "delivery sender→receiver", "transaction (begin → commit ack)"} {
		if l, ok := res.Latency[name]; !ok || l.Count == 0 || l.P99Ms <= 0 {
			t.Errorf("latency %q: %+v", name, l)
		}
	}
	measured := 0
	for _, ir := range mx.Intervals {
		if ir.Phase != "measured" {
			continue
		}
		measured++
		if ir.Server.Cores < 0 || ir.Server.RSSMiB <= 0 || ir.Server.Goroutines <= 0 || ir.Server.OpenFDs <= 0 ||
			ir.Tool.Cores < 0 || ir.Tool.RSSMiB <= 0 || ir.Chat == nil || ir.Chat.RSSMiB <= 0 || ir.Devices != 20 {
			t.Errorf("interval %v–%v s: figures missing: %+v", ir.StartS, ir.EndS, ir)
		}
		for _, name := range []string{"echo round trip", "ReflectAck"} {
			if l := ir.Latency[name]; l.Count == 0 || l.P50Ms <= 0 || l.P99Ms < l.P50Ms || l.P999Ms < l.P99Ms {
				t.Errorf("interval %v–%v s: %s %+v", ir.StartS, ir.EndS, name, l)
			}
		}
		if ir.Errors == nil {
			t.Error("interval without an errors map")
		}
	}
	if measured < 2 {
		t.Errorf("%d measured intervals, want at least 2 of 1 s in 2.5 s", measured)
	}
	if mx.Server.Cores <= 0 || mx.Tool.RSSMiB <= 0 {
		t.Errorf("summary readings: server %+v tool %+v", mx.Server, mx.Tool)
	}
	found := false
	for _, m := range res.Metrics {
		found = found || strings.HasPrefix(m.Name, "devices per core at p99 ≤ 10 ms")
	}
	if !found || !strings.Contains(stderr, "devices per core at p99 ≤ 10 ms: ") {
		t.Errorf("no devices-per-core figure:\n%s", stderr)
	}
	if !strings.Contains(stderr, "plot written") {
		t.Errorf("no plot:\n%s", stderr)
	}
}

// TestMixedShardsMerge runs one run as two shards (one after the other)
// and merges them: every device is in exactly one shard, and the merged
// result adds the shards up.
func TestMixedShardsMerge(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a server and runs the mixed scenario twice")
	}
	s := startTestServerChat(t, 2)
	dir := t.TempDir()
	var files []string
	var parts []*result
	for i := range 2 {
		res, _ := runMixedJSON(t, mixedArgs(s, "--devices", "12", "--duration", "1200ms", "--run-id", "merge-test",
			"--shard", strconv.Itoa(i)+"/2"))
		if len(res.Errors) > 0 {
			t.Errorf("shard %d: errors %v", i, res.Errors)
		}
		b, _ := json.Marshal(res)
		f := filepath.Join(dir, strconv.Itoa(i)+".json")
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
		files, parts = append(files, f), append(parts, res)
	}
	if parts[0].Mixed.DevicesPlanned+parts[1].Mixed.DevicesPlanned != 12 || parts[0].Mixed.DevicesPlanned == 0 || parts[1].Mixed.DevicesPlanned == 0 {
		t.Fatalf("shards planned %d + %d devices, want 12 in both", parts[0].Mixed.DevicesPlanned, parts[1].Mixed.DevicesPlanned)
	}
	var out, errOut bytes.Buffer
	plot := filepath.Join(dir, "merged.png")
	if code := run(append([]string{"merge", "--plot", plot}, files...), &out, &errOut); code != 0 {
		t.Fatalf("merge exit %d: %s", code, errOut.String())
	}
	var m result
	if err := json.Unmarshal(out.Bytes(), &m); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(plot); err != nil || st.Size() == 0 {
		t.Errorf("merged plot: %v", err)
	}
	if m.Mixed.Devices != 12 || len(m.Mixed.Shards) != 2 {
		t.Errorf("merged: %d devices, shards %v", m.Mixed.Devices, m.Mixed.Shards)
	}
	for _, name := range []string{"echo round trip", "ReflectAck"} {
		want := parts[0].Latency[name].Count + parts[1].Latency[name].Count
		if got := m.Latency[name].Count; got != want || got == 0 {
			t.Errorf("merged %s count %d, want %d", name, got, want)
		}
	}
	if want := parts[0].Mixed.Counts["reflects acked"] + parts[1].Mixed.Counts["reflects acked"]; m.Mixed.Counts["reflects acked"] != want {
		t.Errorf("merged reflects acked %d, want %d", m.Mixed.Counts["reflects acked"], want)
	}
	if len(m.Mixed.Intervals) == 0 || m.Mixed.Intervals[0].Devices == 0 {
		t.Errorf("merged intervals: %+v", m.Mixed.Intervals)
	}
	// The same shard twice is refused.
	if code := run([]string{"merge", files[0], files[0]}, &out, &errOut); code == 0 {
		t.Error("merged a shard with itself")
	}
}
