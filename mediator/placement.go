package mediator

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/reflection"
)

// Placement places device groups on the nodes of a cluster (package
// cluster implements it through etcd). A shard is the first byte of the
// device group id; everything of one group lives on the node that owns its
// shard. Nil in Config means a single node that serves every shard.
//
// Every group write passes the shard's lifecycle (Admit): a group's
// in-memory state is loaded while the shard is served at one epoch, and
// its writes are admitted only under that epoch. While a planned move has
// frozen the shard, writes wait; once the shard is handed over (or lost),
// they are refused and the device's connection ends with 1001, so that it
// redoes them on the new owner. So nothing is acknowledged that the new
// owner will not have.
type Placement interface {
	// Route says where devices of the shard are served right now.
	Route(shard byte) Route
	// MayAck reports whether this node may still acknowledge reflections
	// of the shard. It is asked once per ReflectAck and must answer from
	// memory (the fence clock), never from the network.
	MayAck(shard byte) bool
	// Epoch returns the epoch at which this node serves the shard now;
	// ok is false while it does not.
	Epoch(shard byte) (epoch int64, ok bool)
	// Admit admits one group write of the shard by state loaded at
	// epoch: at once while the shard is served there, after the thaw
	// while a planned move has frozen it, never once it is no longer
	// served here at epoch, or when ctx ends. The error says why; if it
	// has a CloseReason() string method, that is the close reason the
	// device gets. Release follows every admitted write once it has been
	// submitted to the store.
	Admit(ctx context.Context, shard byte, epoch int64) error
	Release(shard byte)
}

// Route is where one shard is served.
type Route struct {
	Local bool   // this node owns the shard
	Node  string // the owner's node id ("" when nobody serves it)
	Addr  string // the owner's device listener, host:port ("" when nobody serves it)
	// TLS: the owner's device listener serves TLS; a forward dials it
	// with TLS and verifies its certificate (Config.NodeTLS).
	TLS bool
	// Settling: the answer is about to change on this node (it owns the
	// shard but may not ack for it at this instant, or it is taking the
	// shard over in a move). An upgrade waits up to settleWait for a
	// settled answer instead of being refused.
	Settling bool
}

// ForwardedHeader marks an upgrade request one node forwarded to another
// (the value names the forwarding node); ForwardHopsHeader counts the
// hops. A node that receives a forwarded upgrade for a shard it does not
// serve forwards it once more (the shard has just moved on, and this node
// knows where), but never past maxForwardHops: stale shard maps cannot
// make a loop.
const (
	ForwardedHeader   = "D2m-Forwarded-By"
	ForwardHopsHeader = "D2m-Forward-Hops"
	maxForwardHops    = 2
)

// forwardHops is how many nodes forwarded r already.
func forwardHops(r *http.Request) int {
	if r.Header.Get(ForwardedHeader) == "" {
		return 0
	}
	n, err := strconv.Atoi(r.Header.Get(ForwardHopsHeader))
	if err != nil || n < 1 {
		return 1 // a node that counted no hops
	}
	return n
}

// unavailableRetryAfter is the Retry-After of a 503 for a shard nobody
// serves: about the lease TTL, after which a returning node has claimed it.
const unavailableRetryAfter = "5"

// settleWait bounds how long an upgrade waits for a settling route. A
// fence clock that ran out because one keepalive was late is renewed by
// the next one (LeaseTTL/3 later, about 1.7 s at the default TTL); a move
// flips ownership in one etcd round trip after the import. Both are far
// below a client's dial timeout; anything longer is an outage, answered
// with 503 as before.
const settleWait = 3 * time.Second

// settlePoll is how often a waiting upgrade asks the placement again; the
// placement answers from memory, so polling costs no network.
const settlePoll = 20 * time.Millisecond

var (
	errFenced     = errors.New("shard no longer owned here: not acknowledging")
	errShardMoved = errors.New("shard no longer served by this node")
)

func shardOf(g reflection.GroupID) byte { return g[0] }

// mayAck is the fence on the reflect path.
func (s *Server) mayAck(g reflection.GroupID) bool {
	return s.cfg.Placement == nil || s.cfg.Placement.MayAck(shardOf(g))
}

