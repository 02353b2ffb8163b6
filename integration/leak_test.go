package integration

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
	dto "github.com/prometheus/client_model/go"
	"github.com/rs/zerolog"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/mediator"
	"d2m-mediator/mediator/mediatortest"
	"d2m-mediator/proto/d2mpb"
)

// Resource bounds, in-process (mediatortest) so that the test can read the
// process's goroutine count and heap.

// inProcess starts an in-process server; its bbolt file goes to tmpfs when
// there is one (these tests are about memory and goroutines, not fsync).
func inProcess(t *testing.T, cfg mediator.Config, opts ...mediatortest.Option) *mediatortest.Server {
	t.Helper()
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		if dir, err := os.MkdirTemp("/dev/shm", "mediator-test-"); err == nil {
			t.Cleanup(func() { os.RemoveAll(dir) })
			opts = append([]mediatortest.Option{mediatortest.WithDataDir(dir)}, opts...)
		}
	}
	return mediatortest.NewServer(t, cfg, opts...)
}

func inProcessDevice(url string, keys d2d.Keys, id uint64) d2mclient.Config {
	return d2mclient.Config{URL: url, Keys: keys, DeviceID: id, ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT}
}

// gauge reads a gauge of the server's registry (0 if absent).
func gauge(t *testing.T, srv *mediatortest.Server, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := srv.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if labelsMatch(m, labels) {
				return m.GetGauge().GetValue()
			}
		}
	}
	return 0
}

func counter(t *testing.T, srv *mediatortest.Server, name string) float64 {
	t.Helper()
	mfs, err := srv.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) > 0 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	return 0
}

func labelsMatch(m *dto.Metric, want map[string]string) bool {
	n := 0
	for _, lp := range m.GetLabel() {
		if v, ok := want[lp.GetName()]; ok {
			if v != lp.GetValue() {
				return false
			}
			n++
		}
	}
	return n == len(want)
}

