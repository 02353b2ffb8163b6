package integration

import (
	"bufio"
	"encoding/hex"
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

	"d2m-mediator/chatproxy/cspclient"
	"d2m-mediator/d2d"
)

// The d2m-device simulator (cmd/d2m-device) driven through its stdin and
// stdout, as a person would use it: two devices of identity X, one of Y,
// all through the mediator and its stand-in chat server.

var (
	deviceCLIOnce sync.Once
	deviceCLIPath string
	deviceCLIErr  error
)

// buildDeviceCLI builds cmd/d2m-device once per test process (with -race
// when the tests run with it). It goes into binDir, next to the mediator:
// that directory lives until TestMain returns, so the once-built binary
// stays valid for every test and for -count=N.
func buildDeviceCLI(t testing.TB) string {
	t.Helper()
	deviceCLIOnce.Do(func() {
		args := []string{"build", "-o", filepath.Join(binDir, "d2m-device")}
		if raceEnabled {
			args = append(args, "-race")
		}
		out, err := exec.Command("go", append(args, "../cmd/d2m-device")...).CombinedOutput()
		if err != nil {
			deviceCLIErr = err
			t.Logf("go build ../cmd/d2m-device:\n%s", out)
			return
		}
		deviceCLIPath = filepath.Join(binDir, "d2m-device")
	})
	if deviceCLIErr != nil {
		t.Fatalf("building cmd/d2m-device: %v", deviceCLIErr)
	}
	return deviceCLIPath
}

// deviceCLI is one running d2m-device process. Its stdout and stderr are
// collected line by line.
type deviceCLI struct {
	t      testing.TB
	name   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	exited chan struct{}

	mu      sync.Mutex
	lines   []string
	base    int           // expect searches lines[base:]; command moves it
	changed chan struct{} // closed and replaced on every new line and at EOF
	eof     bool
}

func startDeviceCLI(t testing.TB, name string, args ...string) *deviceCLI {
	t.Helper()
	return startDeviceBinary(t, name, buildDeviceCLI(t), args...)
}

// startDeviceBinary runs the d2m-device binary bin (one that a script or
// make built) as startDeviceCLI does.
func startDeviceBinary(t testing.TB, name, bin string, args ...string) *deviceCLI {
	t.Helper()
	p := &deviceCLI{t: t, name: name, changed: make(chan struct{}), exited: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Env = append(os.Environ(), "GORACE=halt_on_error=1")
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Stdout, p.cmd.Stderr = w, w
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	go p.collect(r)
	go func() { p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			p.cmd.Process.Signal(syscall.SIGKILL)
			<-p.exited
		}
		if t.Failed() {
			t.Logf("output of device %s:\n%s", p.name, p.output())
		}
		if strings.Contains(p.output(), "WARNING: DATA RACE") {
			t.Errorf("data race in device %s", p.name)
		}
	})
	return p
}

func (p *deviceCLI) collect(r *os.File) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		p.mu.Lock()
		p.lines = append(p.lines, sc.Text())
		close(p.changed)
		p.changed = make(chan struct{})
		p.mu.Unlock()
	}
	p.mu.Lock()
	p.eof = true
	close(p.changed)
	p.changed = make(chan struct{})
	p.mu.Unlock()
}

func (p *deviceCLI) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.lines, "\n")
}

// command types one line; later expects look only at output from now on.
func (p *deviceCLI) command(line string) {
	p.t.Helper()
	p.mu.Lock()
	p.base = len(p.lines)
	p.mu.Unlock()
	if _, err := io.WriteString(p.stdin, line+"\n"); err != nil {
		p.t.Fatalf("device %s: writing %q: %v", p.name, line, err)
	}
}

// expect waits until a line matching pattern is printed (since the last
// command) and returns its submatches.
func (p *deviceCLI) expect(pattern string) []string {
	p.t.Helper()
	rx := regexp.MustCompile(pattern)
	deadline := time.NewTimer(20 * time.Second)
	defer deadline.Stop()
	for {
		p.mu.Lock()
		for _, l := range p.lines[p.base:] {
			if m := rx.FindStringSubmatch(l); m != nil {
				p.mu.Unlock()
				return m
			}
		}
		ch, eof := p.changed, p.eof
		p.mu.Unlock()
		if eof {
			p.t.Fatalf("device %s exited without printing a line matching %q", p.name, pattern)
		}
		select {
		case <-ch:
		case <-deadline.C:
			p.t.Fatalf("device %s: no line matching %q within 20s", p.name, pattern)
		}
	}
}

