package mediator

import (
	"context"
	"errors"
	"fmt"
	"net/http"
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

	mu         sync.Mutex // guards groups, conns, closed
	groups     map[reflection.GroupID]*group
	conns      map[*deviceConn]struct{}
	closed     bool
	connsWG    sync.WaitGroup
	connSeq    atomic.Uint64
	handshakes chan struct{} // semaphore: handshakes in flight
	open       atomic.Int64  // open device connections
	ready      atomic.Bool

	janitorStop chan struct{}
	janitorDone chan struct{}
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
		handshakes:  make(chan struct{}, cfg.MaxHandshakes),
		janitorStop: make(chan struct{}),
		janitorDone: make(chan struct{}),
	}
	s.metrics.registerServerGauges(s)
	go s.janitor()
	return s, nil
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

// groupFor returns the group's state object without holding it in memory;
// callers that lock it must check evicted (see lockGroup).
func (s *Server) groupFor(id reflection.GroupID) *group {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.groupForLocked(id)
}

func (s *Server) groupForLocked(id reflection.GroupID) *group {
	g := s.groups[id]
	if g == nil {
		g = newGroup(s, id)
		s.groups[id] = g
	}
	return g
}

// lockGroup returns the group's live state object with g.mu held.
func (s *Server) lockGroup(id reflection.GroupID) *group {
	for {
		g := s.groupFor(id)
		g.mu.Lock()
		if !g.evicted {
			return g
		}
		g.mu.Unlock()
	}
}

