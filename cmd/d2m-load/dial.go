package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/sys/unix"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
)

// checkLoopback refuses every target that is not on this machine: the tool
// generates real load and must never be pointed at somebody else's server.
func checkLoopback(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("%q: %w", raw, err)
	}
	host := u.Hostname()
	if host == "" {
		return fmt.Errorf("%q has no host", raw)
	}
	if host == "localhost" {
		return nil
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("%q is not a loopback address (only 127.0.0.0/8, ::1 and localhost are allowed)", raw)
	}
	return nil
}

// dialer opens authenticated device connections. The server answers 503
// with Retry-After while too many handshakes are in flight; dial retries
// those with exponential backoff and full jitter, capped at the advertised
// Retry-After, and counts them.
type dialer struct {
	url      string
	hc       *http.Client
	queue    int          // d2mclient.Config.RecvQueue (0: its default)
	overload atomic.Int64 // 503 answers seen (each was retried)
	attempts atomic.Int64
}

// dialerOptions shape the dialer's TCP connections.
type dialerOptions struct {
	// sources > 0 binds each connection to one of that many loopback
	// source addresses (sourceAddr), in turn.
	sources int
	// small: 1 KiB HTTP read/write buffers instead of net/http's 4 KiB
	// (only the upgrade uses them, and the read side stays under the
	// WebSocket's own buffer for the connection's life), and receive
	// queues of 32 instead of d2mclient's 1024: what tens of thousands of
	// mostly idle devices need.
	small bool
}

func newDialer(base string, opt dialerOptions) *dialer {
	dial := (&net.Dialer{Timeout: 10 * time.Second}).DialContext
	if opt.sources > 0 {
		dial = sourceDialer(opt.sources)
	}
	tr := &http.Transport{
		// One TCP connection per WebSocket: no pooling, no limits. A
		// hijacked (101) connection never returns to a pool anyway; the
		// 503 answers must not park idle connections either.
		DialContext:        dial,
		DisableKeepAlives:  true,
		DisableCompression: true,
		MaxConnsPerHost:    0,
		MaxIdleConns:       0,
		ForceAttemptHTTP2:  false,
	}
	d := &dialer{url: base, hc: &http.Client{Transport: statusTransport{tr}}}
	if opt.small {
		tr.ReadBufferSize, tr.WriteBufferSize = 1024, 1024
		d.queue = 32
	}
	return d
}

// maxSources bounds --source-addrs: 127.1.0.1 … 127.1.16.32.
const maxSources = 4096

// sourceAddr is the i-th source address: 127.1.A.B with B in 1..254, so
// no address ends in .0 or .255.
func sourceAddr(i int) net.IP {
	return net.IPv4(127, 1, byte(i/254), byte(i%254+1))
}

// sourceDialer spreads connections over n loopback source addresses, so
// that no address needs more than its share of the ephemeral ports
// (net.ipv4.ip_local_port_range, 28,232 by default). The socket is bound
// with IP_BIND_ADDRESS_NO_PORT: the kernel then picks the port at
// connect time by the full 4-tuple instead of reserving one at bind
// time, so a port is only taken per (source, destination) pair. Every
// 127.0.0.0/8 address is on the loopback interface already: nothing is
// configured.
func sourceDialer(n int) func(ctx context.Context, network, addr string) (net.Conn, error) {
	ds := make([]*net.Dialer, n)
	for i := range ds {
		ds[i] = &net.Dialer{
			Timeout:   10 * time.Second,
			LocalAddr: &net.TCPAddr{IP: sourceAddr(i)},
			Control: func(network, address string, c syscall.RawConn) error {
				var serr error
				err := c.Control(func(fd uintptr) {
					serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
				})
				return cmp.Or(err, serr)
			},
		}
	}
	var next atomic.Uint64
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		return ds[(next.Add(1)-1)%uint64(n)].DialContext(ctx, "tcp4", addr)
	}
}

// statusTransport lets dial see the HTTP status and Retry-After of a failed
// upgrade, which d2mclient.Dial does not return.
type statusTransport struct{ rt http.RoundTripper }

type statusKey struct{}

type dialStatus struct {
	code       int
	retryAfter time.Duration
}

func (t statusTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.rt.RoundTrip(r)
	if resp != nil {
		if st, ok := r.Context().Value(statusKey{}).(*dialStatus); ok {
			st.code = resp.StatusCode
			if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil {
				st.retryAfter = time.Duration(s) * time.Second
			}
		}
	}
	return resp, err
}

// deviceConfig is a PERSISTENT device of group keys with id dev.
func (d *dialer) deviceConfig(keys d2d.Keys, dev uint64) d2mclient.Config {
	return d2mclient.Config{
		URL: d.url, Keys: keys, DeviceID: dev,
		ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT,
		DeviceInfo:       []byte("load-device-info"), // opaque to the server; skip sealing
		HTTPClient:       d.hc,
		RecvQueue:        d.queue,
	}
}

