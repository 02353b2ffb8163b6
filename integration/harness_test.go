package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/internal/pgtest"
	"d2m-mediator/mediator/mediatortest"
	"d2m-mediator/proto/d2mpb"
)

var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "d2m-integration-")
	if err != nil {
		panic(err)
	}
	binDir = dir
	args := []string{"build", "-o", dir}
	if raceEnabled {
		args = append(args, "-race")
	}
	args = append(args, "../cmd/mediator")
	cmd := exec.Command("go", args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building cmd/mediator:", err)
		os.Exit(2)
	}
	code := m.Run()
	pgtest.StopShared()
	os.RemoveAll(dir)
	if code == 0 {
		// In-process servers (mediatortest) are shut down by their tests'
		// cleanups; none of their goroutines may be left.
		if err := mediatortest.CheckNoServerGoroutines(5 * time.Second); err != nil {
			fmt.Fprintln(os.Stderr, "goroutine leak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// server is one running mediator process.
type server struct {
	t       testing.TB
	dataDir string
	args    []string
	cmd     *exec.Cmd
	wsURL   string
	admin   string
	logMu   sync.Mutex
	logs    bytes.Buffer
	exited  chan struct{}
}

// startServer runs `mediator serve` on loopback ports with a fresh data
// directory and waits for its startup line.
func startServer(t testing.TB, extra ...string) *server {
	t.Helper()
	return startServerAt(t, t.TempDir(), extra...)
}

// startServerAt is startServer with the data directory dataDir.
func startServerAt(t testing.TB, dataDir string, extra ...string) *server {
	t.Helper()
	s := &server{t: t, dataDir: dataDir}
	s.args = extra
	t.Cleanup(func() {
		if t.Failed() {
			logs := s.Logs()
			if len(logs) > 20000 {
				logs = "…" + logs[len(logs)-20000:]
			}
			t.Logf("server logs:\n%s", logs)
		}
	})
	s.start()
	t.Cleanup(func() { s.kill() })
	return s
}

func (s *server) start() {
	t := s.t
	t.Helper()
	args := append([]string{"serve",
		"--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
		"--data", s.dataDir, "--log-format", "json", "--log-level", "debug",
	}, s.args...)
	cmd := exec.Command(filepath.Join(binDir, "mediator"), args...)
	cmd.Env = append(os.Environ(), "GORACE=halt_on_error=1")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s.cmd = cmd
	s.exited = make(chan struct{})
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			s.logMu.Lock()
			s.logs.WriteString(line + "\n")
			s.logMu.Unlock()
			if strings.Contains(line, `"mediator listening"`) {
				select {
				case ready <- line:
				default:
				}
			}
		}
		io.Copy(io.Discard, stderr)
	}()
	go func() { cmd.Wait(); close(s.exited) }()
	select {
	case line := <-ready:
		var v struct{ Devices, Admin string }
		if err := json.Unmarshal([]byte(line), &v); err != nil {
			t.Fatalf("startup line %q: %v", line, err)
		}
		s.wsURL = strings.TrimSuffix(v.Devices, "/")
		s.admin = strings.TrimSuffix(v.Admin, "/")
	case <-s.exited:
		t.Fatalf("server exited during start:\n%s", s.Logs())
	case <-time.After(30 * time.Second):
		t.Fatalf("server did not start:\n%s", s.Logs())
	}
}

// Logs returns everything the server logged so far.
func (s *server) Logs() string {
	s.logMu.Lock()
	defer s.logMu.Unlock()
	return s.logs.String()
}

// kill ends the process with SIGKILL (no cleanup at all).
func (s *server) kill() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGKILL)
	<-s.exited
	s.checkRace()
}

// stop ends the process with SIGTERM and waits for a clean exit.
func (s *server) stop() {
	s.t.Helper()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(30 * time.Second):
		s.t.Fatalf("server did not stop on SIGTERM:\n%s", s.Logs())
	}
	if code := s.cmd.ProcessState.ExitCode(); code != 0 {
		s.t.Fatalf("server exit code %d:\n%s", code, s.Logs())
	}
	s.checkRace()
}

func (s *server) checkRace() {
	if strings.Contains(s.Logs(), "WARNING: DATA RACE") {
		s.t.Errorf("data race in the server:\n%s", s.Logs())
	}
}

// restart kills the process with SIGKILL and starts it again on the same
// data directory (new ports).
func (s *server) restart() {
	s.kill()
	s.start()
}

