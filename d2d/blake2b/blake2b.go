package blake2b

import (
	"encoding/binary"
	"errors"
	"hash"
	"math/bits"
)

const (
	// BlockSize is the BLAKE2b block size in bytes.
	BlockSize = 128
	// Size is the largest digest size in bytes.
	Size = 64
	// Size256 is the digest size of Sum256 in bytes.
	Size256 = 32
	// MaxKeySize is the largest key size in bytes.
	MaxKeySize = 64
	// SaltSize is the size of the salt parameter; shorter salts are
	// zero-padded.
	SaltSize = 16
	// PersonalSize is the size of the personalization parameter; shorter
	// values are zero-padded.
	PersonalSize = 16
)

var (
	// ErrSize is returned for a digest size outside 1..Size.
	ErrSize = errors.New("blake2b: invalid digest size")
	// ErrKeySize is returned for a key longer than MaxKeySize.
	ErrKeySize = errors.New("blake2b: key too long")
	// ErrSaltSize is returned for a salt longer than SaltSize.
	ErrSaltSize = errors.New("blake2b: salt too long")
	// ErrPersonalSize is returned for a personalization longer than
	// PersonalSize.
	ErrPersonalSize = errors.New("blake2b: personal too long")
)

var iv = [8]uint64{
	0x6a09e667f3bcc908, 0xbb67ae8584caa73b, 0x3c6ef372fe94f82b, 0xa54ff53a5f1d36f1,
	0x510e527fade682d1, 0x9b05688c2b3e6c1f, 0x1f83d9abfb41bd6b, 0x5be0cd19137e2179,
}

