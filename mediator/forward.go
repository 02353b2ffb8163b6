package mediator

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"d2m-mediator/d2m"
)

// A forwarded device connection (placement.go forwards it) is two sockets
// copied byte for byte. The owner ends an idle device itself (4013) and
// its close reaches the device through the copy; but if the link to the
// owner goes silent (a network blackhole: no FIN, no RST), neither copy
// ever returns and the device hangs on a connection nobody serves. So the
// forwarding node watches the copy: nothing from the owner for
// IdleTimeout + forwardGrace (HandshakeTimeout before its first byte), or
// nothing from the device for as long (the owner would have closed it),
// ends the forward. The device then gets what the owner would have sent
// it: a 503 with Retry-After before the owner answered the upgrade, a
// close frame 1001 between WebSocket frames after it (the forwarding node
// tracks the owner's frame boundaries without decoding anything, so that
// it never cuts into a frame); a connection cut mid-frame, or reset by
// the network, ends without one. (Found by TestFaultForwardHop in
// integration/cluster: a blackholed hop left the device and both copies
// hanging for as long as the link stayed silent.)

// forwardGrace is how much longer than the owner's idle timeout the
// forwarding node waits: the owner's own 4013 crosses one hop.
const forwardGrace = time.Second

// forwardLostReason is the reason of the 1001 a device gets when the link
// to its owner is lost.
const forwardLostReason = "connection to the node serving this device group lost"

// forwarded is one device connection copied to its owner node.
type forwarded struct {
	down, up net.Conn
	idle     time.Duration // silence that ends an answered forward
	first    time.Duration // wait for the owner's first byte

	lastDown, lastUp atomic.Int64 // unix nanos of the last byte from the device, from the owner
	answered         atomic.Bool  // the owner sent something
	expired          atomic.Bool  // the watchdog ended the forward
	deviceGone       atomic.Bool  // the device side ended first

	mu    sync.Mutex // guards timer, stopped
	timer *time.Timer
	stop  bool

	ws wsTracker // the owner's stream; only the owner→device copy touches it

	// onExpire is told which side stayed silent ("owner" or "device")
	// when the watchdog ends the forward.
	onExpire func(silent string, silentFor time.Duration)
}

func (s *Server) newForwarded(down, up net.Conn, owner string) *forwarded {
	return &forwarded{down: down, up: up, idle: s.cfg.IdleTimeout + forwardGrace, first: s.cfg.HandshakeTimeout,
		onExpire: func(silent string, silentFor time.Duration) {
			s.metrics.forwards.WithLabelValues(silent + "_silent").Inc()
			s.log.Warn().Str("owner", owner).Str("silent", silent).Dur("for", silentFor).
				Msg("cluster: ended a forwarded device connection: no byte from the " + silent + " for too long (a silent link to the owner, or a vanished device)")
		}}
}

// copy runs both directions until either side ends (or the watchdog ends
// the forward), then closes both. The device side is read through the
// HTTP server's reader, which may hold bytes the device sent right behind
// its upgrade request.
func (f *forwarded) copy(fromDevice *bufio.Reader, toOwner, toDevice func(float64)) {
	now := time.Now().UnixNano()
	f.lastDown.Store(now)
	f.lastUp.Store(now)
	f.mu.Lock()
	f.timer = time.AfterFunc(f.first, f.check)
	f.mu.Unlock()
	done := make(chan struct{})
	go func() {
		defer close(done)
		toOwner(float64(f.copyToOwner(fromDevice)))
	}()
	n := f.copyToDevice()
	toDevice(float64(n))
	f.mu.Lock()
	f.stop = true
	f.timer.Stop()
	f.mu.Unlock()
	f.finish()
	f.close()
	<-done
}

// copyToOwner copies the device's bytes to the owner until either ends;
// then it closes the owner's side, which ends the other copy.
func (f *forwarded) copyToOwner(fromDevice *bufio.Reader) int64 {
	defer f.up.Close()
	buf := make([]byte, 32<<10)
	var total int64
	for {
		n, err := fromDevice.Read(buf)
		if n > 0 {
			f.lastDown.Store(time.Now().UnixNano())
			if _, werr := f.up.Write(buf[:n]); werr != nil {
				return total // the owner's side broke: the other copy tells the device
			}
			total += int64(n)
		}
		if err != nil {
			f.deviceGone.Store(true)
			return total
		}
	}
}

// copyToDevice copies the owner's bytes to the device until either ends.
func (f *forwarded) copyToDevice() int64 {
	buf := make([]byte, 32<<10)
	var total int64
	for {
		n, err := f.up.Read(buf)
		if n > 0 {
			f.lastUp.Store(time.Now().UnixNano())
			f.answered.Store(true)
			f.ws.feed(buf[:n])
			if _, werr := f.down.Write(buf[:n]); werr != nil {
				f.deviceGone.Store(true)
				return total
			}
			total += int64(n)
		}
		if err != nil {
			return total
		}
	}
}

