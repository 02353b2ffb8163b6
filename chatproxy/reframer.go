package chatproxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
)

// Sizes of the units the chat server sends, in the order it sends them
// (docs/protocol.md §9.2, §9.3).
const (
	// ServerHelloSize is the server-hello: SCK(16) ‖ box[TSK.public ‖ CCK] (64).
	ServerHelloSize = 80
	// LoginAckSize is the login-ack: box[16 zero bytes].
	LoginAckSize = 32
	// FrameLengthSize is the u16-le length prefix of every frame after login.
	FrameLengthSize = 2
	// MaxFrameBoxSize is the largest box a frame may carry (CSP "Size
	// Limitations"; Android MAX_PKT_LEN, iOS kMaxPktLen). A larger length
	// means the stream is corrupt or not CSP at all.
	MaxFrameBoxSize = 8192
	// MaxUnitSize is the largest unit Next can return: a full frame with its
	// length prefix.
	MaxUnitSize = FrameLengthSize + MaxFrameBoxSize
)

// DefaultReadBufferSize is the size of the chunks a Reframer reads into.
// Units larger than a chunk are read straight into their own slice, so a
// small chunk costs syscalls only for big frames. A chunk is taken from a
// pool when the Reframer reads and given back as soon as its bytes are cut
// into units: an idle device connection holds none (BENCHMARKS.md, "idle",
// counts the memory per connection).
const DefaultReadBufferSize = 4096

var readChunks = sync.Pool{New: func() any { return new([DefaultReadBufferSize]byte) }}

// Sentinel errors. Errors returned by this package wrap exactly one of them,
// plus the underlying cause where there is one.
var (
	// ErrDial means the chat server could not be reached (close code 4001).
	ErrDial = errors.New("chatproxy: cannot connect to chat server")
	// ErrClosed means the chat-server connection ended: EOF or reset from
	// the server, or Close on our side (close code 4000).
	ErrClosed = errors.New("chatproxy: chat server connection closed")
	// ErrFrameTooLarge means the server announced a frame longer than
	// MaxFrameBoxSize; the stream cannot be cut any further (close code 4009).
	ErrFrameTooLarge = errors.New("chatproxy: CSP frame too large")
	// ErrWriteTimeout means the chat server did not take the device's bytes
	// within the write timeout (close code 4009).
	ErrWriteTimeout = errors.New("chatproxy: write to chat server timed out")
)

type reframerPhase uint8

const (
	phaseServerHello reframerPhase = iota
	phaseLoginAck
	phaseFrames
)

// Reframer cuts the chat server's byte stream into CSP units: the 80-byte
// server-hello, the 32-byte login-ack, then frames returned with their u16-le
// length prefix kept (docs/protocol.md §9.2). It never coalesces or splits units,
// whatever the chunking of the underlying reader.
//
// A Reframer is not safe for concurrent use. After Next returns an error it
// returns the same error forever: once a unit is cut wrong, every later cut
// would be wrong too.
type Reframer struct {
	r     io.Reader
	size  int    // chunk size
	buf   []byte // the chunk; buf[a:b] read and not yet cut; nil when empty
	a, b  int
	rerr  error // the stream's error read by ReadWith, for Next once buf is cut
	phase reframerPhase
	err   error
}

// NewReframer returns a Reframer reading from r in chunks of bufSize bytes
// (DefaultReadBufferSize if bufSize <= 0).
func NewReframer(r io.Reader, bufSize int) *Reframer {
	if bufSize <= 0 {
		bufSize = DefaultReadBufferSize
	}
	return &Reframer{r: r, size: bufSize}
}

// Buffered reports how many bytes were read from the stream and not yet
// returned in a unit.
func (f *Reframer) Buffered() int { return f.b - f.a }

// ready reports whether Next has something to work on without reading.
func (f *Reframer) ready() bool { return f.b > f.a || f.rerr != nil || f.err != nil }

