package d2d

import (
	"crypto/rand"
	"fmt"

	"golang.org/x/crypto/nacl/secretbox"
)

const (
	// NonceSize is the size of the random nonce that prefixes every blob.
	NonceSize = 24
	// BlobOverhead is how much longer a blob is than its plaintext.
	BlobOverhead = NonceSize + secretbox.Overhead
)

// BlobError is returned by Open for a blob that is too short to be a
// nonce‖secretbox or that fails authentication (wrong key or tampered).
type BlobError struct {
	// Len is the length of the rejected blob.
	Len int
	// Short is true if the blob is shorter than BlobOverhead.
	Short bool
}

func (e *BlobError) Error() string {
	if e.Short {
		return fmt.Sprintf("d2d: blob of %d bytes is shorter than %d", e.Len, BlobOverhead)
	}
	return fmt.Sprintf("d2d: blob of %d bytes failed authentication", e.Len)
}

// Seal encrypts plaintext under key and returns nonce(24) ‖
// XSalsa20-Poly1305 secretbox with a random nonce, the format of every
// symmetric d2d blob (docs/protocol.md §14).
func Seal(key *[32]byte, plaintext []byte) []byte {
	var nonce [NonceSize]byte
	rand.Read(nonce[:]) // never fails since Go 1.24
	out := make([]byte, NonceSize, BlobOverhead+len(plaintext))
	copy(out, nonce[:])
	return secretbox.Seal(out, plaintext, &nonce, key)
}

// Open decrypts a blob made by Seal. It returns a *BlobError if the blob is
// short or does not authenticate under key.
func Open(key *[32]byte, blob []byte) ([]byte, error) {
	if len(blob) < BlobOverhead {
		return nil, &BlobError{Len: len(blob), Short: true}
	}
	var nonce [NonceSize]byte
	copy(nonce[:], blob)
	plaintext, ok := secretbox.Open(nil, blob[NonceSize:], &nonce, key)
	if !ok {
		return nil, &BlobError{Len: len(blob)}
	}
	return plaintext, nil
}