// finish tells the device why its forward ended, when the owner could
// not: nothing if the device went away or the owner closed the WebSocket
// itself.
func (f *forwarded) finish() {
	if f.deviceGone.Load() || f.ws.closeSeen {
		return
	}
	var msg []byte
	switch {
	case !f.answered.Load():
		body := "the node serving this device group does not answer\n"
		msg = []byte("HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: " +
			itoa(len(body)) + "\r\n\r\n" + body)
	case f.ws.atBoundary():
		msg = closeFrame(d2m.CloseGoingAway, forwardLostReason)
	default:
		return // mid-frame or not a WebSocket: a bare close is all that is left
	}
	f.down.SetWriteDeadline(time.Now().Add(time.Second))
	f.down.Write(msg)
}

// check is the watchdog: it ends a forward whose owner or device has been
// silent too long, else looks again when that could next be the case.
func (f *forwarded) check() {
	now := time.Now()
	upLimit := f.idle
	if !f.answered.Load() {
		upLimit = f.first
	}
	sinceUp := now.Sub(time.Unix(0, f.lastUp.Load()))
	sinceDown := now.Sub(time.Unix(0, f.lastDown.Load()))
	if sinceUp >= upLimit || sinceDown >= f.idle {
		f.expired.Store(true)
		f.up.Close() // the owner→device copy ends and tells the device
		if f.onExpire != nil {
			if sinceUp >= upLimit {
				f.onExpire("owner", sinceUp)
			} else {
				f.onExpire("device", sinceDown)
			}
		}
		return
	}
	f.mu.Lock()
	if !f.stop {
		f.timer.Reset(min(upLimit-sinceUp, f.idle-sinceDown))
	}
	f.mu.Unlock()
}

func (f *forwarded) close() {
	f.down.Close()
	f.up.Close()
}

func itoa(n int) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
		if n == 0 {
			return string(b[i:])
		}
	}
}

// closeFrame is a server's (unmasked) WebSocket close frame.
func closeFrame(code d2m.CloseCode, reason string) []byte {
	if len(reason) > 123 {
		reason = reason[:123]
	}
	b := []byte{0x88, byte(2 + len(reason)), 0, 0}
	binary.BigEndian.PutUint16(b[2:], uint16(code))
	return append(b, reason...)
}

// wsTracker follows an owner's answer to a forwarded upgrade: the HTTP
// response, then the WebSocket frames, keeping only where the current
// frame ends. It decodes nothing.
type wsTracker struct {
	state     uint8  // wsResponse, wsFrames, wsOther
	pending   []byte // response head so far, or the current frame's header so far
	need      uint64 // payload bytes left in the current frame
	closeSeen bool   // the owner sent a close frame
}

const (
	wsResponse uint8 = iota
	wsFrames
	wsOther // not a 101, or unparseable: never write into it
)

// maxResponseHead bounds the response head the tracker keeps.
const maxResponseHead = 8 << 10

func (w *wsTracker) atBoundary() bool {
	return w.state == wsFrames && w.need == 0 && len(w.pending) == 0
}

func (w *wsTracker) feed(b []byte) {
	for len(b) > 0 {
		switch w.state {
		case wsOther:
			return
		case wsResponse:
			w.pending = append(w.pending, b...)
			i := bytes.Index(w.pending, []byte("\r\n\r\n"))
			if i < 0 {
				if len(w.pending) > maxResponseHead {
					w.state, w.pending = wsOther, nil
				}
				return
			}
			if !bytes.HasPrefix(w.pending, []byte("HTTP/1.1 101 ")) {
				w.state, w.pending = wsOther, nil
				return
			}
			rest := w.pending[i+4:]
			b = append([]byte(nil), rest...)
			w.state, w.pending = wsFrames, nil
		case wsFrames:
			if w.need > 0 {
				n := min(uint64(len(b)), w.need)
				w.need -= n
				b = b[n:]
				continue
			}
			w.pending = append(w.pending, b[0])
			b = b[1:]
			h := w.pending
			if len(h) < 2 {
				continue
			}
			size := 2
			switch h[1] & 0x7f {
			case 126:
				size += 2
			case 127:
				size += 8
			}
			if h[1]&0x80 != 0 {
				size += 4 // masked (a server never masks; counted all the same)
			}
			if len(h) < size {
				continue
			}
			switch l := h[1] & 0x7f; l {
			case 126:
				w.need = uint64(binary.BigEndian.Uint16(h[2:4]))
			case 127:
				w.need = binary.BigEndian.Uint64(h[2:10])
			default:
				w.need = uint64(l)
			}
			if h[0]&0x0f == 0x8 {
				w.closeSeen = true
			}
			w.pending = w.pending[:0] // the next header reuses the buffer
		}
	}
}
