package mediator

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/rs/zerolog"

	"d2m-mediator/chatproxy"
	"d2m-mediator/d2m"
	"d2m-mediator/reflection"
)

// deviceConn is the server's view of one device WebSocket.
//
// Ownership: run (one goroutine, started by Server.spawn) is the reader and
// owns the connection; the writer (sendLoop, started by kick only while
// there is something to write) and the upstream reader are started through
// c.goroutines, and run returns only after both are done. Every close,
// whatever state the connection is in, is decided by closeWith and carried
// out by the writer: it writes what was queued before the decision, then
// the close frame. No other goroutine writes to the socket.
type deviceConn struct {
	// Static after construction.
	srv       *Server
	ws        *websocket.Conn
	seq       uint64 // connection number, for logs and tie-breaks
	info      d2m.ClientURLInfo
	remote    string
	ctx       context.Context // ends when run ends (or the server gives up on it): cancel
	cancelCtx context.CancelFunc

	// upstreamLoop counts the upstream reader; Add happens on run's own
	// goroutine, which later waits for it. run waits for the writer on
	// writerDone: writers are started by whoever kicks, at most one at a
	// time, and the last one closes writerDone.
	upstreamLoop sync.WaitGroup

	// Set during the handshake, read-only afterwards.
	group          *group
	groupID        reflection.GroupID
	deviceID       reflection.DeviceID
	connectedSince int64       // unix ms; guarded by group.mu after registration
	devKnown       atomic.Bool // deviceID is set (for logger)

	// Handshake output, written by the writer before anything else: the
	// ServerHello until authentication, then the ServerInfo, which must be
	// the first frame after the ClientHello (docs/protocol.md §7) even if other
	// devices queued frames for this one while its slot was being stored.
	hsMu     sync.Mutex
	hsFrames [][]byte
	authed   atomic.Bool // ServerInfo queued: deliveries and control frames may follow

	// Outbound: everybody enqueues and kicks, only the writer writes the
	// socket. The writer runs only while there is something to write; an
	// idle device has no writer goroutine (and no stack for one).
	ctrl       ctrlQueue     // control replies and ReflectAcks, FIFO
	replySem   chan struct{} // answers to the device's own requests not yet written
	wakeCh     chan struct{} // coalescing "your queue grew"
	proxyIn    chan proxyUnit
	reflectSem chan struct{} // Reflects stored but not yet acked on the wire

	ephMu     sync.Mutex
	ephemeral []ephemeralItem // online-only reflections awaiting their turn

	// readyThrough is the highest queue seq whose store completion has been
	// handled by the group: deliveries read only up to it, so an entry
	// never overtakes an ephemeral reflection numbered before it whose
	// completion (which places it in c.ephemeral) has not run yet
	// (docs/protocol.md §18 row 4).
	readyThrough atomic.Uint64

	// In-flight Reflected: written by the writer, acked via the read loop.
	inflightMu sync.Mutex
	inflight   map[uint32]uint64 // Reflected id → queue seq
	recentEph  *[64]uint32       // ids of recently sent ephemeral Reflected; made on first use
	recentN    int

	// Owned by run.
	early    [][]byte // Proxy bytes received before authentication
	earlyLen int
	upstream *chatproxy.Upstream
	lastRead atomic.Int64 // unix nanos of the last inbound frame
	// readPaused: the reader waits for a Reflect window slot (the store
	// has not answered yet), so it reads nothing: the idle timer waits.
	readPaused atomic.Bool
	frameAt    time.Time // when the frame being handled was read

	// Cross-goroutine flags.
	dry           atomic.Bool   // ReflectionQueueDry written
	proxied       atomic.Bool   // sent Proxy bytes (started CSP)
	writerRunning atomic.Bool   // a writer goroutine runs (or has ended for good)
	dlv           delivery      // owned by the running writer
	cork          *corkConn     // nil if the upgrade gave no corkable conn
	batching      bool          // the writer has corked the socket; owned by the writer
	inlining      bool          // the round is another goroutine's inline write (flush.go); owned by the writer
	closeCode     atomic.Uint32 // first close code decided; 0 while open
	closeMu       sync.Mutex
	closeCause    error
	closing       chan struct{} // closed by closeWith
	closingCtx    context.Context
	closingCancel context.CancelFunc // cancels closingCtx (dials give up on a close)
	writerDone    chan struct{}      // closed when the writer has ended for good
	writerEnded   sync.Once          // closes writerDone
}

