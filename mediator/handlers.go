package mediator

import (
	"errors"
	"fmt"
	"math"
	"runtime/debug"
	"time"

	"google.golang.org/protobuf/proto"

	"d2m-mediator/chatproxy"
	"d2m-mediator/d2m"
	"d2m-mediator/proto/d2mpb"
	"d2m-mediator/reflection"
)

// readLoop reads frames until the connection ends and dispatches each to
// its handler. A handler error carrying a *d2m.CloseError ends the
// connection with that code.
func (c *deviceConn) readLoop() error {
	for {
		c.waitInbound()
		typ, payload, err := c.readFrame()
		if err != nil {
			return err
		}
		if c.isClosing() {
			// The close is decided (dropped, replaced, …): nothing more is
			// acted upon, but reading goes on until the close handshake
			// completes.
			continue
		}
		if err := c.handleSafely(typ, payload); err != nil {
			return err
		}
	}
}

// waitInbound waits, with a shallow stack, until the next frame can be
// read (corkConn.waitReadable).
func (c *deviceConn) waitInbound() {
	if c.cork != nil {
		c.cork.waitReadable()
	}
}

// handleSafely turns a panic in a handler (a bug) into a 1011 close of
// this connection with its stack in the log, so that the connection still
// unregisters and the rest of the server keeps running.
func (c *deviceConn) handleSafely(typ d2m.PayloadType, payload []byte) (err error) {
	defer func() {
		if r := recover(); r != nil {
			c.logger().Error().Str("type", typ.String()).Str("panic", fmt.Sprint(r)).Bytes("stack", debug.Stack()).
				Msg("handler panicked")
			err = d2m.Close(d2m.CloseInternalError, fmt.Errorf("handler panic: %v", r))
		}
	}()
	return c.handle(typ, payload)
}

func (c *deviceConn) handle(typ d2m.PayloadType, payload []byte) error {
	switch typ {
	case d2m.TypeProxy:
		return c.handleProxy(payload)
	case d2m.TypeReflect:
		return c.handleReflect(payload)
	case d2m.TypeReflectedAck:
		return c.handleReflectedAck(payload)
	case d2m.TypeGetDevicesInfo:
		return c.handleGetDevicesInfo(payload)
	case d2m.TypeDropDevice:
		return c.handleDropDevice(payload)
	case d2m.TypeSetSharedDeviceData:
		return c.handleSetSharedDeviceData(payload)
	case d2m.TypeBeginTransaction:
		return c.handleBeginTransaction(payload)
	case d2m.TypeCommitTransaction:
		return c.handleCommitTransaction(payload)
	}
	// ClientHello twice, server-to-client types and unknown types.
	return d2m.Close(d2m.CloseProtocolError, fmt.Errorf("unexpected %v", typ))
}

func protocolError(err error) error { return d2m.Close(d2m.CloseProtocolError, err) }

func (c *deviceConn) handleReflect(payload []byte) error {
	r, err := d2m.DecodeReflect(payload)
	if err != nil {
		return protocolError(err)
	}
	// The window bounds Reflects awaiting storage per device: a flooding
	// device blocks here, stops reading, and TCP pushes back on it alone.
	select {
	case c.reflectSem <- struct{}{}:
	default:
		// The window is full and the server stops reading the device
		// until the store answers: that silence is the server's, so the
		// idle clock stands still meanwhile (else a store that stalls
		// for longer than the idle timeout would close a busy device
		// with 4013, "client idle", before its writes fail with 1011).
		c.readPaused.Store(true)
		defer c.readPaused.Store(false)
		select {
		case c.reflectSem <- struct{}{}:
			c.lastRead.Store(time.Now().UnixNano())
		case <-c.closing:
			return nil
		case <-c.ctx.Done():
			return c.ctx.Err()
		}
	}
	c.srv.metrics.reflects.WithLabelValues(reflectKind(r)).Inc()
	if err := c.group.submitReflect(c, r, c.frameAt); err != nil {
		c.releaseReflect()
		return err
	}
	return nil
}

func reflectKind(r d2m.Reflect) string {
	if r.Ephemeral() {
		return "ephemeral"
	}
	return "durable"
}

