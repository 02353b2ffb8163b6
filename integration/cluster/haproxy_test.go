package cluster

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/cluster/haproxysync"
	"d2m-mediator/internal/deploytest"
)

// TestHAProxyRoutesByShard runs the shipped deploy/haproxy/haproxy-cluster.cfg
// with the map from Node.HAProxyMap in front of three stand-ins for the
// nodes' device listeners: a request for /<shard>/… reaches the owner of
// that shard without a hop, for every shard, iOS's "//" and upper case
// included. After a move, one runtime-API "set map" line routes the moved
// shard to its new owner. A node whose health check fails is stood in for
// by the next node of its backend (backup).
func TestHAProxyRoutesByShard(t *testing.T) {
	bin := deploytest.Binary(t, "haproxy", "haproxy")
	// Stand-ins for the nodes' device listeners: they answer with their id.
	ids := []string{"node-a", "node-b", "node-c"}
	adv := make(map[string]string)
	stubs := make(map[string]*httptest.Server)
	for _, id := range ids {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, id)
		}))
		t.Cleanup(srv.Close)
		adv[id], stubs[id] = strings.TrimPrefix(srv.URL, "http://"), srv
	}
	e := newEnv(t, nil, nodeOpts{advertise: adv})
	a, b, c := e.start("node-a"), e.start("node-b"), e.start("node-c")
	waitUntil(t, 10*time.Second, "all shards served", func() bool { return allServed(a, b, c) })

	h := startHAProxy(t, bin, adv, a.HAProxyMap())
	hc := h.ca.Client()
	get := func(path string) string {
		t.Helper()
		resp, err := hc.Get("https://" + h.front + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return string(body)
	}
	for i := range cluster.NumShards {
		s := cluster.Shard(i)
		owner, _, _, _ := a.Owner(s)
		path := "/" + s.String() + "/0a20" // /{prefix8}/{hex(ClientUrlInfo)}
		if i%2 == 1 {
			path = "/" + strings.ToUpper(s.String()) + "//0a20" // iOS: template ending in "/"
		}
		if got := get(path); got != owner {
			t.Fatalf("GET %s reached %q, owner is %s", path, got, owner)
		}
	}

	// Move one shard; tell HAProxy through its runtime API.
	s := shardOf(t, a)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if _, err := a.Move(ctx, s, "node-c"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 5*time.Second, "node-c's map has the move", func() bool {
		owner, _, _, _ := c.Owner(s)
		return owner == "node-c"
	})
	var line string
	for l := range strings.SplitSeq(c.HAProxyMap(), "\n") {
		if strings.HasPrefix(l, s.String()+" ") {
			line = l
		}
	}
	if line != s.String()+" node-c" {
		t.Fatalf("map line for %s after the move: %q", s, line)
	}
	if out, err := h.rt.Command(t.Context(), "set map "+h.mapFile+" "+line); err != nil || strings.TrimSpace(out) != "" {
		t.Fatalf("haproxy runtime API: %q %v", out, err)
	}
	if got := get("/" + s.String() + "/0a20"); got != "node-c" {
		t.Fatalf("after the move, shard %s reached %q", s, got)
	}

	// node-c's listener goes away: after two failed checks (2 s apart) its
	// shards go to the first backup of backend node-c, node-a.
	stubs["node-c"].Close()
	deploytest.WaitHAProxyServer(t, h.rt.Socket, "mediator_nodes", "node-c", "DOWN L4CON")
	if got := get("/" + s.String() + "/0a20"); got != "node-a" {
		t.Fatalf("with node-c down, shard %s reached %q, want its backup node-a", s, got)
	}
}

// shippedHAProxy is deploy/haproxy/haproxy-cluster.cfg running.
type shippedHAProxy struct {
	front   string // the first bind, TLS with a certificate of ca
	mapFile string // the shard map, as HAProxy knows it
	rt      haproxysync.Runtime
	ca      *deploytest.CA
	proc    *deploytest.Process
}

// shippedNodes are the node ids and addresses in haproxy-cluster.cfg.
var shippedNodes = map[string]string{"node-a": "10.0.0.11:8765", "node-b": "10.0.0.12:8765", "node-c": "10.0.0.13:8765"}

// startHAProxy runs the shipped cluster configuration with only addresses,
// ports and paths substituted: the nodes' device listeners (node id →
// address, the ids the file names), the binds, the certificate, the map
// file (holding shardMap) and the runtime API socket. It waits until every
// node's health check has passed.
func startHAProxy(t *testing.T, bin string, nodes map[string]string, shardMap string) *shippedHAProxy {
	t.Helper()
	if got, want := slices.Sorted(maps.Keys(nodes)), slices.Sorted(maps.Keys(shippedNodes)); !slices.Equal(got, want) {
		t.Fatalf("nodes %v: haproxy-cluster.cfg names %v", got, want)
	}
	dir := t.TempDir()
	h := &shippedHAProxy{front: deploytest.FreeAddr(t), mapFile: filepath.Join(dir, "mediator-shards.map"),
		rt: haproxysync.Runtime{Socket: filepath.Join(dir, "admin.sock")}, ca: deploytest.NewCA(t)}
	crt := h.ca.Issue(t, dir, "127.0.0.1")
	if err := os.WriteFile(h.mapFile, []byte(shardMap), 0o644); err != nil {
		t.Fatal(err)
	}
	subs := []deploytest.Sub{
		deploytest.S("stats socket /run/haproxy/admin.sock ", "stats socket "+h.rt.Socket+" "),
		deploytest.S("bind :443 ssl", "bind "+h.front+" ssl"),
		deploytest.S("bind :::443 ssl", "bind "+deploytest.FreeAddr(t)+" ssl"),
		{Old: "/etc/haproxy/certs/mediator.pem", New: crt.Combined, N: 3}, // two binds, a comment
		{Old: "/etc/haproxy/mediator-shards.map", New: h.mapFile, N: 3},   // use_backend, two comments
		{Old: shippedNodes["node-a"], New: nodes["node-a"], N: 4},         // mediator_nodes and each per-node backend
		{Old: shippedNodes["node-b"], New: nodes["node-b"], N: 4},
		{Old: shippedNodes["node-c"], New: nodes["node-c"], N: 4},
	}
	cfg := deploytest.Render(t, "deploy/haproxy/haproxy-cluster.cfg", subs...)
	cfgFile := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	args := append([]string{"-db", "-f", cfgFile}, deploytest.HAProxyArgs(t, cfg)...)
	h.proc = deploytest.Start(t, "haproxy", exec.Command(bin, args...))
	h.proc.WaitTCP(t, h.front, 10*time.Second)
	// The shipped health check (TCP to the device listener) passes.
	for id := range nodes {
		deploytest.WaitHAProxyServer(t, h.rt.Socket, "mediator_nodes", id, "UP L4OK")
	}
	return h
}
