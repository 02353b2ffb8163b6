package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/mediator/adminapi"
	"d2m-mediator/mediator/daemon"
	"d2m-mediator/proto/d2mpb"
)

// adminCall sends one admin API request to n with token and extra
// headers, and returns the status, the headers and the body.
func adminCall(t *testing.T, n *mediatorNode, method, path, token string, hdr ...string) (int, http.Header, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, "http://"+n.d.AdminAddr.String()+path, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, body
}

// adminJSON requires status from an admin request and decodes the answer
// into v; it returns the node that answered (adminapi.NodeHeader).
func adminJSON(t *testing.T, n *mediatorNode, method, path string, status int, v any) string {
	t.Helper()
	code, h, body := adminCall(t, n, method, path, adminToken)
	if code != status {
		t.Fatalf("%s %s at %s: %d %s, want %d", method, path, n.id, code, body, status)
	}
	if v != nil {
		if err := json.Unmarshal(body, v); err != nil {
			t.Fatalf("%s %s: %v in %s", method, path, err, body)
		}
	}
	return h.Get(adminapi.NodeHeader)
}

// routeRequest turns a registered pattern into a method and a path with
// a sample value for every wildcard.
func routeRequest(pattern string) (method, path string) {
	method, path, ok := strings.Cut(pattern, " ")
	if !ok {
		method, path = "GET", pattern
	}
	samples := map[string]string{"group": "ab", "device": "1", "shard": "00", "node": "m1"}
	for {
		i := strings.Index(path, "{")
		if i < 0 {
			return method, path
		}
		j := strings.Index(path[i:], "}") + i
		v, ok := samples[strings.TrimSuffix(path[i+1:j], "...")]
		if !ok {
			v = "x"
		}
		path = path[:i] + v + path[j+1:]
	}
}

// TestAdminRoutesNeedToken walks every route the admin handler of a node
// in cluster mode registers (adminapi.Routes, so a route added later is
// walked too): each answers 401 without the token and with a wrong one,
// on the real admin listener; only health and readiness need none.
func TestAdminRoutesNeedToken(t *testing.T) {
	n := startCluster(t, "m1")[0]
	public, private := adminapi.Routes(n.d.AdminHandler)
	if !slices.Equal(public, []string{"GET /healthz", "GET /readyz"}) {
		t.Fatalf("routes without the token: %q, want health and readiness alone", public)
	}
	for _, want := range []string{"GET /cluster/haproxy.map", "POST /api/v1/cluster/shards/{shard}/move", "GET /api/v1/groups/{group}", "GET /metrics"} {
		if !slices.Contains(private, want) {
			t.Fatalf("%q is not among the routes behind the token: %q", want, private)
		}
	}
	for _, p := range public {
		method, path := routeRequest(p)
		if code, _, _ := adminCall(t, n, method, path, ""); code != http.StatusOK {
			t.Errorf("%s %s without a token: %d, want 200", method, path, code)
		}
	}
	for _, p := range private {
		method, path := routeRequest(p)
		for _, tok := range []string{"", "wrong-" + adminToken} {
			if code, _, body := adminCall(t, n, method, path, tok); code != http.StatusUnauthorized {
				t.Errorf("%s %s with token %q: %d %.200s, want 401", method, path, tok, code, body)
			}
		}
	}
	t.Logf("%d routes behind the token, %d public", len(private), len(public))
}

