package cluster

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"d2m-mediator/chatproxy/chatstub"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/mediator/adminapi"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// mediatorBinary builds cmd/mediator once for the process tests.
func mediatorBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "d2m-cluster-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "mediator")
		out, err := exec.Command("go", "build", "-o", binPath, "d2m-mediator/cmd/mediator").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

var (
	sharedOnce        sync.Once
	sharedChat        string   // one stand-in chat server for every node
	sharedChatKey     [32]byte // its public key (CSP logins through the nodes)
	sharedTokenFile   string   // one admin token file for every node
	sharedPiecesError error
)

// sharedPieces starts the stand-in chat server and writes the admin token
// file that every node of every process test shares: cluster mode refuses
// to start without them (a node's own stand-in would have a key of its
// own). Both live as long as the test binary.
func sharedPieces(t *testing.T) (chat, tokenFile string) {
	t.Helper()
	sharedOnce.Do(func() {
		var key [32]byte
		rand.Read(key[:])
		stub, err := chatstub.New(chatstub.Config{SecretKey: &key, Logger: zerolog.Nop()})
		if err != nil {
			sharedPiecesError = err
			return
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			sharedPiecesError = err
			return
		}
		go stub.Serve(ln)
		sharedChat = ln.Addr().String()
		sharedChatKey = stub.PublicKey()
		dir, err := os.MkdirTemp("", "d2m-cluster-token-")
		if err != nil {
			sharedPiecesError = err
			return
		}
		sharedTokenFile = filepath.Join(dir, "admin.token")
		sharedPiecesError = os.WriteFile(sharedTokenFile, []byte(rand.Text()+"\n"), 0o600)
	})
	if sharedPiecesError != nil {
		t.Fatal(sharedPiecesError)
	}
	return sharedChat, sharedTokenFile
}

// process is one `mediator serve --cluster-etcd …` process.
type process struct {
	id, dir, prefix string
	cmd             *exec.Cmd
	url, admin      string
	token           string
	done            chan struct{}

	mu    sync.Mutex
	lines []string // the log
}

