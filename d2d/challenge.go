package d2d

import (
	"crypto/rand"
	"fmt"

	"golang.org/x/crypto/nacl/box"
)

const (
	// ChallengeSize is the size of ServerHello.challenge (protocol.md §6.1).
	ChallengeSize = 32
	// ChallengeResponseSize is the size of ClientHello.response:
	// nonce(24) ‖ box overhead(16) ‖ challenge(32).
	ChallengeResponseSize = NonceSize + box.Overhead + ChallengeSize
)

// ChallengeResponse answers a ServerHello (protocol.md §6.1): nonce(24) ‖
// crypto_box(challenge, nonce, pk=ESK.public, sk=DGPK.secret), 72 bytes.
// The mediator opens it with the device_group_id from the URL, which proves
// that the device holds DGPK.secret.
func ChallengeResponse(keys Keys, eskPublic *[32]byte, challenge []byte) ([]byte, error) {
	if len(challenge) != ChallengeSize {
		return nil, fmt.Errorf("d2d: challenge of %d bytes, want %d", len(challenge), ChallengeSize)
	}
	var nonce [NonceSize]byte
	rand.Read(nonce[:]) // never fails since Go 1.24
	out := make([]byte, NonceSize, ChallengeResponseSize)
	copy(out, nonce[:])
	return box.Seal(out, challenge, &nonce, eskPublic, &keys.DGPK.Secret), nil
}
