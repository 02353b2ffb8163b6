package mediator

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"d2m-mediator/d2m"
	"d2m-mediator/proto/d2mpb"
	"d2m-mediator/reflection"
)

// Server is the mediator. Create it with New, serve Handler() on the device
// listener, and end it with Shutdown.
type Server struct {
	cfg     Config
	store   reflection.Store
	log     zerolog.Logger
	metrics *metrics

	baseCtx    context.Context // parent of every connection context
	cancelBase context.CancelFunc

	mu     sync.Mutex // guards groups, conns, closed and Add on goroutines
	groups map[reflection.GroupID]*group
	conns  map[*deviceConn]struct{}
	// forwards are device connections copied to the node owning their
	// shard (cluster mode).
	forwards map[*forwarded]struct{}
	closed   bool
	// goroutines counts every goroutine the server starts (spawn):
	// connections, the janitor. Shutdown waits for it.
	goroutines sync.WaitGroup
	connSeq    atomic.Uint64
	handshakes chan struct{} // semaphore: handshakes in flight
	open       atomic.Int64  // open device connections
	ready      atomic.Bool
	keys       *keyPool    // ephemeral server keys, made ahead of the handshakes
	logAckErr  func(error) // done callback of every store Ack, made once

	// Connections the store's completions queued frames for, written by
	// the committer at the end of the commit (flush.go).
	flushMu       sync.Mutex
	completing    atomic.Bool
	flushOverflow bool // this commit reached more than maxInlineFlush connections
	flushList     []*deviceConn
	flushSpare    []*deviceConn

	janitorStop chan struct{}
}

// New returns a server over store. It does not take ownership of store:
// the caller closes it after Shutdown.
func New(cfg Config, store reflection.Store, log zerolog.Logger) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	s := &Server{
		cfg: cfg, store: store, log: log,
		metrics:     newMetrics(),
		baseCtx:     ctx,
		cancelBase:  cancel,
		groups:      make(map[reflection.GroupID]*group),
		conns:       make(map[*deviceConn]struct{}),
		forwards:    make(map[*forwarded]struct{}),
		handshakes:  make(chan struct{}, cfg.MaxHandshakes),
		janitorStop: make(chan struct{}),
	}
	s.metrics.registerServerGauges(s)
	s.logAckErr = s.logStoreErr("removing acked reflection")
	if h, ok := store.(storeWithCompletionHooks); ok {
		h.SetCompletionHooks(s.beginCompletions, s.endCompletions)
	}
	s.keys = newKeyPool(keyPoolSize)
	s.spawn(s.keys.fill)
	s.spawn(s.janitor)
	return s, nil
}

// spawn runs fn in a goroutine that Shutdown waits for. It reports false,
// without starting anything, once Shutdown has begun.
func (s *Server) spawn(fn func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.goroutines.Add(1)
	go func() {
		defer s.goroutines.Done()
		fn()
	}()
	return true
}

// Registry exposes the server's Prometheus metrics.
func (s *Server) Registry() *prometheus.Registry { return s.metrics.reg }

// ObserveCommit feeds storage commit statistics into the metrics; pass it
// as reflection.Options.OnCommit.
func (s *Server) ObserveCommit(batch int, took time.Duration, err error) {
	if s == nil || s.metrics == nil {
		return
	}
	s.metrics.observeCommit(batch, took, err)
}

// SetReady marks the device listener as accepting (for /readyz).
func (s *Server) SetReady(v bool) { s.ready.Store(v) }

// Ready reports whether the server accepts devices.
func (s *Server) Ready() bool { return s.ready.Load() && !s.isClosed() }

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *Server) groupForLocked(id reflection.GroupID) *group {
	g := s.groups[id]
	if g != nil && s.cfg.Placement != nil && g.epoch != s.epochOf(id) {
		// Made under an earlier epoch of the shard (it was moved away or
		// lost, and is served here again): its memory may be stale and
		// none of its writes is admitted any more. Its connections are
		// being closed; newcomers get state loaded under this epoch.
		g.mu.Lock()
		g.evicted = true
		g.mu.Unlock()
		delete(s.groups, id)
		g = nil
	}
	if g == nil {
		g = newGroup(s, id)
		s.groups[id] = g
	}
	return g
}

