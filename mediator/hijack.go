package mediator

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// Buffer sizes for an upgraded device connection. net/http hands a
// hijacked connection over with its own 4 KiB reader and 4 KiB writer,
// and the WebSocket library keeps both for the connection's life: 8 KiB
// on every idle device. Device frames are small (a Reflected of a typical
// envelope is a few hundred bytes); a larger frame costs one more read or
// write system call, not a copy.
//
// The writer hardly uses the library's write buffer: every send round
// appends its frames to the corked buffer itself (corkConn.appendFrame).
// What is left for the library's buffer are its own control frames (pong,
// close: at most 127 bytes) and the frames a closing connection still
// writes, for which a larger frame is written through in two writes.
//
// The read buffer is not kept either: the library's buffered reader gets
// bufio's smallest size, and corkConn.Read reads the socket into a pooled
// chunk of readChunk bytes, which goes back to the pool as soon as its
// bytes are consumed. An idle connection holds no read buffer; a busy one
// makes as many read system calls as with a buffer of its own.
const (
	connReadBuffer  = 16 // bufio's minimum
	readChunk       = 1024
	connWriteBuffer = 128
)

var readChunks = sync.Pool{New: func() any { return new([readChunk]byte) }}

// upgradeWriter hands the WebSocket library a hijacked connection with
// right-sized buffers and a corkable writer in place of net/http's.
type upgradeWriter struct {
	http.ResponseWriter
	hj   http.Hijacker
	cork *corkConn
}

func (w upgradeWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := w.hj.Hijack()
	if err != nil {
		return nil, nil, err
	}
	if err := brw.Writer.Flush(); err != nil {
		conn.Close()
		return nil, nil, err
	}
	w.cork.Conn = conn
	if sc, ok := conn.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			w.cork.setRaw(raw)
		}
	}
	// Bytes the HTTP server read past the request (a client may send its
	// first frames right behind the upgrade request) must come first.
	// They are served by the conn itself: the WebSocket library resets the
	// reader it is given onto the conn.
	if n := brw.Reader.Buffered(); n > 0 {
		early, _ := brw.Reader.Peek(n)
		w.cork.early = bytes.Clone(early)
	}
	w.cork.br = bufio.NewReaderSize(w.cork, connReadBuffer)
	return w.cork, bufio.NewReadWriter(w.cork.br, bufio.NewWriterSize(w.cork, connWriteBuffer)), nil
}

// withUpgradeBuffers wraps w when it can be hijacked; otherwise it returns
// w and the upgrade reports the error. cork receives the connection.
func withUpgradeBuffers(w http.ResponseWriter, cork *corkConn) http.ResponseWriter {
	hj, ok := w.(http.Hijacker)
	if !ok {
		return w
	}
	return upgradeWriter{ResponseWriter: w, hj: hj, cork: cork}
}

// corkConn lets the writer send a burst of WebSocket messages with one
// system call. The WebSocket library flushes every message to the socket;
// at tens of thousands of small frames per second those write calls were
// the server's largest single cost. While corked, writes are collected in
// memory; uncork sends them at once. Writes from other goroutines (the
// library's pong and close replies) made during a burst go out with it, and
// Close sends whatever is collected before closing, so a close reply is
// never lost.
//
// Two locks: mu guards the buffer state and is never held during I/O;
// wmu serialises writes to the socket so bytes leave in the order they
// were queued. wmu is taken while mu is held (that fixes the order) and is
// held across exactly one socket write, which always has a deadline.
type corkConn struct {
	net.Conn
	raw            syscall.RawConn // for tryUncork's write that never waits; nil if the conn has none
	writeTimeout   time.Duration
	onWriteTimeout func() // called before a timed-out write returns
	early          []byte // read past the upgrade request; owned by the reader

	mu     sync.Mutex
	corked bool
	buf    *[]byte
	err    error // a failed write; later writes fail fast

	wmu sync.Mutex
	// tryUncork's raw write, bound once (a closure per call would be
	// allocated): its input and results, guarded by wmu.
	rawWrite func(fd uintptr) bool
	rawBuf   []byte
	rawN     int
	rawErr   error

	// br is the library's buffered reader over this conn (made in
	// Hijack), for pending.
	br *bufio.Reader
	// The read chunk: chunk[ra:rb] are read from the socket and not yet
	// consumed; nil while there are none. rerr is what the socket
	// reported to waitReadable's read (end of stream, an error), for the
	// next Read once the chunk is consumed. Owned by whoever reads: the
	// read loop, or the library's close handshake while readMu keeps the
	// read loop out (deviceConn.finishClose).
	chunk  *[readChunk]byte
	ra, rb int
	rerr   error
	readMu sync.Mutex
	fill   func(fd uintptr) bool // waitReadable's read, bound once
}

// corkFlushAt bounds the memory one burst may collect.
const corkFlushAt = 64 << 10