// startProcess starts `mediator serve` in cluster mode with extra flags
// (--store postgres://… for a shared store).
func startProcess(t *testing.T, id, prefix, dir string, extra ...string) *process {
	t.Helper()
	p := &process{id: id, dir: dir, prefix: prefix, done: make(chan struct{})}
	chat, tokenFile := sharedPieces(t)
	args := []string{"serve", "--data", dir, "--listen", "127.0.0.1:0",
		"--chat-server", chat, "--admin-token-file", tokenFile,
		"--admin-listen", "127.0.0.1:0", "--log-format", "json",
		"--cluster-etcd", strings.Join(shared.clients, ","), "--node-id", id,
		"--cluster-prefix", prefix, "--cluster-lease-ttl", ttl.String()}
	cmd := exec.Command(mediatorBinary(t), append(args, extra...)...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.cmd = cmd
	ready := make(chan string, 1)
	go func() {
		defer close(p.done)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			l := sc.Text()
			if strings.Contains(l, `"mediator listening"`) {
				select {
				case ready <- l:
				default:
				}
			}
			p.mu.Lock()
			p.lines = append(p.lines, l)
			p.mu.Unlock()
		}
		cmd.Wait()
	}()
	t.Cleanup(func() { p.kill() })
	select {
	case l := <-ready:
		var v struct{ Devices, Admin string }
		json.Unmarshal([]byte(l), &v)
		p.url, p.admin = strings.TrimSuffix(v.Devices, "/"), strings.TrimSuffix(v.Admin, "/")
	case <-p.done:
		t.Fatalf("%s exited before listening", id)
	case <-time.After(30 * time.Second):
		t.Fatalf("%s did not start", id)
	}
	tok, err := os.ReadFile(tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	p.token = strings.TrimSpace(string(tok))
	return p
}

// logLines returns the process's log lines that contain s.
func (p *process) logLines(s string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, l := range p.lines {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}

func (p *process) kill() {
	if p.cmd.ProcessState == nil {
		p.cmd.Process.Signal(syscall.SIGKILL)
	}
	<-p.done
}

func (p *process) shards(t *testing.T) adminapi.ClusterShards {
	t.Helper()
	req, _ := http.NewRequest("GET", p.admin+"/api/v1/cluster/shards", nil)
	req.Header.Set("Authorization", "Bearer "+p.token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var cs adminapi.ClusterShards
	if err := json.NewDecoder(resp.Body).Decode(&cs); err != nil {
		t.Fatal(err)
	}
	return cs
}

func (p *process) ownerOf(t *testing.T, shard byte) string {
	return p.shards(t).Shards[shard].Owner
}

// startProcesses starts processes p1 and p2 of one cluster and waits until
// every shard is served.
func startProcesses(t *testing.T) (*process, *process) {
	t.Helper()
	prefix := fmt.Sprintf("/t/%s/%d/", t.Name(), clusterSeq.Add(1))
	base := t.TempDir()
	p1 := startProcess(t, "p1", prefix, filepath.Join(base, "p1"))
	p2 := startProcess(t, "p2", prefix, filepath.Join(base, "p2"))
	waitUntil(t, 30*time.Second, "every shard served", func() bool {
		for _, s := range p1.shards(t).Shards {
			if s.Owner == "" {
				return false
			}
		}
		return true
	})
	return p1, p2
}

// TestProcessSIGKILL: real `mediator serve` processes in cluster mode.
// SIGKILL one: its shards answer 503 at the other node, whose own shards
// keep working; restarted on the same data, it serves them again with the
// reflections queued before the kill.
func TestProcessSIGKILL(t *testing.T) {
	p1, p2 := startProcesses(t)
	var onP2, onP1 d2d.Keys
	for found := 0; found != 3; {
		k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		switch p1.ownerOf(t, k.DeviceGroupID()[0]) {
		case "p2":
			onP2, found = k, found|1
		case "p1":
			onP1, found = k, found|2
		}
	}
	// Device 1 (through p1, forwarded to p2) queues a reflection for the
	// offline device 2.
	c2, err := dialDevice(t, p1.url, onP2, 2)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, c2, d2m.TypeReflectionQueueDry)
	c2.Close()
	c1, err := dialDevice(t, p1.url, onP2, 1)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, c1, d2m.TypeReflectionQueueDry)
	if _, err := c1.Reflect(context.Background(), []byte("before-the-kill"), 0); err != nil {
		t.Fatal(err)
	}
	recvType(t, c1, d2m.TypeReflectAck)

	p2.kill()
	shard := onP2.DeviceGroupID()[0]
	waitUntil(t, 10*time.Second, "p2's shard unserved", func() bool { return p1.ownerOf(t, shard) == "" })
	if _, err := dialDevice(t, p1.url, onP2, 2); err == nil || !strings.Contains(err.Error(), "503") {
		t.Fatalf("device of the killed node's shard: %v, want HTTP 503", err)
	}
	c, err := dialDevice(t, p1.url, onP1, 1)
	if err != nil {
		t.Fatalf("a shard of the live node: %v", err)
	}
	recvType(t, c, d2m.TypeReflectionQueueDry)

	startProcess(t, "p2", p2.prefix, p2.dir)
	waitUntil(t, 30*time.Second, "p2 serves its shard again", func() bool { return p1.ownerOf(t, shard) == "p2" })
	c2, err = dialDevice(t, p1.url, onP2, 2)
	if err != nil {
		t.Fatal(err)
	}
	r, _ := d2m.DecodeReflected(recvType(t, c2, d2m.TypeReflected).Payload)
	if string(r.Envelope) != "before-the-kill" {
		t.Fatalf("after the restart: %q", r.Envelope)
	}
}

// TestProcessSIGSTOP: a real `mediator serve` process stopped with SIGSTOP
// past its lease TTL, then continued. A reflection its device sent while
// it was stopped (the bytes wait in the kernel) gets no ReflectAck after
// SIGCONT, only a 1001 close. Two mechanisms race here: the fence (MayAck
// false at once after SIGCONT) and the lease-loss event that closes the
// shard's devices; TestMediatorFenceWithholdsAcks proves the fence alone
// (it fails with the fence ignored, this test does not).
func TestProcessSIGSTOP(t *testing.T) {
	p1, p2 := startProcesses(t)
	var k d2d.Keys
	for {
		k = d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		if p1.ownerOf(t, k.DeviceGroupID()[0]) == "p2" {
			break
		}
	}
	c, err := dialDevice(t, p2.url, k, 1) // directly to the owner
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, c, d2m.TypeReflectionQueueDry)
	id, _ := c.Reflect(context.Background(), []byte("before-the-stop"), 0)
	if a, _ := d2m.DecodeReflectAck(recvType(t, c, d2m.TypeReflectAck).Payload); a.ID != id {
		t.Fatalf("ack %d, want %d", a.ID, id)
	}

	if err := p2.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// kill returns before every thread has stopped: a reflection the node
	// still handles in that moment is a legitimate ack of the owner.
	waitUntil(t, 5*time.Second, "every thread of p2 stopped", func() bool { return allThreadsStopped(t, p2.cmd.Process.Pid) })
	stopped := time.Now()
	if _, err := c.Reflect(context.Background(), []byte("during-the-stop"), 0); err != nil {
		t.Fatal(err)
	}
	shard := k.DeviceGroupID()[0]
	waitUntil(t, 10*time.Second, "the stopped node's lease to expire", func() bool { return p1.ownerOf(t, shard) == "" })
	time.Sleep(ttl - time.Since(stopped)%ttl) // well past the TTL (the stop's length, not an order)
	if err := p2.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		m, err := c.Recv(ctx)
		if err != nil {
			break
		}
		if m.Type == d2m.TypeReflectAck {
			t.Fatal("ReflectAck after SIGCONT for a reflection sent while the node was stopped past its TTL")
		}
	}
	if code := c.CloseCode(context.Background()); code != int(d2m.CloseGoingAway) {
		t.Fatalf("close %d, want 1001", code)
	}
	// The node comes back: it rejoins under a new lease and serves the
	// shard again.
	waitUntil(t, 30*time.Second, "p2 serves its shard again", func() bool { return p1.ownerOf(t, shard) == "p2" })
	c2, err := dialDevice(t, p1.url, k, 2)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, c2, d2m.TypeReflectionQueueDry)
}