type outFrame struct {
	b          []byte
	reflectAck bool // frees a reflectSem slot once written
	reply      bool // frees a replySem slot once written
	// readAt and doneAt (ReflectAck only): when its Reflect was read and
	// when its commit ended, monotonic nanoseconds (reflectstages.go).
	readAt, doneAt int64
	// afterSeq holds the frame back until the Reflected with this queue seq
	// has been written: TransactionEnded must reach a device after the
	// reflections the transaction released into its queue (§10).
	afterSeq uint64
}

type proxyUnit struct {
	b    []byte
	code d2m.CloseCode // non-zero: the upstream ended; close with this code
	err  error
}

type ephemeralItem struct {
	seq       uint64
	flags     uint16
	timestamp uint64
	envelope  []byte
}

// maxEphemeralBacklog bounds online-only reflections waiting for a slow
// device; beyond it they are dropped and counted, as they carry no
// durability promise (§18 row 4).
const maxEphemeralBacklog = 64

var (
	errBeginWhileHolding = errors.New("BeginTransaction while holding the lock")
	errCommitWithoutLock = errors.New("CommitTransaction without holding the lock")
	errSlowConsumer      = errors.New("outbound queue full")
	errTextFrame         = errors.New("text frame")
	errHandshakeTimeout  = errors.New("handshake timeout")
	errIdleTimeout       = errors.New("no inbound frame within the idle timeout")
	errShuttingDown      = errors.New("server shutting down")
	errTransactionTTL    = errors.New("transaction lock held past its TTL")
)

// closeWith decides how the connection ends. The first call wins; the
// writer then sends the frames queued before the decision (so a
// DropDeviceAck precedes a self-drop's 4113) and the close frame. It never
// blocks: the committer, timers and other devices call it.
func (c *deviceConn) closeWith(code d2m.CloseCode, cause error) {
	c.closeMu.Lock()
	if c.closeCode.Load() != 0 {
		c.closeMu.Unlock()
		return
	}
	c.closeCause = cause
	c.closeCode.Store(uint32(code))
	close(c.closing)
	c.closeMu.Unlock()
	c.closingCancel()
	c.kick()
}

// logger is the server's logger with the connection's fields. It is made
// when a line is written, not kept: zerolog's With allocates a 500-byte
// buffer, and a connection writes few lines (connected, disconnected,
// failures), so keeping one cost every idle device 0.5 KiB.
func (c *deviceConn) logger() *zerolog.Logger {
	ctx := c.srv.log.With().Str("group", c.info.DeviceGroupID.Short()).Uint64("conn", c.seq)
	if c.devKnown.Load() {
		ctx = ctx.Str("device", deviceStr(c.deviceID))
	}
	l := ctx.Logger()
	return &l
}

// cancel ends ctx and closingCtx.
func (c *deviceConn) cancel() {
	c.cancelCtx()
	c.closingCancel()
}

// kick makes sure a writer runs to pick up what the caller just queued or
// signalled. Once the writer has ended for good, writerRunning stays true
// and kicks do nothing.
//
// While the store completes a commit, the connection is written by the
// committer at the end of the commit's completions instead (flush.go).
func (c *deviceConn) kick() {
	if c.writerRunning.CompareAndSwap(false, true) && !c.srv.deferFlush(c) {
		go c.sendLoop()
	}
}

// queueHandshakeFrame queues a ServerHello or ServerInfo for the writer.
func (c *deviceConn) queueHandshakeFrame(b []byte, authenticated bool) {
	c.hsMu.Lock()
	c.hsFrames = append(c.hsFrames, b)
	c.hsMu.Unlock()
	if authenticated {
		c.authed.Store(true)
	}
	// The handshake goroutine holds no lock here: it writes the frame
	// itself when the socket takes it at once.
	c.flushNow()
}