// acquireGroup returns the group's state and keeps it in memory until the
// matching releaseGroup. Connections hold a group from handshake to end;
// the janitor and the admin API hold one for a single operation.
func (s *Server) acquireGroup(id reflection.GroupID) *group {
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.groupForLocked(id)
	g.refs++
	return g
}

// acquireLoadedGroup is acquireGroup followed by load.
func (s *Server) acquireLoadedGroup(id reflection.GroupID) (*group, error) {
	g := s.acquireGroup(id)
	if err := g.load(); err != nil {
		s.releaseGroup(g)
		return nil, err
	}
	return g, nil
}

// releaseGroup drops a reference; the last one evicts an idle group, so
// memory follows the groups in use, not every group ever seen. The state
// is reloaded from the store on the next connection.
func (s *Server) releaseGroup(g *group) {
	s.mu.Lock()
	defer s.mu.Unlock()
	g.refs--
	s.maybeEvictLocked(g)
}

func (s *Server) maybeEvict(g *group) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.maybeEvictLocked(g)
}

// maybeEvictLocked forgets g if nothing holds it: no reference, no
// connection, no lock, no store write in flight and no load running.
func (s *Server) maybeEvictLocked(g *group) {
	if g.refs > 0 || s.groups[g.id] != g {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.conns) == 0 && g.txn == nil && g.storeWrites == 0 && g.loading == nil {
		g.evicted = true
		delete(s.groups, g.id)
	}
}

func (s *Server) logStoreErr(what string) func(error) {
	return func(err error) {
		if err != nil {
			s.log.Error().Err(err).Msg(what + " failed")
		}
	}
}

func shortID(g reflection.GroupID) string { return d2m.DeviceGroupID(g).Short() }

// Handler returns the device endpoint: a WebSocket upgrade on any path
// whose last segment is the hex ClientUrlInfo (§2).
func (s *Server) Handler() http.Handler {
	return http.HandlerFunc(s.serveDevice)
}

func (s *Server) serveDevice(w http.ResponseWriter, r *http.Request) {
	info, err := d2m.ParseClientURLPath(r.URL.Path)
	if err != nil {
		// §18 row 5: nothing is created for an invalid ClientUrlInfo.
		s.metrics.handshakes.WithLabelValues("bad_url").Inc()
		http.Error(w, "invalid client url info", http.StatusBadRequest)
		return
	}
	if s.isClosed() {
		w.Header().Set("Retry-After", "5")
		http.Error(w, "shutting down", http.StatusServiceUnavailable)
		return
	}
	if s.routeDevice(w, r, info.DeviceGroupID[0]) {
		return
	}
	// Admission control before the upgrade: in a reconnect storm an
	// upgrade waits briefly for a handshake slot (a waiting socket costs
	// little; a 503 makes the device dial again), then is answered 503
	// with Retry-After instead of piling up half-open sockets.
	if !s.admitHandshake(r.Context()) {
		s.metrics.handshakes.WithLabelValues("overload").Inc()
		w.Header().Set("Retry-After", "1")
		http.Error(w, "too many handshakes in flight", http.StatusServiceUnavailable)
		return
	}
	if s.open.Load() >= int64(s.cfg.MaxConnections) {
		<-s.handshakes
		s.metrics.handshakes.WithLabelValues("overload").Inc()
		w.Header().Set("Retry-After", "5")
		http.Error(w, "too many connections", http.StatusServiceUnavailable)
		return
	}
	cork := &corkConn{writeTimeout: s.cfg.WriteTimeout}
	ws, err := websocket.Accept(withUpgradeBuffers(w, cork), r, &websocket.AcceptOptions{
		// Payloads are ciphertext and do not compress.
		CompressionMode: websocket.CompressionDisabled,
		// Devices authenticate with the challenge, not with cookies, so
		// the browser origin check protects nothing here.
		InsecureSkipVerify: true,
	})
	if err != nil {
		<-s.handshakes
		s.metrics.handshakes.WithLabelValues("upgrade_failed").Inc()
		return
	}
	ws.SetReadLimit(d2m.MaxFrameSize)
	c := s.newConn(ws, info, r.RemoteAddr)
	if cork.Conn != nil {
		c.cork = cork
		cork.onWriteTimeout = func() {
			s.metrics.slowConsumers.Inc()
			c.closeWith(d2m.CloseInternalError, fmt.Errorf("%w: a write blocked for %v", errSlowConsumer, s.cfg.WriteTimeout))
		}
	}
	// The connection lives on in its own goroutine and the handler
	// returns, freeing net/http's per-request state: several KiB for every
	// connected device.
	if !s.startConn(c) {
		<-s.handshakes
		s.metrics.handshakes.WithLabelValues("shutting_down").Inc()
		ws.Close(websocket.StatusCode(d2m.CloseGoingAway), d2m.CloseGoingAway.String())
	}
}

