package chatstub

import (
	"bufio"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
	"unicode/utf8"

	"d2m-mediator/chatproxy/csp"

	"github.com/rs/zerolog"
	"golang.org/x/crypto/nacl/box"
)

// outboxSlack is room in a connection's outbox beyond a full mailbox, for
// echo responses, acks and queue-send-complete.
const outboxSlack = 1024

// conn is one client connection.
type conn struct {
	srv   *Server
	nc    net.Conn
	log   zerolog.Logger
	start time.Time

	// Set by the handshake, read-only afterwards.
	identity csp.Identity
	sess     *csp.Session

	// unblocked is guarded by srv.mu: it decides, under the same lock as
	// the queues, whether a message goes out live.
	unblocked bool

	// The outbox: frames waiting for the writer goroutine.
	omu       sync.Mutex
	out       []outFrame
	outClosed bool
	outMax    int
	wake      chan struct{} // cap 1: "out changed"
}

type outFrame struct {
	typ  csp.PayloadType
	data []byte
}

// protocolError is a client mistake after login: it earns a close-error
// before the connection closes.
type protocolError struct{ msg string }

func (e *protocolError) Error() string { return e.msg }

func protoErr(format string, args ...any) error {
	return &protocolError{msg: fmt.Sprintf(format, args...)}
}

func newConn(s *Server, nc net.Conn) *conn {
	return &conn{
		srv:    s,
		nc:     nc,
		log:    s.log.With().Str("remote", nc.RemoteAddr().String()).Logger(),
		start:  time.Now(),
		outMax: s.cfg.MaxQueuedPerIdentity + outboxSlack,
		wake:   make(chan struct{}, 1),
	}
}

// serve runs the connection to its end: handshake, then the read loop with
// a writer goroutine beside it.
func (c *conn) serve() {
	defer c.nc.Close()
	c.log.Debug().Msg("chatstub: connection opened")
	r := bufio.NewReader(c.nc)
	if err := c.handshake(r); err != nil {
		// No session yet, so no close-error: the client could not
		// decrypt one before the login-ack (docs/protocol.md §9.3).
		c.log.Info().Err(err).Dur("after", time.Since(c.start)).Msg("chatstub: handshake failed")
		return
	}
	c.log = c.log.With().Str("identity", c.identity.String()).Logger()

	c.srv.register(c)
	defer c.srv.unregister(c)
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		c.writeLoop()
	}()

	err := c.readLoop(r)
	var pe *protocolError
	if errors.As(err, &pe) {
		// Flush what is pending, then close-error, then close: clients
		// want the reason before the connection ends (§8.2).
		c.closeOutbox(&outFrame{typ: csp.CloseErrorType, data: (&csp.CloseError{CanReconnect: true, Message: pe.msg}).Marshal()})
		c.log.Warn().Str("reason", pe.msg).Dur("duration", time.Since(c.start)).Msg("chatstub: closing connection on protocol error")
	} else {
		c.closeOutbox(nil)
		c.log.Info().AnErr("cause", err).Dur("duration", time.Since(c.start)).Msg("chatstub: connection closed")
	}
	<-writerDone
	if pe != nil {
		c.lingerClose(r)
	}
}

// lingerClose half-closes the connection and drains what the client still
// sends for a moment. Closing a socket with unread input makes the kernel
// send a reset, which can destroy the close-error before the client reads
// it; net/http avoids the same with closeWriteAndWait.
func (c *conn) lingerClose(r *bufio.Reader) {
	tc, ok := c.nc.(*net.TCPConn)
	if !ok {
		return
	}
	tc.CloseWrite()
	tc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	io.Copy(io.Discard, io.LimitReader(r, 64<<10))
}