// acquireGroup returns the group's state and keeps it in memory until the
// matching releaseGroup. Connections hold a group from handshake to end.
func (s *Server) acquireGroup(id reflection.GroupID) *group {
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.groupForLocked(id)
	g.refs++
	return g
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

func (s *Server) maybeEvictLocked(g *group) {
	if g.refs > 0 || s.groups[g.id] != g {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.conns) == 0 && g.txn == nil {
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
	if c == nil {
		<-s.handshakes
		ws.Close(websocket.StatusCode(d2m.CloseGoingAway), d2m.CloseGoingAway.String())
		return
	}
	if cork.Conn != nil {
		c.cork = cork
		cork.onWriteTimeout = func() {
			s.metrics.slowConsumers.Inc()
			c.closeWith(d2m.CloseInternalError, fmt.Errorf("%w: a write blocked for %v", errSlowConsumer, s.cfg.WriteTimeout))
		}
	}
	// The handler runs the handshake; the connection then lives on in its
	// own goroutine and the handler returns, freeing net/http's
	// per-request state and the stack the handshake grew: several KiB for
	// every connected device.
	c.serve()
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
	ctx, cancel := context.WithCancel(s.baseCtx)
	c := &deviceConn{
		srv: s, ws: ws, info: info, remote: remote,
		seq: s.connSeq.Add(1), ctx: ctx, cancel: cancel,
		groupID:    reflection.GroupID(info.DeviceGroupID),
		ctrl:       newCtrlQueue(s.cfg.ReflectWindow + 64),
		replySem:   make(chan struct{}, maxPendingReplies),
		wakeCh:     make(chan struct{}, 1),
		proxyIn:    make(chan proxyUnit, 16),
		reflectSem: make(chan struct{}, s.cfg.ReflectWindow),
		inflight:   make(map[uint32]uint64),
		closing:    make(chan struct{}),
		sendDone:   make(chan struct{}),
		wsClosed:   make(chan struct{}),
	}
	c.log = s.log.With().Str("group", info.DeviceGroupID.Short()).Uint64("conn", c.seq).Logger()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		cancel()
		return nil
	}
	s.conns[c] = struct{}{}
	s.connsWG.Add(1)
	s.open.Add(1)
	s.metrics.connections.WithLabelValues("handshake").Inc()
	return c
}

func (s *Server) forgetConn(c *deviceConn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.open.Add(-1)
	s.connsWG.Done()
}

// serve runs one connection's handshake and registration, then hands it
// to live; every exit path unregisters and ends the goroutines it started.
func (c *deviceConn) serve() {
	s := c.srv
	start := time.Now()
	slotHeld, handedOff := true, false
	defer func() {
		// Also on a panic (net/http recovers it): the connection must not
		// keep its handshake slot or stay counted.
		if slotHeld {
			<-s.handshakes
			s.metrics.connections.WithLabelValues("handshake").Dec()
		}
		if !handedOff {
			if c.group != nil {
				s.releaseGroup(c.group)
			}
			c.cancel()
			s.forgetConn(c)
		}
	}()
	c.lastRead.Store(time.Now().UnixNano())
	hsTimer := time.AfterFunc(s.cfg.HandshakeTimeout, func() {
		s.metrics.handshakes.WithLabelValues("timeout").Inc()
		c.closeWith(d2m.CloseIdleTimeout, errors.New("handshake timeout"))
	})
	hwm, err := c.handshake()
	hsTimer.Stop()
	slotHeld = false
	<-s.handshakes
	s.metrics.connections.WithLabelValues("handshake").Dec()
	if err != nil {
		c.endWith(err, start)
		return
	}
	handedOff = true
	go c.live(hwm, start)
}

// live runs an authenticated connection until it ends, then unregisters
// it and releases everything the connection held.
func (c *deviceConn) live(hwm uint64, start time.Time) {
	s := c.srv
	defer s.forgetConn(c)
	defer c.cancel()
	defer s.releaseGroup(c.group)
	var err error
	s.metrics.handshakes.WithLabelValues("ok").Inc()
	s.metrics.connections.WithLabelValues("authenticated").Inc()
	defer s.metrics.connections.WithLabelValues("authenticated").Dec()

	c.log.Info().Str("remote", c.remote).Msg("device connected")
	c.startSendLoop(hwm)
	idle := c.startIdleTimer()
	if len(c.early) > 0 {
		// The CSP client-hello that arrived during the handshake: its
		// upstream opens now, with the buffered bytes first (§18 row 2).
		err = c.openUpstream()
	}
	if err == nil {
		err = c.readLoop()
	}
	idle.Stop()
	if err != nil {
		var ce *d2m.CloseError
		if errors.As(err, &ce) {
			c.closeWith(ce.Code, ce.Err)
		} else {
			// The peer went away (or closed with its own code); close our
			// side without a handshake.
			c.closeWith(d2m.CloseNormal, err)
		}
	}
	if c.upstream != nil {
		c.upstream.Close()
	}
	c.group.unregister(c)
	select {
	case <-c.sendDone:
	case <-time.After(12 * time.Second):
		c.ws.CloseNow()
		<-c.sendDone
	}
	c.ws.CloseNow()
	c.logEnd(err, start)
}

func (c *deviceConn) endWith(err error, start time.Time) {
	var ce *d2m.CloseError
	if errors.As(err, &ce) {
		c.closeWith(ce.Code, ce.Err)
		c.srv.metrics.handshakes.WithLabelValues(handshakeOutcome(ce.Code)).Inc()
	} else {
		c.closeWith(d2m.CloseNormal, err)
		c.srv.metrics.handshakes.WithLabelValues("aborted").Inc()
	}
	// Without a sendLoop, closeWith runs the close handshake in its own
	// goroutine; wait for it so the device gets its code.
	select {
	case <-c.wsClosed:
	case <-time.After(11 * time.Second):
	}
	c.ws.CloseNow()
	c.logEnd(err, start)
}

func handshakeOutcome(code d2m.CloseCode) string {
	switch code {
	case d2m.CloseIdleTimeout:
		return "timeout"
	case d2m.CloseUnsupportedVersion:
		return "unsupported_version"
	case d2m.CloseProtocolError:
		return "protocol_error"
	case d2m.CloseDeviceLimit:
		return "device_limit"
	case d2m.CloseSlotStateMismatch, d2m.CloseDropped, d2m.CloseQueueLimit:
		return "slot_state"
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
	ev := c.log.Info()
	if code == d2m.CloseInternalError || code == d2m.CloseProtocolError || code == d2m.CloseUpstreamError {
		ev = c.log.Warn()
	}
	if cause == nil {
		cause = err
	}
	ev = ev.Int("code", int(code)).Str("reason", code.String()).
		Dur("duration", time.Since(start))
	if cause != nil {
		ev = ev.AnErr("cause", cause)
	}
	ev.Msg("device disconnected")
}

func (c *deviceConn) startIdleTimer() *time.Timer {
	idle := c.srv.cfg.IdleTimeout
	var t *time.Timer
	t = time.AfterFunc(idle, func() {
		since := time.Since(time.Unix(0, c.lastRead.Load()))
		if since >= idle {
			c.closeWith(d2m.CloseIdleTimeout, nil)
			return
		}
		t.Reset(idle - since)
	})
	return t
}

// Shutdown stops accepting devices, closes every connection with 1001
// spread over ShutdownSpread (so they do not all reconnect at once) and
// waits for them, at most until ctx ends (§18 row 15). The caller shuts the
// HTTP server down first and closes the store afterwards.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	conns := make([]*deviceConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	close(s.janitorStop)
	<-s.janitorDone

	if len(conns) > 0 {
		step := s.cfg.ShutdownSpread / time.Duration(len(conns))
		for _, c := range conns {
			c.closeWith(d2m.CloseGoingAway, nil)
			if step > 0 {
				select {
				case <-time.After(step):
				case <-ctx.Done():
				}
			}
		}
	}
	done := make(chan struct{})
	go func() { s.connsWG.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.cancelBase() // remaining sockets are dropped without a handshake
		<-done
	}
	s.cancelBase()
	return nil
}

// handshake runs §6 up to ServerInfo and returns the queue's next seq at
// login (everything below it is backlog for ReflectionQueueDry).
func (c *deviceConn) handshake() (uint64, error) {
	s := c.srv
	esk, challenge, err := d2m.NewChallenge()
	if err != nil {
		return 0, d2m.Close(d2m.CloseInternalError, err)
	}
	hello := d2m.MustEncodeMessage(d2m.TypeServerHello, &d2mpb.ServerHello{
		Version: 0, Esk: esk.PublicKey().Bytes(), Challenge: challenge,
	})
	if err := c.write(hello); err != nil {
		return 0, err
	}
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
	c.log = c.log.With().Uint64("device", ch.DeviceId).Logger()
	c.group = s.acquireGroup(c.groupID)
	state, persisted, err := c.group.register(c, ch)
	if err != nil {
		return 0, err
	}
	if err := <-persisted; err != nil {
		c.group.unregister(c)
		return 0, d2m.Close(d2m.CloseInternalError, err)
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
		c.group.unregister(c)
		return 0, d2m.Close(d2m.CloseInternalError, fmt.Errorf("ServerInfo: %w", err))
	}
	if err := c.write(info); err != nil {
		c.group.unregister(c)
		return 0, err
	}
	if c.isClosing() {
		// Replaced (4112) or dropped while the slot was being stored.
		c.group.unregister(c)
		return 0, d2m.Close(d2m.CloseCode(c.closeCode.Load()), nil)
	}
	return stats.NextSeq, nil
}

// readFrame reads one binary frame and splits the container.
func (c *deviceConn) readFrame() (d2m.PayloadType, []byte, error) {
	typ, b, err := c.ws.Read(c.ctx)
	if err != nil {
		return 0, nil, err
	}
	c.lastRead.Store(time.Now().UnixNano())
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
