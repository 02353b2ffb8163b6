package integration

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestClusterFromScratch runs OPERATIONS.md, "From a bare Debian host to a
// three-node cluster", on this machine: the commands are taken from the
// document itself, with the example addresses (192.0.2.x) mapped to free
// loopback ports and the paths into scratch directories, nothing else
// changed. Debian's postgresql-common creates the two PostgreSQL clusters
// (what apt-get install does on each database host), the shipped
// deploy/postgres scripts make them a primary with a synchronous standby,
// three etcd members run with the document's /etc/default/etcd variables,
// and three mediator nodes run from the installed systemd unit with the
// document's mediator.env. Their startup lines must name the replication
// as the document shows; the documented CLI line lists the three nodes; a
// phone and a desktop of one user connect to two different nodes (a node
// that does not own the shard forwards), log in to the chat server and
// reflect. Needs root (pg_createcluster, runuser).
func TestClusterFromScratch(t *testing.T) {
	if testing.Short() {
		t.Skip("starts two PostgreSQL servers, three etcd members and three nodes")
	}
	if os.Geteuid() != 0 {
		msg := "needs root: pg_createcluster and the deploy/postgres scripts run as root"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	for _, tool := range [][2]string{{"pg_createcluster", "postgresql"}, {"pg_conftool", "postgresql"}, {"runuser", "util-linux"},
		{"etcd", "etcd-server"}, {"etcdctl", "etcd-client"}} {
		needDebianTool(t, tool[0], tool[1])
	}
	doc := walkthrough(t)
	begin := time.Now()

	// Every example address of the document gets a loopback port.
	docAddrs := []string{"192.0.2.11:5432", "192.0.2.12:5432",
		"192.0.2.21:2379", "192.0.2.22:2379", "192.0.2.23:2379", "192.0.2.21:2380", "192.0.2.22:2380", "192.0.2.23:2380",
		"192.0.2.31:8765", "192.0.2.32:8765", "192.0.2.33:8765", "192.0.2.31:8766", "192.0.2.32:8766", "192.0.2.33:8766",
		"192.0.2.31:5222"}
	local := map[string]string{}
	for i, a := range freePorts(t, len(docAddrs)) {
		local[docAddrs[i]] = a
	}
	port := func(docAddr string) string { _, p, _ := net.SplitHostPort(local[docAddr]); return p }
	// subst maps the document's addresses onto this machine: host:port
	// first, then the bare hosts and networks (one machine: all are
	// 127.0.0.1).
	subst := func(s string) string {
		keys := make([]string, 0, len(local))
		for k := range local {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			s = strings.ReplaceAll(s, k, local[k])
		}
		s = strings.ReplaceAll(s, "0.0.0.0:8765", "MEDIATOR_LISTEN_ADDR") // per node, below
		for _, n := range []string{"192.0.2.0/24", "192.0.2.11/32", "192.0.2.12/32"} {
			s = strings.ReplaceAll(s, n, "127.0.0.1/32")
		}
		return strings.ReplaceAll(strings.ReplaceAll(s, "192.0.2.11", "127.0.0.1"), "192.0.2.12", "127.0.0.1")
	}

	// 1. PostgreSQL: two Debian clusters, then the scripts.
	pgRoot, err := os.MkdirTemp("", "d2m-scratch-pg-")
	if err != nil {
		t.Fatal(err)
	}
	// pg_createcluster makes the data directories below it as postgres.
	pgUser, err := user.Lookup("postgres")
	if err != nil {
		t.Fatalf("no OS user postgres (Debian package postgresql): %v", err)
	}
	uid, _ := strconv.Atoi(pgUser.Uid)
	gid, _ := strconv.Atoi(pgUser.Gid)
	if err := os.Chown(pgRoot, uid, gid); err != nil {
		t.Fatal(err)
	}
	os.Chmod(pgRoot, 0o755)
	pgEnv := append(os.Environ(), "PG_CLUSTER_CONF_ROOT="+filepath.Join(pgRoot, "etc"))
	version := newestPostgres(t)
	var clusters []string
	t.Cleanup(func() {
		for _, c := range clusters {
			cmd := exec.Command("pg_ctlcluster", version, c, "stop", "-m", "immediate")
			cmd.Env = pgEnv
			cmd.Run()
		}
		os.RemoveAll(pgRoot)
	})
	run := func(env []string, dir, line string) string {
		t.Helper()
		cmd := exec.Command("bash", "-euc", line)
		cmd.Env, cmd.Dir = env, dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", line, err, out)
		}
		return string(out)
	}
	// Two hosts, so at the same time. initdb --no-sync: the catalog only
	// has to survive this test; the servers run with fsync on
	// (primary.conf).
	clusters = []string{"db1", "db2"}
	created := make(chan error, 2)
	for i, name := range clusters {
		go func() {
			cmd := exec.Command("pg_createcluster", version, name, "-d", filepath.Join(pgRoot, name), "-p", port(docAddrs[i]),
				"-l", filepath.Join(pgRoot, name+".log"), "--start", "--", "--no-sync")
			cmd.Env = pgEnv
			if out, err := cmd.CombinedOutput(); err != nil {
				created <- fmt.Errorf("pg_createcluster %s: %v\n%s", name, err, out)
				return
			}
			created <- nil
		}()
	}
	for range clusters {
		if err := <-created; err != nil {
			t.Fatal(err)
		}
	}
	// The scripts as shipped, with their listen address on loopback.
	scripts := filepath.Join(pgRoot, "deploy/postgres")
	copyDir(t, "../deploy/postgres", scripts, func(b []byte) []byte {
		return []byte(strings.ReplaceAll(string(b), "listen_addresses = '*'", "listen_addresses = '127.0.0.1'"))
	})
	// The document relies on the default cluster (15/main, port 5432);
	// here the cluster and the primary's port are given.
	run(append(pgEnv, "PG_CLUSTER=db1"), pgRoot, subst(doc.line(t, "STANDBY_ADDR=")))
	run(append(pgEnv, "PG_CLUSTER=db2", "PRIMARY_PORT="+port("192.0.2.11:5432")), pgRoot, subst(doc.line(t, "PRIMARY_HOST=192.0.2.11 ")))
	check := doc.line(t, "runuser -u postgres -- psql -XAtc \"SELECT application_name, sync_state")
	t.Logf("%v: PostgreSQL primary and standby set up", time.Since(begin).Round(time.Millisecond))
	waitFor(t, 30*time.Second, "standby1|sync on the primary", func() bool {
		cmd := exec.Command("bash", "-euc", check)
		cmd.Env = append(pgEnv, "PGCLUSTER="+version+"/db1")
		out, _ := cmd.CombinedOutput()
		return strings.TrimSpace(string(out)) == "standby1|sync"
	})

	// 2. etcd: the document's /etc/default/etcd for etcd1, and for etcd2
	// and etcd3 with their name and address in the first five lines.
	etcdConf := doc.block(t, "ETCD_NAME=etcd1")
	for i := 1; i <= 3; i++ {
		env := []string{"PATH=" + os.Getenv("PATH"), "ETCD_DATA_DIR=" + filepath.Join(t.TempDir(), "etcd")}
		for j, l := range etcdConf {
			if j < 5 {
				l = strings.ReplaceAll(l, "etcd1", fmt.Sprintf("etcd%d", i))
				l = strings.ReplaceAll(l, "192.0.2.21", fmt.Sprintf("192.0.2.2%d", i))
			}
			env = append(env, subst(l))
		}
		startBackground(t, fmt.Sprintf("etcd%d", i), env, "etcd")
	}
	health := subst(doc.line(t, "etcdctl --endpoints="))
	waitFor(t, 30*time.Second, "etcd healthy", func() bool {
		out, err := exec.Command("bash", "-euc", health).CombinedOutput()
		return err == nil && strings.Count(string(out), "is healthy") == 3
	})

	t.Logf("%v: etcd healthy", time.Since(begin).Round(time.Millisecond))
	// The stand-in chat server, as the document starts it.
	chatstub := buildBinary(t, "chatstub")
	chatLine := strings.Fields(subst(doc.code(t, "chatstub --listen")))
	chatLine[len(chatLine)-1] = filepath.Join(t.TempDir(), "chatstub.key")
	chatOut := startBackground(t, "chatstub", os.Environ(), chatstub, chatLine[1:]...)
	chatKey := strings.TrimPrefix(chatOut.waitLine(t, "public key: "), "public key: ")

	// 3. Three nodes from the installed unit; m2 and m3 get m1's token.
	install := installSequence(t)
	copyToken := doc.line(t, "install -D -m 0600 admin.token /etc/mediator/admin.token")
	nodeEnv := doc.block(t, "MEDIATOR_LISTEN=0.0.0.0:8765")
	var token string
	var nodes []*unitProcess
	for i := 1; i <= 3; i++ {
		root := t.TempDir()
		if i == 1 {
			installInto(t, root, install)
			b, err := os.ReadFile(filepath.Join(root, "etc/mediator/admin.token"))
			if err != nil {
				t.Fatal(err)
			}
			token = string(b)
		} else {
			var cmds []string
			for _, c := range install {
				if !strings.HasPrefix(c, "(umask ") {
					cmds = append(cmds, c)
				}
			}
			installInto(t, root, cmds)
			dir := t.TempDir() // where the copy of m1's token arrived
			os.WriteFile(filepath.Join(dir, "admin.token"), []byte(token), 0o600)
			run(os.Environ(), dir, strings.ReplaceAll(copyToken, " /etc/", " "+root+"/etc/"))
		}
		var env []string
		for j, l := range nodeEnv {
			if j < 3 || strings.HasPrefix(l, "MEDIATOR_NODE_ID=") {
				l = strings.ReplaceAll(l, "m1", fmt.Sprintf("m%d", i))
				l = strings.ReplaceAll(l, "192.0.2.31", fmt.Sprintf("192.0.2.3%d", i))
			}
			l = strings.ReplaceAll(subst(l), "MEDIATOR_LISTEN_ADDR", local[fmt.Sprintf("192.0.2.3%d:8765", i)])
			env = append(env, strings.ReplaceAll(l, "chat.example.org:5222", local["192.0.2.31:5222"]))
		}
		appendEnv(t, root, append(env, "MEDIATOR_DATA="+filepath.Join(root, "var/lib/mediator"))...)
		nodes = append(nodes, startUnit(t, root))
	}
	// The startup line the document shows, on every node.
	var want struct{ Store string }
	if err := json.Unmarshal([]byte("{"+subst(doc.code(t, `"store":"postgres postgres://`))+"}"), &want); err != nil {
		t.Fatal(err)
	}
	for i, n := range nodes {
		if n.startup["store"] != want.Store {
			t.Errorf("m%d: store %q, want %q (OPERATIONS.md)", i+1, n.startup["store"], want.Store)
		}
	}
	cli := strings.Fields(subst(doc.code(t, "mediator --admin 192.0.2.31:8766")))
	for i, a := range cli {
		if a == "/etc/mediator/admin.token" {
			cli[i] = filepath.Join(t.TempDir(), "admin.token")
			os.WriteFile(cli[i], []byte(token), 0o600)
		}
	}
	waitFor(t, 30*time.Second, "cluster nodes: m1, m2, m3 with 256 shards between them", func() bool {
		r := runCLI(t, nil, cli[1:]...)
		total := 0
		for _, l := range strings.Split(r.stdout, "\n") {
			if f := strings.Fields(l); len(f) >= 3 && strings.HasPrefix(f[0], "m") {
				n, _ := strconv.Atoi(f[len(f)-2])
				total += n
			}
		}
		return r.code == 0 && strings.Contains(r.stdout, "m1") && strings.Contains(r.stdout, "m2") &&
			strings.Contains(r.stdout, "m3") && total == 256
	})

	t.Logf("%v: three nodes serve all shards", time.Since(begin).Round(time.Millisecond))
	// 4. Two devices of one user on two nodes.
	phoneArgs := strings.Fields(strings.ReplaceAll(subst(doc.code(t, "d2m-device --url ws://192.0.2.31:8765")), "KEY", chatKey))
	phone := startDeviceCLI(t, "phone", append(phoneArgs[1:], "--label", "phone")...)
	again := strings.Fields(phone.expect(`^another device of this user: d2m-device (.*)$`)[1])
	for i := range again {
		if again[i] == "--url" {
			again[i+1] = "ws://" + local["192.0.2.32:8765"]
		}
	}
	phone.expect(`^csp: logged in as ALICE001 `)
	desktop := startDeviceCLI(t, "desktop", append(again, "--label", "desktop")...)
	desktop.expect(`^csp: logged in as ALICE001 `)
	desktop.command("send BOB00001 hello")
	m := desktop.expect(`^sent message to BOB00001 id ([0-9a-f]{16}) .*: "hello"$`)
	phone.expect(`^reflected #\d+ from device 0x[0-9a-f]{16} .*: outgoing message to BOB00001 id ` + m[1] + `: "hello"$`)
	var forwards float64
	for i := 1; i <= 3; i++ {
		forwards += metricOf(t, local[fmt.Sprintf("192.0.2.3%d:8766", i)], strings.TrimSpace(token), `mediator_cluster_forwards_total{outcome="forwarded"}`)
	}
	if forwards < 1 {
		t.Errorf("no forward although the devices connected to two nodes")
	}
	desktop.quit()
	phone.quit()
	for _, n := range nodes {
		n.stop(t)
	}
}

