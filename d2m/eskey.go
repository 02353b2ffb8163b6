package d2m

import (
	"crypto/subtle"
	"io"

	"filippo.io/edwards25519"
	"filippo.io/edwards25519/field"
	//lint:ignore SA1019 HSalsa20 is the NaCl box key derivation itself (see SharedKey).
	"golang.org/x/crypto/salsa20/salsa"
)

// EphemeralKey is the server's X25519 key for one handshake (ESK,
// docs/protocol.md §6.1).
//
// Its public key is computed on the Edwards form of the curve with a
// precomputed table of multiples of the base point (filippo.io/
// edwards25519: ScalarBaseMult, then the Montgomery u-coordinate), 20 µs
// on the benchmark VM, where crypto/ecdh's Montgomery ladder takes 49 µs:
// the ladder cannot use that the base point is fixed. crypto/ecdh cannot
// take a key made that way without computing its public key again, so
// the shared key is computed here too, with the RFC 7748 ladder over the
// same constant-time field arithmetic (as fast as crypto/ecdh's).
// TestEphemeralKeyMatchesECDH compares both with crypto/ecdh.
type EphemeralKey struct {
	scalar [32]byte // clamped (RFC 7748 §5)
	public [32]byte
}

// NewEphemeralKey makes a key from 32 bytes of rand.
func NewEphemeralKey(rand io.Reader) (*EphemeralKey, error) {
	k := new(EphemeralKey)
	if _, err := io.ReadFull(rand, k.scalar[:]); err != nil {
		return nil, err
	}
	k.scalar[0] &= 248
	k.scalar[31] &= 127
	k.scalar[31] |= 64
	// The clamped scalar as an Edwards scalar (reduced mod the group
	// order, which the base point's multiples do not see).
	s, err := edwards25519.NewScalar().SetBytesWithClamping(k.scalar[:])
	if err != nil {
		return nil, err
	}
	copy(k.public[:], new(edwards25519.Point).ScalarBaseMult(s).BytesMontgomery())
	return k, nil
}

// Public is the public key, as sent in the ServerHello.
func (k *EphemeralKey) Public() []byte { return k.public[:] }

// sharedKey computes the NaCl box key X25519HSalsa20(k, peer), like
// SharedKey; a low-order peer key yields ErrLowOrderKey.
func (k *EphemeralKey) sharedKey(peer []byte) (*[32]byte, error) {
	if len(peer) != 32 {
		return nil, ErrLowOrderKey
	}
	var in [32]byte
	x25519(&in, &k.scalar, peer)
	var zero [32]byte
	if subtle.ConstantTimeCompare(in[:], zero[:]) == 1 {
		return nil, ErrLowOrderKey
	}
	var key [32]byte
	var nonce [16]byte
	salsa.HSalsa20(&key, &nonce, &in, &salsa.Sigma)
	return &key, nil
}

// x25519 sets dst to X25519(scalar, point): the Montgomery ladder of RFC
// 7748 §5, constant time in the scalar. point's top bit is ignored.
func x25519(dst, scalar *[32]byte, point []byte) {
	var x1, x2, z2, x3, z3, tmp0, tmp1 field.Element
	x1.SetBytes(point)
	x2.One()
	x3.Set(&x1)
	z3.One()
	swap := 0
	for pos := 254; pos >= 0; pos-- {
		b := int(scalar[pos/8]>>uint(pos&7)) & 1
		swap ^= b
		x2.Swap(&x3, swap)
		z2.Swap(&z3, swap)
		swap = b

		tmp0.Subtract(&x3, &z3)
		tmp1.Subtract(&x2, &z2)
		x2.Add(&x2, &z2)
		z2.Add(&x3, &z3)
		z3.Multiply(&tmp0, &x2)
		z2.Multiply(&z2, &tmp1)
		tmp0.Square(&tmp1)
		tmp1.Square(&x2)
		x3.Add(&z3, &z2)
		z2.Subtract(&z3, &z2)
		x2.Multiply(&tmp1, &tmp0)
		tmp1.Subtract(&tmp1, &tmp0)
		z2.Square(&z2)
		z3.Mult32(&tmp1, 121666)
		x3.Square(&x3)
		tmp0.Add(&tmp0, &z3)
		z3.Multiply(&x1, &z2)
		z2.Multiply(&tmp1, &tmp0)
	}
	x2.Swap(&x3, swap)
	z2.Swap(&z3, swap)
	z2.Invert(&z2)
	x2.Multiply(&x2, &z2)
	copy(dst[:], x2.Bytes())
}