// sigma is the message schedule; rounds 10 and 11 reuse rows 0 and 1.
var sigma = [10][16]byte{
	{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
	{14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
	{11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
	{7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
	{9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
	{2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
	{12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
	{13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
	{6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
	{10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
}

// digest is a BLAKE2b state. The buffer always keeps the most recent
// 1..BlockSize bytes unprocessed, because BLAKE2b must compress the last
// block with the final flag set and Write cannot know which block is last.
type digest struct {
	h      [8]uint64
	t      [2]uint64 // byte counter, low word first
	buf    [BlockSize]byte
	n      int // bytes used in buf
	size   int
	init   [8]uint64       // h after the parameter block, for Reset
	key    [BlockSize]byte // zero-padded key block, for Reset
	keyLen int
}

// New returns a BLAKE2b hash.Hash with a digest of size bytes (1..Size).
// key may be empty (unkeyed) or up to MaxKeySize bytes; salt and personal
// may be up to SaltSize and PersonalSize bytes and are zero-padded.
func New(size int, key, salt, personal []byte) (hash.Hash, error) {
	return newDigest(size, key, salt, personal)
}

// Sum256 returns the 32-byte BLAKE2b digest of msg under the given key,
// salt and personal parameters (see New for their limits).
func Sum256(key, salt, personal, msg []byte) ([Size256]byte, error) {
	var out [Size256]byte
	d, err := newDigest(Size256, key, salt, personal)
	if err != nil {
		return out, err
	}
	d.Write(msg)
	d.finish(out[:])
	return out, nil
}

func newDigest(size int, key, salt, personal []byte) (*digest, error) {
	switch {
	case size < 1 || size > Size:
		return nil, ErrSize
	case len(key) > MaxKeySize:
		return nil, ErrKeySize
	case len(salt) > SaltSize:
		return nil, ErrSaltSize
	case len(personal) > PersonalSize:
		return nil, ErrPersonalSize
	}

	// The parameter block (RFC 7693 §2.5, BLAKE2 paper §2.8) for sequential
	// hashing: byte 0 digest length, 1 key length, 2 fanout=1, 3 depth=1,
	// 32..47 salt, 48..63 personal; everything else zero.
	var p [64]byte
	p[0] = byte(size)
	p[1] = byte(len(key))
	p[2] = 1
	p[3] = 1
	copy(p[32:48], salt)
	copy(p[48:64], personal)

	d := &digest{size: size, keyLen: len(key)}
	for i := range d.init {
		d.init[i] = iv[i] ^ binary.LittleEndian.Uint64(p[8*i:])
	}
	copy(d.key[:], key)
	d.Reset()
	return d, nil
}

// Reset restores the state after the parameter block and, if keyed, the
// buffered key block.
func (d *digest) Reset() {
	d.h = d.init
	d.t = [2]uint64{}
	d.buf = [BlockSize]byte{}
	d.n = 0
	if d.keyLen > 0 {
		d.buf = d.key
		d.n = BlockSize
	}
}

// Size returns the digest size in bytes.
func (d *digest) Size() int { return d.size }

// BlockSize returns BlockSize.
func (d *digest) BlockSize() int { return BlockSize }

// Write absorbs p. It never returns an error.
func (d *digest) Write(p []byte) (int, error) {
	written := len(p)
	if d.n+len(p) > BlockSize {
		// More input follows the buffered bytes, so the buffer is not the
		// last block: fill it and compress it as a non-final block.
		k := copy(d.buf[d.n:], p)
		p = p[k:]
		d.compress(d.buf[:], BlockSize, false)
		d.n = 0
		for len(p) > BlockSize {
			d.compress(p[:BlockSize], BlockSize, false)
			p = p[BlockSize:]
		}
	}
	d.n += copy(d.buf[d.n:], p)
	return written, nil
}

// Sum appends the digest to b without changing the state.
func (d *digest) Sum(b []byte) []byte {
	var out [Size]byte
	c := *d
	c.finish(out[:d.size])
	return append(b, out[:d.size]...)
}

// finish compresses the zero-padded final block and writes the digest to
// out, which must be d.size bytes. It consumes the state.
func (d *digest) finish(out []byte) {
	clear(d.buf[d.n:])
	d.compress(d.buf[:], uint64(d.n), true)
	var full [Size]byte
	for i, v := range d.h {
		binary.LittleEndian.PutUint64(full[8*i:], v)
	}
	copy(out, full[:d.size])
}

// compress is the BLAKE2b compression function F (RFC 7693 §3.2). inc is
// the number of message bytes in block, added to the counter first.
func (d *digest) compress(block []byte, inc uint64, last bool) {
	var carry uint64
	d.t[0], carry = bits.Add64(d.t[0], inc, 0)
	d.t[1] += carry

	var m [16]uint64
	for i := range m {
		m[i] = binary.LittleEndian.Uint64(block[8*i:])
	}
	var v [16]uint64
	copy(v[:8], d.h[:])
	copy(v[8:], iv[:])
	v[12] ^= d.t[0]
	v[13] ^= d.t[1]
	if last {
		v[14] = ^v[14]
	}
	for r := range 12 {
		s := &sigma[r%10]
		g(&v, 0, 4, 8, 12, m[s[0]], m[s[1]])
		g(&v, 1, 5, 9, 13, m[s[2]], m[s[3]])
		g(&v, 2, 6, 10, 14, m[s[4]], m[s[5]])
		g(&v, 3, 7, 11, 15, m[s[6]], m[s[7]])
		g(&v, 0, 5, 10, 15, m[s[8]], m[s[9]])
		g(&v, 1, 6, 11, 12, m[s[10]], m[s[11]])
		g(&v, 2, 7, 8, 13, m[s[12]], m[s[13]])
		g(&v, 3, 4, 9, 14, m[s[14]], m[s[15]])
	}
	for i := range d.h {
		d.h[i] ^= v[i] ^ v[i+8]
	}
}

// g is the mixing function G (RFC 7693 §3.1).
func g(v *[16]uint64, a, b, c, d int, x, y uint64) {
	v[a] += v[b] + x
	v[d] = bits.RotateLeft64(v[d]^v[a], -32)
	v[c] += v[d]
	v[b] = bits.RotateLeft64(v[b]^v[c], -24)
	v[a] += v[b] + y
	v[d] = bits.RotateLeft64(v[d]^v[a], -16)
	v[c] += v[d]
	v[b] = bits.RotateLeft64(v[b]^v[c], -63)
}