func (c *deviceConn) takeHandshakeFrames() [][]byte {
	c.hsMu.Lock()
	defer c.hsMu.Unlock()
	f := c.hsFrames
	c.hsFrames = nil
	return f
}

// startDelivery arms the reflection cursor after the ServerInfo: the writer
// sends the backlog (seq < hwm), then ReflectionQueueDry. Called by run
// before anything else can reach the writer's delivery state.
func (c *deviceConn) startDelivery(hwm uint64) {
	c.dlv = delivery{c: c, hwm: hwm, more: true}
}

func (c *deviceConn) isClosing() bool { return c.closeCode.Load() != 0 }

// enqueue queues a control frame without blocking; a device whose queue is
// full does not read and is closed.
func (c *deviceConn) enqueue(b []byte) {
	if !c.ctrl.push(outFrame{b: b}, false) {
		c.srv.metrics.slowConsumers.Inc()
		c.closeWith(d2m.CloseInternalError, errSlowConsumer)
		return
	}
	c.kick()
}

// enqueueAfter queues a control frame that sendLoop writes only once the
// queue entry seq has been delivered.
func (c *deviceConn) enqueueAfter(b []byte, seq uint64) {
	if !c.ctrl.push(outFrame{b: b, afterSeq: seq}, false) {
		c.srv.metrics.slowConsumers.Inc()
		c.closeWith(d2m.CloseInternalError, errSlowConsumer)
		return
	}
	c.kick()
}

// enqueueReflectAck never fails: ReflectAcks are bounded by reflectSem.
// t carries the Reflect's stage times so far.
func (c *deviceConn) enqueueReflectAck(b []byte, t reflectTimes) {
	c.srv.metrics.observeQueued(t)
	c.ctrl.push(outFrame{b: b, reflectAck: true, readAt: mono(t.read), doneAt: mono(t.commitDone)}, true)
	c.kick()
}

func (c *deviceConn) releaseReflect() {
	select {
	case <-c.reflectSem:
	default:
	}
}

func (c *deviceConn) wake() {
	c.signalWake()
	c.kick()
}

// signalWake sets the coalescing "your queue grew" flag without kicking.
func (c *deviceConn) signalWake() {
	select {
	case c.wakeCh <- struct{}{}:
	default:
	}
}

func (c *deviceConn) pushEphemeral(it ephemeralItem) {
	c.ephMu.Lock()
	if len(c.ephemeral) >= maxEphemeralBacklog {
		c.ephMu.Unlock()
		c.srv.metrics.ephemeralDrops.WithLabelValues("backlog").Inc()
		return
	}
	c.ephemeral = append(c.ephemeral, it)
	c.ephMu.Unlock()
	c.wake()
}

// noteEphemeralSent remembers the id so that the ReflectedAck every client
// sends anyway is accepted silently (§10).
func (c *deviceConn) noteEphemeralSent(id uint32) {
	c.inflightMu.Lock()
	if c.recentEph == nil {
		c.recentEph = new([64]uint32) // most devices never get one
	}
	c.recentEph[c.recentN%len(c.recentEph)] = id
	c.recentN++
	c.inflightMu.Unlock()
}

// ackReflected resolves a ReflectedAck: the queue seq for a durable entry,
// ok=false with ephemeral=true for a recent ephemeral id. wasFull reports
// that the delivery window was full before this ack: only then may the
// writer have stopped for want of room.
func (c *deviceConn) ackReflected(id uint32) (seq uint64, ok, ephemeral, wasFull bool) {
	c.inflightMu.Lock()
	defer c.inflightMu.Unlock()
	if seq, ok := c.inflight[id]; ok {
		wasFull = len(c.inflight) >= c.srv.cfg.DeliveryWindow
		delete(c.inflight, id)
		return seq, true, false, wasFull
	}
	n := 0
	if c.recentEph != nil {
		n = min(c.recentN, len(c.recentEph))
	}
	for i := 0; i < n; i++ {
		if c.recentEph[i] == id {
			return 0, false, true, false
		}
	}
	return 0, false, false, false
}

