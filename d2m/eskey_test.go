package d2m

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"testing"

	"golang.org/x/crypto/nacl/box"
)

// TestEphemeralKeyMatchesECDH: public keys and shared secrets equal
// crypto/ecdh's for random keys and peers.
func TestEphemeralKeyMatchesECDH(t *testing.T) {
	for i := 0; i < 300; i++ {
		k, err := NewEphemeralKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		ref, err := ecdh.X25519().NewPrivateKey(k.scalar[:])
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(k.Public(), ref.PublicKey().Bytes()) {
			t.Fatalf("key %d: public %x, crypto/ecdh %x", i, k.Public(), ref.PublicKey().Bytes())
		}
		peer, _ := ecdh.X25519().GenerateKey(rand.Reader)
		var got [32]byte
		x25519(&got, &k.scalar, peer.PublicKey().Bytes())
		want, err := ref.ECDH(peer.PublicKey())
		if err != nil || !bytes.Equal(got[:], want) {
			t.Fatalf("key %d: shared %x, crypto/ecdh %x (%v)", i, got, want, err)
		}
		gotKey, err := k.sharedKey(peer.PublicKey().Bytes())
		wantKey, _ := SharedKey(ref, peer.PublicKey().Bytes())
		if err != nil || *gotKey != *wantKey {
			t.Fatalf("key %d: box key differs (%v)", i, err)
		}
	}
}

// TestX25519Vector: RFC 7748 §5.2, first test vector.
func TestX25519Vector(t *testing.T) {
	scalar, _ := hex.DecodeString("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
	u, _ := hex.DecodeString("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
	want := "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"
	var s, out [32]byte
	copy(s[:], scalar)
	s[0] &= 248
	s[31] &= 127
	s[31] |= 64
	x25519(&out, &s, u)
	if hex.EncodeToString(out[:]) != want {
		t.Fatalf("X25519 = %x, want %s", out, want)
	}
}

func TestEphemeralKeyRejectsLowOrder(t *testing.T) {
	k, _ := NewEphemeralKey(rand.Reader)
	for _, u := range []string{
		"0000000000000000000000000000000000000000000000000000000000000000",
		"0100000000000000000000000000000000000000000000000000000000000000",
		"e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
	} {
		b, _ := hex.DecodeString(u)
		if _, err := k.sharedKey(b); !errors.Is(err, ErrLowOrderKey) {
			t.Errorf("u=%s: %v, want ErrLowOrderKey", u, err)
		}
	}
	if _, err := k.sharedKey(make([]byte, 31)); !errors.Is(err, ErrLowOrderKey) {
		t.Errorf("31-byte key: %v", err)
	}
	// And the box key is NaCl's.
	pub, sec, _ := box.GenerateKey(rand.Reader)
	var want [32]byte
	box.Precompute(&want, pub, (*[32]byte)(&k.scalar))
	got, err := k.sharedKey(pub[:])
	if err != nil || *got != want {
		t.Fatalf("box key differs from box.Precompute (%v)", err)
	}
	_ = sec
}
