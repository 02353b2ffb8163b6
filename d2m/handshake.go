package d2m

import (
	"crypto/ecdh"
	"crypto/subtle"
	"errors"

	"golang.org/x/crypto/nacl/secretbox"
	//lint:ignore SA1019 HSalsa20 is the NaCl box key derivation itself; box.Precompute costs twice as much (BENCHMARKS.md, "handshake").
	"golang.org/x/crypto/salsa20/salsa"
)

// ChallengeSize and ResponseSize are fixed by the protocol (§6.1).
const (
	ChallengeSize = 32
	ResponseSize  = 24 + secretbox.Overhead + ChallengeSize // nonce ‖ box = 72
)

// Authentication errors; the server closes with 4010 for each (§18 row 5).
var (
	ErrResponseLength = errors.New("d2m: challenge response is not 72 bytes")
	ErrLowOrderKey    = errors.New("d2m: low-order public key")
	ErrBadResponse    = errors.New("d2m: challenge response does not verify")
)

// SharedKey computes the NaCl box key X25519HSalsa20(priv, peer), the same
// bytes as box.Precompute. crypto/ecdh with a cached private key costs half
// of box.Precompute (BENCHMARKS.md, "handshake") and, unlike
// curve25519.ScalarMult, refuses low-order peer keys instead of silently
// yielding an all-zero secret.
func SharedKey(priv *ecdh.PrivateKey, peer []byte) (*[32]byte, error) {
	pub, err := ecdh.X25519().NewPublicKey(peer)
	if err != nil {
		return nil, ErrLowOrderKey
	}
	secret, err := priv.ECDH(pub)
	if err != nil {
		return nil, ErrLowOrderKey
	}
	var k, in [32]byte
	copy(in[:], secret)
	var zero [16]byte
	salsa.HSalsa20(&k, &zero, &in, &salsa.Sigma)
	return &k, nil
}

// VerifyChallengeResponse checks that response = nonce(24) ‖ box(challenge)
// under DGPK.secret and ESK.public, which proves the device holds the group's
// path key (§6.1): box.Open(resp[24:], resp[:24], peer=device_group_id,
// priv=ESK.secret) must equal the challenge.
func VerifyChallengeResponse(esk *EphemeralKey, group DeviceGroupID, challenge, response []byte) error {
	if len(response) != ResponseSize {
		return ErrResponseLength
	}
	key, err := esk.sharedKey(group[:])
	if err != nil {
		return err
	}
	var nonce [24]byte
	copy(nonce[:], response[:24])
	var out [ChallengeSize]byte
	plain, ok := secretbox.Open(out[:0], response[24:], &nonce, key)
	if !ok || subtle.ConstantTimeCompare(plain, challenge) != 1 {
		return ErrBadResponse
	}
	return nil
}