func (c *deviceConn) inflightCount() int {
	c.inflightMu.Lock()
	defer c.inflightMu.Unlock()
	return len(c.inflight)
}

// write sends one frame with its own deadline; a device that does not take
// a frame within WriteTimeout is a slow consumer and loses its connection
// (its durable data stays queued).
func (c *deviceConn) write(b []byte) error {
	if c.batching {
		// Corked: the frame is only appended; uncork applies the
		// timeout. An inline round never writes here (it bounds what it
		// collects by inlineBytes instead).
		err := c.cork.appendFrame(b, !c.inlining)
		if err == nil {
			c.srv.metrics.framesOut.Inc()
		}
		return err
	}
	ctx, cancel := context.WithCancel(c.ctx)
	defer cancel()
	// Not context.WithTimeout: the reason must be recorded before the
	// socket is torn down, or the read loop sees the close first and the
	// slow consumer is logged as a normal 1000 closure and not counted.
	timer := time.AfterFunc(c.srv.cfg.WriteTimeout, func() {
		c.srv.metrics.slowConsumers.Inc()
		c.closeWith(d2m.CloseInternalError, fmt.Errorf("%w: a write blocked for %v", errSlowConsumer, c.srv.cfg.WriteTimeout))
		cancel()
	})
	err := c.ws.Write(ctx, websocket.MessageBinary, b)
	timer.Stop()
	if err == nil {
		c.srv.metrics.framesOut.Inc()
	}
	return err
}

// sendLoop is the only writer of the socket. It writes the handshake
// frames, then control frames (ReflectAcks are latency-critical), Proxy
// units and reflection deliveries within the window. When nothing is left
// it ends; the next kick starts it again. Once the connection closes it
// performs the close handshake and ends for good (writerDone).
func (c *deviceConn) sendLoop() {
	defer func() {
		if r := recover(); r != nil {
			// A bug: end this connection, not the process. No writer runs
			// again (writerRunning stays set), so run can stop waiting.
			c.logger().Error().Str("panic", fmt.Sprint(r)).Bytes("stack", debug.Stack()).Msg("writer panicked")
			c.closeWith(d2m.CloseInternalError, fmt.Errorf("writer panic: %v", r))
			c.ws.CloseNow()
			c.writerEnded.Do(func() { close(c.writerDone) })
		}
	}()
	if c.writeUntilIdle() {
		c.writerEnded.Do(func() { close(c.writerDone) })
	}
}

// writeUntilIdle writes until nothing is left (false) or the connection
// is over (true).
func (c *deviceConn) writeUntilIdle() (ended bool) {
	d := &c.dlv
	for {
		select {
		case <-c.closing:
			c.finishClose()
			return true
		case <-c.ctx.Done():
			c.ws.CloseNow()
			return true
		default:
		}
		progressed, err := c.drainBatch(d)
		if err != nil {
			c.ws.CloseNow()
			return true
		}
		if progressed {
			continue
		}
		// Idle. A producer that signalled after the checks above saw a
		// running writer and did not start one, so look once more after
		// stepping down; a kick after that starts a new writer.
		c.writerRunning.Store(false)
		if !c.hasWork() || !c.writerRunning.CompareAndSwap(false, true) {
			return false
		}
	}
}

// drainBatch runs drainOnce with the socket corked, so that the round's
// frames (ServerInfo with the first window of the backlog, a window of
// deliveries, a run of ReflectAcks) leave in one write.
func (c *deviceConn) drainBatch(d *delivery) (bool, error) {
	if c.cork == nil {
		return c.drainOnce(d, nil)
	}
	var acks ackStamps
	c.cork.cork()
	c.batching = true
	progressed, err := c.drainRounds(d, &acks)
	c.batching = false
	if ferr := c.cork.uncork(); ferr != nil && err == nil {
		err = ferr
	}
	if err == nil {
		acks.flush(c.srv.metrics)
	}
	return progressed, err
}

