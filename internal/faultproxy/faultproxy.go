// Package faultproxy is a TCP proxy for tests that puts network faults
// between two parts of the system: a blackhole, added latency, a bandwidth
// limit, a reset mid-stream and a half-close, each switchable on and off
// while connections run through it. It owns the proxy's listener, its
// connections and their goroutines, and nothing else; the tests point one
// part at Proxy.Addr instead of the other part's address. It is test-only:
// no binary imports it.
//
// Why not Shopify's toxiproxy (v2.5.0) as a library: its blackhole (the
// "timeout" toxic with timeout 0) reads what arrives and drops it on the
// ground, so a connection that outlives the fault carries a stream with a
// hole in it, which TCP never delivers; and because it keeps reading, the
// sender's writes never block, unlike behind a real silent link. It has no
// half-close toxic. And it would add gorilla/mux, urfave/cli, rs/xid,
// tomb.v1 and its own prometheus and zerolog versions to the go.mod of
// whichever module uses it, while this package, in the main module, is
// usable from the main module's tests and from integration/cluster alike
// with nothing but the standard library.
//
// What each fault does:
//
//   - Blackhole: nothing is read from either side and nothing written, on
//     every open connection and on new ones (accepted, but the target is
//     dialled only once the blackhole ends). Bytes already sent wait in
//     the kernel's buffers and arrive, in order and whole, after the
//     blackhole ends: a link that went silent and came back, as TCP's
//     retransmissions make it look. Unlike a dropped link, the peers'
//     TCP keepalives are answered (by this process's kernel), so only
//     timeouts of the application itself notice: the stricter case.
//   - Latency(dir, d): every chunk read in dir is written d later (order
//     kept; reading goes on meanwhile, so it is latency, not a throughput
//     cap).
//   - Bandwidth(dir, n): at most n bytes per second in dir.
//   - Reset: every open connection is reset now on both sides (linger 0,
//     then close: the peers get RST). ResetAfter(dir, n): each connection
//     is reset once n bytes have passed in dir, mid-stream.
//   - HalfClose(dir, true): dir is shut on every open connection and on
//     new ones: its receiver gets EOF (a FIN), what its sender still
//     writes is read and dropped, and the other direction keeps flowing.
//
// Heal switches every fault off.
package faultproxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Direction names the flow of bytes through the proxy.
type Direction uint8

const (
	Up   Direction = 1 << iota // from the client (who dialled the proxy) to the target
	Down                       // from the target to the client
	Both = Up | Down
)

func (d Direction) has(x Direction) bool { return d&x != 0 }

func (d Direction) String() string {
	switch d {
	case Up:
		return "up"
	case Down:
		return "down"
	case Both:
		return "both"
	}
	return "none"
}

// dirs are the two single directions, by index.
var dirs = [2]Direction{Up, Down}

// dialTimeout bounds dialling the target.
const dialTimeout = 5 * time.Second

// chunkSize is the most one read takes from a socket.
const chunkSize = 32 << 10

// settings are the faults in force.
type settings struct {
	blackhole  bool
	latency    [2]time.Duration
	rate       [2]int64 // bytes per second; 0: unlimited
	resetAfter [2]int64 // bytes; 0: never
	halfClose  [2]bool
}

// Proxy is one listener on loopback forwarding to one target.
type Proxy struct {
	ln net.Listener

	mu      sync.Mutex // guards everything below; held for no I/O
	target  string
	set     settings
	changed chan struct{} // closed (and replaced) when set or target changes
	links   map[*link]struct{}
	closed  bool

	wg       sync.WaitGroup // every goroutine of the proxy
	bytes    [2]atomic.Int64
	accepted atomic.Int64
}

