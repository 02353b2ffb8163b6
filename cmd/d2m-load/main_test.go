package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"net"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"d2m-mediator/chatproxy/chatstub"
	"d2m-mediator/mediator"
	"d2m-mediator/mediator/adminapi"
	"d2m-mediator/reflection"
)

func TestHistQuantiles(t *testing.T) {
	h := newHist("x")
	for i := 1; i <= 1000; i++ {
		h.Record(time.Duration(i) * time.Microsecond)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Microsecond}, {0.9, 900 * time.Microsecond}, {0.99, 990 * time.Microsecond}, {1, time.Millisecond}} {
		got := h.Quantile(c.q)
		if d := float64(got-c.want) / float64(c.want); d < -0.02 || d > 0.02 {
			t.Errorf("q%.2f = %v, want %v ±2%%", c.q, got, c.want)
		}
	}
	if s := h.Summary(); s.MaxMs != 1 || s.Count != 1000 {
		t.Errorf("summary %+v", s)
	}
	for v := uint64(0); v < 1<<20; v = v*3/2 + 1 {
		lo, w := bucketRange(bucketOf(v))
		if v < lo || v >= lo+w {
			t.Fatalf("%d not in bucket [%d, %d)", v, lo, lo+w)
		}
	}
}

func TestCheckLoopback(t *testing.T) {
	for _, ok := range []string{"ws://127.0.0.1:8765", "ws://127.1.2.3:1/", "ws://[::1]:80", "ws://localhost:8765", "http://127.0.0.1:8766"} {
		if err := checkLoopback(ok); err != nil {
			t.Errorf("%s: %v", ok, err)
		}
	}
	for _, bad := range []string{"ws://10.0.0.1:8765", "ws://example.com", "ws://0.0.0.0:1", "ws://[::]:1", "wss://192.168.1.1", "ws://"} {
		if err := checkLoopback(bad); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
}

func TestFlags(t *testing.T) {
	var sink bytes.Buffer
	for _, bad := range [][]string{
		{},
		{"--scenario", "nope"},
		{"--scenario", "reflect", "--url", "ws://8.8.8.8:80"},
		{"--scenario", "reflect", "--duration", "11m"},
		{"--scenario", "reflect", "--devices", "1"},
		{"--scenario", "idle", "--devices", "200000"},
		{"--scenario", "csp"},
	} {
		if _, err := parseFlags(bad, &sink); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	o, err := parseFlags([]string{"--scenario", "storm"}, &sink)
	if err != nil || o.devices != 8000 || o.duration != 10*time.Second {
		t.Fatalf("storm defaults: %+v %v", o, err)
	}
}

func TestRaiseNoFile(t *testing.T) {
	if _, err := raiseNoFile(10); err != nil {
		t.Fatal(err)
	}
	if _, err := raiseNoFile(1 << 40); err == nil || !strings.Contains(err.Error(), "file descriptors") {
		t.Fatalf("want a clear error, got %v", err)
	}
}

func TestParseProm(t *testing.T) {
	m := parseProm("# HELP x\nprocess_resident_memory_bytes 1.5e+07\nmediator_handshakes_total{outcome=\"ok\"} 12\n")
	if m["process_resident_memory_bytes"] != 1.5e7 || m[`mediator_handshakes_total{outcome="ok"}`] != 12 {
		t.Fatalf("%v", m)
	}
}

// testServer runs a mediator in this process on loopback, as cmd/mediator
// does, with the in-process stand-in chat server.
type testServer struct {
	url, admin, tokenFile, chatKey string
	// serverGroups, with chatListeners > 1: the chat server's ports, to
	// be used as server groups (the mediator dials 127.0.0.1:{group}).
	serverGroups []string
	accepted     []*atomic.Int64 // connections each chat listener accepted
}

func startTestServer(t *testing.T) *testServer { return startTestServerChat(t, 1) }

// startTestServerChat starts the stand-in chat server on chatListeners
// loopback ports; with more than one, the mediator's --chat-server is the
// template 127.0.0.1:{group}, so a device's server group picks the port.
func startTestServerChat(t *testing.T, chatListeners int) *testServer {
	t.Helper()
	dir := t.TempDir()
	var srv *mediator.Server
	store, err := reflection.Open(filepath.Join(dir, "mediator.db"), reflection.Options{
		OnCommit: func(n int, took time.Duration, err error) {
			if srv != nil {
				srv.ObserveCommit(n, took, err)
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	key, err := chatstub.LoadOrCreateKey(filepath.Join(dir, "chatstub.key"))
	if err != nil {
		t.Fatal(err)
	}
	stub, err := chatstub.New(chatstub.Config{SecretKey: key, Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	ts := &testServer{}
	chatServer := ""
	var serving sync.WaitGroup
	for range chatListeners {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		cl := &countingListener{Listener: ln}
		ts.accepted = append(ts.accepted, &cl.n)
		serving.Add(1)
		go func() { defer serving.Done(); stub.Serve(cl) }()
		chatServer = ln.Addr().String()
		ts.serverGroups = append(ts.serverGroups, strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
	}
	if chatListeners > 1 {
		chatServer = "127.0.0.1:{group}"
	}
	srv, err = mediator.New(mediator.Config{ChatServer: chatServer}, store, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(dir, "admin.token")
	token, err := adminapi.LoadOrCreateToken(tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	dev := httptest.NewServer(srv.Handler())
	adm := httptest.NewServer(adminapi.Handler(srv, token, zerolog.Nop()))
	srv.SetReady(true)
	t.Cleanup(func() {
		dev.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		adm.Close()
		stub.Close()
		serving.Wait()
		store.Close()
	})
	pub := stub.PublicKey()
	ts.url, ts.admin, ts.tokenFile, ts.chatKey = "ws"+strings.TrimPrefix(dev.URL, "http"), adm.URL, tokenFile, hex.EncodeToString(pub[:])
	return ts
}

// countingListener counts accepted connections.
type countingListener struct {
	net.Listener
	n atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// TestScenarios runs every scenario briefly against a real server and
// checks the JSON result and the plot.
func TestScenarios(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a server and runs every scenario")
	}
	s := startTestServer(t)
	probe := []string{"--admin", s.admin, "--admin-token-file", s.tokenFile}
	cases := []struct {
		name string
		args []string
		want string // a metric that must be positive
	}{
		{"reflect", []string{"--groups", "4", "--devices", "3", "--duration", "1500ms"}, "reflects/s (window mean)"},
		{"reflect-rate", []string{"--scenario", "reflect", "--groups", "4", "--devices", "2", "--rate", "200", "--duration", "1500ms"}, "reflects/s (window mean)"},
		{"idle", []string{"--devices", "30", "--duration", "1s", "--keepalive", "200ms"}, "devices connected"},
		{"handshake", []string{"--concurrency", "4", "--duration", "1s"}, "authenticated handshakes"},
		{"storm", []string{"--devices", "20", "--queued", "5", "--duration", "20s"}, "devices dry (backlog fully served)"},
		{"csp", []string{"--devices", "4", "--duration", "1500ms", "--chat-server-key", s.chatKey}, "messages received end-to-end in window"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			args := append([]string{"--url", s.url, "--json", "--quiet", "--plot", filepath.Join(t.TempDir(), "p.svg")}, probe...)
			if !strings.HasPrefix(c.args[0], "--scenario") {
				args = append(args, "--scenario", c.name)
			}
			args = append(args, c.args...)
			var out, errOut bytes.Buffer
			if code := run(args, &out, &errOut); code != 0 {
				t.Fatalf("exit %d:\n%s", code, errOut.String())
			}
			var res result
			if err := json.Unmarshal(out.Bytes(), &res); err != nil {
				t.Fatalf("json: %v\n%s", err, out.String())
			}
			if len(res.Errors) > 0 {
				t.Errorf("errors: %v", res.Errors)
			}
			found := false
			for _, m := range res.Metrics {
				if m.Name == c.want {
					found = true
					if m.Value <= 0 {
						t.Errorf("%s = %v", m.Name, m.Value)
					}
				}
			}
			if !found {
				t.Errorf("no metric %q in %+v", c.want, res.Metrics)
			}
			if !strings.Contains(errOut.String(), "plot written") {
				t.Errorf("no plot:\n%s", errOut.String())
			}
		})
	}
	if b, err := os.ReadFile(s.tokenFile); err != nil || len(b) == 0 {
		t.Fatal("token file")
	}
}
