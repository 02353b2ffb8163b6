package d2d

import (
	"crypto/ecdh"
	"crypto/rand"
	"fmt"

	"golang.org/x/crypto/nacl/box"

	"d2m-mediator/d2m"
)

const (
	// ChallengeSize is the size of ServerHello.challenge (docs/protocol.md §6.1).
	ChallengeSize = 32
	// ChallengeResponseSize is the size of ClientHello.response:
	// nonce(24) ‖ box overhead(16) ‖ challenge(32).
	ChallengeResponseSize = NonceSize + box.Overhead + ChallengeSize
)

// ChallengeResponse answers a ServerHello (docs/protocol.md §6.1): nonce(24) ‖
// crypto_box(challenge, nonce, pk=ESK.public, sk=DGPK.secret), 72 bytes.
// The mediator opens it with the device_group_id from the URL, which proves
// that the device holds DGPK.secret.
func ChallengeResponse(keys Keys, eskPublic *[32]byte, challenge []byte) ([]byte, error) {
	if len(challenge) != ChallengeSize {
		return nil, fmt.Errorf("d2d: challenge of %d bytes, want %d", len(challenge), ChallengeSize)
	}
	var nonce [NonceSize]byte
	rand.Read(nonce[:]) // never fails since Go 1.24
	// crypto/ecdh instead of box.Seal's curve25519.ScalarMult: half the
	// cost, and a low-order ESK from a rogue server is refused instead of
	// silently yielding an all-zero shared key.
	priv := keys.pathKey
	if priv == nil { // Keys not made by DeriveKeys
		var err error
		if priv, err = ecdh.X25519().NewPrivateKey(keys.DGPK.Secret[:]); err != nil {
			return nil, fmt.Errorf("d2d: path key: %w", err)
		}
	}
	shared, err := d2m.SharedKey(priv, eskPublic[:])
	if err != nil {
		return nil, fmt.Errorf("d2d: server ephemeral key: %w", err)
	}
	out := make([]byte, NonceSize, ChallengeResponseSize)
	copy(out, nonce[:])
	return box.SealAfterPrecomputation(out, challenge, &nonce, shared), nil
}