// dial connects and authenticates, retrying 503 answers until ctx ends.
func (d *dialer) dial(ctx context.Context, cfg d2mclient.Config) (*d2mclient.Client, error) {
	backoff := 50 * time.Millisecond
	for {
		st := &dialStatus{}
		d.attempts.Add(1)
		c, err := d2mclient.Dial(context.WithValue(ctx, statusKey{}, st), cfg)
		if err == nil {
			return c, nil
		}
		if c != nil {
			code := websocket.CloseStatus(c.Err())
			c.CloseNow()
			if code > 0 {
				return nil, &closeErr{code: int(code), during: "handshake", err: err}
			}
		}
		if st.code != http.StatusServiceUnavailable || ctx.Err() != nil {
			if st.code != 0 && st.code != http.StatusSwitchingProtocols {
				return nil, fmt.Errorf("HTTP %d: %w", st.code, err)
			}
			return nil, err
		}
		d.overload.Add(1)
		limit := st.retryAfter
		if limit <= 0 {
			limit = time.Second
		}
		wait := time.Duration(rand.Int64N(int64(min(backoff, limit)) + 1))
		backoff *= 2
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// dialReady dials, then reads the device's backlog up to
// ReflectionQueueDry, recording the time it took in hs. On a failed
// ready the connection is closed.
func (d *dialer) dialReady(ctx context.Context, cfg d2mclient.Config, hs *hist) (*d2mclient.Client, error) {
	t0 := time.Now()
	c, err := d.dial(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if _, err := readyDevice(ctx, c, nil); err != nil {
		c.CloseNow()
		return nil, err
	}
	hs.Record(time.Since(t0))
	return c, nil
}

// closeErr is a connection the server closed with a code.
type closeErr struct {
	code   int
	during string
	err    error
}

func (e *closeErr) Error() string {
	return fmt.Sprintf("close %d during %s: %v", e.code, e.during, e.err)
}

// errorKey is the key errors are counted under: the close code where there
// is one, else a short class.
func errorKey(err error) string {
	var ce *closeErr
	switch {
	case err == nil:
		return ""
	case errors.As(err, &ce):
		return fmt.Sprintf("close %d (%s)", ce.code, d2m.CloseCode(ce.code))
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	}
	if code := websocket.CloseStatus(err); code > 0 {
		return fmt.Sprintf("close %d (%s)", int(code), d2m.CloseCode(code))
	}
	s := err.Error()
	if len(s) > 80 {
		s = s[:80]
	}
	return "error: " + s
}

// errCounter counts errors by key.
type errCounter struct {
	mu sync.Mutex
	m  map[string]int64
	n  atomic.Int64
}

func (e *errCounter) add(err error) {
	if err == nil {
		return
	}
	e.addKey(errorKey(err))
}

func (e *errCounter) addKey(k string) { e.addN(k, 1) }

// addN counts n errors of kind k.
func (e *errCounter) addN(k string, n int64) {
	e.n.Add(n)
	e.mu.Lock()
	if e.m == nil {
		e.m = map[string]int64{}
	}
	e.m[k] += n
	e.mu.Unlock()
}

func (e *errCounter) snapshot() map[string]int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[string]int64, len(e.m))
	for k, v := range e.m {
		out[k] = v
	}
	return out
}

// connEnd classifies how a device connection ended: its close code if the
// server sent one, else the transport error.
func connEnd(c *d2mclient.Conn) error {
	err := c.Err()
	if code := websocket.CloseStatus(err); code > 0 {
		return &closeErr{code: int(code), during: "session", err: err}
	}
	if err == nil {
		return errors.New("connection ended")
	}
	return err
}

// recvSession reads the next message of a running session. When the
// connection ends it reports why to errs, unless the run is stopping (ctx
// ended or closing set), and returns false.
func recvSession(ctx context.Context, c *d2mclient.Conn, closing *atomic.Bool, errs *errCounter) (d2mclient.Message, bool) {
	m, err := c.Recv(ctx)
	if err != nil {
		if ctx.Err() == nil && !closing.Load() {
			if errors.Is(err, d2mclient.ErrClosed) {
				err = connEnd(c)
			}
			errs.add(err)
		}
		return m, false
	}
	return m, true
}

// readyDevice waits for ReflectionQueueDry, acking every backlog Reflected
// on the way, and returns how many Reflected it got. onReflected, if not
// nil, sees each one. RolePromotedToLeader and other messages are skipped.
func readyDevice(ctx context.Context, c *d2mclient.Client, onReflected func(d2m.Reflected)) (int, error) {
	n := 0
	for {
		m, err := c.Recv(ctx)
		if err != nil {
			if errors.Is(err, d2mclient.ErrClosed) {
				return n, connEnd(c.Conn)
			}
			return n, err
		}
		switch m.Type {
		case d2m.TypeReflected:
			r, err := d2m.DecodeReflected(m.Payload)
			if err != nil {
				return n, err
			}
			n++
			if onReflected != nil {
				onReflected(r)
			}
			if err := c.AckReflected(ctx, r.ID); err != nil {
				return n, err
			}
		case d2m.TypeReflectionQueueDry:
			return n, nil
		}
	}
}

// forEach runs fn(i) for i in [0, n) on `workers` goroutines and returns
// the first error, after all have finished. It stops handing out work when
// ctx ends.
func forEach(ctx context.Context, n, workers int, fn func(i int) error) error {
	var next atomic.Int64
	var wg sync.WaitGroup
	var once sync.Once
	var first error
	for range min(workers, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := fn(i); err != nil {
					once.Do(func() { first = err })
				}
			}
		}()
	}
	wg.Wait()
	if first == nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return first
}
