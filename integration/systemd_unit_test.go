package integration

import (
	"bufio"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The systemd unit as shipped, without systemd (no service manager runs
// here): the install sequence from the unit's header (the same lines as in
// OPERATIONS.md) into a scratch root, then the installed unit's ExecStart
// with the environment systemd would give it (Environment=, then the
// EnvironmentFile, which overrides; LoadCredential= copied into a
// credentials directory; %d and ${VAR} expanded). Only paths and addresses
// are substituted, through the environment file, as an operator edits it.

const unitFile = "../deploy/systemd/mediator.service"

// installSequence returns the install commands of the unit's header
// comment, and checks that OPERATIONS.md shows the same lines.
func installSequence(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	var cmds []string
	for _, l := range strings.Split(string(b), "\n") {
		c, ok := strings.CutPrefix(l, "#   ")
		if ok && (strings.HasPrefix(c, "install ") || strings.HasPrefix(c, "(umask ") || strings.HasPrefix(c, "systemctl ")) {
			cmds = append(cmds, c)
		}
	}
	if len(cmds) < 4 {
		t.Fatalf("install sequence in %s: %q", unitFile, cmds)
	}
	ops, err := os.ReadFile("../OPERATIONS.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cmds {
		if !strings.Contains(string(ops), "\n    "+c+"\n") {
			t.Errorf("OPERATIONS.md does not show the install line %q of %s", c, unitFile)
		}
	}
	return cmds
}

// installInto runs the install sequence with root standing for / and
// binDir's mediator for bin/mediator, from the repository's top directory.
// systemctl lines are left out: no service manager runs here.
func installInto(t *testing.T, root string, cmds []string) {
	t.Helper()
	for _, c := range cmds {
		if strings.HasPrefix(c, "systemctl ") {
			continue
		}
		c = strings.ReplaceAll(c, " /etc/", " "+root+"/etc/")
		c = strings.ReplaceAll(c, " /usr/local/", " "+root+"/usr/local/")
		c = strings.ReplaceAll(c, " bin/mediator ", " "+filepath.Join(binDir, "mediator")+" ")
		cmd := exec.Command("bash", "-euc", c)
		cmd.Dir = ".."
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", c, err, out)
		}
	}
}

// unitProcess is the installed unit's ExecStart, running.
type unitProcess struct {
	cmd     *exec.Cmd
	exited  chan struct{}
	mu      sync.Mutex
	lines   []string
	startup map[string]string // the "mediator listening" line's fields
}

// startUnit starts the unit installed under root as systemd would, and
// waits for its startup line.
func startUnit(t *testing.T, root string) *unitProcess {
	t.Helper()
	unit, err := os.ReadFile(filepath.Join(root, "etc/systemd/system/mediator.service"))
	if err != nil {
		t.Fatal(err)
	}
	creds := filepath.Join(root, "run/credentials/mediator.service")
	if err := os.MkdirAll(creds, 0o700); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	var order []string
	set := func(k, v string) {
		if _, ok := env[k]; !ok {
			order = append(order, k)
		}
		env[k] = v
	}
	spec := func(v string) string {
		v = strings.ReplaceAll(v, "%%", "\x00")
		v = strings.ReplaceAll(v, "%d", creds)
		if i := strings.IndexByte(v, '%'); i >= 0 {
			t.Fatalf("unit specifier %q in %q: not emulated here", v[i:i+2], v)
		}
		return strings.ReplaceAll(v, "\x00", "%")
	}
	var execStart string
	var envFiles []string
	section := ""
	for _, l := range strings.Split(string(unit), "\n") {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, "[") {
			section = l
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		if !ok || section != "[Service]" || strings.HasPrefix(l, "#") {
			continue
		}
		switch k {
		case "Environment":
			for _, a := range strings.Fields(v) {
				ek, ev, _ := strings.Cut(strings.Trim(a, `"`), "=")
				set(ek, spec(ev))
			}
		case "EnvironmentFile":
			envFiles = append(envFiles, v)
		case "LoadCredential":
			id, path, _ := strings.Cut(v, ":")
			b, err := os.ReadFile(filepath.Join(root, path))
			if err != nil {
				t.Fatalf("LoadCredential=%s: %v (systemd would refuse to start the unit)", v, err)
			}
			if err := os.WriteFile(filepath.Join(creds, id), b, 0o400); err != nil {
				t.Fatal(err)
			}
		case "StateDirectory":
			set("STATE_DIRECTORY", filepath.Join(root, "var/lib", v))
			os.MkdirAll(env["STATE_DIRECTORY"], 0o700)
		case "ExecStart":
			execStart = v
		}
	}
	// EnvironmentFile= after Environment=: the file wins.
	for _, f := range envFiles {
		optional := strings.HasPrefix(f, "-")
		b, err := os.ReadFile(filepath.Join(root, strings.TrimPrefix(f, "-")))
		if err != nil {
			if optional && os.IsNotExist(err) {
				continue
			}
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(b), "\n") {
			l = strings.TrimSpace(l)
			if l == "" || l[0] == '#' || l[0] == ';' {
				continue
			}
			k, v, ok := strings.Cut(l, "=")
			if !ok {
				t.Fatalf("%s: line %q is not KEY=value", f, l)
			}
			set(k, strings.Trim(v, `"'`))
		}
	}
	set("CREDENTIALS_DIRECTORY", creds)
	argv := strings.Fields(os.Expand(execStart, func(k string) string { return env[k] }))
	for _, a := range argv[1:] {
		if strings.HasPrefix(a, "-") {
			t.Fatalf("ExecStart=%s has flag %s: flags beat mediator.env", execStart, a)
		}
	}
	p := &unitProcess{exited: make(chan struct{})}
	p.cmd = exec.Command(filepath.Join(root, argv[0]), argv[1:]...)
	p.cmd.Env = []string{"PATH=/usr/bin:/bin"}
	for _, k := range order {
		p.cmd.Env = append(p.cmd.Env, k+"="+env[k])
	}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan string, 1)
	go func() {
		defer close(p.exited)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			p.mu.Unlock()
			if strings.Contains(sc.Text(), `"mediator listening"`) {
				ready <- sc.Text()
			}
		}
		io.Copy(io.Discard, stderr)
		p.cmd.Wait()
	}()
	t.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.exited
		if t.Failed() {
			t.Logf("unit under %s logged:\n%s", root, tailString(p.log(), 6000))
		}
	})
	select {
	case l := <-ready:
		json.Unmarshal([]byte(l), &p.startup)
	case <-p.exited:
		t.Fatalf("the unit's ExecStart exited: %v\n%s", p.cmd.ProcessState, p.log())
	case <-time.After(60 * time.Second):
		t.Fatalf("no startup line within 60 s\n%s", p.log())
	}
	return p
}