func (s *server) adminToken() string {
	b, err := os.ReadFile(filepath.Join(s.dataDir, "admin.token"))
	if err != nil {
		s.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func (s *server) adminGet(path string) (int, []byte) {
	s.t.Helper()
	req, _ := http.NewRequest("GET", s.admin+path, nil)
	req.Header.Set("Authorization", "Bearer "+s.adminToken())
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// group is one device group's keys.
type group struct {
	dgk  d2d.DeviceGroupKey
	keys d2d.Keys
}

func newGroup() *group {
	dgk := d2d.NewDeviceGroupKey()
	return &group{dgk: dgk, keys: d2d.DeriveKeys(dgk)}
}

func (g *group) config(s *server, deviceID uint64) d2mclient.Config {
	return d2mclient.Config{
		URL: s.wsURL, Keys: g.keys, DeviceID: deviceID,
		ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT,
	}
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// connect authenticates a device and fails the test otherwise.
func connect(t testing.TB, s *server, cfg d2mclient.Config) *d2mclient.Client {
	t.Helper()
	c, err := d2mclient.Dial(ctxT(t, 10*time.Second), cfg)
	if err != nil {
		t.Fatalf("device %d: %v", cfg.DeviceID, err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return c
}

// connectReady authenticates and consumes (and acks) the backlog up to
// ReflectionQueueDry, returning the Reflected messages seen before it.
func connectReady(t testing.TB, s *server, cfg d2mclient.Config) (*d2mclient.Client, []d2m.Reflected) {
	t.Helper()
	c := connect(t, s, cfg)
	var backlog []d2m.Reflected
	for {
		m := recv(t, c.Conn)
		switch m.Type {
		case d2m.TypeReflected:
			r, err := d2m.DecodeReflected(m.Payload)
			if err != nil {
				t.Fatal(err)
			}
			backlog = append(backlog, r)
			// Ack as real clients do: the server keeps only a window of
			// unacked entries in flight.
			if err := c.AckReflected(ctxT(t, time.Second), r.ID); err != nil {
				t.Fatal(err)
			}
		case d2m.TypeReflectionQueueDry:
			return c, backlog
		default:
			t.Fatalf("device %d: unexpected %v before ReflectionQueueDry", cfg.DeviceID, m.Type)
		}
	}
}

// expectRejected dials and expects the server to close the connection
// with code during the handshake.
func expectRejected(t testing.TB, cfg d2mclient.Config, code d2m.CloseCode) {
	t.Helper()
	c, err := d2mclient.Dial(ctxT(t, 10*time.Second), cfg)
	if err == nil {
		c.CloseNow()
		t.Fatalf("device %d: handshake succeeded, want close %d", cfg.DeviceID, code)
	}
	if c == nil {
		t.Fatalf("device %d: dial failed: %v", cfg.DeviceID, err)
	}
	if got := c.CloseCode(ctxT(t, 15*time.Second)); got != int(code) {
		t.Fatalf("device %d: close code %d, want %d (err %v)", cfg.DeviceID, got, code, err)
	}
}

// recv returns the next message, skipping RolePromotedToLeader, which any
// first device of a group receives; leader tests use recvAny.
func recv(t testing.TB, c *d2mclient.Conn) d2mclient.Message {
	t.Helper()
	for {
		m := recvAny(t, c)
		if m.Type != d2m.TypeRolePromotedToLeader {
			return m
		}
	}
}

func recvAny(t testing.TB, c *d2mclient.Conn) d2mclient.Message {
	t.Helper()
	m, err := c.Recv(ctxT(t, 10*time.Second))
	if err != nil {
		t.Fatalf("recv: %v", err)
	}
	return m
}

// recvType receives the next message and requires its type.
func recvType(t testing.TB, c *d2mclient.Conn, want d2m.PayloadType) []byte {
	t.Helper()
	m := recv(t, c)
	if m.Type != want {
		t.Fatalf("got %v, want %v", m.Type, want)
	}
	return m.Payload
}

// expectClose waits for the server to close c with code.
func expectClose(t testing.TB, c *d2mclient.Conn, code d2m.CloseCode) {
	t.Helper()
	if got := c.CloseCode(ctxT(t, 20*time.Second)); got != int(code) {
		t.Fatalf("close code %d, want %d (err %v)", got, code, c.Err())
	}
}

// expectSilence asserts nothing arrives for d.
func expectSilence(t testing.TB, c *d2mclient.Conn, d time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	for {
		m, err := c.Recv(ctx)
		if err != nil {
			return
		}
		if m.Type != d2m.TypeRolePromotedToLeader {
			t.Fatalf("unexpected %v", m.Type)
		}
	}
}