// Next returns the next CSP unit in a freshly allocated slice that the caller
// owns (one allocation per unit, since the caller hands it to another
// goroutine).
//
// Errors: a frame length above MaxFrameBoxSize wraps ErrFrameTooLarge. The
// end of the stream wraps ErrClosed and the reader's error: io.EOF at a unit
// boundary, io.ErrUnexpectedEOF when a partial unit was left over (those
// bytes are discarded: the client could not use half a unit anyway). Every
// complete unit that arrived before the end is returned first.
func (f *Reframer) Next() ([]byte, error) {
	if f.err != nil {
		return nil, f.err
	}
	var n int
	switch f.phase {
	case phaseServerHello:
		n = ServerHelloSize
	case phaseLoginAck:
		n = LoginAckSize
	default:
		if err := f.fill(FrameLengthSize); err != nil {
			return nil, f.fail(err)
		}
		length := int(binary.LittleEndian.Uint16(f.buf[f.a:]))
		if length > MaxFrameBoxSize {
			f.err = fmt.Errorf("%w: length %d, limit %d", ErrFrameTooLarge, length, MaxFrameBoxSize)
			return nil, f.err
		}
		n = FrameLengthSize + length
	}
	unit := make([]byte, n)
	for k := 0; k < n; {
		if f.a == f.b && n-k >= f.size && f.rerr == nil {
			// Nothing buffered and a chunk would not hold the rest:
			// straight into the unit.
			if _, err := io.ReadFull(f.r, unit[k:]); err != nil {
				if errors.Is(err, io.EOF) && k > 0 {
					err = io.ErrUnexpectedEOF
				}
				return nil, f.fail(err)
			}
			break
		}
		if f.a == f.b {
			if err := f.fill(1); err != nil {
				if errors.Is(err, io.EOF) && k > 0 {
					err = io.ErrUnexpectedEOF
				}
				return nil, f.fail(err)
			}
		}
		c := copy(unit[k:], f.buf[f.a:f.b])
		f.a += c
		k += c
		f.release()
	}
	if f.phase < phaseFrames {
		f.phase++
	}
	return unit, nil
}

// fill reads until at least min bytes are buffered (min <= size).
func (f *Reframer) fill(min int) error {
	for f.b-f.a < min {
		if f.rerr != nil {
			err := f.rerr
			f.rerr = nil
			f.release()
			return err
		}
		n, err := f.r.Read(f.space())
		f.b += n
		if err != nil {
			if f.b-f.a >= min {
				return nil // the error comes back with the next read
			}
			f.release()
			return err
		}
	}
	return nil
}

// space returns where the next read goes: the free end of the chunk,
// taking one and moving the unread bytes to its start where needed.
func (f *Reframer) space() []byte {
	if f.buf == nil {
		if f.size == DefaultReadBufferSize {
			f.buf = readChunks.Get().(*[DefaultReadBufferSize]byte)[:]
		} else {
			f.buf = make([]byte, f.size)
		}
		f.a, f.b = 0, 0
	}
	if f.b == len(f.buf) {
		f.b = copy(f.buf, f.buf[f.a:f.b])
		f.a = 0
	}
	return f.buf[f.b:]
}

// ReadWith reads the stream once with read, which reads into the buffer
// it is given like io.Reader.Read, except that it reports "nothing there
// yet" as (0, false) instead of waiting. What it reads is cut into units
// by the next calls to Next; an error is returned by Next once the units
// before it are. It reports whether anything (bytes or an error) came;
// if not, the Reframer holds no chunk afterwards.
func (f *Reframer) ReadWith(read func([]byte) (n int, ok bool, err error)) bool {
	if f.err != nil || f.rerr != nil {
		return true
	}
	n, ok, err := read(f.space())
	f.b += n
	if err != nil {
		f.rerr = err
		return true
	}
	if !ok || n == 0 {
		f.release()
		return false
	}
	return true
}

// release gives the chunk back once nothing in it is left to cut.
func (f *Reframer) release() {
	if f.buf == nil || f.a < f.b {
		return
	}
	if len(f.buf) == DefaultReadBufferSize {
		readChunks.Put((*[DefaultReadBufferSize]byte)(f.buf))
	}
	f.buf, f.a, f.b = nil, 0, 0
}

// fail records a read error as the Reframer's final error.
func (f *Reframer) fail(err error) error {
	// A partial length prefix looks the same as a partial unit.
	if errors.Is(err, io.EOF) && f.Buffered() > 0 {
		err = io.ErrUnexpectedEOF
	}
	f.err = fmt.Errorf("%w: %w", ErrClosed, err)
	return f.err
}
