package faultproxy

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"
)

// echoServer echoes every connection until the test ends; received counts
// the bytes it read.
type echoServer struct {
	ln       net.Listener
	mu       sync.Mutex
	received int
	eofs     int // connections whose client half-closed (EOF while writing back works)
	wg       sync.WaitGroup
}

func startEcho(t *testing.T) *echoServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e := &echoServer{ln: ln}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			e.wg.Add(1)
			go func() {
				defer e.wg.Done()
				defer c.Close()
				buf := make([]byte, 64<<10)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						e.mu.Lock()
						e.received += n
						e.mu.Unlock()
						if _, werr := c.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						if errors.Is(err, io.EOF) {
							e.mu.Lock()
							e.eofs++
							e.mu.Unlock()
							c.Write([]byte("bye"))
						}
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); e.wg.Wait() })
	return e
}

func (e *echoServer) addr() string { return e.ln.Addr().String() }

func (e *echoServer) got() (received, eofs int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.received, e.eofs
}

func startProxy(t *testing.T, target string) *Proxy {
	t.Helper()
	p, err := Start(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// roundTrip writes msg and reads it back within timeout.
func roundTrip(c net.Conn, msg []byte, timeout time.Duration) error {
	c.SetDeadline(time.Now().Add(timeout))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if !bytes.Equal(got, msg) {
		return errors.New("echo differs")
	}
	return nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestForwards(t *testing.T) {
	e := startEcho(t)
	p := startProxy(t, e.addr())
	c := dial(t, p.Addr())
	msg := make([]byte, 200<<10)
	rand.Read(msg)
	if err := roundTrip(c, msg, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	// The counts follow each write, which the peer may read first.
	waitFor(t, "the byte counts", func() bool {
		return p.Bytes(Up) == int64(len(msg)) && p.Bytes(Down) == int64(len(msg)) && p.Bytes(Both) == 2*int64(len(msg))
	})
	if p.Conns() != 1 || p.Accepted() != 1 {
		t.Fatalf("conns %d accepted %d", p.Conns(), p.Accepted())
	}
	c.Close()
	waitFor(t, "the link gone after the client closed", func() bool { return p.Conns() == 0 })
}

// A blackhole stalls an open connection and a new one, and loses nothing:
// after it ends both carry every byte, in order.
func TestBlackholeStallsThenDeliversWhole(t *testing.T) {
	e := startEcho(t)
	p := startProxy(t, e.addr())
	c := dial(t, p.Addr())
	if err := roundTrip(c, []byte("before"), time.Second); err != nil {
		t.Fatal(err)
	}
	p.Blackhole(true)
	var nerr net.Error
	if err := roundTrip(c, []byte("during"), 300*time.Millisecond); !errors.As(err, &nerr) || !nerr.Timeout() {
		t.Fatalf("round trip through a blackhole: %v, want a timeout", err)
	}
	recv, _ := e.got()
	if recv != len("before") {
		t.Fatalf("the target received %d bytes during the blackhole", recv)
	}
	// A new connection is accepted, but nothing reaches the target.
	c2 := dial(t, p.Addr())
	c2.Write([]byte("new"))
	time.Sleep(100 * time.Millisecond) // a window for a wrong delivery (its length, not an order)
	if recv, _ := e.got(); recv != len("before") {
		t.Fatalf("a new connection reached the target during the blackhole")
	}
	p.Blackhole(false)
	// The timed-out read above may have consumed nothing: "during" comes
	// back, then the rest.
	c.SetDeadline(time.Now().Add(2 * time.Second))
	got := make([]byte, len("during"))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "during" {
		t.Fatalf("after the blackhole: %q %v", got, err)
	}
	c2.SetDeadline(time.Now().Add(2 * time.Second))
	got = make([]byte, 3)
	if _, err := io.ReadFull(c2, got); err != nil || string(got) != "new" {
		t.Fatalf("new connection after the blackhole: %q %v", got, err)
	}
}

// A blackhole stops reading: a sender that keeps writing fills the
// buffers and blocks, as behind a silent link.
func TestBlackholeBlocksTheSender(t *testing.T) {
	e := startEcho(t)
	p := startProxy(t, e.addr())
	c := dial(t, p.Addr())
	if err := roundTrip(c, []byte("x"), time.Second); err != nil {
		t.Fatal(err)
	}
	p.Blackhole(true)
	c.SetWriteDeadline(time.Now().Add(500 * time.Millisecond))
	buf := make([]byte, 1<<20)
	total := 0
	for {
		n, err := c.Write(buf)
		total += n
		if err != nil {
			var nerr net.Error
			if !errors.As(err, &nerr) || !nerr.Timeout() {
				t.Fatalf("write: %v", err)
			}
			break
		}
		if total > 256<<20 {
			t.Fatal("256 MiB written into a blackhole without blocking")
		}
	}
	t.Logf("the sender blocked after %d KiB", total>>10)
}

func TestLatencyPerDirection(t *testing.T) {
	e := startEcho(t)
	p := startProxy(t, e.addr())
	c := dial(t, p.Addr())
	if err := roundTrip(c, []byte("warm"), time.Second); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		up, down time.Duration
	}{{50 * time.Millisecond, 0}, {0, 100 * time.Millisecond}, {50 * time.Millisecond, 50 * time.Millisecond}} {
		p.Latency(Up, tc.up)
		p.Latency(Down, tc.down)
		start := time.Now()
		if err := roundTrip(c, []byte("ping"), 5*time.Second); err != nil {
			t.Fatal(err)
		}
		rtt := time.Since(start)
		if want := tc.up + tc.down; rtt < want || rtt > want+time.Second {
			t.Fatalf("latency up %v down %v: round trip %v", tc.up, tc.down, rtt)
		}
	}
	// Latency is not a throughput cap: 64 chunks in flight at once take
	// about one latency, not 64.
	p.Latency(Both, 0)
	p.Latency(Up, 100*time.Millisecond)
	msg := make([]byte, 64*chunkSize)
	start := time.Now()
	go c.Write(msg)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("2 MiB with 100 ms of latency took %v", took)
	}
	p.Heal()
}

func TestBandwidth(t *testing.T) {
	e := startEcho(t)
	p := startProxy(t, e.addr())
	c := dial(t, p.Addr())
	p.Bandwidth(Up, 400<<10)
	msg := make([]byte, 200<<10)
	start := time.Now()
	if err := roundTrip(c, msg, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if took < 400*time.Millisecond || took > 3*time.Second {
		t.Fatalf("200 KiB at 400 KiB/s took %v", took)
	}
	p.Bandwidth(Up, 0)
	start = time.Now()
	if err := roundTrip(c, msg, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 300*time.Millisecond {
		t.Fatalf("unlimited again: 200 KiB took %v", took)
	}
}

func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

func TestReset(t *testing.T) {
	e := startEcho(t)
	p := startProxy(t, e.addr())
	c := dial(t, p.Addr())
	if err := roundTrip(c, []byte("x"), time.Second); err != nil {
		t.Fatal(err)
	}
	if n := p.Reset(); n != 1 {
		t.Fatalf("Reset reset %d connections", n)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(make([]byte, 1)); !isReset(err) {
		t.Fatalf("read after Reset: %v, want ECONNRESET", err)
	}
	waitFor(t, "no link left", func() bool { return p.Conns() == 0 })
	// The proxy still takes new connections.
	if err := roundTrip(dial(t, p.Addr()), []byte("again"), time.Second); err != nil {
		t.Fatal(err)
	}
}

// ResetAfter cuts a stream in the middle: the client gets some of its
// echo, then ECONNRESET.
func TestResetMidStream(t *testing.T) {
	e := startEcho(t)
	p := startProxy(t, e.addr())
	p.ResetAfter(Up, 100<<10)
	c := dial(t, p.Addr())
	go c.Write(make([]byte, 1<<20))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := io.Copy(io.Discard, c)
	if !isReset(err) {
		t.Fatalf("after %d bytes: %v, want ECONNRESET", n, err)
	}
	// (What the target read is not counted: a reset discards what its
	// kernel held unread.)
	if up := p.Bytes(Up); up < 100<<10 || up >= 1<<20 {
		t.Fatalf("%d bytes went up before the reset, want at least 100 KiB and not all", up)
	}
}

// HalfClose(Up): the target reads EOF, the way back still works.
// HalfClose(Down): the client reads EOF, while the target still receives.
func TestHalfClose(t *testing.T) {
	e := startEcho(t)
	p := startProxy(t, e.addr())
	c := dial(t, p.Addr())
	if err := roundTrip(c, []byte("x"), time.Second); err != nil {
		t.Fatal(err)
	}
	if n := p.HalfClose(Up, true); n != 1 {
		t.Fatalf("HalfClose shut %d connections", n)
	}
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	got := make([]byte, 3)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "bye" {
		t.Fatalf("after the target's EOF: %q %v, want its goodbye", got, err)
	}
	if _, eofs := e.got(); eofs != 1 {
		t.Fatalf("the target saw %d EOFs", eofs)
	}
	p.HalfClose(Up, false)

	c2 := dial(t, p.Addr())
	if err := roundTrip(c2, []byte("y"), time.Second); err != nil {
		t.Fatal(err)
	}
	p.HalfClose(Down, true)
	c2.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c2.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("client read after HalfClose(Down): %v, want EOF", err)
	}
	before, _ := e.got()
	c2.Write([]byte("still-up"))
	waitFor(t, "the target to receive after the client's EOF", func() bool {
		r, _ := e.got()
		return r == before+len("still-up")
	})
}

// Close ends every connection and goroutine of the proxy.
func TestCloseLeavesNothing(t *testing.T) {
	e := startEcho(t)
	before := runtime.NumGoroutine()
	p, err := Start(e.addr())
	if err != nil {
		t.Fatal(err)
	}
	var cs []net.Conn
	for range 5 {
		c, err := net.Dial("tcp", p.Addr())
		if err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
		if err := roundTrip(c, []byte("x"), time.Second); err != nil {
			t.Fatal(err)
		}
	}
	p.Blackhole(true)
	p.Latency(Both, time.Hour)
	p.Close()
	for _, c := range cs {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("a client connection survived Close")
		}
		c.Close()
	}
	waitFor(t, "the proxy's goroutines to end", func() bool { return runtime.NumGoroutine() <= before+2 })
	if p.Conns() != 0 {
		t.Fatalf("%d links after Close", p.Conns())
	}
}