// admitHandshake takes a handshake slot, waiting up to AdmissionWait.
func (s *Server) admitHandshake(ctx context.Context) bool {
	select {
	case s.handshakes <- struct{}{}:
		return true
	default:
	}
	if s.cfg.AdmissionWait <= 0 {
		return false
	}
	t := time.NewTimer(s.cfg.AdmissionWait)
	defer t.Stop()
	select {
	case s.handshakes <- struct{}{}:
		return true
	case <-t.C:
	case <-ctx.Done():
	case <-s.baseCtx.Done():
	}
	return false
}

func (s *Server) newConn(ws *websocket.Conn, info d2m.ClientURLInfo, remote string) *deviceConn {
	// Neither context is a child of baseCtx or of the other: a child
	// costs an entry in its parent's map of children, several hundred
	// bytes per idle device. cancel ends both; Shutdown cancels the
	// connections it gives up on itself.
	ctx, cancelCtx := context.WithCancel(context.Background())
	closingCtx, closingCancel := context.WithCancel(context.Background())
	c := &deviceConn{
		srv: s, ws: ws, info: info, remote: remote,
		seq: s.connSeq.Add(1), ctx: ctx, cancelCtx: cancelCtx,
		groupID:       reflection.GroupID(info.DeviceGroupID),
		ctrl:          newCtrlQueue(s.cfg.ReflectWindow + 64),
		replySem:      make(chan struct{}, maxPendingReplies),
		wakeCh:        make(chan struct{}, 1),
		proxyIn:       make(chan proxyUnit, proxyInBuffer),
		reflectSem:    make(chan struct{}, s.cfg.ReflectWindow),
		inflight:      make(map[uint32]uint64),
		closing:       make(chan struct{}),
		closingCtx:    closingCtx,
		closingCancel: closingCancel,
		writerDone:    make(chan struct{}),
	}
	return c
}

// startConn registers c and starts its run goroutine, unless the server is
// shutting down. Registration and the goroutine count change under one
// lock, so Shutdown sees every connection it has to wait for.
func (s *Server) startConn(c *deviceConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		c.cancel()
		return false
	}
	s.conns[c] = struct{}{}
	s.open.Add(1)
	s.metrics.connections.WithLabelValues("handshake").Inc()
	s.goroutines.Add(1)
	go func() {
		defer s.goroutines.Done()
		c.run()
	}()
	return true
}

func (s *Server) forgetConn(c *deviceConn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.open.Add(-1)
}