// epochOf is the epoch under which a group's state loaded now is
// served (0 in single-node mode).
func (s *Server) epochOf(g reflection.GroupID) int64 {
	if s.cfg.Placement == nil {
		return 0
	}
	e, _ := s.cfg.Placement.Epoch(shardOf(g))
	return e
}

// admit passes one write of g through its shard's lifecycle; a refusal is
// a 1001 close with the reason (the device redoes the write wherever the
// shard is served now). Every nil return is followed by released.
func (g *group) admit(ctx context.Context) error {
	p := g.srv.cfg.Placement
	if p == nil {
		return nil
	}
	if err := p.Admit(ctx, shardOf(g.id), g.epoch); err != nil {
		g.srv.metrics.writesRefused.Inc()
		return d2m.Close(d2m.CloseGoingAway, err)
	}
	return nil
}

func (g *group) released() {
	if p := g.srv.cfg.Placement; p != nil {
		p.Release(shardOf(g.id))
	}
}

// routeDevice serves an upgrade for a shard this node does not own: it
// forwards the connection to the owner (clients cannot be redirected:
// WebSocket clients fail on anything but 101), or answers 503 with
// Retry-After when nobody serves the shard. It reports whether it
// answered the request.
func (s *Server) routeDevice(w http.ResponseWriter, r *http.Request, shard byte) bool {
	if s.cfg.Placement == nil {
		return false
	}
	rt := s.cfg.Placement.Route(shard)
	if rt.Settling {
		rt = s.awaitSettled(r.Context(), shard, rt)
	}
	if rt.Local {
		return false
	}
	hops := forwardHops(r)
	if hops >= maxForwardHops {
		s.metrics.forwards.WithLabelValues("loop_refused").Inc()
		w.Header().Set("Retry-After", "1")
		http.Error(w, fmt.Sprintf("forwarded %d times (last by %s) for a shard this node does not serve", hops, r.Header.Get(ForwardedHeader)), http.StatusServiceUnavailable)
		return true
	}
	if rt.Addr == "" {
		s.metrics.forwards.WithLabelValues("unavailable").Inc()
		w.Header().Set("Retry-After", unavailableRetryAfter)
		http.Error(w, "the device group's shard is not served right now", http.StatusServiceUnavailable)
		return true
	}
	s.forward(w, r, rt, hops+1)
	return true
}

// awaitSettled asks the placement again until the shard's route has
// settled, settleWait has passed or the device gave up, and returns the
// last answer. Without it, a device that a fence blip or a move's flip
// closed with 1001 reconnects within milliseconds into a 503: the node
// that owns the shard but may not ack at this instant has nowhere to send
// it, and the recipient of a move that has not recorded its own flip yet
// forwards it back to the donor, which refuses it as a loop.
func (s *Server) awaitSettled(ctx context.Context, shard byte, rt Route) Route {
	s.metrics.forwards.WithLabelValues("settle_wait").Inc()
	deadline := time.NewTimer(settleWait)
	defer deadline.Stop()
	poll := time.NewTicker(settlePoll)
	defer poll.Stop()
	for rt.Settling {
		select {
		case <-ctx.Done():
			return rt
		case <-deadline.C:
			return rt
		case <-poll.C:
			rt = s.cfg.Placement.Route(shard)
		}
	}
	return rt
}

