package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"d2m-mediator/mediator/adminapi"
)

// needDebianTool skips the test when a tool the shipped deploy files run
// is missing, and fails it instead under CI (or DEPLOY_CHECK_STRICT=1),
// which installs them (.ci/run).
func needDebianTool(t *testing.T, tool, pkg string) {
	t.Helper()
	if _, err := exec.LookPath(tool); err == nil {
		return
	}
	msg := fmt.Sprintf("%s is not installed (Debian package %s; .ci/run installs it)", tool, pkg)
	if os.Getenv("CI") != "" || os.Getenv("DEPLOY_CHECK_STRICT") == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// TestLocalCluster runs `make cluster` as shipped (ports and the data
// directory through the CLUSTER_* variables the script reads) and uses
// what it prints: the phone runs the printed d2m-device command line
// through the printed HAProxy URL and lands on its shard's node without a
// forwarding hop; the desktop of the same user connects to a node that
// does not own the shard, is forwarded, logs in to the shared stand-in
// chat server through it, and reflects to the phone; a third user gets
// the desktop's message through the chat server. Then Ctrl-C (SIGINT to
// make's process group): everything the script started is gone and every
// port is free.
func TestLocalCluster(t *testing.T) {
	lc := startLocalCluster(t)
	out := lc.out
	deviceURL := out.match(t, `^\s+device URL\s+(ws://\S+)`)[1]
	if deviceURL != "ws://"+lc.addrs[0] {
		t.Fatalf("device URL %s, want HAProxy at %s", deviceURL, lc.addrs[0])
	}
	nodeURL := map[string]string{}
	for _, m := range regexp.MustCompile(`(m[123]) (ws://[0-9.:]+)`).FindAllStringSubmatch(out.match(t, `^\s+nodes\s+(.*)`)[1], -1) {
		nodeURL[m[1]] = m[2]
	}
	chatKey := out.match(t, `^\s+chat server\s+\S+ \(stand-in\), public key ([0-9a-f]{64})$`)[1]
	tokenFile := out.match(t, `^\s+admin\s+.*, token file (\S+)$`)[1]
	deviceLine := strings.Fields(out.match(t, `^\s+(\S+/d2m-device --url .*)$`)[1])
	if len(nodeURL) != 3 || deviceLine[0] != lc.bin+"/d2m-device" {
		t.Fatalf("nodes %v, device command %q", nodeURL, deviceLine)
	}
	admin := adminPorts(t, out.match(t, `^\s+admin\s+(.*), token file`)[1])
	tok, err := os.ReadFile(tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	token := strings.TrimSpace(string(tok))
	forwarded := func() map[string]float64 {
		f := map[string]float64{}
		for node, a := range admin {
			f[node] = metricOf(t, a, token, `mediator_cluster_forwards_total{outcome="forwarded"}`)
		}
		return f
	}

	// The phone: the printed command line, through HAProxy.
	phone := startDeviceBinary(t, "phone", deviceLine[0], append(deviceLine[1:], "--label", "phone")...)
	again := phone.expect(`^another device of this user: d2m-device (.*)$`)[1]
	group := phone.expect(`^device 0x[0-9a-f]{16} .*, group ([0-9a-f]{8}), connecting to ` + regexp.QuoteMeta(deviceURL) + `$`)[1]
	phone.expect(`^promoted to leader$`)
	phone.expect(`^csp: logged in as ALICE001 `)
	if f := forwarded(); f["m1"]+f["m2"]+f["m3"] != 0 {
		t.Fatalf("HAProxy sent the phone to a node that forwarded it: %v", f)
	}
	var shards adminapi.ClusterShards
	adminGet(t, admin["m1"], token, "/api/v1/cluster/shards", &shards)
	shard, _ := strconv.ParseUint(group[:2], 16, 8)
	owner := shards.Shards[shard].Owner
	other := map[string]string{"m1": "m2", "m2": "m3", "m3": "m1"}[owner]
	if other == "" {
		t.Fatalf("shard %02x has no owner: %+v", shard, shards.Shards[shard])
	}

	// The desktop, through a node that does not own the shard: forwarded,
	// and its chat-server login goes through that node to the shared
	// stand-in.
	args := strings.Fields(again)
	for i := range args {
		if args[i] == "--url" {
			args[i+1] = nodeURL[other]
		}
	}
	desktop := startDeviceBinary(t, "desktop", deviceLine[0], append(args, "--label", "desktop")...)
	desktop.expect(`^queue dry`)
	desktop.expect(`^csp: logged in as ALICE001 `)
	if f := forwarded(); f[other] != 1 || f[owner] != 0 {
		t.Fatalf("forwards after the desktop connected to %s (owner %s): %v, want 1 at %s", other, owner, f, other)
	}
	bob := startDeviceBinary(t, "bob", deviceLine[0], "--url", deviceURL, "--new", "--identity", "BOB00001", "--chat-server-key", chatKey)
	bob.expect(`^csp: unblocked incoming messages`)
	desktop.command("send BOB00001 hello from the forwarded desktop")
	m := desktop.expect(`^sent message to BOB00001 id ([0-9a-f]{16}) .*: "hello from the forwarded desktop"$`)
	phone.expect(`^reflected #\d+ from device 0x[0-9a-f]{16} .*: outgoing message to BOB00001 id ` + m[1] + `: "hello from the forwarded desktop"$`)
	bob.expect(`^incoming message from ALICE001 id ` + m[1] + ` .*: "hello from the forwarded desktop"$`)
	bob.quit()
	desktop.quit()

	// Ctrl-C: SIGINT to make's process group. The phone is still
	// connected: its node closes it with 1001, which reaches it because
	// the script stops the nodes before HAProxy. (A device forwarded by a
	// node that stops loses its connection without a close frame: the
	// forwarding node copies bytes and cannot end a frame stream.)
	lc.stop(t, -lc.cmd.Process.Pid, syscall.SIGINT)
	phone.expect(`^connection closed: 1001 `)
}

// TestLocalClusterSIGTERM: SIGTERM to make alone (a process manager, kill)
// stops everything the script started, too.
func TestLocalClusterSIGTERM(t *testing.T) {
	lc := startLocalCluster(t)
	lc.stop(t, lc.cmd.Process.Pid, syscall.SIGTERM)
}

// localCluster is one `make cluster` run.
type localCluster struct {
	cmd       *exec.Cmd
	out       *lineLog
	exited    chan struct{}
	addrs     []string // HAProxy, 3 nodes, 3 admin, 3 etcd, 3 etcd peers, chat server
	bin, data string
	started   []int // every process under make, once the cluster is up
}

// startLocalCluster runs `make cluster` as shipped, its ports and data
// directory set through the CLUSTER_* variables the script reads, in a
// process group of its own (as a terminal's foreground job), and waits for
// its last line.
func startLocalCluster(t *testing.T) *localCluster {
	t.Helper()
	if testing.Short() {
		t.Skip("builds the binaries through make and starts etcd, HAProxy and three nodes")
	}
	needDebianTool(t, "make", "make")
	needDebianTool(t, "etcd", "etcd-server")
	needDebianTool(t, "haproxy", "haproxy")
	needDebianTool(t, "curl", "curl")

	lc := &localCluster{addrs: freePorts(t, 14), bin: t.TempDir(), data: t.TempDir(),
		out: &lineLog{changed: make(chan struct{})}, exited: make(chan struct{})}
	port := func(i int) string { _, p, _ := net.SplitHostPort(lc.addrs[i]); return p }
	ports := func(from int) string { return port(from) + " " + port(from+1) + " " + port(from+2) }
	cmd := exec.Command("make", "--no-print-directory", "-C", "..", "cluster", "BIN="+lc.bin)
	cmd.Env = append(os.Environ(),
		"CLUSTER_DATA="+lc.data,
		"CLUSTER_PORT="+port(0),
		"CLUSTER_NODE_PORTS="+ports(1),
		"CLUSTER_ADMIN_PORTS="+ports(4),
		"CLUSTER_ETCD_PORTS="+ports(7),
		"CLUSTER_ETCD_PEER_PORTS="+ports(10),
		"CLUSTER_CHAT_PORT="+port(13))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lc.cmd = cmd
	w.Close()
	go lc.out.collect(r)
	go func() { cmd.Wait(); close(lc.exited) }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		for _, pid := range lc.started {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		<-lc.exited
		if t.Failed() {
			t.Logf("make cluster printed:\n%s", lc.out.text())
			for _, name := range []string{"m1", "m2", "m3", "haproxy", "chatstub", "etcd-e1"} {
				if b, err := os.ReadFile(filepath.Join(lc.data, "logs", name+".log")); err == nil {
					t.Logf("%s.log (end):\n%s", name, tailString(string(b), 3000))
				}
			}
		}
	})
	lc.out.wait(t, 4*time.Minute, lc.exited, `^Ctrl-C stops everything\.$`)
	lc.started = descendants(cmd.Process.Pid)
	if len(lc.started) < 9 { // the script, 3 etcd, chatstub, 3 nodes, haproxy
		t.Fatalf("processes under make: %v", lc.started)
	}
	return lc
}

// stop sends sig to pid (negative: a process group) and checks that make
// ends without an error, the script said so, no process it started is
// left and every port is free.
func (lc *localCluster) stop(t *testing.T, pid int, sig syscall.Signal) {
	t.Helper()
	begin := time.Now()
	if err := syscall.Kill(pid, sig); err != nil {
		t.Fatal(err)
	}
	select {
	case <-lc.exited:
	case <-time.After(60 * time.Second):
		t.Fatalf("make cluster still running 60 s after %v", sig)
	}
	t.Logf("stopped %v after %v", time.Since(begin).Round(time.Millisecond), sig)
	// make waits for the script, then ends by the signal it got, as it
	// should; it must not report the script as failed.
	ws := lc.cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ws.Exited() && !(ws.Signaled() && ws.Signal() == sig) || ws.Exited() && ws.ExitStatus() != 0 ||
		strings.Contains(lc.out.text(), "make: ***") {
		t.Errorf("make ended with %v", lc.cmd.ProcessState)
	}
	lc.out.match(t, `^cluster: stopped$`)
	for _, p := range lc.started {
		if err := syscall.Kill(p, 0); err != syscall.ESRCH {
			t.Errorf("process %d (%s) still there after the cluster stopped", p, procName(p))
		}
	}
	for _, a := range lc.addrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			t.Errorf("port %s still taken after the cluster stopped: %v", a, err)
			continue
		}
		ln.Close()
	}
}