func (c *deviceConn) handleReflectedAck(payload []byte) error {
	id, err := d2m.DecodeReflectedAck(payload)
	if err != nil {
		return protocolError(err)
	}
	seq, ok, ephemeral, wasFull := c.ackReflected(id)
	if ephemeral {
		return nil // every client acks ephemeral Reflected anyway (§10)
	}
	if !ok {
		return d2m.Close(d2m.CloseUnknownAck, fmt.Errorf("reflected id %d not in flight", id))
	}
	c.srv.metrics.reflectedAcked.Inc()
	// Not tracked by the group: an ack changes only the queue, which the
	// store owns, never the group state a reload would read.
	c.srv.store.Ack(c.groupID, c.deviceID, seq, c.srv.logAckErr)
	if wasFull {
		// The writer stops sending when the window is full (it checks
		// under inflightMu, as this ack does): the first ack after that
		// sees the window full and restarts it. Any other ack needs no
		// writer: a wake per ReflectedAck started one that found nothing
		// to do, two goroutine hand-offs per reflect at fan-out 2.
		c.wake()
	}
	return nil
}

func (c *deviceConn) handleGetDevicesInfo(payload []byte) error {
	if err := d2m.DecodeEmpty(d2m.TypeGetDevicesInfo, payload); err != nil {
		return protocolError(err)
	}
	b, err := d2m.EncodeMessage(d2m.TypeDevicesInfo, c.group.devicesInfo())
	if err != nil {
		// The slots' device infos (each up to a ClientHello frame) do not
		// fit one frame together; §4.5 has no paging. Refuse cleanly
		// instead of panicking with the connection still registered.
		return d2m.Close(d2m.CloseInternalError, fmt.Errorf("DevicesInfo: %w", err))
	}
	return c.reply(b)
}

func (c *deviceConn) handleDropDevice(payload []byte) error {
	m, err := d2m.DecodeDropDevice(payload)
	if err != nil {
		return protocolError(err)
	}
	return c.group.dropDevice(c, reflection.DeviceID(m.DeviceId))
}

func (c *deviceConn) handleSetSharedDeviceData(payload []byte) error {
	m, err := d2m.DecodeSetSharedDeviceData(payload)
	if err != nil {
		return protocolError(err)
	}
	if !fitsServerInfo(m.EncryptedSharedDeviceData) {
		return protocolError(errSharedDataTooLarge)
	}
	return c.group.setSharedDeviceData(c, m.EncryptedSharedDeviceData)
}

func (c *deviceConn) handleBeginTransaction(payload []byte) error {
	m, err := d2m.DecodeBeginTransaction(payload)
	if err != nil {
		return protocolError(err)
	}
	if !fitsTransactionEnded(m.EncryptedScope) {
		return protocolError(errScopeTooLarge)
	}
	return c.group.beginTransaction(c, m.EncryptedScope, m.Ttl)
}

func (c *deviceConn) handleCommitTransaction(payload []byte) error {
	if err := d2m.DecodeEmpty(d2m.TypeCommitTransaction, payload); err != nil {
		return protocolError(err)
	}
	return c.group.commitTransaction(c)
}

// The server repeats device-chosen bytes inside larger messages: the shared
// device data in every later ServerInfo of the group, the transaction scope
// in TransactionRejected and TransactionEnded (after a 9-byte fixed64
// device id). Bytes that fit the request's frame but not the answer's are
// refused with 4010 here, where the sender is to blame; otherwise encoding
// the answer fails later (MustEncodeMessage panicked: in another device's
// handshake, and for TransactionEnded in the storage committer, which took
// the whole process down).
var (
	errSharedDataTooLarge = errors.New("shared device data would not fit a ServerInfo")
	errScopeTooLarge      = errors.New("transaction scope would not fit a TransactionEnded")
)

func fitsServerInfo(data []byte) bool {
	return fitsFrame(&d2mpb.ServerInfo{
		MaxDeviceSlots: math.MaxUint32, DeviceSlotState: d2mpb.DeviceSlotState_EXISTING,
		EncryptedSharedDeviceData: data, CurrentTime: math.MaxUint64, ReflectionQueueLength: math.MaxUint32,
	})
}

func fitsTransactionEnded(scope []byte) bool {
	// TransactionRejected has the same fields and size.
	return fitsFrame(&d2mpb.TransactionEnded{DeviceId: math.MaxUint64, EncryptedScope: scope})
}

func fitsFrame(m proto.Message) bool { return d2m.HeaderSize+proto.Size(m) <= d2m.MaxFrameSize }