// run owns the connection from the upgrade to its end: it runs the
// handshake and the read loop on its own goroutine, and returns only after
// the writer and the upstream reader it started have ended. Every exit
// path unregisters and releases what the connection held.
func (c *deviceConn) run() {
	s := c.srv
	start := time.Now()
	defer s.forgetConn(c)
	defer c.cancel()
	inHandshake := true
	defer func() {
		// Also on a panic: the connection must not keep its handshake slot.
		if inHandshake {
			<-s.handshakes
			s.metrics.connections.WithLabelValues("handshake").Dec()
		}
	}()
	c.lastRead.Store(time.Now().UnixNano())
	hsTimer := time.AfterFunc(s.cfg.HandshakeTimeout, func() {
		c.closeWith(d2m.CloseIdleTimeout, errHandshakeTimeout)
	})
	var hwm uint64
	err := c.recovered("handshake", func() (err error) {
		hwm, err = c.handshake()
		return err
	})
	hsTimer.Stop()
	inHandshake = false
	<-s.handshakes
	s.metrics.connections.WithLabelValues("handshake").Dec()
	s.metrics.handshakes.WithLabelValues(c.handshakeOutcome(err)).Inc()
	if err == nil {
		err = c.recovered("connection", func() error { return c.live(hwm) })
	}
	c.closeWith(closeCodeFor(err))
	if c.upstream != nil {
		c.upstream.Close()
	}
	if c.group != nil {
		c.group.unregister(c)
		defer s.releaseGroup(c.group)
	}
	// The writer sends what was queued before the close and the close
	// frame, then ends for good; the upstream reader ends with its socket.
	<-c.writerDone
	c.upstreamLoop.Wait()
	c.ws.CloseNow()
	c.logEnd(err, start)
}

// recovered runs fn and turns a panic (a bug) into a 1011 close of this
// connection with the stack in the log, so that the connection still
// unregisters and waits for its goroutines, and the process keeps running.
func (c *deviceConn) recovered(what string, fn func() error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			c.logger().Error().Str("panic", fmt.Sprint(r)).Bytes("stack", debug.Stack()).Msg(what + " panicked")
			err = d2m.Close(d2m.CloseInternalError, fmt.Errorf("%s panic: %v", what, r))
		}
	}()
	return fn()
}

// closeCodeFor maps how the read side ended to the close to send: a
// *d2m.CloseError carries its code; anything else means the peer went away
// (or closed with its own code), answered with a normal closure.
func closeCodeFor(err error) (d2m.CloseCode, error) {
	var ce *d2m.CloseError
	if errors.As(err, &ce) {
		return ce.Code, ce.Err
	}
	return d2m.CloseNormal, err
}

// live runs an authenticated connection until its read side ends.
func (c *deviceConn) live(hwm uint64) error {
	s := c.srv
	s.metrics.connections.WithLabelValues("authenticated").Inc()
	defer s.metrics.connections.WithLabelValues("authenticated").Dec()
	c.logger().Info().Str("remote", c.remote).Msg("device connected")
	idle := c.startIdleTimer()
	defer idle.Stop()
	if len(c.early) > 0 {
		// The CSP client-hello that arrived during the handshake: its
		// upstream opens now, with the buffered bytes first (§18 row 2).
		if err := c.openUpstream(); err != nil {
			return err
		}
	}
	return c.readLoop()
}

// handshakeOutcome names how the handshake ended, for the one metric
// sample each handshake gets.
func (c *deviceConn) handshakeOutcome(err error) string {
	if err == nil {
		return "ok"
	}
	c.closeMu.Lock()
	cause := c.closeCause
	c.closeMu.Unlock()
	if errors.Is(cause, errHandshakeTimeout) {
		return "timeout"
	}
	if code := d2m.CloseCode(c.closeCode.Load()); code == d2m.CloseGoingAway && errors.Is(cause, errShuttingDown) {
		return "shutting_down"
	}
	var ce *d2m.CloseError
	if !errors.As(err, &ce) {
		return "aborted"
	}
	switch ce.Code {
	case d2m.CloseUnsupportedVersion:
		return "unsupported_version"
	case d2m.CloseProtocolError:
		return "protocol_error"
	case d2m.CloseDeviceLimit:
		return "device_limit"
	case d2m.CloseSlotStateMismatch, d2m.CloseDropped, d2m.CloseQueueLimit:
		return "slot_state"
	case d2m.CloseDuplicate:
		return "replaced"
	}
	return "failed"
}