// lineLog collects a process's output line by line.
type lineLog struct {
	mu      sync.Mutex
	lines   []string
	changed chan struct{} // closed and replaced on every line and at EOF
	eof     bool
}

func (l *lineLog) collect(r io.ReadCloser) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		l.mu.Lock()
		l.lines = append(l.lines, sc.Text())
		close(l.changed)
		l.changed = make(chan struct{})
		l.mu.Unlock()
	}
	l.mu.Lock()
	l.eof = true
	close(l.changed)
	l.mu.Unlock()
}

func (l *lineLog) text() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// find returns the submatches of the first line matching rx, nil if none.
func (l *lineLog) find(rx *regexp.Regexp) (m []string, changed chan struct{}, eof bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, s := range l.lines {
		if m := rx.FindStringSubmatch(s); m != nil {
			return m, nil, false
		}
	}
	return nil, l.changed, l.eof
}

// wait waits for a line matching pattern; the process exiting first or
// the timeout fails the test.
func (l *lineLog) wait(t *testing.T, timeout time.Duration, exited <-chan struct{}, pattern string) []string {
	t.Helper()
	rx := regexp.MustCompile(pattern)
	deadline := time.After(timeout)
	for {
		m, changed, eof := l.find(rx)
		if m != nil {
			return m
		}
		if eof {
			<-exited
			t.Fatalf("output ended without a line matching %q", pattern)
		}
		select {
		case <-changed:
		case <-deadline:
			t.Fatalf("no line matching %q within %v", pattern, timeout)
		}
	}
}

