package cluster

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os/exec"
	"strings"
	"testing"
	"time"

	"d2m-mediator/d2m"
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
	var hmap string
	if code := nodes[0].admin(t, "GET", "/cluster/haproxy.map", &hmap); code != 200 {
		t.Fatalf("haproxy.map: %d", code)
	}
	var backends [][2]string
	for _, n := range nodes {
		backends = append(backends, [2]string{n.id, n.d.DeviceAddr.String()})
	}
	front, mapFile, sock := startHAProxy(t, bin, backends, hmap)
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
	to := moveToOther(t, nodes[0], shard)
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