// runMediatorCLI runs the mediator binary's operator command against n's
// admin API.
func runMediatorCLI(t *testing.T, n *mediatorNode, args ...string) (string, error) {
	t.Helper()
	tokenFile := filepath.Join(t.TempDir(), "admin.token")
	if err := os.WriteFile(tokenFile, []byte(adminToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, mediatorBinary(t), append(args, "--admin", n.d.AdminAddr.String(), "--admin-token-file", tokenFile)...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	if err != nil {
		err = fmt.Errorf("%v: %s", err, errOut.String())
	}
	return out.String(), err
}

// TestAdminThroughAnyNode: every admin request naming a group is
// answered by the node serving the group's shard, whichever node was
// asked (it forwards the request once, with the caller's token); groups
// list and stats ask every live node and name the node per row; a shard
// nobody serves answers 503 naming the shard and the node it waits for,
// and `cluster shards` shows it as unserved.
func TestAdminThroughAnyNode(t *testing.T) {
	nodes := startCluster(t, "m1", "m2", "m3")
	byID := map[string]*mediatorNode{}
	for _, n := range nodes {
		byID[n.id] = n
	}
	owner := func(k d2d.Keys) *mediatorNode {
		id, _, _, _ := nodes[0].d.Cluster.Owner(cluster.Shard(k.DeviceGroupID()[0]))
		return byID[id]
	}
	other := func(k d2d.Keys) *mediatorNode {
		for _, n := range nodes {
			if n != owner(k) {
				return n
			}
		}
		panic("one node")
	}
	// One group per node, each with devices 1 and 2 and a reflection
	// queued for device 2.
	groups := map[string]d2d.Keys{}
	for len(groups) < 3 {
		k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		groups[owner(k).id] = k
	}
	for _, k := range groups {
		c2, err := dialDevice(t, owner(k).d.DeviceURL, k, 2)
		if err != nil {
			t.Fatal(err)
		}
		recvType(t, c2, d2m.TypeReflectionQueueDry)
		c2.Close()
		c1, err := dialDevice(t, owner(k).d.DeviceURL, k, 1)
		if err != nil {
			t.Fatal(err)
		}
		recvType(t, c1, d2m.TypeReflectionQueueDry)
		c1.Reflect(context.Background(), []byte("queued"), 0)
		recvType(t, c1, d2m.TypeReflectAck)
		c1.Close()
	}

	k := groups["m1"]
	gid := fmt.Sprintf("%x", k.DeviceGroupID())
	via := other(k)
	prefix := gid[:6]

	// Reads, through a node that does not serve the shard.
	var gd adminapi.GroupDetail
	if by := adminJSON(t, via, "GET", "/api/v1/groups/"+prefix, 200, &gd); by != "m1" {
		t.Fatalf("answered by %q, want the owner m1", by)
	}
	if gd.ID != gid || len(gd.Slots) != 2 || gd.Queued != 1 {
		t.Fatalf("group through %s: %+v", via.id, gd)
	}
	var sd adminapi.SlotDetail
	adminJSON(t, via, "GET", "/api/v1/groups/"+prefix+"/slots/2", 200, &sd)
	if sd.DeviceID != 2 || sd.QueueLength != 1 || sd.Group != gid {
		t.Fatalf("slot through %s: %+v", via.id, sd)
	}
	// A prefix too short to name the shard, and an unknown group of the
	// shard (the owner's answer).
	var e adminapi.APIError
	adminJSON(t, via, "GET", "/api/v1/groups/"+gid[:1], http.StatusBadRequest, &e)
	if !strings.Contains(e.Error, "at least two hex digits") {
		t.Fatalf("one hex digit: %q", e.Error)
	}
	if by := adminJSON(t, via, "GET", "/api/v1/groups/"+gid[:2]+"ffffffffff", http.StatusNotFound, &e); by != "m1" || !strings.Contains(e.Error, "unknown group") {
		t.Fatalf("unknown group of m1's shard: %q from %q", e.Error, by)
	}
	// A forwarded request is never forwarded again.
	code, _, body := adminCall(t, via, "GET", "/api/v1/groups/"+prefix, adminToken, adminapi.ForwardedHeader, "m9")
	if code != http.StatusServiceUnavailable || !bytes.Contains(body, []byte("m9 forwarded this request here")) {
		t.Fatalf("a forwarded request at a node without the shard: %d %s", code, body)
	}
	// Without the token the forwarding node refuses it itself.
	if code, _, _ := adminCall(t, via, "GET", "/api/v1/groups/"+prefix, ""); code != http.StatusUnauthorized {
		t.Fatalf("without a token: %d", code)
	}

	// Writes: purge device 2's queue, then the lock, then drop device 2,
	// each through a node that does not serve the shard.
	var pr adminapi.PurgeResult
	adminJSON(t, via, "DELETE", "/api/v1/groups/"+prefix+"/slots/2/queue", 200, &pr)
	if pr.PurgedCount != 1 || pr.DeviceID != 2 {
		t.Fatalf("purge: %+v", pr)
	}
	a, err := dialDevice(t, via.d.DeviceURL, k, 1)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeReflectionQueueDry)
	b, err := dialDevice(t, via.d.DeviceURL, k, 2)
	if err != nil {
		t.Fatal(err)
	}
	if b.ServerInfo.ReflectionQueueLength != 0 {
		t.Fatalf("device 2's queue after the purge: %d", b.ServerInfo.ReflectionQueueLength)
	}
	recvType(t, b, d2m.TypeReflectionQueueDry)
	if err := a.SendMessage(context.Background(), d2m.TypeBeginTransaction, &d2mpb.BeginTransaction{EncryptedScope: []byte("scope")}); err != nil {
		t.Fatal(err)
	}
	recvType(t, a, d2m.TypeBeginTransactionAck)
	var li adminapi.LockInfo
	adminJSON(t, via, "GET", "/api/v1/groups/"+prefix+"/lock", 200, &li)
	if !li.Held || li.Holder == nil || *li.Holder != 1 {
		t.Fatalf("lock through %s: %+v", via.id, li)
	}
	var lr adminapi.LockReleaseResult
	adminJSON(t, via, "DELETE", "/api/v1/groups/"+prefix+"/lock", 200, &lr)
	if lr.Holder != 1 || !lr.Released {
		t.Fatalf("lock release: %+v", lr)
	}
	recvType(t, b, d2m.TypeTransactionEnded)
	var dr adminapi.DropResult
	adminJSON(t, via, "DELETE", "/api/v1/groups/"+prefix+"/slots/2", 200, &dr)
	if !dr.WasConnected || dr.DeviceID != 2 {
		t.Fatalf("drop: %+v", dr)
	}
	if code := b.CloseCode(context.Background()); code != int(d2m.CloseDropped) {
		t.Fatalf("dropped device: close %d, want %d", code, d2m.CloseDropped)
	}

	// The cluster-wide list, from any node: every group once, named by
	// the node serving it; --local is the asked node's store alone.
	var gl adminapi.GroupList
	adminJSON(t, nodes[2], "GET", "/api/v1/groups", 200, &gl)
	if len(gl.Groups) != 3 || len(gl.Errors) != 0 || len(gl.UnservedShards) != 0 {
		t.Fatalf("cluster-wide groups: %+v", gl)
	}
	for _, g := range gl.Groups {
		if k := groups[g.Node]; fmt.Sprintf("%x", k.DeviceGroupID()) != g.ID {
			t.Errorf("group %s listed by %s, which does not serve it", g.Prefix, g.Node)
		}
	}
	adminJSON(t, nodes[2], "GET", "/api/v1/groups?local=true", 200, &gl)
	if len(gl.Groups) != 1 || gl.Groups[0].Node != "m3" {
		t.Fatalf("m3's own groups: %+v", gl)
	}
	var cs adminapi.ClusterStats
	adminJSON(t, nodes[1], "GET", "/api/v1/stats", 200, &cs)
	if len(cs.Nodes) != 3 {
		t.Fatalf("cluster stats: %+v", cs)
	}
	for i, ns := range cs.Nodes {
		if ns.Node != nodes[i].id || ns.Stats == nil || ns.Stats.Node != ns.Node || ns.Error != "" {
			t.Fatalf("cluster stats row %d: %+v", i, ns)
		}
	}
	var st adminapi.ServerStats
	adminJSON(t, nodes[1], "GET", "/api/v1/stats?local=true", 200, &st)
	if st.Node != "m2" || st.Goroutines == 0 {
		t.Fatalf("m2's own stats: %+v", st)
	}

	// The CLI: a group's slots through any node, the list with its NODE
	// column, the nodes with their admin addresses.
	out, err := runMediatorCLI(t, via, "slots", "list", prefix)
	if err != nil || !strings.Contains(out, gid) || !strings.Contains(out, d2m.FormatDeviceID(1)) {
		t.Fatalf("slots list through %s: %v\n%s", via.id, err, out)
	}
	out, err = runMediatorCLI(t, nodes[0], "groups", "list")
	if err != nil || !strings.Contains(out, "NODE") || !strings.Contains(out, "3 group(s)") {
		t.Fatalf("groups list: %v\n%s", err, out)
	}
	out, err = runMediatorCLI(t, nodes[0], "stats")
	if err != nil || !strings.Contains(out, "total (3 of 3 nodes)") {
		t.Fatalf("stats: %v\n%s", err, out)
	}
	out, err = runMediatorCLI(t, nodes[0], "cluster", "nodes")
	if err != nil || !strings.Contains(out, nodes[2].d.AdminAddr.String()) {
		t.Fatalf("cluster nodes: %v\n%s", err, out)
	}

	// m3 stops: its shards are served by nobody (bbolt: they wait for
	// it). A request for its group says so, at any node.
	k3 := groups["m3"]
	shard3 := cluster.Shard(k3.DeviceGroupID()[0])
	nodes[2].stop(t)
	waitUntil(t, 10*time.Second, "m3's shards unserved", func() bool {
		_, _, _, ok := nodes[0].d.Cluster.Owner(shard3)
		return !ok
	})
	code, h, body := adminCall(t, nodes[0], "GET", "/api/v1/groups/"+fmt.Sprintf("%x", k3.DeviceGroupID())[:6], adminToken)
	if want := fmt.Sprintf("shard %s is not served right now: it is assigned to node m3, which is not live", shard3); code != http.StatusServiceUnavailable ||
		h.Get("Retry-After") == "" || !bytes.Contains(body, []byte(want)) {
		t.Fatalf("a group of the stopped node: %d %s, want 503 %q", code, body, want)
	}
	adminJSON(t, nodes[1], "GET", "/api/v1/groups", 200, &gl)
	if len(gl.Groups) != 2 || !slices.Contains(gl.UnservedShards, shard3.String()) || len(gl.Errors) != 0 {
		t.Fatalf("groups with m3 stopped: %+v", gl)
	}
	out, err = runMediatorCLI(t, nodes[1], "cluster", "shards")
	if err != nil {
		t.Fatal(err)
	}
	var row string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, shard3.String()+" ") {
			row = strings.Join(strings.Fields(l), " ")
		}
	}
	if want := shard3.String() + " m3 - - unserved - - -"; row != want {
		t.Fatalf("cluster shards row of %s: %q, want %q\n%s", shard3, row, want, out)
	}
	if !strings.Contains(out, "shard(s) unserved") {
		t.Fatalf("cluster shards: no summary of the unserved shards\n%s", out)
	}
}