// maxCorkedRounds bounds the rounds one corked write collects.
const maxCorkedRounds = 4

// drainRounds runs drainOnce until a round finds nothing more, at most
// maxCorkedRounds times, so that frames a round itself causes (the
// RolePromotedToLeader that writing ReflectionQueueDry queues, a window
// refilled by acks read meanwhile) leave in the same write instead of a
// write and a writer goroutine of their own.
func (c *deviceConn) drainRounds(d *delivery, acks *ackStamps) (bool, error) {
	progressed := false
	for range maxCorkedRounds {
		p, err := c.drainOnce(d, acks)
		progressed = progressed || p
		if err != nil || !p || c.inlineFull() {
			return progressed, err
		}
	}
	return progressed, nil
}

// hasWork reports whether any signal the writer reacts to is pending.
func (c *deviceConn) hasWork() bool {
	c.hsMu.Lock()
	hs := len(c.hsFrames) > 0
	c.hsMu.Unlock()
	if hs {
		return true
	}
	if c.authed.Load() && (len(c.ctrl.ready) > 0 || len(c.proxyIn) > 0 || len(c.wakeCh) > 0) {
		return true
	}
	select {
	case <-c.closing:
		return true
	case <-c.ctx.Done():
		return true
	default:
		return false
	}
}

// writeOut writes f. A ReflectAck written into the corked socket is
// remembered in acks, whose round observes it once the bytes have left;
// otherwise (acks nil or full) it is observed at once.
func (c *deviceConn) writeOut(f outFrame, acks *ackStamps) error {
	err := c.write(f.b)
	if f.reflectAck {
		c.releaseReflect()
		if err == nil && f.readAt != 0 && !acks.add(f.readAt, f.doneAt) {
			c.srv.metrics.observeWritten(f.readAt, f.doneAt, mono(time.Now()))
		}
	}
	if f.reply {
		<-c.replySem
	}
	return err
}

func (c *deviceConn) writeProxy(u proxyUnit) error {
	if u.code != 0 {
		c.closeWith(u.code, u.err)
		return nil
	}
	c.srv.metrics.upstreamBytes.WithLabelValues("to_device").Add(float64(len(u.b)))
	return c.write(d2m.EncodeRaw(d2m.TypeProxy, u.b))
}

// drainOnce does one round of non-blocking work and reports whether it did
// anything. Before authentication only the handshake frames go out.
func (c *deviceConn) drainOnce(d *delivery, acks *ackStamps) (bool, error) {
	progressed := false
	for _, b := range c.takeHandshakeFrames() {
		if err := c.write(b); err != nil {
			return false, err
		}
		progressed = true
	}
	if !c.authed.Load() {
		return progressed, nil
	}
	// Signals are consumed here; what they announce is picked up below.
	select {
	case <-c.ctrl.ready:
	default:
	}
	select {
	case <-c.wakeCh:
		d.more = true
	default:
	}
	for i := 0; i < 64 && !c.inlineFull(); i++ {
		f, ok := c.ctrl.pop()
		if !ok {
			break
		}
		if err := d.out(f, acks); err != nil {
			return false, err
		}
		progressed = true
	}
	if len(c.ctrl.ready) == 0 && c.ctrl.pending() {
		// More than one round's worth: come back without waiting.
		c.ctrl.signal()
	}
	for i := 0; i < 16 && !c.inlineFull(); i++ {
		select {
		case u := <-c.proxyIn:
			if err := c.writeProxy(u); err != nil {
				return false, err
			}
			progressed = true
			continue
		default:
		}
		break
	}
	sent, err := d.step()
	if err != nil {
		return false, err
	}
	return progressed || sent, nil
}