// logEnd writes the one line per connection that explains how it ended.
func (c *deviceConn) logEnd(err error, start time.Time) {
	code := d2m.CloseCode(c.closeCode.Load())
	c.srv.metrics.closes.WithLabelValues(strconv.Itoa(int(code))).Inc()
	c.closeMu.Lock()
	cause := c.closeCause
	c.closeMu.Unlock()
	switch {
	case errors.Is(cause, errHandshakeTimeout):
		c.srv.metrics.timeouts.WithLabelValues("handshake").Inc()
	case errors.Is(cause, errIdleTimeout):
		c.srv.metrics.timeouts.WithLabelValues("idle").Inc()
	}
	log := c.logger()
	ev := log.Info()
	if code == d2m.CloseInternalError || code == d2m.CloseProtocolError || code == d2m.CloseUpstreamError {
		ev = log.Warn()
	}
	if cause == nil {
		cause = err
	}
	ev = ev.Int("code", int(code)).Str("reason", code.String()).
		Dur("duration", time.Since(start))
	if cause != nil {
		ev = ev.Str("cause", describeCause(cause))
	}
	ev.Msg("device disconnected")
}

// describeCause words the end of a connection for the log: a close frame
// from the device is the device's decision, not a read failure.
func describeCause(err error) string {
	if st := websocket.CloseStatus(err); st != -1 {
		var ce websocket.CloseError
		if errors.As(err, &ce) && ce.Reason != "" {
			return fmt.Sprintf("device closed the connection with %d (%s)", int(st), ce.Reason)
		}
		return fmt.Sprintf("device closed the connection with %d", int(st))
	}
	if errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		return "connection lost: " + err.Error()
	}
	return err.Error()
}

func (c *deviceConn) startIdleTimer() *time.Timer {
	idle := c.srv.cfg.IdleTimeout
	var t *time.Timer
	t = time.AfterFunc(idle, func() {
		since := time.Since(time.Unix(0, c.lastRead.Load()))
		if c.readPaused.Load() {
			since = 0 // the server is not reading, not the device silent
		}
		if since >= idle {
			c.closeWith(d2m.CloseIdleTimeout, errIdleTimeout)
			return
		}
		t.Reset(idle - since)
	})
	return t
}

// Shutdown stops accepting devices, closes every connection with 1001
// spread over ShutdownSpread (so they do not all reconnect at once, §18
// row 15) and waits for every goroutine the server started. When ctx ends
// first, the remaining connections are dropped without a close handshake
// and Shutdown returns ctx.Err() once they are gone. The caller shuts the
// HTTP server down first and closes the store afterwards.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	first := !s.closed
	s.closed = true
	conns := make([]*deviceConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	for f := range s.forwards {
		f.close() // the device reconnects, to wherever its shard is served
	}
	s.mu.Unlock()
	if first {
		close(s.janitorStop)
		s.keys.stop()
		s.closeSpread(ctx, conns)
	}
	done := make(chan struct{})
	go func() { s.goroutines.Wait(); close(done) }()
	select {
	case <-done:
		s.cancelBase()
		return nil
	case <-ctx.Done():
	}
	// Out of time: drop what remains. Reads and writes fail at once, so
	// the connections' goroutines end promptly.
	s.cancelBase()
	s.mu.Lock()
	for c := range s.conns {
		c.cancel()
		c.ws.CloseNow()
	}
	s.mu.Unlock()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		s.log.Error().Msg("shutdown: goroutines still running after the connections were dropped")
	}
	return ctx.Err()
}

