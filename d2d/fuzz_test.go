package d2d

import (
	"bytes"
	"errors"
	"testing"

	"golang.org/x/crypto/nacl/secretbox"
)

// fuzzKey is the key every fuzz input is opened with.
var fuzzKey = [32]byte{0: 0x42, 31: 0x24}

// validBlob is a deterministic blob under fuzzKey, so the seed corpus
// covers the success path.
func validBlob(plaintext []byte) []byte {
	var nonce [NonceSize]byte
	copy(nonce[:], "fuzz-seed-nonce-24-bytes")
	return secretbox.Seal(nonce[:], plaintext, &nonce, &fuzzKey)
}

// FuzzOpen feeds arbitrary blobs to Open: it must never panic, reject with
// a *BlobError, and only accept what Seal with the same nonce reproduces.
func FuzzOpen(f *testing.F) {
	f.Add([]byte{})
	f.Add(make([]byte, BlobOverhead-1))
	f.Add(make([]byte, BlobOverhead))
	f.Add(validBlob(nil))
	f.Add(validBlob([]byte("hello")))
	f.Fuzz(func(t *testing.T, blob []byte) {
		pt, err := Open(&fuzzKey, blob)
		if err != nil {
			var be *BlobError
			if !errors.As(err, &be) || be.Len != len(blob) || be.Short != (len(blob) < BlobOverhead) {
				t.Fatalf("Open(%d bytes) error %v", len(blob), err)
			}
			return
		}
		var nonce [NonceSize]byte
		copy(nonce[:], blob)
		if again := secretbox.Seal(nonce[:], pt, &nonce, &fuzzKey); !bytes.Equal(again, blob) {
			t.Fatalf("accepted blob %x does not re-seal to itself", blob)
		}
	})
}

// FuzzOpenEnvelope seals arbitrary plaintext under DGRK, so the protobuf
// decoding behind OpenEnvelope sees hostile bytes: it must never panic.
func FuzzOpenEnvelope(f *testing.F) {
	k := testKeys(f)
	f.Add([]byte{})
	f.Add([]byte{0xff})
	env, err := k.SealEnvelope(NewOutgoingMessageSentUpdate(1, "ECHOECHO", 2))
	if err != nil {
		f.Fatal(err)
	}
	plain, err := Open(&k.DGRK, env)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(plain)
	f.Fuzz(func(t *testing.T, plaintext []byte) {
		if _, err := k.OpenEnvelope(Seal(&k.DGRK, plaintext)); err != nil {
			var be *BlobError
			if errors.As(err, &be) {
				t.Fatalf("a fresh seal failed to open: %v", err)
			}
		}
	})
}
