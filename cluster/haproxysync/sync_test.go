package haproxysync

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"d2m-mediator/cluster"
	"d2m-mediator/internal/deploytest"
)

func TestParseMap(t *testing.T) {
	var owners [cluster.NumShards]string
	owners[0x00], owners[0x2a], owners[0xff] = "node-a", "node-b", "node.c_1"
	m, err := ParseMap(cluster.RenderHAProxyMap(7, owners))
	if err != nil {
		t.Fatal(err)
	}
	if want := (Map{"00": "node-a", "2a": "node-b", "ff": "node.c_1"}); !reflect.DeepEqual(m, want) {
		t.Fatalf("parsed %v, want %v", m, want)
	}
	for _, bad := range []string{
		"2A node-a",            // the cluster renders lowercase; HAProxy's lookup is lower-cased
		"2a",                   // no backend
		"2a node-a extra",      // three fields
		"0a1b2c3d node-a",      // not one byte
		"2a node;del",          // not a node id: it would end up in a runtime command
		"2a node-a\n2a node-b", // twice
	} {
		if _, err := ParseMap(bad); err == nil {
			t.Errorf("ParseMap(%q) accepted it", bad)
		}
	}
}

func TestDiff(t *testing.T) {
	have := []Entry{{"00", "a"}, {"01", "a"}, {"02", "b"}, {"03", "a"}, {"03", "b"}, {"04", "c"}}
	want := Map{"00": "a", "01": "b", "03": "b", "05": "c"}
	got := Diff(have, want)
	exp := []Change{
		{Op: OpSet, Key: "01", From: "a", To: "b"},
		{Op: OpDel, Key: "02", From: "b"},
		{Op: OpDel, Key: "03", From: "a,b"}, {Op: OpAdd, Key: "03", To: "b"},
		{Op: OpDel, Key: "04", From: "c"},
		{Op: OpAdd, Key: "05", To: "c"},
	}
	if !reflect.DeepEqual(got, exp) {
		t.Fatalf("Diff:\n got %v\nwant %v", got, exp)
	}
	if d := Diff([]Entry{{"00", "a"}}, Map{"00": "a"}); len(d) != 0 {
		t.Fatalf("equal maps: %v", d)
	}
}

// haproxy is a real HAProxy with one map loaded from a file and its
// runtime API on a socket.
type haproxy struct {
	bin, cfg, mapFile string
	rt                Runtime
	proc              *deploytest.Process
}

