package cluster

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"d2m-mediator/cluster"
)

// TestHAProxyRoutesByShard runs a real HAProxy (Debian's haproxy) with the
// map from Node.HAProxyMap and one backend per node: a request for
// /<prefix8>/… reaches the owner of that shard without a hop, for every
// shard, iOS's "//" included. After a move, one runtime-API "set map"
// line routes the moved shard to its new owner.
func TestHAProxyRoutesByShard(t *testing.T) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Skip("haproxy not installed (apt-get install haproxy; .ci/run installs it)")
	}
	// Stand-ins for the nodes' device listeners: they answer with their id.
	ids := []string{"node-a", "node-b", "node-c"}
	adv := make(map[string]string)
	for _, id := range ids {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, id)
		}))
		t.Cleanup(srv.Close)
		adv[id] = strings.TrimPrefix(srv.URL, "http://")
	}
	e := newEnv(t, nil, nodeOpts{advertise: adv})
	a, b, c := e.start("node-a"), e.start("node-b"), e.start("node-c")
	waitUntil(t, 10*time.Second, "all shards served", func() bool { return allServed(a, b, c) })

	backends := make([][2]string, 0, len(ids))
	for _, id := range ids {
		backends = append(backends, [2]string{id, adv[id]})
	}
	front, mapFile, sock := startHAProxy(t, bin, backends, a.HAProxyMap())

	get := func(path string) string {
		t.Helper()
		resp, err := http.Get("http://" + front + path)
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
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "set map %s %s\n", mapFile, line)
	reply, _ := bufio.NewReader(conn).ReadString('\n')
	conn.Close()
	if strings.TrimSpace(reply) != "" {
		t.Fatalf("haproxy runtime API: %q", reply)
	}
	if got := get("/" + s.String() + "/0a20"); got != "node-c" {
		t.Fatalf("after the move, shard %s reached %q", s, got)
	}
}

// startHAProxy runs a real HAProxy routing devices by the /{prefix8}/
// segment with shardMap (HAProxy map format) over one backend per node
// (id, address), plus a default backend of every node; it returns the
// frontend address, the map file and the runtime API socket.
func startHAProxy(t *testing.T, bin string, backends [][2]string, shardMap string) (front, mapFile, sock string) {
	t.Helper()
	dir := t.TempDir()
	mapFile = filepath.Join(dir, "shards.map")
	if err := os.WriteFile(mapFile, []byte(shardMap), 0o644); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	front = ln.Addr().String()
	ln.Close()
	sock = filepath.Join(dir, "admin.sock")
	var cfg strings.Builder
	fmt.Fprintf(&cfg, `global
    stats socket %s level admin
defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    timeout tunnel 1h
frontend devices
    bind %s
    use_backend %%[path,field(2,/),lower,map(%s,mediators)]
    default_backend mediators
backend mediators
`, sock, front, mapFile)
	for _, b := range backends {
		fmt.Fprintf(&cfg, "    server %s %s\n", b[0], b[1])
	}
	for _, b := range backends {
		fmt.Fprintf(&cfg, "backend %s\n    server %s %s\n", b[0], b[0], b[1])
	}
	cfgFile := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfgFile, []byte(cfg.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-db", "-f", cfgFile)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	waitUntil(t, 10*time.Second, "haproxy listening", func() bool {
		conn, err := net.Dial("tcp", front)
		if err == nil {
			conn.Close()
		}
		return err == nil
	})
	return front, mapFile, sock
}