// closeSpread closes conns with 1001 in small batches over ShutdownSpread,
// or over half the time ctx leaves if that is shorter.
func (s *Server) closeSpread(ctx context.Context, conns []*deviceConn) {
	if len(conns) == 0 {
		return
	}
	spread := s.cfg.ShutdownSpread
	if dl, ok := ctx.Deadline(); ok {
		spread = min(spread, time.Until(dl)/2)
	}
	const tick = 10 * time.Millisecond
	rounds := max(int(spread/tick), 1)
	per := (len(conns) + rounds - 1) / rounds
	t := time.NewTicker(tick)
	defer t.Stop()
	for len(conns) > 0 {
		n := min(per, len(conns))
		for _, c := range conns[:n] {
			c.closeWith(d2m.CloseGoingAway, errShuttingDown)
		}
		conns = conns[n:]
		if len(conns) == 0 {
			return
		}
		select {
		case <-t.C:
		case <-ctx.Done():
			for _, c := range conns {
				c.closeWith(d2m.CloseGoingAway, errShuttingDown)
			}
			return
		}
	}
}

// handshake runs §6 up to ServerInfo and returns the queue's next seq at
// login (everything below it is backlog for ReflectionQueueDry). It only
// reads; the writer sends the ServerHello and the ServerInfo.
func (c *deviceConn) handshake() (uint64, error) {
	s := c.srv
	esk, err := s.keys.get()
	if err != nil {
		return 0, d2m.Close(d2m.CloseInternalError, err)
	}
	challenge := make([]byte, d2m.ChallengeSize)
	if _, err := rand.Read(challenge); err != nil {
		return 0, d2m.Close(d2m.CloseInternalError, err)
	}
	c.queueHandshakeFrame(d2m.MustEncodeMessage(d2m.TypeServerHello, &d2mpb.ServerHello{
		Version: 0, Esk: esk.Public(), Challenge: challenge,
	}), false)
	var ch *d2mpb.ClientHello
	for ch == nil {
		typ, payload, err := c.readFrame()
		if err != nil {
			return 0, err
		}
		switch typ {
		case d2m.TypeProxy:
			// Clients send the CSP client-hello as soon as the socket
			// opens (§6 "The early Proxy"): keep it until auth.
			c.earlyLen += len(payload)
			if c.earlyLen > s.cfg.EarlyProxyLimit {
				return 0, d2m.Close(d2m.CloseProtocolError, errors.New("early proxy bytes over the limit"))
			}
			c.early = append(c.early, payload)
			c.proxied.Store(true)
		case d2m.TypeClientHello:
			if ch, err = d2m.DecodeClientHello(payload); err != nil {
				return 0, d2m.Close(d2m.CloseProtocolError, err)
			}
		default:
			return 0, d2m.Close(d2m.CloseProtocolError, fmt.Errorf("%v before ClientHello", typ))
		}
	}
	if ch.Version != 0 {
		return 0, d2m.Close(d2m.CloseUnsupportedVersion, nil)
	}
	// Open protobuf enums accept any number; only the protocol's values
	// are stored (an unknown expiration policy must not silently become
	// VOLATILE).
	if _, ok := d2mpb.DeviceSlotExpirationPolicy_name[int32(ch.DeviceSlotExpirationPolicy)]; !ok {
		return 0, d2m.Close(d2m.CloseProtocolError, errors.New("unknown device slot expiration policy"))
	}
	if _, ok := d2mpb.ClientHello_DeviceSlotsExhaustedPolicy_name[int32(ch.DeviceSlotsExhaustedPolicy)]; !ok {
		return 0, d2m.Close(d2m.CloseProtocolError, errors.New("unknown device slots exhausted policy"))
	}
	if ch.ExpectedDeviceSlotState != nil {
		if _, ok := d2mpb.DeviceSlotState_name[int32(*ch.ExpectedDeviceSlotState)]; !ok {
			return 0, d2m.Close(d2m.CloseProtocolError, errors.New("unknown expected device slot state"))
		}
	}
	if err := d2m.VerifyChallengeResponse(esk, c.info.DeviceGroupID, challenge, ch.Response); err != nil {
		return 0, d2m.Close(d2m.CloseProtocolError, err)
	}
	c.deviceID = reflection.DeviceID(ch.DeviceId)
	c.devKnown.Store(true)
	c.group = s.acquireGroup(c.groupID)
	if err := c.group.load(); err != nil {
		return 0, d2m.Close(storeCloseCode(err), err)
	}
	state, persisted, err := c.group.register(c, ch)
	if err != nil {
		return 0, err
	}
	if err := <-persisted; err != nil {
		c.group.abandonRegistration(c, state == d2mpb.DeviceSlotState_NEW)
		return 0, d2m.Close(storeCloseCode(err), err)
	}
	if c.isClosing() {
		// Replaced (4112) or dropped while the slot was being stored.
		return 0, d2m.Close(d2m.CloseCode(c.closeCode.Load()), nil)
	}
	stats, _ := s.store.QueueStats(c.groupID, c.deviceID)
	info, err := d2m.EncodeMessage(d2m.TypeServerInfo, &d2mpb.ServerInfo{
		MaxDeviceSlots:            uint32(s.cfg.MaxDeviceSlots),
		DeviceSlotState:           state,
		EncryptedSharedDeviceData: c.group.sharedDeviceData(),
		CurrentTime:               uint64(time.Now().UnixMilli()),
		ReflectionQueueLength:     uint32(stats.Length),
	})
	if err != nil {
		// Shared data stored before it was size-checked (handlers.go
		// fitsServerInfo): fail this connection, not the process.
		return 0, d2m.Close(d2m.CloseInternalError, fmt.Errorf("ServerInfo: %w", err))
	}
	if stats.NextSeq > 0 {
		c.noteReady(stats.NextSeq - 1)
	}
	c.startDelivery(stats.NextSeq)
	// The writer sends the ServerInfo and the first window of the backlog
	// in one write.
	c.queueHandshakeFrame(info, true)
	return stats.NextSeq, nil
}