// Start listens on 127.0.0.1 on a free port and forwards every connection
// to target (host:port; "" until SetTarget: connections wait).
func Start(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{ln: ln, target: target, changed: make(chan struct{}), links: make(map[*link]struct{})}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the proxy's address, host:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// SetTarget changes where new connections go.
func (p *Proxy) SetTarget(target string) {
	p.update(func(*settings) {
		p.target = target
	})
}

// Blackhole turns the blackhole on or off.
func (p *Proxy) Blackhole(on bool) { p.update(func(s *settings) { s.blackhole = on }) }

// Latency delays every chunk in dir by d (0: none).
func (p *Proxy) Latency(dir Direction, d time.Duration) {
	p.update(func(s *settings) {
		for i, x := range dirs {
			if dir.has(x) {
				s.latency[i] = d
			}
		}
	})
}

// Bandwidth limits dir to bytesPerSecond (0: unlimited).
func (p *Proxy) Bandwidth(dir Direction, bytesPerSecond int64) {
	p.update(func(s *settings) {
		for i, x := range dirs {
			if dir.has(x) {
				s.rate[i] = bytesPerSecond
			}
		}
	})
}

// ResetAfter resets every connection once n bytes have passed in dir on
// it (0: never).
func (p *Proxy) ResetAfter(dir Direction, n int64) {
	p.update(func(s *settings) {
		for i, x := range dirs {
			if dir.has(x) {
				s.resetAfter[i] = n
			}
		}
	})
	p.mu.Lock()
	links := p.linkList()
	p.mu.Unlock()
	for _, l := range links {
		l.checkReset()
	}
}

// HalfClose shuts dir on every open connection (on) and on every new one
// while on; off lets new connections be whole again (a FIN cannot be
// taken back). It returns how many open connections it shut.
func (p *Proxy) HalfClose(dir Direction, on bool) int {
	p.update(func(s *settings) {
		for i, x := range dirs {
			if dir.has(x) {
				s.halfClose[i] = on
			}
		}
	})
	if !on {
		return 0
	}
	p.mu.Lock()
	links := p.linkList()
	p.mu.Unlock()
	for _, l := range links {
		for i, x := range dirs {
			if dir.has(x) {
				l.shutDir(i)
			}
		}
	}
	return len(links)
}

// Reset resets every open connection now and returns how many.
func (p *Proxy) Reset() int {
	p.mu.Lock()
	links := p.linkList()
	p.mu.Unlock()
	for _, l := range links {
		l.reset()
	}
	return len(links)
}

// Heal switches every fault off.
func (p *Proxy) Heal() { p.update(func(s *settings) { *s = settings{} }) }

// Conns is the number of connections open through the proxy.
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

// Accepted is the number of connections accepted so far.
func (p *Proxy) Accepted() int64 { return p.accepted.Load() }

// Bytes is the number of bytes written so far in dir (both directions
// added for Both).
func (p *Proxy) Bytes(dir Direction) int64 {
	var n int64
	for i, x := range dirs {
		if dir.has(x) {
			n += p.bytes[i].Load()
		}
	}
	return n
}

// Close stops listening, closes every connection and waits for the
// proxy's goroutines.
func (p *Proxy) Close() error {
	err := p.ln.Close()
	p.mu.Lock()
	p.closed = true
	links := p.linkList()
	p.bump()
	p.mu.Unlock()
	for _, l := range links {
		l.teardown()
	}
	p.wg.Wait()
	return err
}

func (p *Proxy) linkList() []*link {
	out := make([]*link, 0, len(p.links))
	for l := range p.links {
		out = append(out, l)
	}
	return out
}

func (p *Proxy) update(fn func(*settings)) {
	p.mu.Lock()
	fn(&p.set)
	p.bump()
	p.mu.Unlock()
}

// bump wakes every waiter. Called with p.mu held.
func (p *Proxy) bump() {
	close(p.changed)
	p.changed = make(chan struct{})
}

// state returns the settings in force and a channel closed at their next
// change.
func (p *Proxy) state() (settings, string, bool, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.set, p.target, p.closed, p.changed
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.accepted.Add(1)
		l := &link{p: p, client: c, done: make(chan struct{})}
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			c.Close()
			return
		}
		p.links[l] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go l.run()
	}
}

// link is one proxied connection.
type link struct {
	p      *Proxy
	client net.Conn

	mu     sync.Mutex // guards up, shut, torn
	up     net.Conn
	shut   [2]bool // direction shut by HalfClose
	torn   bool
	done   chan struct{} // closed by teardown
	passed [2]atomic.Int64
}

// run waits for a time without blackhole, dials the target and pipes both
// directions until both have ended.
func (l *link) run() {
	p := l.p
	defer p.wg.Done()
	defer l.teardown()
	var target string
	for {
		set, t, closed, changed := p.state()
		if closed {
			return
		}
		if !set.blackhole && t != "" {
			target = t
			break
		}
		select {
		case <-changed:
		case <-l.done:
			return
		}
	}
	up, err := net.DialTimeout("tcp", target, dialTimeout)
	if err != nil {
		return // the client sees its connection closed, as if refused
	}
	l.mu.Lock()
	if l.torn {
		l.mu.Unlock()
		up.Close()
		return
	}
	l.up = up
	l.mu.Unlock()
	set, _, _, _ := p.state()
	for i := range dirs {
		if set.halfClose[i] {
			l.shutDir(i)
		}
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); l.pipe(0, l.client, up) }()
	go func() { defer wg.Done(); l.pipe(1, up, l.client) }()
	wg.Wait()
}