// finishClose flushes the control frames queued before the close was
// decided (only after authentication: before it, nothing but the
// handshake may reach the device), then performs the close handshake with
// the decided code. It is the only place a close frame is written.
func (c *deviceConn) finishClose() {
	if c.cork != nil {
		// An inline round (flush.go) may have left collected bytes
		// behind: they go before anything the close adds.
		if c.cork.uncork() != nil {
			c.ws.CloseNow()
			return
		}
	}
	for _, b := range c.takeHandshakeFrames() {
		if c.authed.Load() && c.write(b) != nil {
			c.ws.CloseNow()
			return
		}
	}
	if c.authed.Load() {
		deadline := time.Now().Add(2 * time.Second)
		for time.Now().Before(deadline) {
			f, ok := c.ctrl.pop()
			if !ok {
				break
			}
			if c.writeOut(f, nil) != nil {
				c.ws.CloseNow()
				return
			}
		}
	}
	code := d2m.CloseCode(c.closeCode.Load())
	// The close handshake reads the peer's answer through the reader's
	// buffers: the read loop must not fill them meanwhile
	// (corkConn.waitReadable).
	if c.cork != nil {
		c.cork.readMu.Lock()
		defer c.cork.readMu.Unlock()
	}
	c.ws.Close(websocket.StatusCode(code), closeReason(code, c.cause()))
}

// closeReasoner is a close cause with a reason for the device (a moved
// shard names its new owner).
type closeReasoner interface{ CloseReason() string }

// maxCloseReason is RFC 6455's limit for a close frame's reason (125
// bytes of payload less the 2-byte code).
const maxCloseReason = 123

// closeReason is the reason sent with code: the cause's own, if it has
// one, else the code's name.
func closeReason(code d2m.CloseCode, cause error) string {
	var cr closeReasoner
	if errors.As(cause, &cr) {
		if r := cr.CloseReason(); r != "" && len(r) <= maxCloseReason {
			return r
		}
	}
	return code.String()
}

// cause returns the cause recorded with the close decision.
func (c *deviceConn) cause() error {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	return c.closeCause
}

// out writes a control frame, or parks it behind its delivery barrier.
// Parked frames keep their order among themselves; other control frames
// (ReflectAcks above all) pass them.
func (d *delivery) out(f outFrame, acks *ackStamps) error {
	if f.afterSeq > d.sentSeq || (f.afterSeq != 0 && len(d.parked) > 0) {
		d.parked = append(d.parked, f)
		return nil
	}
	return d.c.writeOut(f, acks)
}

// releaseParked writes the parked frames whose barrier has passed.
func (d *delivery) releaseParked() (bool, error) {
	wrote := false
	for len(d.parked) > 0 && d.parked[0].afterSeq <= d.sentSeq {
		f := d.parked[0]
		d.parked = d.parked[1:]
		if err := d.c.writeOut(f, nil); err != nil {
			return wrote, err
		}
		wrote = true
	}
	return wrote, nil
}

// delivery is the reflection-queue cursor of one connection, owned by
// sendLoop. Only a window of entries is in memory: a device with a 25,000
// entry backlog costs DeliveryWindow entries, and a slow device blocks
// nobody but itself.
type delivery struct {
	c       *deviceConn
	cursor  uint64 // every durable entry with seq ≤ cursor has been read
	pending []reflection.Entry
	hwm     uint64 // queue's next seq at login: the backlog is seq < hwm
	more    bool   // the queue may hold entries beyond cursor
	dryDone bool
	sentSeq uint64     // highest durable seq written
	parked  []outFrame // control frames waiting for their barrier
}