// quit types quit and requires exit status 0.
func (p *deviceCLI) quit() {
	p.t.Helper()
	p.command("quit")
	select {
	case <-p.exited:
	case <-time.After(20 * time.Second):
		p.t.Fatalf("device %s did not exit after quit", p.name)
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		p.t.Fatalf("device %s: exit status %d after quit", p.name, code)
	}
	p.expect(`^closed$`)
}

func TestDeviceCLIEndToEnd(t *testing.T) {
	s := startServer(t) // no --chat-server: the stand-in runs
	pub := stubPublicKey(t, s)
	chatKey := hex.EncodeToString(pub[:])
	groupX := d2d.NewDeviceGroupKey().Hex()
	x, err := cspclient.NewIdentity("XXXXXXXX")
	if err != nil {
		t.Fatal(err)
	}
	identityKeyX := hex.EncodeToString(x.SecretKey[:])
	deviceX := func(name, id, label string) *deviceCLI {
		return startDeviceCLI(t, name, "--url", s.wsURL, "--key", groupX, "--device", id,
			"--identity", "XXXXXXXX", "--identity-key", identityKeyX, "--chat-server-key", chatKey, "--label", label)
	}

	// X1 first: it becomes leader and unblocks; X2 joins as a sibling.
	x1 := deviceX("X1", "0x0000000000000001", "phone X1")
	x1.expect(`^server info: slot state NEW, max slots \d+, reflection queue length 0`)
	x1.expect(`^promoted to leader$`)
	x1.expect(`^csp: unblocked incoming messages`)
	x2 := deviceX("X2", "0x2", "desktop X2")
	x2.expect(`^queue dry`)
	x2.expect(`^csp: logged in as XXXXXXXX`)
	// Identity Y: a new group made up by the tool.
	y := startDeviceCLI(t, "Y", "--url", s.wsURL, "--new", "--identity", "YYYYYYYY", "--chat-server-key", chatKey)
	y.expect(`^new device group key: [0-9a-f]{64}$`)
	y.expect(`^new identity secret key: [0-9a-f]{64}$`)
	y.expect(`^csp: unblocked incoming messages`)

	// Y → X: the leader prints it, reflects it, acks it; the sibling prints
	// the reflection decrypted.
	y.command("send XXXXXXXX hello")
	m := y.expect(`^sent message to XXXXXXXX id ([0-9a-f]{16}) .*: "hello"$`)
	id := m[1]
	y.expect(`^chat server acked message to XXXXXXXX id ` + id + `$`)
	x1.expect(`^incoming message from YYYYYYYY id ` + id + ` sent .*: "hello"$`)
	x1.expect(`^reflected incoming message from YYYYYYYY id ` + id + ` .*acked to the chat server$`)
	x2.expect(`^reflected #\d+ from device 0x0000000000000001 .*: incoming message from YYYYYYYY id ` + id + `: "hello"$`)

	// X2 (not leader) → Y: reflected first, so X1 sees it; Y's leader gets it.
	x2.command("send YYYYYYYY hi  there")
	m = x2.expect(`^sent message to YYYYYYYY id ([0-9a-f]{16}) .*: "hi  there"$`)
	x1.expect(`^reflected #\d+ from device 0x0000000000000002 .*: outgoing message to YYYYYYYY id ` + m[1] + `: "hi  there"$`)
	y.expect(`^incoming message from XXXXXXXX id ` + m[1] + ` .*: "hi  there"$`)
	x1.expect(`^reflected #\d+ from device 0x0000000000000002 .*: outgoing message update: message to YYYYYYYY id ` + m[1] + ` sent$`)

	// devices lists both devices of X, decrypted, with this device marked.
	x1.command("devices")
	x1.expect(`^2 device\(s\):$`)
	x1.expect(`^\s+0x0000000000000001\s+phone X1\s+DESKTOP .*connected since .*PERSISTENT\s+\(this device\)$`)
	x1.expect(`^\s+0x0000000000000002\s+desktop X2\s+DESKTOP .*connected since .*PERSISTENT$`)

	for _, p := range []*deviceCLI{x2, x1, y} {
		p.quit()
	}
}
