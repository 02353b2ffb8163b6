package cluster

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"d2m-mediator/cluster/haproxysync"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/internal/deploytest"
	"d2m-mediator/mediator/adminapi"
	"d2m-mediator/proto/d2mpb"
)

// TestHAProxyClusterShipped: the shipped deploy/haproxy/haproxy-cluster.cfg
// in front of three `mediator serve` processes in cluster mode, its map
// kept by `mediator cluster haproxy-sync` started with the ExecStart line
// of deploy/systemd/mediator-haproxy-sync.service. HAProxy starts with an
// empty map (as installed), its health checks pass, haproxy-sync fills the
// map; a device reaches its shard's owner through wss:// with no
// forwarding hop (mediator_cluster_forwards_total unchanged on every
// node). After a move, haproxy-sync updates the map, and the next device
// lands on the new owner, again without a hop, and gets the backlog that
// moved with the shard. haproxy-sync ends cleanly on SIGTERM.
func TestHAProxyClusterShipped(t *testing.T) {
	bin := deploytest.Binary(t, "haproxy", "haproxy")
	base := t.TempDir()
	// The nodes share one admin token file (startProcess); haproxy-sync
	// reads its copy on the HAProxy host.
	_, nodeToken := sharedPieces(t)
	token, err := os.ReadFile(nodeToken)
	if err != nil {
		t.Fatal(err)
	}
	syncToken := filepath.Join(base, "etc-mediator-admin.token")
	write(t, syncToken, string(token))
	prefix := fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1))
	procs := map[string]*process{}
	addrs := map[string]string{}
	for _, id := range []string{"node-a", "node-b", "node-c"} {
		dir := filepath.Join(base, id)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		procs[id] = startProcess(t, id, prefix, dir)
		addrs[id] = strings.TrimPrefix(procs[id].url, "ws://")
	}
	a := procs["node-a"]
	waitUntil(t, 30*time.Second, "every shard served", func() bool {
		for _, s := range a.shards(t).Shards {
			if s.Owner == "" {
				return false
			}
		}
		return true
	})

	h := startHAProxy(t, bin, addrs, "") // installed empty: install -D -m 0644 /dev/null …
	sync := startHAProxySyncUnit(t, h, syncToken, a.admin+","+procs["node-b"].admin)
	sync.WaitLine(t, 10*time.Second, "the first full sync", func(l string) bool { return strings.Contains(l, "haproxy map in sync") })
	served := servedMap(t, a)
	if len(served) != 256 {
		t.Fatalf("served map has %d shards, want 256", len(served))
	}
	if got := haproxyMap(t, h); !reflect.DeepEqual(got, served) {
		t.Fatalf("haproxy's map after the first sync differs from the served one:\n%v\n%v", got, served)
	}
	if b, err := os.ReadFile(h.mapFile); err != nil {
		t.Fatal(err)
	} else if m, err := haproxysync.ParseMap(string(b)); err != nil || !reflect.DeepEqual(m, served) {
		t.Fatalf("--map-file holds %d entries (%v), want the served map", len(m), err)
	}

	// Through HAProxy to the owner, no hop.
	g := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	shard := g.DeviceGroupID()[0]
	owner := a.ownerOf(t, shard)
	url := "wss://" + h.front
	before := forwards(t, procs)
	c1 := dialVia(t, url, h.ca, g, 1)
	recvType(t, c1, d2m.TypeReflectionQueueDry)
	c2 := dialVia(t, url, h.ca, g, 2)
	recvType(t, c2, d2m.TypeReflectionQueueDry)
	if n := devicesOn(t, procs[owner], shard); n != 2 {
		t.Fatalf("owner %s has %d devices of shard %02x, want the 2 that dialled HAProxy", owner, n, shard)
	}
	c2.Close() // the reflection below waits in its queue (unacked until it reconnects)
	if after := forwards(t, procs); !reflect.DeepEqual(after, before) {
		t.Fatalf("forwards changed although HAProxy routed by the map: %v → %v", before, after)
	}
	id, err := c1.Reflect(context.Background(), []byte("before the move"), 0)
	if err != nil {
		t.Fatal(err)
	}
	if ack, _ := d2m.DecodeReflectAck(recvType(t, c1, d2m.TypeReflectAck).Payload); ack.ID != id {
		t.Fatalf("ack %d, want %d", ack.ID, id)
	}

	// Move the shard; haproxy-sync sees it and sets the map.
	to := "node-b"
	if owner == to {
		to = "node-c"
	}
	var mr adminapi.MoveResult
	if code := a.post(t, fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=%s", shard, to), &mr); code != 200 {
		t.Fatalf("move of shard %02x to %s: %d %+v", shard, to, code, mr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if code := c1.CloseCode(ctx); code != int(d2m.CloseGoingAway) {
		t.Fatalf("device on the donor: close %d, want 1001", code)
	}
	sync.WaitLine(t, 10*time.Second, "haproxy-sync setting the moved shard", func(l string) bool {
		return strings.Contains(l, fmt.Sprintf(`"op":"set","shard":"%02x","from":"%s","to":"%s"`, shard, owner, to))
	})
	before = forwards(t, procs)
	c2 = dialVia(t, url, h.ca, g, 2)
	r, err := d2m.DecodeReflected(recvType(t, c2, d2m.TypeReflected).Payload)
	if err != nil || string(r.Envelope) != "before the move" {
		t.Fatalf("after the move: %q %v, want the backlog that moved with the shard", r.Envelope, err)
	}
	if n := devicesOn(t, procs[to], shard); n != 1 {
		t.Fatalf("new owner %s has %d devices of shard %02x, want 1", to, n, shard)
	}
	if after := forwards(t, procs); !reflect.DeepEqual(after, before) {
		t.Fatalf("forwards changed after the move although haproxy-sync set the map: %v → %v", before, after)
	}

	if err := sync.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sync.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("haproxy-sync did not exit within 5 s of SIGTERM")
	}
	if code := sync.ExitCode(); code != 0 || !strings.Contains(sync.Output(), "haproxy-sync stopped") {
		t.Fatalf("haproxy-sync exit code %d after SIGTERM:\n%s", code, sync.Output())
	}
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

var execStart = regexp.MustCompile(`(?m)^ExecStart=(.+)$`)
var unitEnv = regexp.MustCompile(`(?m)^Environment=(\S+)$`)

// startHAProxySyncUnit runs the ExecStart line of the shipped
// deploy/systemd/mediator-haproxy-sync.service with its paths
// substituted (binary, HAProxy's socket, the map, the token file) and the
// unit's environment: its Environment= lines and, as its EnvironmentFile
// would, MEDIATOR_ADMIN=admin.
func startHAProxySyncUnit(t *testing.T, h *shippedHAProxy, tokenFile, admin string) *deploytest.Process {
	t.Helper()
	unit := deploytest.Render(t, "deploy/systemd/mediator-haproxy-sync.service",
		deploytest.Sub{Old: "/usr/local/bin/mediator", New: mediatorBinary(t), N: 2}, // ExecStart, install comment
		deploytest.S("/run/haproxy/admin.sock", h.rt.Socket),
		deploytest.Sub{Old: "/etc/haproxy/mediator-shards.map", New: h.mapFile, N: 2}, // --map, --map-file
		deploytest.Sub{Old: "/etc/mediator/admin.token", New: tokenFile, N: 2},        // ExecStart, install comment
	)
	m := execStart.FindAllStringSubmatch(unit, -1)
	if len(m) != 1 || strings.ContainsAny(m[0][1], `$"'\%`) {
		t.Fatalf("mediator-haproxy-sync.service: want one ExecStart= line without variables or quoting, got %q", m)
	}
	argv := strings.Fields(m[0][1])
	env := []string{"PATH=" + os.Getenv("PATH"), "MEDIATOR_ADMIN=" + admin}
	for _, e := range unitEnv.FindAllStringSubmatch(unit, -1) {
		env = append(env, e[1])
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	return deploytest.Start(t, "haproxy-sync", cmd)
}

// servedMap is GET /cluster/haproxy.map of p.
func servedMap(t *testing.T, p *process) haproxysync.Map {
	t.Helper()
	req, _ := http.NewRequest("GET", p.admin+"/cluster/haproxy.map", nil)
	req.Header.Set("Authorization", "Bearer "+p.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b strings.Builder
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		b.WriteString(sc.Text() + "\n")
	}
	m, err := haproxysync.ParseMap(b.String())
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// haproxyMap is HAProxy's copy of the shard map (show map).
func haproxyMap(t *testing.T, h *shippedHAProxy) haproxysync.Map {
	t.Helper()
	entries, err := h.rt.ShowMap(t.Context(), h.mapFile)
	if err != nil {
		t.Fatal(err)
	}
	m := haproxysync.Map{}
	for _, e := range entries {
		m[e.Key] = e.Value
	}
	return m
}

func dialVia(t *testing.T, url string, ca *deploytest.CA, k d2d.Keys, dev uint64) *d2mclient.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := d2mclient.Dial(ctx, d2mclient.Config{URL: url, Keys: k, DeviceID: dev, HTTPClient: ca.Client(),
		ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
	if err != nil {
		t.Fatalf("device %d through %s: %v", dev, url, err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return c
}

// devicesOn is the number of devices of shard connected to p, as p
// counts them (GET /api/v1/cluster/shards: only for shards it serves).
func devicesOn(t *testing.T, p *process, shard byte) int {
	t.Helper()
	s := p.shards(t).Shards[shard]
	if s.Devices == nil {
		return 0
	}
	return *s.Devices
}

var forwardLine = regexp.MustCompile(`(?m)^(mediator_cluster_forwards_total\{[^}]*\}) (\S+)$`)

// forwards reads mediator_cluster_forwards_total of every node, every
// outcome, from its /metrics.
func forwards(t *testing.T, procs map[string]*process) map[string]string {
	t.Helper()
	out := map[string]string{}
	for id, p := range procs {
		req, _ := http.NewRequest("GET", p.admin+"/metrics", nil)
		req.Header.Set("Authorization", "Bearer "+p.token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var b strings.Builder
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			b.WriteString(sc.Text() + "\n")
		}
		resp.Body.Close()
		// The counter appears with its first forward; a gauge every
		// cluster node has shows that this is the scrape of one.
		if resp.StatusCode != 200 || !strings.Contains(b.String(), "\nmediator_cluster_shards_owned ") {
			t.Fatalf("%s: /metrics answered %d without mediator_cluster_shards_owned", id, resp.StatusCode)
		}
		for _, m := range forwardLine.FindAllStringSubmatch(b.String(), -1) {
			out[id+" "+m[1]] = m[2]
		}
	}
	return out
}