// step sends what the window allows: queued entries and ephemeral items in
// seq order. It reports whether it sent anything.
func (d *delivery) step() (bool, error) {
	c := d.c
	window := c.srv.cfg.DeliveryWindow
	sentAny := false
	for {
		if c.inlineFull() {
			// The rest is for a writer goroutine (flush.go).
			c.signalWake()
			return sentAny, nil
		}
		if len(d.pending) == 0 && d.more && c.inflightCount() < window {
			if err := d.refill(window); err != nil {
				return sentAny, err
			}
		}
		eph, haveEph, needRead := d.nextEphemeral()
		if needRead && len(d.pending) == 0 && c.inflightCount() < window {
			// An ephemeral item is ahead of what was read: every durable
			// entry before it is committed by now, so one more read
			// reaches it.
			if err := d.refill(window); err != nil {
				return sentAny, err
			}
			eph, haveEph, _ = d.nextEphemeral()
		}
		switch {
		case haveEph && (len(d.pending) == 0 || eph.seq < d.pending[0].Seq):
			c.popEphemeral()
			if err := c.write(d2m.EncodeReflected(eph.flags, uint32(eph.seq), eph.timestamp, eph.envelope)); err != nil {
				return sentAny, err
			}
			c.noteEphemeralSent(uint32(eph.seq))
			c.srv.metrics.reflectedSent.Inc()
			sentAny = true
			continue
		case len(d.pending) > 0 && c.inflightCount() < window:
			e := d.pending[0]
			d.pending = d.pending[1:]
			id := uint32(e.Seq)
			c.inflightMu.Lock()
			c.inflight[id] = e.Seq
			c.inflightMu.Unlock()
			if err := c.write(d2m.EncodeReflected(0, id, e.Timestamp, e.Envelope)); err != nil {
				return sentAny, err
			}
			d.sentSeq = max(d.sentSeq, e.Seq)
			c.srv.metrics.reflectedSent.Inc()
			sentAny = true
			continue
		}
		break
	}
	if wrote, err := d.releaseParked(); err != nil || wrote {
		return sentAny || wrote, err
	}
	backlogSent := len(d.pending) == 0 || d.pending[0].Seq >= d.hwm
	if !d.dryDone && backlogSent && d.cursor+1 >= d.hwm {
		d.dryDone = true
		// Marked before the write: once the device has seen the frame
		// it must already count as dry for leader election. A promotion
		// this queues is written after the frame, by this goroutine.
		c.group.queueDry(c)
		if err := c.write(encodedReflectionQueueDry); err != nil {
			return sentAny, err
		}
		sentAny = true
	}
	return sentAny, nil
}

// refill reads the next window of entries, up to readyThrough.
func (d *delivery) refill(window int) error {
	c := d.c
	ready := c.readyThrough.Load()
	if d.cursor >= ready {
		d.more = false
		return nil
	}
	stats, ok := c.srv.store.QueueStats(c.groupID, c.deviceID)
	if !ok {
		// The slot is gone (dropped); the connection is being closed.
		d.more = false
		d.cursor = max(d.cursor, d.hwm)
		return nil
	}
	batch := window - c.inflightCount()
	entries, err := c.srv.store.ReadQueue(c.groupID, c.deviceID, d.cursor, batch)
	if err != nil {
		return err
	}
	n := sort.Search(len(entries), func(i int) bool { return entries[i].Seq > ready })
	d.pending = entries[:n]
	if n > 0 {
		d.cursor = entries[n-1].Seq
	}
	if n < batch {
		// Everything up to readyThrough that was committed when the stats
		// were read has been seen.
		if stats.NextSeq > 0 {
			d.cursor = max(d.cursor, min(stats.NextSeq-1, ready))
		}
		d.more = false
	}
	return nil
}

// noteReady advances readyThrough; the group calls it, in store completion
// order, for every copy it hands to this connection.
func (c *deviceConn) noteReady(seq uint64) {
	for {
		cur := c.readyThrough.Load()
		if seq <= cur || c.readyThrough.CompareAndSwap(cur, seq) {
			return
		}
	}
}

// nextEphemeral returns the lowest-seq ephemeral item once every durable
// entry before it has been read, so it keeps its place in queue order.
func (d *delivery) nextEphemeral() (it ephemeralItem, ok, needRead bool) {
	c := d.c
	c.ephMu.Lock()
	defer c.ephMu.Unlock()
	if len(c.ephemeral) == 0 {
		return ephemeralItem{}, false, false
	}
	sort.Slice(c.ephemeral, func(i, j int) bool { return c.ephemeral[i].seq < c.ephemeral[j].seq })
	it = c.ephemeral[0]
	if it.seq > d.cursor+1 {
		d.more = true
		return ephemeralItem{}, false, true
	}
	return it, true, false
}

func (c *deviceConn) popEphemeral() {
	c.ephMu.Lock()
	c.ephemeral = c.ephemeral[1:]
	c.ephMu.Unlock()
}