func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// waitGoroutines waits until the goroutine count is back to at most max,
// and fails with a dump of every goroutine if it does not within d.
func waitGoroutines(t *testing.T, max int, d time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		n := runtime.NumGoroutine()
		if n <= max {
			return n
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("%d goroutines after %v, want at most %d:\n%s", n, d, max, buf)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestConnectionChurnNoLeak runs 10,000 connect/handshake/disconnect cycles
// (1,000 with -short; LEAK_CYCLES overrides) from 16 concurrent workers, mixing successful
// handshakes (closed cleanly or dropped), failed ones (bad response 4010,
// version 4110, client gone after ServerHello, early Proxy then gone) and
// invalid URLs (HTTP 400). Afterwards the goroutine count returns to its
// baseline within a few seconds, the heap stays within a small bound, the
// connection gauges are back to zero and no handshake slot leaked (all
// MaxHandshakes are admitted again).
func TestConnectionChurnNoLeak(t *testing.T) {
	cycles := 10000
	if testing.Short() {
		cycles = 1000
	}
	if v, err := strconv.Atoi(os.Getenv("LEAK_CYCLES")); err == nil && v > 0 {
		cycles = v
	}
	const workers = 16
	const maxHandshakes = 64
	srv := inProcess(t, mediator.Config{MaxHandshakes: maxHandshakes, HandshakeTimeout: 5 * time.Second},
		mediatortest.WithLogLevel(zerolog.WarnLevel))
	hc := &http.Client{Transport: &http.Transport{}}
	t.Cleanup(hc.CloseIdleConnections)
	groups := make([]d2d.Keys, 8)
	for i := range groups {
		groups[i] = d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	}
	badURL := srv.URL + "/42/zz"
	httpBadURL := "http" + strings.TrimPrefix(badURL, "ws")

	// Warm up every kind of cycle once so that lazily started goroutines
	// (http transport, committer, ...) are in the baseline.
	var failures atomic.Int64
	var firstErr atomic.Value
	cycle := func(w, i int) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		keys := groups[w%len(groups)]
		dev := uint64(1 + w/len(groups))
		fail := func(err error) {
			failures.Add(1)
			firstErr.CompareAndSwap(nil, fmt.Errorf("worker %d cycle %d kind %d: %w", w, i, i%6, err))
		}
		switch i % 6 {
		case 0, 1: // authenticated, then a clean close or a dropped socket
			cfg := inProcessDevice(srv.URL, keys, dev)
			cfg.HTTPClient = hc
			c, err := d2mclient.Dial(ctx, cfg)
			if err != nil {
				fail(err)
				return
			}
			if i%6 == 0 {
				c.Close()
			} else {
				c.CloseNow()
			}
		case 2, 3: // 4010 (bad response) or 4110 (version 1)
			conn, _, err := d2mclient.DialRaw(ctx, d2mclient.URLFor(srv.URL, keys, "7f"), hc)
			if err != nil {
				fail(err)
				return
			}
			defer conn.CloseNow()
			m, err := conn.Recv(ctx)
			if err != nil || m.Type != d2m.TypeServerHello {
				fail(fmt.Errorf("ServerHello: %v", err))
				return
			}
			ch := &d2mpb.ClientHello{Response: make([]byte, 72), DeviceId: dev}
			want := 4010
			if i%6 == 3 {
				hello, _ := d2m.DecodeServerHello(m.Payload)
				var esk [32]byte
				copy(esk[:], hello.Esk)
				ch.Response, _ = d2d.ChallengeResponse(keys, &esk, hello.Challenge)
				ch.Version, want = 1, 4110
			}
			conn.SendMessage(ctx, d2m.TypeClientHello, ch)
			if code := conn.CloseCode(ctx); code != want {
				fail(fmt.Errorf("close %d, want %d", code, want))
			}
		case 4: // gone after ServerHello, with early Proxy bytes
			conn, _, err := d2mclient.DialRaw(ctx, d2mclient.URLFor(srv.URL, keys, "7f"), hc)
			if err != nil {
				fail(err)
				return
			}
			conn.SendProxy(ctx, make([]byte, 48))
			conn.Recv(ctx)
			conn.CloseNow()
		case 5: // invalid ClientUrlInfo: 400, no upgrade
			req, _ := http.NewRequestWithContext(ctx, "GET", httpBadURL, nil)
			req.Header.Set("Connection", "Upgrade")
			req.Header.Set("Upgrade", "websocket")
			req.Header.Set("Sec-WebSocket-Version", "13")
			req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
			resp, err := hc.Do(req)
			if err != nil {
				fail(err)
				return
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest {
				fail(fmt.Errorf("status %d", resp.StatusCode))
			}
		}
	}
	for k := 0; k < 6; k++ {
		cycle(0, k)
	}
	if n := failures.Load(); n > 0 {
		t.Fatalf("a warm-up cycle failed: %v", firstErr.Load())
	}
	hc.CloseIdleConnections()
	time.Sleep(200 * time.Millisecond)
	baseGoroutines := runtime.NumGoroutine()
	baseHeap := heapAlloc()

	start := time.Now()
	var wg sync.WaitGroup
	var next atomic.Int64
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for failures.Load() == 0 { // a broken cycle ends the run at once
				i := int(next.Add(1)) - 1
				if i >= cycles {
					return
				}
				cycle(w, i)
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	if n := failures.Load(); n > 0 {
		t.Fatalf("%d of %d cycles failed; first: %v", n, cycles, firstErr.Load())
	}
	hc.CloseIdleConnections()
	after := waitGoroutines(t, baseGoroutines+2, 10*time.Second)
	heap := heapAlloc()
	growth := int64(heap) - int64(baseHeap)
	t.Logf("%d cycles in %v (%.0f/s); goroutines %d → %d; heap %d KiB → %d KiB (%+d KiB)",
		cycles, took.Round(time.Millisecond), float64(cycles)/took.Seconds(), baseGoroutines, after,
		baseHeap>>10, heap>>10, growth>>10)
	if growth > 16<<20 {
		t.Fatalf("heap grew by %d MiB over %d cycles", growth>>20, cycles)
	}
	for _, state := range []string{"handshake", "authenticated"} {
		if v := gauge(t, srv, "mediator_connections", map[string]string{"state": state}); v != 0 {
			t.Errorf("mediator_connections{state=%q} = %v after all connections ended", state, v)
		}
	}
	// Every handshake slot was given back: MaxHandshakes silent sockets
	// are admitted, one more is not.
	var silent []*d2mclient.Conn
	for i := 0; i < maxHandshakes; i++ {
		c, resp, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), d2mclient.URLFor(srv.URL, groups[0], "7f"), nil)
		if err != nil {
			t.Fatalf("silent socket %d refused (%v): a handshake slot leaked", i, statusOf(resp))
		}
		silent = append(silent, c)
	}
	_, resp, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), d2mclient.URLFor(srv.URL, groups[0], "7f"), nil)
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("handshake %d admitted: %v %v", maxHandshakes+1, statusOf(resp), err)
	}
	for _, c := range silent {
		c.CloseNow()
	}
}

func statusOf(resp *http.Response) string {
	if resp == nil {
		return "no response"
	}
	return resp.Status
}