// TestAdminTokenMismatch: a node whose admin token differs from the asked
// node's refuses the forwarded request; the asked node says that the
// nodes need one token, instead of passing on a 401 that would blame the
// caller's token.
func TestAdminTokenMismatch(t *testing.T) {
	prefix := fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1))
	base := t.TempDir()
	m1 := startMediator(t, "m1", prefix, filepath.Join(base, "m1"))
	startMediatorWith(t, "m2", prefix, filepath.Join(base, "m2"), shared.clients, func(c *daemon.Config) { c.AdminToken = "another-token" })
	var k d2d.Keys
	waitUntil(t, 20*time.Second, "a shard served by m2", func() bool {
		k = d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		node, _, _, _ := m1.d.Cluster.Owner(cluster.Shard(k.DeviceGroupID()[0]))
		return node == "m2"
	})
	code, _, body := adminCall(t, m1, "GET", "/api/v1/groups/"+fmt.Sprintf("%x", k.DeviceGroupID())[:4], adminToken)
	if code != http.StatusBadGateway || !bytes.Contains(body, []byte("node m2 refused the admin token this node accepted")) {
		t.Fatalf("forwarded to a node with another token: %d %s", code, body)
	}
	var gl adminapi.GroupList
	adminJSON(t, m1, "GET", "/api/v1/groups", 200, &gl)
	if len(gl.Errors) != 1 || gl.Errors[0].Node != "m2" || !strings.Contains(gl.Errors[0].Error, "same admin token") {
		t.Fatalf("groups with m2 refusing: %+v", gl)
	}
	if _, err := runMediatorCLI(t, m1, "groups", "list"); err == nil || !strings.Contains(err.Error(), "incomplete: 1 node(s) did not answer (m2: it refused the admin token") {
		t.Fatalf("CLI groups list with m2 refusing: %v", err)
	}
}