// docText is the walk-through section of OPERATIONS.md.
type docText struct{ lines []string }

func walkthrough(t *testing.T) docText {
	t.Helper()
	b, err := os.ReadFile("../OPERATIONS.md")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "## From a bare Debian host to a three-node cluster")
	j := strings.Index(s, "### Failover of the database")
	if i < 0 || j < i {
		t.Fatal("OPERATIONS.md: no section \"From a bare Debian host to a three-node cluster\"")
	}
	return docText{strings.Split(s[i:j], "\n")}
}

// line returns the code line (indented four spaces) that starts with
// prefix.
func (d docText) line(t *testing.T, prefix string) string {
	t.Helper()
	for _, l := range d.lines {
		if c, ok := strings.CutPrefix(l, "    "); ok && strings.HasPrefix(c, prefix) {
			return c
		}
	}
	t.Fatalf("OPERATIONS.md: no command starting with %q in the walk-through", prefix)
	return ""
}

// code returns the code line, or the inline code span, that contains s.
func (d docText) code(t *testing.T, s string) string {
	t.Helper()
	for _, l := range d.lines {
		if c, ok := strings.CutPrefix(l, "    "); ok && strings.Contains(c, s) {
			return c
		}
	}
	text := strings.Join(d.lines, " ")
	for _, span := range strings.Split(text, "`")[1:] {
		if strings.Contains(span, s) {
			return span
		}
	}
	t.Fatalf("OPERATIONS.md: no code with %q in the walk-through", s)
	return ""
}

