package csp

import (
	"encoding/binary"
	"fmt"

	"golang.org/x/crypto/nacl/box"
)

// Nonce returns cookie ‖ u64-le(seq), the nonce of every CSP box (§9.3).
func Nonce(cookie Cookie, seq uint64) [NonceSize]byte {
	var n [NonceSize]byte
	copy(n[:], cookie[:])
	binary.LittleEndian.PutUint64(n[CookieSize:], seq)
	return n
}

// NonceCounter yields the nonces of one direction of a connection. The
// counter is per direction and covers the handshake too (see the *Seq
// constants), so a box that is skipped or opened twice puts the two ends
// out of step and every later box fails to open.
type NonceCounter struct {
	cookie Cookie
	next   uint64
}

// NewNonceCounter returns a counter whose next nonce is cookie ‖ next.
func NewNonceCounter(cookie Cookie, next uint64) *NonceCounter {
	return &NonceCounter{cookie: cookie, next: next}
}

// Next returns the next nonce and advances the counter.
func (c *NonceCounter) Next() [NonceSize]byte {
	n := Nonce(c.cookie, c.next)
	c.next++
	return n
}

// Seq returns the sequence number the next call to Next will use.
func (c *NonceCounter) Seq() uint64 { return c.next }

// Cookie returns the counter's cookie.
func (c *NonceCounter) Cookie() Cookie { return c.cookie }

// Session is one CSP connection's box state after the server-hello: the
// shared key of the two temporary key pairs (TCK, TSK), computed once with
// box.Precompute so that a frame costs a symmetric seal, not an X25519
// exchange (tens of µs: BENCHMARKS.md, "Changes this measurement drove"),
// and the two nonce counters.
//
// The send side and the receive side may each be used by one goroutine at a
// time, concurrently with each other.
type Session struct {
	key  [KeySize]byte
	send *NonceCounter
	recv *NonceCounter
}

// NewSession returns a session for the given peer public key and own secret
// key, sending with send's nonces and opening with recv's.
func NewSession(peerPublicKey, ownSecretKey *[KeySize]byte, send, recv *NonceCounter) *Session {
	s := &Session{send: send, recv: recv}
	box.Precompute(&s.key, peerPublicKey, ownSecretKey)
	return s
}

// Seal boxes plaintext with the next send nonce.
func (s *Session) Seal(plaintext []byte) []byte {
	n := s.send.Next()
	return box.SealAfterPrecomputation(make([]byte, 0, len(plaintext)+BoxOverhead), plaintext, &n, &s.key)
}

// Open opens a box with the next receive nonce. The counter advances even
// when the box does not open; the connection is unusable after an error.
func (s *Session) Open(boxed []byte) ([]byte, error) {
	n := s.recv.Next()
	if len(boxed) < BoxOverhead {
		return nil, malformed("box", "%d bytes, shorter than the %d-byte tag", len(boxed), BoxOverhead)
	}
	out, ok := box.OpenAfterPrecomputation(nil, boxed, &n, &s.key)
	if !ok {
		return nil, fmt.Errorf("%w (nonce sequence %d)", ErrDecrypt, s.recv.Seq()-1)
	}
	return out, nil
}

// SealFrame returns a complete frame: u16-le length ‖ box[container(typ,
// data)], the exact bytes of one device→server Proxy payload (§9.1) or one
// server→device CSP unit (§9.2).
func (s *Session) SealFrame(typ PayloadType, data []byte) ([]byte, error) {
	if len(data) > MaxPayloadSize {
		return nil, malformed("frame", "%s payload of %d bytes exceeds %d", typ, len(data), MaxPayloadSize)
	}
	container := AppendContainer(make([]byte, 0, ContainerHeader+len(data)), typ, data)
	n := s.send.Next()
	frame := make([]byte, FrameLengthSize, FrameLengthSize+len(container)+BoxOverhead)
	binary.LittleEndian.PutUint16(frame, uint16(len(container)+BoxOverhead))
	return box.SealAfterPrecomputation(frame, container, &n, &s.key), nil
}

// OpenFrame opens one complete frame (length prefix included) and returns
// its container's type and data. data aliases a fresh plaintext buffer, not
// frame.
func (s *Session) OpenFrame(frame []byte) (PayloadType, []byte, error) {
	boxed, err := ParseFrame(frame)
	if err != nil {
		return 0, nil, err
	}
	plain, err := s.Open(boxed)
	if err != nil {
		return 0, nil, err
	}
	return ParseContainer(plain)
}

// ParseFrame checks a complete frame (u16-le length ‖ box) and returns the
// box. The length must match exactly: a unit holding more or less than one
// frame is a re-framing bug (§9.2, Android and iOS assert the same).
func ParseFrame(frame []byte) ([]byte, error) {
	if len(frame) < FrameLengthSize {
		return nil, malformed("frame", "%d bytes, no length prefix", len(frame))
	}
	n := int(binary.LittleEndian.Uint16(frame))
	if n > MaxBoxSize {
		return nil, malformed("frame", "box length %d exceeds %d", n, MaxBoxSize)
	}
	if n != len(frame)-FrameLengthSize {
		return nil, malformed("frame", "length prefix %d, but %d bytes follow", n, len(frame)-FrameLengthSize)
	}
	return frame[FrameLengthSize:], nil
}

// AppendContainer appends the plaintext container type u8 ‖ 3 zero bytes ‖
// data to dst.
func AppendContainer(dst []byte, typ PayloadType, data []byte) []byte {
	dst = append(dst, byte(typ), 0, 0, 0)
	return append(dst, data...)
}

// ParseContainer splits a plaintext container. The reserved bytes are
// ignored on receipt, as everywhere in this project (§18 row 13).
func ParseContainer(p []byte) (PayloadType, []byte, error) {
	if len(p) < ContainerHeader {
		return 0, nil, malformed("container", "%d bytes, shorter than the %d-byte header", len(p), ContainerHeader)
	}
	return PayloadType(p[0]), p[ContainerHeader:], nil
}