// handshake runs client-hello → server-hello → login → login-ack
// (docs/protocol.md §9.3) under one deadline.
func (c *conn) handshake(r *bufio.Reader) error {
	if err := c.nc.SetDeadline(time.Now().Add(c.srv.cfg.HandshakeTimeout)); err != nil {
		return err
	}
	buf := make([]byte, csp.LoginBoxSize)

	if _, err := io.ReadFull(r, buf[:csp.ClientHelloSize]); err != nil {
		return fmt.Errorf("read client-hello: %w", err)
	}
	hello, err := csp.ParseClientHello(buf[:csp.ClientHelloSize])
	if err != nil {
		return err
	}

	tskPub, tskSec, err := box.GenerateKey(rand.Reader)
	if err != nil {
		return fmt.Errorf("temporary key: %w", err)
	}
	sh := csp.ServerHello{TempPublicKey: *tskPub, ClientCookie: hello.Cookie}
	// Clients abort if SCK equals CCK; with random cookies that never
	// happens, but the loop costs nothing.
	for sh.Cookie == hello.Cookie {
		rand.Read(sh.Cookie[:])
	}
	if _, err := c.nc.Write(sh.Seal(&c.srv.secretKey, &hello.TempPublicKey)); err != nil {
		return fmt.Errorf("write server-hello: %w", err)
	}
	// The server-hello used SCK‖1, so the session sends from SCK‖2.
	c.sess = csp.NewSession(&hello.TempPublicKey, tskSec,
		csp.NewNonceCounter(sh.Cookie, csp.LoginAckSeq),
		csp.NewNonceCounter(hello.Cookie, csp.LoginSeq))

	if _, err := io.ReadFull(r, buf[:csp.LoginBoxSize]); err != nil {
		return fmt.Errorf("read login: %w", err)
	}
	plain, err := c.sess.Open(buf[:csp.LoginBoxSize])
	if err != nil {
		return fmt.Errorf("login box: %w", err)
	}
	login, err := csp.ParseLoginData(plain)
	if err != nil {
		return err
	}
	if login.ServerCookie != sh.Cookie {
		return errors.New("login carries another connection's server cookie")
	}
	// The vouch is not checked: that needs the identity's public key from
	// a directory the stub does not have (§9.3).
	ev := c.log.Info().Str("identity", login.Identity.String())
	if login.HasExtensions {
		extBox := make([]byte, login.ExtensionsBoxLength)
		if _, err := io.ReadFull(r, extBox); err != nil {
			return fmt.Errorf("read extensions: %w", err)
		}
		plain, err := c.sess.Open(extBox)
		if err != nil {
			return fmt.Errorf("extensions box: %w", err)
		}
		ext, err := csp.ParseExtensions(plain)
		if err != nil {
			return err
		}
		if ext.HasCSPDeviceID {
			ev = ev.Uint64("csp_device_id", ext.CSPDeviceID)
		}
		if ext.HasClientInfo {
			ev = ev.Str("client_info", ext.ClientInfo)
		}
	} else {
		ev = ev.Str("client_info", login.LegacyClientInfo)
	}
	c.identity = login.Identity

	if _, err := c.nc.Write(csp.SealLoginAck(c.sess)); err != nil {
		return fmt.Errorf("write login-ack: %w", err)
	}
	ev.Msg("chatstub: login")
	// No deadline after the handshake: the stub enforces no idle timeout,
	// and writes set their own.
	return c.nc.SetDeadline(time.Time{})
}

// readLoop reads frames until the connection ends or the client breaks the
// protocol (a *protocolError).
func (c *conn) readLoop(r *bufio.Reader) error {
	var hdr [csp.FrameLengthSize]byte
	buf := make([]byte, csp.MaxBoxSize)
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return err
		}
		n := int(binary.LittleEndian.Uint16(hdr[:]))
		if n > csp.MaxBoxSize {
			return protoErr("frame length %d exceeds %d", n, csp.MaxBoxSize)
		}
		if _, err := io.ReadFull(r, buf[:n]); err != nil {
			return err
		}
		plain, err := c.sess.Open(buf[:n])
		if err != nil {
			return protoErr("cannot decrypt frame")
		}
		typ, data, err := csp.ParseContainer(plain)
		if err != nil {
			return protoErr("%v", err)
		}
		if err := c.handle(typ, data); err != nil {
			return err
		}
	}
}