// block returns the code block whose first line starts with first.
func (d docText) block(t *testing.T, first string) []string {
	t.Helper()
	var out []string
	for _, l := range d.lines {
		c, ok := strings.CutPrefix(l, "    ")
		switch {
		case out == nil && ok && strings.HasPrefix(c, first):
			out = append(out, c)
		case out != nil && ok && c != "":
			out = append(out, c)
		case out != nil:
			return out
		}
	}
	if out == nil {
		t.Fatalf("OPERATIONS.md: no code block starting with %q", first)
	}
	return out
}

func newestPostgres(t *testing.T) string {
	t.Helper()
	entries, err := os.ReadDir("/usr/lib/postgresql")
	if err != nil {
		t.Fatal(err)
	}
	best := 0
	for _, e := range entries {
		if v, err := strconv.Atoi(e.Name()); err == nil && v > best {
			best = v
		}
	}
	if best == 0 {
		t.Fatal("no PostgreSQL under /usr/lib/postgresql")
	}
	return strconv.Itoa(best)
}

// copyDir copies the files of from into to (created), through edit.
func copyDir(t *testing.T, from, to string, edit func([]byte) []byte) {
	t.Helper()
	entries, err := os.ReadDir(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(to, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(from, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		info, _ := e.Info()
		if err := os.WriteFile(filepath.Join(to, e.Name()), edit(b), info.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
	}
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// bgProcess is a process the test started, its output collected.
type bgProcess struct{ out *lineLog }

// waitLine waits for a line starting with prefix and returns it.
func (p *bgProcess) waitLine(t *testing.T, prefix string) string {
	t.Helper()
	never := make(chan struct{})
	return p.out.wait(t, 30*time.Second, never, "^"+prefix+".*$")[0]
}

// startBackground runs name's binary bin with env until the test ends
// (SIGTERM, then SIGKILL after 10 s).
func startBackground(t *testing.T, name string, env []string, bin string, args ...string) *bgProcess {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	p := &bgProcess{out: &lineLog{changed: make(chan struct{})}}
	go p.out.collect(r)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("%s:\n%s", name, tailString(p.out.text(), 3000))
		}
	})
	return p
}

// buildBinary builds cmd/<name> into binDir once per test process.
func buildBinary(t *testing.T, name string) string {
	t.Helper()
	path := filepath.Join(binDir, name)
	if _, err := os.Stat(path); err == nil {
		return path
	}
	out, err := exec.Command("go", "build", "-o", path, "../cmd/"+name).CombinedOutput()
	if err != nil {
		t.Fatalf("go build ../cmd/%s: %v\n%s", name, err, out)
	}
	return path
}