// match returns the submatches of a line already printed.
func (l *lineLog) match(t *testing.T, pattern string) []string {
	t.Helper()
	m, _, _ := l.find(regexp.MustCompile(pattern))
	if m == nil {
		t.Fatalf("no line matching %q", pattern)
	}
	return m
}

// adminPorts maps m1, m2, m3 to the admin addresses in the printed order.
func adminPorts(t *testing.T, list string) map[string]string {
	t.Helper()
	f := strings.Fields(list)
	if len(f) != 3 {
		t.Fatalf("admin addresses %q", list)
	}
	return map[string]string{"m1": f[0], "m2": f[1], "m3": f[2]}
}

func adminGet(t *testing.T, addr, token, path string, v any) []byte {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET %s%s: %d %v %s", addr, path, resp.StatusCode, err, b)
	}
	if v != nil {
		if err := json.Unmarshal(b, v); err != nil {
			t.Fatalf("GET %s%s: %v", addr, path, err)
		}
	}
	return b
}

// metricOf is one series' value from a node's /metrics (0 if absent).
func metricOf(t *testing.T, addr, token, series string) float64 {
	t.Helper()
	v, _ := metricValue(adminGet(t, addr, token, "/metrics", nil), series)
	return v
}

// descendants lists every process below pid (children, their children, …)
// from /proc.
func descendants(pid int) []int {
	children := map[int][]int{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid …; comm may hold spaces and parentheses.
		rest := string(b[strings.LastIndexByte(string(b), ')')+1:])
		f := strings.Fields(rest)
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		children[ppid] = append(children[ppid], p)
	}
	var out []int
	var walk func(int)
	walk = func(p int) {
		for _, c := range children[p] {
			out = append(out, c)
			walk(c)
		}
	}
	walk(pid)
	return out
}

func procName(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return strings.TrimSpace(string(b))
}