// handle acts on one frame from the client (docs/protocol.md §9.5, minimal stub
// behaviour). data is a fresh buffer per frame, so it may be kept.
func (c *conn) handle(typ csp.PayloadType, data []byte) error {
	switch typ {
	case csp.EchoRequest:
		// At once and unchanged: every client drops the connection within
		// about 25 s without echo responses (§9.5).
		c.push(csp.EchoResponse, data)
	case csp.OutgoingMessage:
		return c.handleOutgoingMessage(data)
	case csp.IncomingMessageAck:
		a, err := csp.ParseMessageAck(data)
		if err != nil {
			return protoErr("%v", err)
		}
		c.srv.ack(c.identity, a)
	case csp.UnblockIncomingMessages:
		c.srv.unblock(c)
	case csp.EchoResponse, // a reply to an echo we never send; harmless
		csp.SetConnectionIdleTimeout,       // no idle timeout in the stub
		0x20, 0x21, 0x22, 0x23, 0x24, 0x25, // push tokens and settings: no push here
		csp.ClearDeviceCookieChange:
	default:
		return protoErr("unexpected payload type %s", typ)
	}
	return nil
}

func (c *conn) handleOutgoingMessage(data []byte) error {
	m, err := csp.ParseMessage(data)
	if err != nil {
		return protoErr("%v", err)
	}
	if m.Sender != c.identity {
		return protoErr("message sender %q is not the logged-in identity", m.Sender.String())
	}
	if !c.srv.deliver(&m, data) {
		c.log.Warn().Str("receiver", m.Receiver.String()).Msg("chatstub: receiver queue full, message refused")
		msg := "message refused: queue of " + printable(m.Receiver) + " is full"
		c.push(csp.Alert, []byte(msg))
		return nil
	}
	if m.Flags&csp.FlagNoServerAck == 0 {
		ack := csp.MessageAck{Identity: m.Receiver, MessageID: m.MessageID}
		c.push(csp.OutgoingMessageAck, ack.Marshal())
	}
	return nil
}

// printable returns an identity as text for an alert, which must be UTF-8.
func printable(id csp.Identity) string {
	if utf8.Valid(id[:]) {
		return id.String()
	}
	return fmt.Sprintf("%x", id[:])
}

// push hands a frame to the writer. A full outbox means the client does not
// read fast enough: the connection is closed (its reader then cleans up) and
// the frame dropped; queued messages survive in the mailbox.
func (c *conn) push(typ csp.PayloadType, data []byte) {
	c.omu.Lock()
	if c.outClosed {
		c.omu.Unlock()
		return
	}
	if len(c.out) >= c.outMax {
		c.omu.Unlock()
		c.log.Warn().Int("outbox", c.outMax).Msg("chatstub: slow consumer, closing")
		c.nc.Close()
		return
	}
	c.out = append(c.out, outFrame{typ: typ, data: data})
	c.omu.Unlock()
	c.signal()
}

// closeOutbox ends the writer. With final == nil pending frames are
// dropped (the connection is ending anyway); otherwise they are written,
// then final.
func (c *conn) closeOutbox(final *outFrame) {
	c.omu.Lock()
	if !c.outClosed {
		c.outClosed = true
		if final == nil {
			c.out = nil
		} else {
			c.out = append(c.out, *final)
		}
	}
	c.omu.Unlock()
	c.signal()
}

func (c *conn) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// writeLoop is the only goroutine that seals and writes frames after the
// handshake, so nonce order equals wire order. It writes whatever is pending
// in one writev, then waits for more.
func (c *conn) writeLoop() {
	var bufs net.Buffers
	for {
		c.omu.Lock()
		batch, closed := c.out, c.outClosed
		c.out = nil
		c.omu.Unlock()

		if len(batch) > 0 {
			bufs = bufs[:0]
			for _, f := range batch {
				frame, err := c.sess.SealFrame(f.typ, f.data)
				if err != nil {
					// Only our own frames land here, and all fit.
					c.log.Error().Err(err).Msg("chatstub: seal frame")
					c.nc.Close()
					return
				}
				bufs = append(bufs, frame)
			}
			c.nc.SetWriteDeadline(time.Now().Add(c.srv.cfg.WriteTimeout))
			// WriteTo consumes bufs; keep the backing array for reuse.
			b := bufs
			if _, err := b.WriteTo(c.nc); err != nil {
				c.log.Debug().Err(err).Msg("chatstub: write failed")
				c.nc.Close()
				return
			}
		}
		if closed {
			return
		}
		if len(batch) == 0 {
			<-c.wake
		}
	}
}