// TestSlowlorisHandshake: sockets that upgrade and then send nothing, or
// trickle early Proxy bytes, are closed with 4013 at the handshake timeout;
// trickling does not extend it. Their goroutines end.
func TestSlowlorisHandshake(t *testing.T) {
	const timeout = 400 * time.Millisecond
	srv := inProcess(t, mediator.Config{HandshakeTimeout: timeout}, mediatortest.WithLogLevel(zerolog.WarnLevel))
	base := runtime.NumGoroutine()
	keys := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	const n = 20
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			c, _, err := d2mclient.DialRaw(ctx, d2mclient.URLFor(srv.URL, keys, "7f"), nil)
			if err != nil {
				errs <- err
				return
			}
			defer c.CloseNow()
			if i%2 == 1 { // trickle one early Proxy byte every 50ms
				go func() {
					for {
						select {
						case <-c.Done():
							return
						case <-time.After(50 * time.Millisecond):
							c.SendProxy(ctx, []byte{0})
						}
					}
				}()
			}
			if code := c.CloseCode(ctx); code != int(d2m.CloseIdleTimeout) {
				errs <- fmt.Errorf("socket %d: close %d, want 4013", i, code)
			}
			if d := time.Since(start); d > timeout+3*time.Second {
				errs <- fmt.Errorf("socket %d closed after %v", i, d)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	t.Logf("%d silent sockets closed after %v", n, time.Since(start).Round(time.Millisecond))
	waitGoroutines(t, base+2, 5*time.Second)
}

// TestHandshakeAdmission: with MaxHandshakes in flight, the next upgrade is
// answered 503 with Retry-After before the upgrade; authenticated
// connections do not count, and a slot is free again once a handshake
// ends.
func TestHandshakeAdmission(t *testing.T) {
	const max = 4
	srv := inProcess(t, mediator.Config{MaxHandshakes: max, HandshakeTimeout: 10 * time.Second})
	keys := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	url := d2mclient.URLFor(srv.URL, keys, "7f")
	// Authenticated devices hold no handshake slot.
	for i := 1; i <= max+1; i++ {
		c, err := d2mclient.Dial(ctxT(t, 5*time.Second), inProcessDevice(srv.URL, keys, uint64(i)))
		if err != nil {
			t.Fatalf("device %d: %v", i, err)
		}
		defer c.CloseNow()
	}
	var pending []*d2mclient.Conn
	for i := 0; i < max; i++ {
		c, _, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), url, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseNow()
		recvType(t, c, d2m.TypeServerHello)
		pending = append(pending, c)
	}
	hc := &http.Client{Transport: &http.Transport{}}
	defer hc.CloseIdleConnections()
	for i := 0; i < 3; i++ {
		req, _ := http.NewRequest("GET", "http"+strings.TrimPrefix(url, "ws"), nil)
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", "websocket")
		req.Header.Set("Sec-WebSocket-Version", "13")
		req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
			t.Fatalf("handshake over the limit: %s, Retry-After %q", resp.Status, resp.Header.Get("Retry-After"))
		}
	}
	// One pending handshake ends: one slot is free again.
	pending[0].CloseNow()
	deadline := time.Now().Add(3 * time.Second)
	for {
		c, resp, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), url, nil)
		if err == nil {
			c.CloseNow()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("slot not freed: %v %v", statusOf(resp), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// dialNoRead opens a device connection whose socket receive buffer is tiny
// and performs the handshake by hand with coder/websocket, so that after it
// nothing reads: the server's writes back up into its own send buffer.
func dialNoRead(t *testing.T, url string, keys d2d.Keys, id uint64) *websocket.Conn {
	t.Helper()
	dialer := &net.Dialer{Control: func(network, address string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	hc := &http.Client{Transport: &http.Transport{DialContext: dialer.DialContext}}
	ctx := ctxT(t, 10*time.Second)
	ws, _, err := websocket.Dial(ctx, d2mclient.URLFor(url, keys, "7f"), &websocket.DialOptions{
		HTTPClient: hc, CompressionMode: websocket.CompressionDisabled,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.CloseNow() })
	ws.SetReadLimit(1 << 20)
	read := func(want d2m.PayloadType) []byte {
		_, b, err := ws.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		typ, payload, err := d2m.DecodeContainer(b)
		if err != nil || typ != want {
			t.Fatalf("got %v, want %v (%v)", typ, want, err)
		}
		return payload
	}
	hello, err := d2m.DecodeServerHello(read(d2m.TypeServerHello))
	if err != nil {
		t.Fatal(err)
	}
	frame := clientHello(hello, keys, &d2mpb.ClientHello{DeviceId: id, DeviceSlotExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
	if err := ws.Write(ctx, websocket.MessageBinary, frame); err != nil {
		t.Fatal(err)
	}
	read(d2m.TypeServerInfo)
	return ws
}

// TestSlowConsumerClosed: a device that stops reading while another floods
// reflections to it is closed once one write blocks for WriteTimeout; the
// flooding sender, a reading device of the same group and another group
// are not slowed down or closed, the close is logged and counted as a slow
// consumer, and the slow device's durable data is all still queued when it
// comes back. The flood goes on in rounds until the slow device is closed,
// so the test does not depend on the machine's socket buffer sizes; the
// delivery window is raised so that it is the write that blocks, not the
// window that stops the writes.
func TestSlowConsumerClosed(t *testing.T) {
	srv := inProcess(t, mediator.Config{WriteTimeout: 300 * time.Millisecond, DeliveryWindow: 4096})
	g := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	dial := func(id uint64) *d2mclient.Client {
		c, err := d2mclient.Dial(ctxT(t, 10*time.Second), inProcessDevice(srv.URL, g, id))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.CloseNow() })
		return c
	}
	flooder := dial(1)
	observer := dial(2)
	dialNoRead(t, srv.URL, g, 3)
	other := newHealthyPairURL(t, srv.URL)

	const size, round, maxRounds = 60 << 10, 50, 12 // at most 36 MiB, below the 64 MiB queue limit
	envelope := func(i int) []byte {
		e := bytes.Repeat([]byte{byte(i)}, size)
		copy(e, fmt.Sprintf("flood-%04d", i))
		return e
	}
	// The observer reads and acks everything, recording the order.
	got := make(chan []byte, round*maxRounds)
	go func() {
		for {
			m, err := observer.Recv(context.Background())
			if err != nil {
				return
			}
			if m.Type == d2m.TypeReflected {
				r, _ := d2m.DecodeReflected(m.Payload)
				observer.AckReflected(context.Background(), r.ID)
				got <- append([]byte(nil), r.Envelope[:10]...)
			}
		}
	}()
	slowClosed := func() bool {
		s, ok := devicesInfo(t, flooder)[3]
		return ok && s.GetLastDisconnectAt() != 0
	}
	start := time.Now()
	sent := 0
	for r := 0; r < maxRounds && !slowClosed(); r++ {
		go func(from int) {
			for i := from; i < from+round; i++ {
				if _, err := flooder.Reflect(context.Background(), envelope(i), 0); err != nil {
					return
				}
			}
		}(sent)
		for acks := 0; acks < round; {
			switch m := recv(t, flooder.Conn); m.Type {
			case d2m.TypeReflectAck:
				acks++
			case d2m.TypeReflectionQueueDry:
			default:
				t.Fatalf("flooder got %v", m.Type)
			}
		}
		for i := sent; i < sent+round; i++ {
			select {
			case e := <-got:
				if want := fmt.Sprintf("flood-%04d", i); string(e) != want {
					t.Fatalf("observer got %q, want %q", e, want)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("observer got only %d of %d", i, sent+round)
			}
		}
		sent += round
		other.roundTrip(t, fmt.Sprintf("during the flood (%d sent)", sent))
	}
	// The slow device's connection ends (its slot shows a disconnect).
	for deadline := time.Now().Add(5 * time.Second); !slowClosed(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("slow device still connected after %d × %d KiB", sent, size>>10)
		}
	}
	t.Logf("slow device closed after %d × %d KiB in %v; flooder, observer and another group unaffected",
		sent, size>>10, time.Since(start).Round(time.Millisecond))
	other.roundTrip(t, "after the slow consumer")

	// Its one log line says why, and it is counted as a slow consumer.
	logged := false
	for _, l := range strings.Split(srv.Logs(), "\n") {
		if strings.Contains(l, `"device":"0x0000000000000003"`) && strings.Contains(l, `"device disconnected"`) {
			logged = strings.Contains(l, `"code":1011`) && strings.Contains(l, "a write blocked for")
			if !logged {
				t.Errorf("slow consumer logged as: %s", l)
			}
		}
	}
	if !logged {
		t.Error("no disconnect line for the slow consumer")
	}
	if v := counter(t, srv, "mediator_slow_consumers_total"); v < 1 {
		t.Errorf("mediator_slow_consumers_total = %v", v)
	}

	// Nothing it missed is lost: it comes back to all of it.
	back, err := d2mclient.Dial(ctxT(t, 10*time.Second), inProcessDevice(srv.URL, g, 3))
	if err != nil {
		t.Fatal(err)
	}
	defer back.CloseNow()
	if int(back.ServerInfo.ReflectionQueueLength) != sent {
		t.Fatalf("slow device's queue holds %d, want %d", back.ServerInfo.ReflectionQueueLength, sent)
	}
}

// newHealthyPairURL is newHealthyPair for an in-process server.
func newHealthyPairURL(t *testing.T, url string) *healthyPair {
	t.Helper()
	g := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	var cs []*d2mclient.Client
	for id := uint64(1); id <= 2; id++ {
		c, err := d2mclient.Dial(ctxT(t, 10*time.Second), inProcessDevice(url, g, id))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.CloseNow() })
		recvType(t, c.Conn, d2m.TypeReflectionQueueDry)
		cs = append(cs, c)
	}
	return &healthyPair{a: cs[0], b: cs[1]}
}