var corkBuffers = sync.Pool{New: func() any { b := make([]byte, 0, 8<<10); return &b }}

var errWriteTimeout = errors.New("write timed out")

func (c *corkConn) Read(p []byte) (int, error) {
	if len(c.early) > 0 {
		n := copy(p, c.early)
		c.early = c.early[n:]
		if len(c.early) == 0 {
			c.early = nil
		}
		return n, nil
	}
	if c.chunk == nil {
		if c.rerr != nil {
			return 0, c.rerr
		}
		if len(p) >= readChunk || c.br == nil {
			return c.Conn.Read(p)
		}
		chunk := readChunks.Get().(*[readChunk]byte)
		n, err := c.Conn.Read(chunk[:])
		if n <= 0 {
			readChunks.Put(chunk)
			return n, err
		}
		c.chunk, c.ra, c.rb = chunk, 0, n
	}
	n := copy(p, c.chunk[c.ra:c.rb])
	c.ra += n
	if c.ra == c.rb {
		readChunks.Put(c.chunk)
		c.chunk = nil
	}
	return n, nil
}

func (c *corkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return 0, err
	}
	if !c.corked {
		c.wmu.Lock()
		c.mu.Unlock()
		n, err := c.Conn.Write(p)
		c.wmu.Unlock()
		if err != nil {
			c.fail(err)
		}
		return n, err
	}
	if c.buf == nil {
		c.buf = corkBuffers.Get().(*[]byte)
	}
	*c.buf = append(*c.buf, p...)
	if len(*c.buf) < corkFlushAt {
		c.mu.Unlock()
		return len(p), nil
	}
	if err := c.flushUnlock(c.writeTimeout); err != nil {
		return 0, err
	}
	return len(p), nil
}

// appendFrame appends payload as one unfragmented binary WebSocket frame
// (server frames are not masked, RFC 6455 §5.1) to the collected bytes.
// It is the writer's path while corked, instead of the library's Write:
// no write mutex of the library, no second copy through its buffered
// writer, and nothing that can wait, so that another goroutine's inline
// write (flush.go) never blocks. Frames of the library's own (pong and
// close replies) are appended whole by Write under mu, so the byte stream
// never interleaves. Unless mayFlush, the collected bytes grow past
// corkFlushAt instead of being written here; the caller bounds them.
func (c *corkConn) appendFrame(payload []byte, mayFlush bool) error {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	if c.buf == nil {
		c.buf = corkBuffers.Get().(*[]byte)
	}
	*c.buf = appendFrameHeader(*c.buf, len(payload))
	*c.buf = append(*c.buf, payload...)
	if !mayFlush || !c.corked || len(*c.buf) < corkFlushAt {
		if !c.corked {
			// Not corked: nothing would send it. Callers cork first.
			return c.flushUnlock(c.writeTimeout)
		}
		c.mu.Unlock()
		return nil
	}
	return c.flushUnlock(c.writeTimeout)
}

// appendFrameHeader appends the header of a final, unmasked binary frame
// carrying n bytes.
func appendFrameHeader(b []byte, n int) []byte {
	const finBinary = 0x80 | 0x2
	switch {
	case n < 126:
		return append(b, finBinary, byte(n))
	case n <= 0xffff:
		return append(b, finBinary, 126, byte(n>>8), byte(n))
	default:
		return append(b, finBinary, 127, 0, 0, 0, 0, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
	}
}

// buffered is how many bytes are collected.
func (c *corkConn) buffered() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.buf == nil {
		return 0
	}
	return len(*c.buf)
}

// tryUncork sends the collected bytes if the socket takes them at once,
// without waiting: it never blocks, so a goroutine that is not this
// connection's writer (the store's committer, flush.go) may call it. It
// reports false, with the connection still corked and whatever was not
// sent still collected (in order, ahead of bytes collected meanwhile),
// when another write is in progress, the socket's buffer is full or the
// conn offers no raw access; the caller then leaves the rest to a writer
// goroutine, whose uncork sends it. An error is the connection's end.
func (c *corkConn) tryUncork() (bool, error) {
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return false, err
	}
	b := c.buf
	if b == nil || len(*b) == 0 {
		c.corked = false
		c.mu.Unlock()
		return true, nil
	}
	if c.raw == nil || !c.wmu.TryLock() {
		c.mu.Unlock()
		return false, nil
	}
	c.buf = nil
	c.mu.Unlock() // still corked: concurrent writes are collected meanwhile
	c.rawBuf = *b
	err := c.raw.Write(c.rawWrite)
	n, werr := c.rawN, c.rawErr
	c.rawBuf, c.rawErr = nil, nil
	c.wmu.Unlock()
	if err == nil && werr != nil && werr != syscall.EAGAIN && werr != syscall.EINTR {
		err = werr
	}
	n = max(n, 0)
	c.mu.Lock()
	if err != nil {
		if c.err == nil {
			c.err = err
		}
		c.mu.Unlock()
		putCorkBuffer(b)
		return false, err
	}
	if n == len(*b) && (c.buf == nil || len(*c.buf) == 0) {
		c.corked = false
		c.mu.Unlock()
		putCorkBuffer(b)
		return true, nil
	}
	// Keep the rest first, then what others collected meanwhile.
	rest := copy(*b, (*b)[n:])
	*b = (*b)[:rest]
	if c.buf != nil {
		*b = append(*b, *c.buf...)
		putCorkBuffer(c.buf)
	}
	c.buf = b
	c.mu.Unlock()
	return false, nil
}