func (p *unitProcess) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}

// stop sends the unit's KillSignal (SIGTERM) and wants exit status 0
// within its TimeoutStopSec (30 s).
func (p *unitProcess) stop(t *testing.T) {
	t.Helper()
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("still running 30 s after SIGTERM (TimeoutStopSec)")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit status %d after SIGTERM", code)
	}
}

// phoneAndDesktop starts a phone (a new device group, ALICE001) and a
// desktop of the same user at url, pinning chatKey; the desktop logs in to
// the chat server and sends text to BOB00001, and the phone receives the
// reflection of that message.
func phoneAndDesktop(t *testing.T, url, chatKey, text string) (phone, desktop *deviceCLI) {
	t.Helper()
	phone = startDeviceCLI(t, "phone", "--url", url, "--new", "--identity", "ALICE001", "--chat-server-key", chatKey, "--label", "phone")
	again := strings.Fields(phone.expect(`^another device of this user: d2m-device (.*)$`)[1])
	phone.expect(`^csp: unblocked incoming messages`)
	desktop = startDeviceCLI(t, "desktop", append(again, "--label", "desktop")...)
	desktop.expect(`^csp: logged in as ALICE001 `)
	desktop.command("send BOB00001 " + text)
	m := desktop.expect(`^sent message to BOB00001 id ([0-9a-f]{16}) .*: "` + regexp.QuoteMeta(text) + `"$`)
	phone.expect(`^reflected #\d+ from device 0x[0-9a-f]{16} .*: outgoing message to BOB00001 id ` + m[1] + `: "` + regexp.QuoteMeta(text) + `"$`)
	return phone, desktop
}

// appendEnv adds settings to an installed mediator.env, as an operator
// edits it.
func appendEnv(t *testing.T, root string, kv ...string) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(root, "etc/mediator/mediator.env"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, s := range kv {
		if _, err := f.WriteString(s + "\n"); err != nil {
			t.Fatal(err)
		}
	}
}

// TestSystemdUnitSingleNode: the install sequence, then the unit with
// addresses and the state directory set in mediator.env only. The startup
// line shows the file's addresses (nothing in the unit overrides them); a
// phone and a desktop of one user log in to the stand-in chat server
// through it and reflect; the documented CLI line works with the
// installed token; SIGTERM ends it with status 0.
func TestSystemdUnitSingleNode(t *testing.T) {
	cmds := installSequence(t)
	root := t.TempDir()
	installInto(t, root, cmds)
	for path, mode := range map[string]os.FileMode{
		"usr/local/bin/mediator": 0o755, "etc/systemd/system/mediator.service": 0o644,
		"etc/mediator/mediator.env": 0o600, "etc/mediator/admin.token": 0o600,
	} {
		if st, err := os.Stat(filepath.Join(root, path)); err != nil || st.Mode().Perm() != mode {
			t.Fatalf("/%s after the install sequence: %v %v, want mode %v", path, st, err, mode)
		}
	}
	ports := freePorts(t, 2)
	data := filepath.Join(root, "var/lib/mediator")
	appendEnv(t, root, "MEDIATOR_LISTEN="+ports[0], "MEDIATOR_ADMIN_LISTEN="+ports[1], "MEDIATOR_DATA="+data)
	p := startUnit(t, root)
	if p.startup["devices"] != "ws://"+ports[0]+"/" || p.startup["admin"] != "http://"+ports[1]+"/" || p.startup["data"] != data {
		t.Fatalf("startup line %v: want the addresses and data directory of mediator.env", p.startup)
	}
	if !strings.HasPrefix(p.startup["store"], "bbolt "+data) {
		t.Fatalf("store %q", p.startup["store"])
	}
	key := regexp.MustCompile(`"public_key":"([0-9a-f]{64})"`).FindStringSubmatch(p.log())
	if key == nil {
		t.Fatalf("no stand-in key in the log")
	}
	phone, desktop := phoneAndDesktop(t, "ws://"+ports[0], key[1], "through the unit")

	// The CLI line of the unit's header, with the installed token file.
	r := runCLI(t, nil, "--admin", ports[1], "--admin-token-file", filepath.Join(root, "etc/mediator/admin.token"), "stats")
	if r.code != 0 || !strings.Contains(r.stdout, "authenticated") {
		t.Fatalf("mediator stats with the installed token: %d %q %q", r.code, r.stdout, r.stderr)
	}
	desktop.quit()
	phone.quit()
	p.stop(t)
}