// forward copies the device's connection to the owner's device listener,
// byte for byte in both directions, after replaying the upgrade request
// with ForwardedHeader added (like DERP's mesh: one hop, no parsing of
// d2m frames). The copy runs on a goroutine the server counts; Shutdown
// closes both sockets, and a silent owner or device ends it (forward.go).
func (s *Server) forward(w http.ResponseWriter, r *http.Request, rt Route, hops int) {
	up, err := s.dialOwner(r.Context(), rt)
	if err != nil {
		s.metrics.forwards.WithLabelValues("dial_failed").Inc()
		var cv *tls.CertificateVerificationError
		if errors.As(err, &cv) {
			// A configuration error, not an outage: say so.
			s.log.Warn().Err(err).Str("owner", rt.Node).Str("addr", rt.Addr).
				Msg("cluster: forwarding a device failed: the owner's TLS certificate does not verify against the cluster CA (--cluster-ca-file)")
		}
		w.Header().Set("Retry-After", "1")
		http.Error(w, "the node serving this device group cannot be reached", http.StatusServiceUnavailable)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		up.Close()
		http.Error(w, "cannot forward this connection", http.StatusInternalServerError)
		return
	}
	req := r.Clone(context.Background())
	req.Header.Set(ForwardedHeader, s.cfg.NodeID)
	req.Header.Set(ForwardHopsHeader, strconv.Itoa(hops))
	req.RequestURI = ""
	if err := req.Write(up); err != nil {
		up.Close()
		s.metrics.forwards.WithLabelValues("dial_failed").Inc()
		w.Header().Set("Retry-After", "1")
		http.Error(w, "the node serving this device group cannot be reached", http.StatusServiceUnavailable)
		return
	}
	down, brw, err := hj.Hijack()
	if err != nil {
		up.Close()
		return
	}
	f := s.newForwarded(down, up, rt.Node) // forward.go
	if !s.trackForward(f) {
		f.close()
		return
	}
	s.metrics.forwards.WithLabelValues("forwarded").Inc()
	go func() {
		defer s.untrackForward(f)
		f.copy(brw.Reader, s.metrics.forwardedBytes.WithLabelValues("to_owner").Add,
			s.metrics.forwardedBytes.WithLabelValues("to_device").Add)
	}()
}

// dialOwner connects to the owner's device listener: over TLS when it
// serves TLS, verifying its certificate for the host of its advertise
// address against Config.NodeTLS's roots. The dial and the handshake
// together are bounded by forwardDialTimeout.
func (s *Server) dialOwner(ctx context.Context, rt Route) (net.Conn, error) {
	dialer := &net.Dialer{Timeout: forwardDialTimeout}
	if !rt.TLS {
		return dialer.DialContext(ctx, "tcp", rt.Addr)
	}
	host, _, err := net.SplitHostPort(rt.Addr)
	if err != nil {
		return nil, err
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if s.cfg.NodeTLS != nil {
		tc = s.cfg.NodeTLS.Clone()
	}
	tc.ServerName = host
	// HTTP/1.1 only: the upgrade request is replayed as written.
	tc.NextProtos = []string{"http/1.1"}
	return (&tls.Dialer{NetDialer: dialer, Config: tc}).DialContext(ctx, "tcp", rt.Addr)
}

// forwardDialTimeout bounds connecting to the owner (TCP and TLS).
const forwardDialTimeout = 5 * time.Second

func (s *Server) trackForward(f *forwarded) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.forwards[f] = struct{}{}
	s.goroutines.Add(1)
	return true
}

func (s *Server) untrackForward(f *forwarded) {
	s.mu.Lock()
	delete(s.forwards, f)
	s.mu.Unlock()
	s.goroutines.Done()
}

// shardClosed is the cause of a CloseShard close; its reason is sent.
type shardClosed string

func (e shardClosed) Error() string       { return string(e) }
func (e shardClosed) CloseReason() string { return string(e) }

// CloseShard closes every connection of the shard's device groups with
// 1001 and reason (they reconnect, and land wherever the shard is served
// now). The cluster calls it when the node loses the shard.
func (s *Server) CloseShard(shard byte, reason string) int {
	s.mu.Lock()
	var conns []*deviceConn
	for c := range s.conns {
		if shardOf(c.groupID) == shard {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	cause := error(errShardMoved)
	if reason != "" {
		cause = shardClosed(reason)
	}
	for _, c := range conns {
		c.closeWith(d2m.CloseGoingAway, cause)
	}
	return len(conns)
}

// WaitShardClosed waits until no connection of the shard is left (after
// CloseShard), or ctx ends.
func (s *Server) WaitShardClosed(ctx context.Context, shard byte) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		s.mu.Lock()
		left := 0
		for c := range s.conns {
			if shardOf(c.groupID) == shard {
				left++
			}
		}
		s.mu.Unlock()
		if left == 0 {
			return nil
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			return fmt.Errorf("%d connections of shard %02x still open: %w", left, shard, ctx.Err())
		}
	}
}

// storeCloseCode is the close code for a device whose store write or read
// failed: 1001 when a replicated store fenced the shard (another node
// serves it now, so the device should simply reconnect), else 1011.
func storeCloseCode(err error) d2m.CloseCode {
	if errors.Is(err, reflection.ErrFenced) {
		return d2m.CloseGoingAway
	}
	return d2m.CloseInternalError
}