type chunk struct {
	b   []byte
	due time.Time
}

// pipe copies direction i from src to dst through a reader and a writer
// goroutine (so that latency delays chunks without stopping the reading).
// At src's EOF it passes the FIN on (CloseWrite); on any other error it
// tears the link down.
func (l *link) pipe(i int, src, dst net.Conn) {
	p := l.p
	ch := make(chan chunk, 64)
	var readErr error
	go func() {
		defer close(ch)
		for {
			if !l.waitFlowing() {
				readErr = net.ErrClosed
				return
			}
			buf := make([]byte, chunkSize)
			n, err := src.Read(buf)
			if n > 0 {
				set, _, _, _ := p.state()
				select {
				case ch <- chunk{b: buf[:n], due: time.Now().Add(set.latency[i])}:
				case <-l.done:
					readErr = net.ErrClosed
					return
				}
			}
			if err != nil {
				readErr = err
				return
			}
		}
	}()
	var nextFree time.Time // bandwidth: when the next byte may go
	for c := range ch {
		b := c.b
		for len(b) > 0 {
			if !l.waitUntil(c.due) {
				l.drain(ch)
				return
			}
			if l.isShut(i) {
				b = nil // read and dropped: the receiver has its FIN
				break
			}
			set, _, _, _ := p.state()
			n := len(b)
			if r := set.rate[i]; r > 0 {
				// Pieces of about 10 ms at the rate.
				n = int(min(int64(n), max(r/100, 1)))
				now := time.Now()
				if nextFree.Before(now) {
					nextFree = now
				}
				if !l.waitUntil(nextFree) {
					l.drain(ch)
					return
				}
				nextFree = nextFree.Add(time.Duration(int64(n) * int64(time.Second) / r))
			}
			if _, err := dst.Write(b[:n]); err != nil {
				l.teardown()
				l.drain(ch)
				return
			}
			b = b[n:]
			p.bytes[i].Add(int64(n))
			l.passed[i].Add(int64(n))
			l.checkReset()
		}
	}
	if errors.Is(readErr, io.EOF) {
		l.shutDir(i)
		return
	}
	l.teardown()
}

// drain empties ch so the reader can end.
func (l *link) drain(ch <-chan chunk) {
	for range ch {
	}
}

// waitFlowing waits while the blackhole is on; false once the link is
// torn down.
func (l *link) waitFlowing() bool {
	for {
		set, _, closed, changed := l.p.state()
		if closed {
			return false
		}
		if !set.blackhole {
			select {
			case <-l.done:
				return false
			default:
				return true
			}
		}
		select {
		case <-changed:
		case <-l.done:
			return false
		}
	}
}

// waitUntil waits until t has passed and no blackhole is on; false once
// the link is torn down.
func (l *link) waitUntil(t time.Time) bool {
	for {
		if !l.waitFlowing() {
			return false
		}
		d := time.Until(t)
		if d <= 0 {
			return true
		}
		_, _, _, changed := l.p.state()
		timer := time.NewTimer(d)
		select {
		case <-timer.C:
		case <-changed:
		case <-l.done:
			timer.Stop()
			return false
		}
		timer.Stop()
	}
}

func (l *link) isShut(i int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.shut[i]
}

// shutDir sends a FIN to the receiver of direction i.
func (l *link) shutDir(i int) {
	l.mu.Lock()
	if l.shut[i] || l.torn {
		l.mu.Unlock()
		return
	}
	l.shut[i] = true
	dst := l.client
	if dirs[i] == Up {
		dst = l.up
	}
	l.mu.Unlock()
	if tc, ok := dst.(*net.TCPConn); ok {
		tc.CloseWrite()
	}
}

// checkReset resets the link if a ResetAfter threshold was passed.
func (l *link) checkReset() {
	set, _, _, _ := l.p.state()
	for i := range dirs {
		if n := set.resetAfter[i]; n > 0 && l.passed[i].Load() >= n {
			l.reset()
			return
		}
	}
}

// reset sends RST to both peers.
func (l *link) reset() {
	l.mu.Lock()
	conns := []net.Conn{l.client, l.up}
	l.mu.Unlock()
	for _, c := range conns {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
	}
	l.teardown()
}

// teardown closes both sockets once and forgets the link.
func (l *link) teardown() {
	l.mu.Lock()
	if l.torn {
		l.mu.Unlock()
		return
	}
	l.torn = true
	up := l.up
	close(l.done)
	l.mu.Unlock()
	l.client.Close()
	if up != nil {
		up.Close()
	}
	l.p.mu.Lock()
	delete(l.p.links, l)
	l.p.mu.Unlock()
}