// reply queues an answer to the device's own request. Unlike messages
// other parties queue, it may block: a device that floods requests without
// reading answers stalls only its own read loop.
func (c *deviceConn) reply(b []byte) error {
	select {
	case c.replySem <- struct{}{}:
		c.ctrl.push(outFrame{b: b, reply: true}, true)
		c.flushNow() // the read loop holds no lock
		return nil
	case <-c.closing:
		return nil
	case <-c.ctx.Done():
		return c.ctx.Err()
	}
}

// handleProxy forwards CSP bytes to the device's own upstream, opening it
// with the early bytes on first use (§18 row 2).
func (c *deviceConn) handleProxy(payload []byte) error {
	c.proxied.Store(true)
	if c.upstream == nil {
		c.early = append(c.early, payload)
		return c.openUpstream()
	}
	return c.writeUpstream(payload)
}

var errNoChatServer = errors.New("no chat server configured")

func (c *deviceConn) openUpstream() error {
	s := c.srv
	if s.cfg.ChatServer == "" {
		return d2m.Close(d2m.CloseUpstreamUnreachable, errNoChatServer)
	}
	addr := chatproxy.Address(s.cfg.ChatServer, c.info.ServerGroup)
	// The dial gives up as soon as the connection's close is decided.
	up, err := chatproxy.Dial(c.closingCtx, addr, chatproxy.Options{})
	if err != nil {
		s.metrics.upstreams.WithLabelValues("dial_failed").Inc()
		return d2m.Close(d2m.CloseUpstreamUnreachable, err)
	}
	s.metrics.upstreams.WithLabelValues("opened").Inc()
	c.upstream = up
	// On run's goroutine, before run waits for c.goroutines.
	c.upstreamLoop.Add(1)
	go func() {
		defer c.upstreamLoop.Done()
		c.readUpstream(up)
	}()
	early := c.early
	c.early, c.earlyLen = nil, 0
	for _, b := range early {
		if err := c.writeUpstream(b); err != nil {
			return err
		}
	}
	return nil
}

func (c *deviceConn) writeUpstream(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	if err := c.upstream.Write(b); err != nil {
		if errors.Is(err, chatproxy.ErrWriteTimeout) {
			// The chat server stopped reading: a relay-side failure.
			return d2m.Close(d2m.CloseUpstreamError, err)
		}
		return d2m.Close(d2m.CloseUpstreamClosed, err)
	}
	c.srv.metrics.upstreamBytes.WithLabelValues("to_chat_server").Add(float64(len(b)))
	return nil
}

// proxyInBuffer is how many CSP units from the chat server may wait for
// the device's writer (48 bytes each on every connection). With 4 instead
// of 16 the closed-loop csp scenario (8 messages in flight per identity)
// carried 5-15 % fewer messages/s: the upstream reader stalled on a busy
// writer.
const proxyInBuffer = 16

// readUpstream cuts the chat server's stream into CSP units and hands them
// to sendLoop with a blocking send: a slow device backs up only its own
// TCP upstream. When the upstream ends, every complete unit goes out
// before the close (4000, or 4009 for a frame the re-framer cannot take).
func (c *deviceConn) readUpstream(up *chatproxy.Upstream) {
	defer func() {
		if r := recover(); r != nil {
			c.logger().Error().Str("panic", fmt.Sprint(r)).Bytes("stack", debug.Stack()).Msg("upstream reader panicked")
			c.closeWith(d2m.CloseUpstreamError, fmt.Errorf("upstream reader panic: %v", r))
		}
	}()
	for {
		up.WaitReadable() // idle: a shallow stack (chatproxy.Upstream.WaitReadable)
		unit, err := up.ReadUnit()
		if err != nil {
			code := d2m.CloseUpstreamClosed
			if errors.Is(err, chatproxy.ErrFrameTooLarge) {
				code = d2m.CloseUpstreamError
			}
			select {
			case c.proxyIn <- proxyUnit{code: code, err: err}:
				c.kick()
			case <-c.ctx.Done():
			}
			return
		}
		select {
		case c.proxyIn <- proxyUnit{b: unit}:
			// This goroutine holds no lock: it writes the unit itself
			// when no writer runs and the socket takes it at once.
			c.flushNow()
		case <-c.ctx.Done():
			return
		}
	}
}