// readFrame reads one binary frame and splits the container.
//
// The read is not bound to c.ctx: with a cancellable context the WebSocket
// library registers and removes a context.AfterFunc on every message (5 %
// of server CPU at 5,000 reflects/s, in the parent context's lock and the
// timer bookkeeping). Nothing needs it: a read ends when the socket does,
// and whoever gives up on a connection closes the socket (the writer's
// CloseNow once c.ctx ends; Shutdown's CloseNow when out of time).
func (c *deviceConn) readFrame() (d2m.PayloadType, []byte, error) {
	typ, b, err := c.ws.Read(context.Background())
	if err != nil {
		return 0, nil, err
	}
	c.frameAt = time.Now()
	c.lastRead.Store(c.frameAt.UnixNano())
	c.srv.metrics.framesIn.Inc()
	if typ != websocket.MessageBinary {
		return 0, nil, d2m.Close(d2m.CloseProtocolError, errTextFrame)
	}
	t, payload, err := d2m.DecodeContainer(b)
	if err != nil {
		return 0, nil, d2m.Close(d2m.CloseProtocolError, err)
	}
	return t, payload, nil
}

var (
	encodedReflectionQueueDry   = d2m.MustEncodeMessage(d2m.TypeReflectionQueueDry, &d2mpb.ReflectionQueueDry{})
	encodedRolePromoted         = d2m.MustEncodeMessage(d2m.TypeRolePromotedToLeader, &d2mpb.RolePromotedToLeader{})
	encodedBeginTransactionAck  = d2m.MustEncodeMessage(d2m.TypeBeginTransactionAck, &d2mpb.BeginTransactionAck{})
	encodedCommitTransactionAck = d2m.MustEncodeMessage(d2m.TypeCommitTransactionAck, &d2mpb.CommitTransactionAck{})
)