func startHAProxy(t *testing.T, initial string) *haproxy {
	t.Helper()
	bin := deploytest.Binary(t, "haproxy", "haproxy")
	dir := t.TempDir()
	h := &haproxy{bin: bin, cfg: filepath.Join(dir, "haproxy.cfg"), mapFile: filepath.Join(dir, "shards.map"),
		rt: Runtime{Socket: filepath.Join(dir, "admin.sock")}}
	if err := os.WriteFile(h.mapFile, []byte(initial), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`global
    stats socket %s level admin
defaults
    mode http
    timeout connect 1s
    timeout client 1s
    timeout server 1s
frontend devices
    bind %s
    use_backend %%[path,field(2,/),lower,map(%s,nodes)]
backend nodes
`, h.rt.Socket, deploytest.FreeAddr(t), h.mapFile)
	if err := os.WriteFile(h.cfg, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	h.start(t)
	return h
}

func (h *haproxy) start(t *testing.T) {
	t.Helper()
	os.Remove(h.rt.Socket)
	h.proc = deploytest.Start(t, "haproxy", exec.Command(h.bin, "-db", "-f", h.cfg))
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := h.rt.Command(t.Context(), "show info"); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("haproxy's runtime API did not come up:\n%s", h.proc.Output())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (h *haproxy) entries(t *testing.T) []Entry {
	t.Helper()
	e, err := h.rt.ShowMap(t.Context(), h.mapFile)
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(e, func(a, b Entry) int { return strings.Compare(a.Key+a.Value, b.Key+b.Value) })
	return e
}

func served(m Map) string {
	var owners [cluster.NumShards]string
	for k, v := range m {
		var s int
		fmt.Sscanf(k, "%02x", &s)
		owners[s] = v
	}
	return cluster.RenderHAProxyMap(1, owners)
}

func asEntries(m Map) []Entry {
	var e []Entry
	for k, v := range m {
		e = append(e, Entry{k, v})
	}
	slices.SortFunc(e, func(a, b Entry) int { return strings.Compare(a.Key+a.Value, b.Key+b.Value) })
	return e
}

// TestSyncerAgainstHAProxy drives a real HAProxy's runtime API: adds, sets
// and deletes, a key HAProxy holds twice, the map file a restarted HAProxy
// loads, and the errors an operator sees for a wrong map name or socket.
func TestSyncerAgainstHAProxy(t *testing.T) {
	h := startHAProxy(t, "00 node-a\n01 node-a\n02 node-b\n")
	want := Map{"00": "node-a", "01": "node-b", "03": "node-c"}
	s := &Syncer{Runtime: h.rt, Map: h.mapFile, File: h.mapFile, Log: zerolog.Nop(),
		Fetch: func(context.Context) (string, error) { return served(want), nil }}
	changes, n, err := s.Once(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	exp := []Change{{Op: OpSet, Key: "01", From: "node-a", To: "node-b"}, {Op: OpDel, Key: "02", From: "node-b"}, {Op: OpAdd, Key: "03", To: "node-c"}}
	if !reflect.DeepEqual(changes, exp) || n != 3 {
		t.Fatalf("first pass: %v (%d served), want %v", changes, n, exp)
	}
	if got := h.entries(t); !reflect.DeepEqual(got, asEntries(want)) {
		t.Fatalf("haproxy holds %v, want %v", got, asEntries(want))
	}
	if changes, _, err := s.Once(t.Context()); err != nil || len(changes) != 0 {
		t.Fatalf("second pass: %v %v, want nothing to do", changes, err)
	}

	// A key twice (two syncers raced on an add): deleted and added once.
	if out, err := h.rt.Command(t.Context(), "add map "+h.mapFile+" 03 node-a"); err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("add map: %q %v", out, err)
	}
	if changes, _, err := s.Once(t.Context()); err != nil || len(changes) != 2 || changes[0].Op != OpDel || changes[1].Op != OpAdd {
		t.Fatalf("duplicate key: %v %v", changes, err)
	}
	if got := h.entries(t); !reflect.DeepEqual(got, asEntries(want)) {
		t.Fatalf("haproxy holds %v, want %v", got, asEntries(want))
	}

	// The file: a restarted HAProxy starts from the current map.
	h.proc.Stop(10 * time.Second)
	h.start(t)
	if got := h.entries(t); !reflect.DeepEqual(got, asEntries(want)) {
		t.Fatalf("restarted haproxy loaded %v from the file, want %v", got, asEntries(want))
	}
	want = Map{"ff": "node-a"}
	if changes, _, err := s.Once(t.Context()); err != nil || len(changes) != 4 {
		t.Fatalf("after the restart: %v %v", changes, err)
	}
	if got := h.entries(t); !reflect.DeepEqual(got, asEntries(want)) {
		t.Fatalf("haproxy holds %v, want %v", got, asEntries(want))
	}

	// Errors name what to fix.
	bad := *s
	bad.Map = "/etc/haproxy/other.map"
	if _, _, err := bad.Once(t.Context()); err == nil || !strings.Contains(err.Error(), "has no map \"/etc/haproxy/other.map\"") || !strings.Contains(err.Error(), h.mapFile) {
		t.Fatalf("wrong map name: %v", err)
	}
	bad.Map = ""
	if _, _, err := bad.Once(t.Context()); err != nil {
		t.Fatalf("the only map, found by itself: %v", err)
	}
	bad.Runtime.Socket = filepath.Join(t.TempDir(), "missing.sock")
	if _, _, err := bad.Once(t.Context()); !errors.Is(err, ErrUnreachable) {
		t.Fatalf("missing socket: %v", err)
	}
	bad = *s
	bad.Fetch = func(context.Context) (string, error) { return "2a node a\n", nil }
	if _, _, err := bad.Once(t.Context()); err == nil || !strings.Contains(err.Error(), "the served map") {
		t.Fatalf("bad served map: %v", err)
	}
}

// lines is a log sink a test can wait on.
type lines struct {
	mu    sync.Mutex
	all   []string
	added chan struct{}
}

func newLines() *lines { return &lines{added: make(chan struct{})} }

func (l *lines) Write(p []byte) (int, error) {
	l.mu.Lock()
	l.all = append(l.all, strings.TrimSpace(string(p)))
	close(l.added)
	l.added = make(chan struct{})
	l.mu.Unlock()
	return len(p), nil
}

func (l *lines) wait(t *testing.T, what string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		l.mu.Lock()
		all, added := strings.Join(l.all, "\n"), l.added
		l.mu.Unlock()
		if strings.Contains(all, what) {
			return
		}
		select {
		case <-added:
		case <-deadline:
			t.Fatalf("no log line with %q:\n%s", what, all)
		}
	}
}

// TestSyncerRunResyncsAfterHAProxyComesBack: Run keeps trying while
// HAProxy is away, logs the failure once, and the first pass that reaches
// it again re-syncs the whole map. It returns when its context ends.
func TestSyncerRunResyncsAfterHAProxyComesBack(t *testing.T) {
	h := startHAProxy(t, "")
	h.proc.Stop(10 * time.Second)
	want := Map{"10": "node-a", "11": "node-b"}
	log := newLines()
	s := &Syncer{Runtime: h.rt, Map: h.mapFile, Log: zerolog.New(log),
		Fetch: func(context.Context) (string, error) { return served(want), nil }}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx, 20*time.Millisecond) }()
	log.wait(t, "pass failed")
	h.start(t)
	log.wait(t, "re-synced in full after the failure")
	if got := h.entries(t); !reflect.DeepEqual(got, asEntries(want)) {
		t.Fatalf("haproxy holds %v, want %v", got, asEntries(want))
	}
	log.mu.Lock()
	failures := 0
	for _, l := range log.all {
		if strings.Contains(l, "pass failed") {
			failures++
		}
	}
	log.mu.Unlock()
	// Once per distinct error (a socket being created can give a second
	// one), not once per 20 ms pass.
	if failures < 1 || failures > 2 {
		t.Fatalf("the failure logged %d times, want once (twice at most)", failures)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
}