// setRaw gives tryUncork and waitReadable raw access to the socket.
func (c *corkConn) setRaw(raw syscall.RawConn) {
	c.raw = raw
	c.rawWrite = func(fd uintptr) bool {
		c.rawN, c.rawErr = syscall.Write(int(fd), c.rawBuf)
		return true // never wait for the socket to become writable
	}
	c.fill = func(fd uintptr) bool {
		if !c.readMu.TryLock() {
			// The close handshake reads: let the read loop go on to its
			// read, which waits for the handshake and then fails.
			return true
		}
		defer c.readMu.Unlock()
		if c.pendingLocked() {
			return true
		}
		chunk := readChunks.Get().(*[readChunk]byte)
		// The socket is non-blocking: no system-call bookkeeping of the
		// scheduler is needed.
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&chunk[0])), readChunk)
		switch {
		case e == syscall.EAGAIN:
			readChunks.Put(chunk) // idle: hold no buffer while waiting
			return false
		case e == syscall.EINTR:
			readChunks.Put(chunk)
			return true // the read that follows tries again
		case e != 0:
			readChunks.Put(chunk)
			c.rerr = os.NewSyscallError("read", e)
		case n == 0:
			readChunks.Put(chunk)
			c.rerr = io.EOF
		default:
			c.chunk, c.ra, c.rb = chunk, 0, int(n)
		}
		return true
	}
}

// pendingLocked reports whether bytes already read from the socket (or
// its end) wait in the reader's buffers: the library's buffered reader,
// the read chunk, the bytes read past the upgrade request. Called with
// readMu held.
func (c *corkConn) pendingLocked() bool {
	return len(c.early) > 0 || c.chunk != nil || c.rerr != nil || (c.br != nil && c.br.Buffered() > 0)
}

// waitReadable returns once bytes wait in the reader's buffers: if none
// do, it waits for the socket and reads what it has into the read chunk,
// with the same one read system call the library's read would have made.
// It lets an idle connection's reader wait near the bottom of its stack
// instead of deep inside the library's read path, so that the garbage
// collector can shrink the stack of every idle device (4 KiB less each),
// and the idle connection holds no read buffer while it waits.
func (c *corkConn) waitReadable() {
	if c.raw == nil {
		return
	}
	_ = c.raw.Read(c.fill) // an error (closed) shows in the read that follows
}

func (c *corkConn) cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// uncork sends what was collected. A peer that does not take the bytes
// within writeTimeout fails the write with errWriteTimeout.
func (c *corkConn) uncork() error {
	c.mu.Lock()
	c.corked = false
	return c.flushUnlock(c.writeTimeout)
}

// flushUnlock takes the collected bytes, releases mu and writes them.
// Called with mu held.
func (c *corkConn) flushUnlock(timeout time.Duration) error {
	b := c.buf
	c.buf = nil
	if c.err != nil || b == nil || len(*b) == 0 {
		err := c.err
		c.mu.Unlock()
		putCorkBuffer(b)
		return err
	}
	c.wmu.Lock()
	c.mu.Unlock()
	defer putCorkBuffer(b)
	if timeout > 0 {
		c.Conn.SetWriteDeadline(time.Now().Add(timeout))
	}
	_, err := c.Conn.Write(*b)
	c.Conn.SetWriteDeadline(time.Time{})
	c.wmu.Unlock()
	if err != nil {
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			err = errWriteTimeout
			if c.onWriteTimeout != nil {
				// Before anyone sees the broken connection, so that the
				// close is recorded for the right reason.
				c.onWriteTimeout()
			}
		}
		c.fail(err)
	}
	return err
}

func (c *corkConn) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
}

func putCorkBuffer(b *[]byte) {
	if b != nil && cap(*b) <= corkFlushAt*2 {
		*b = (*b)[:0]
		corkBuffers.Put(b)
	}
}

// Close sends collected bytes first, so that a close reply written during
// a burst is not lost. A write blocked on a peer that does not read is cut
// short at once: the connection is going away anyway.
func (c *corkConn) Close() error {
	c.Conn.SetWriteDeadline(time.Now())
	c.mu.Lock()
	c.corked = false
	c.flushUnlock(time.Second)
	return c.Conn.Close()
}
