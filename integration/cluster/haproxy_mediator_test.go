package cluster

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/d2m"
	"d2m-mediator/mediator/adminapi"
)

// TestHAProxyInFrontOfMediators: HAProxy routes devices by the /{prefix8}/
// segment with the map a mediator serves (GET /cluster/haproxy.map), so
// every device reaches its shard's owner without a forwarding hop; after a
// move and one runtime-API "set map" it does again.
func TestHAProxyInFrontOfMediators(t *testing.T) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Skip("haproxy not installed (apt-get install haproxy; .ci/run installs it)")
	}
	nodes := startCluster(t, "m1", "m2")
	dir := t.TempDir()
	var hmap string
	if code := nodes[0].admin(t, "GET", "/cluster/haproxy.map", &hmap); code != 200 {
		t.Fatalf("haproxy.map: %d", code)
	}
	mapFile := filepath.Join(dir, "shards.map")
	if err := os.WriteFile(mapFile, []byte(hmap), 0o644); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	front := ln.Addr().String()
	ln.Close()
	sock := filepath.Join(dir, "admin.sock")
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
	for _, n := range nodes {
		fmt.Fprintf(&cfg, "    server %s %s\n", n.id, n.d.DeviceAddr)
	}
	for _, n := range nodes {
		fmt.Fprintf(&cfg, "backend %s\n    server %s %s\n", n.id, n.id, n.d.DeviceAddr)
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
	url := "ws://" + front
	forwards := func() float64 { return forwarded(nodes[0]) + forwarded(nodes[1]) }

	groups := keysForShards(8)
	for i, k := range groups {
		c, err := dialDevice(t, url, k, 1)
		if err != nil {
			t.Fatalf("group %d through haproxy: %v", i, err)
		}
		recvType(t, c, d2m.TypeReflectionQueueDry)
		c.Close()
	}
	if f := forwards(); f != 0 {
		t.Fatalf("%v connections forwarded although HAProxy had the map", f)
	}

	// Move one group's shard, then tell HAProxy through its runtime API.
	k := groups[0]
	shard := k.DeviceGroupID()[0]
	owner, _, _, _ := nodes[0].d.Cluster.Owner(cluster.Shard(shard))
	to := "m1"
	if owner == "m1" {
		to = "m2"
	}
	var mr adminapi.MoveResult
	if code := nodes[0].admin(t, "POST", fmt.Sprintf("/api/v1/cluster/shards/%02x/move?to=%s", shard, to), &mr); code != 200 {
		t.Fatalf("move: %d %+v", code, mr)
	}
	waitUntil(t, 5*time.Second, "the map to show the move", func() bool {
		var m string
		nodes[0].admin(t, "GET", "/cluster/haproxy.map", &m)
		return strings.Contains(m, fmt.Sprintf("\n%02x %s\n", shard, to))
	})
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(conn, "set map %s %02x %s\n", mapFile, shard, to)
	reply, _ := bufio.NewReader(conn).ReadString('\n')
	conn.Close()
	if strings.TrimSpace(reply) != "" {
		t.Fatalf("haproxy runtime API: %q", reply)
	}
	c, err := dialDevice(t, url, k, 1)
	if err != nil {
		t.Fatalf("after the move: %v", err)
	}
	recvType(t, c, d2m.TypeReflectionQueueDry)
	if f := forwards(); f != 0 {
		t.Fatalf("%v connections forwarded after the move and the map update", f)
	}
	if _, err := c.Reflect(context.Background(), []byte("via haproxy"), 0); err != nil {
		t.Fatal(err)
	}
	recvType(t, c, d2m.TypeReflectAck)
}
