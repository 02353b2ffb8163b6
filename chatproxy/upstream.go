package chatproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Defaults for Options fields left at zero.
const (
	DefaultDialTimeout  = 10 * time.Second
	DefaultWriteTimeout = 10 * time.Second
)

// Options configure Dial. The zero value uses the defaults.
type Options struct {
	// DialTimeout bounds the TCP connect (DNS included). Zero means
	// DefaultDialTimeout.
	DialTimeout time.Duration
	// WriteTimeout bounds each Write, so a chat server that stops reading
	// blocks the device's read loop at most this long. Zero means
	// DefaultWriteTimeout.
	WriteTimeout time.Duration
	// ReadBufferSize is the buffer behind the Reframer. Zero means
	// DefaultReadBufferSize.
	ReadBufferSize int
}

func (o Options) withDefaults() Options {
	if o.DialTimeout <= 0 {
		o.DialTimeout = DefaultDialTimeout
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = DefaultWriteTimeout
	}
	if o.ReadBufferSize <= 0 {
		o.ReadBufferSize = DefaultReadBufferSize
	}
	return o
}

// Upstream is one device connection's TCP link to the chat server
// (docs/protocol.md §18 row 2: one per device connection that proxies).
//
// Write and ReadUnit may run at the same time in two goroutines (the device's
// read loop writes, the upstream loop reads); each of them must only be called
// from one goroutine at a time. Close may be called from anywhere, any number
// of times.
type Upstream struct {
	conn         net.Conn
	reframer     *Reframer
	writeTimeout time.Duration
	raw          syscall.RawConn       // for WaitReadable; nil if conn has none
	fill         func(fd uintptr) bool // WaitReadable's read, bound once
	rawRead      func([]byte) (int, bool, error)
	fd           uintptr

	// writeErr makes a failed write final: after a timeout some bytes of p may
	// have been sent, so the server's view of the stream is broken and no
	// later write may pretend otherwise. Only the writing goroutine uses it.
	writeErr error

	closed    atomic.Bool
	closeOnce sync.Once
	closeErr  error
}

// Dial connects to the chat server at addr ("host:port"). A failure wraps
// ErrDial and the dialer's error. ctx bounds the dial only, not the life of
// the connection.
func Dial(ctx context.Context, addr string, opts Options) (*Upstream, error) {
	opts = opts.withDefaults()
	d := net.Dialer{Timeout: opts.DialTimeout}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%w %s: %w", ErrDial, addr, err)
	}
	u := &Upstream{
		conn:         conn,
		reframer:     NewReframer(conn, opts.ReadBufferSize),
		writeTimeout: opts.WriteTimeout,
	}
	if sc, ok := conn.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			u.raw = raw
			u.rawRead = func(p []byte) (int, bool, error) {
				// The socket is non-blocking: no system-call
				// bookkeeping of the scheduler is needed.
				n, _, e := syscall.RawSyscall(syscall.SYS_READ, u.fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
				switch {
				case e == syscall.EAGAIN:
					return 0, false, nil
				case e == syscall.EINTR:
					return 0, true, nil // ReadUnit reads again
				case e != 0:
					return 0, true, os.NewSyscallError("read", e)
				case n == 0:
					return 0, true, io.EOF
				}
				return int(n), true, nil
			}
			u.fill = func(fd uintptr) bool {
				u.fd = fd
				return u.reframer.ReadWith(u.rawRead)
			}
		}
	}
	return u, nil
}

// WaitReadable returns when ReadUnit has bytes to work on: some are
// buffered already, or it waits for the connection and reads what it has
// (or its end) with the one read system call ReadUnit would have made. A
// goroutine that waits here between units, instead of inside ReadUnit's
// read, waits near the bottom of its stack, which the garbage collector
// can then shrink, and holds no read buffer while it waits. Only the
// goroutine that calls ReadUnit may call it.
func (u *Upstream) WaitReadable() {
	if u.raw == nil || u.reframer.ready() {
		return
	}
	_ = u.raw.Read(u.fill) // an error (closed) shows in the ReadUnit that follows
}

// Write sends device→server bytes verbatim. Proxy payloads are a byte stream
// (docs/protocol.md §9.1: iOS splits the login in two, so one Proxy is not one CSP
// message), so p is written as is, in call order.
//
// A write that does not finish within the write timeout returns an error
// wrapping ErrWriteTimeout; a broken or closed connection wraps ErrClosed.
// After an error every later Write returns the same error; the caller should
// Close the Upstream.
func (u *Upstream) Write(p []byte) error {
	if u.writeErr != nil {
		return u.writeErr
	}
	if u.closed.Load() {
		return fmt.Errorf("%w: %w", ErrClosed, net.ErrClosed)
	}
	if len(p) == 0 {
		return nil
	}
	if err := u.conn.SetWriteDeadline(time.Now().Add(u.writeTimeout)); err != nil {
		u.writeErr = fmt.Errorf("%w: %w", ErrClosed, err)
		return u.writeErr
	}
	n, err := u.conn.Write(p)
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("%w after %v (%d of %d bytes written): %w", ErrWriteTimeout, u.writeTimeout, n, len(p), err)
		} else {
			err = fmt.Errorf("%w: %w", ErrClosed, err)
		}
		u.writeErr = err
		return err
	}
	return nil
}

// ReadUnit blocks until the next complete CSP unit arrives from the chat
// server and returns it in a new slice the caller owns (see Reframer.Next for
// the cutting rules). When the server closes the connection, every complete
// unit already received is returned before the error, so the device still
// gets a final close-error or alert (docs/protocol.md §8.2: forward, then 4000).
//
// Errors wrap ErrClosed (server EOF or reset, or Close) or ErrFrameTooLarge.
func (u *Upstream) ReadUnit() ([]byte, error) {
	unit, err := u.reframer.Next()
	if err != nil {
		return nil, err
	}
	return unit, nil
}

// Close closes the TCP connection, which unblocks a pending ReadUnit or
// Write. It is safe to call more than once; later calls return the first
// call's result.
func (u *Upstream) Close() error {
	u.closeOnce.Do(func() {
		u.closed.Store(true)
		u.closeErr = u.conn.Close()
	})
	return u.closeErr
}
