package d2d

import (
	"bytes"
	"crypto/rand"
	"testing"

	"golang.org/x/crypto/nacl/box"
)

// TestChallengeResponse verifies the response the way the mediator does
// (docs/protocol.md §6.1): box.Open with the device_group_id and ESK.secret.
func TestChallengeResponse(t *testing.T) {
	k := testKeys(t)
	eskPublic, eskSecret, err := box.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	challenge := make([]byte, ChallengeSize)
	rand.Read(challenge)

	resp, err := ChallengeResponse(k, eskPublic, challenge)
	if err != nil {
		t.Fatal(err)
	}
	if len(resp) != 72 || ChallengeResponseSize != 72 {
		t.Fatalf("len(resp) = %d, ChallengeResponseSize = %d, want 72", len(resp), ChallengeResponseSize)
	}
	var nonce [24]byte
	copy(nonce[:], resp[:24])
	dgid := k.DeviceGroupID()
	got, ok := box.Open(nil, resp[24:], &nonce, &dgid, eskSecret)
	if !ok || !bytes.Equal(got, challenge) {
		t.Fatalf("box.Open = %x, %v, want %x", got, ok, challenge)
	}

	// Another group's id must not open it: the response proves DGPK.secret.
	other := DeriveKeys(NewDeviceGroupKey()).DGPK.Public
	if _, ok := box.Open(nil, resp[24:], &nonce, &other, eskSecret); ok {
		t.Error("response opened with another group's id")
	}
}

func TestChallengeResponseRejectsBadChallenge(t *testing.T) {
	k := testKeys(t)
	for _, n := range []int{0, 31, 33} {
		if _, err := ChallengeResponse(k, &[32]byte{9}, make([]byte, n)); err == nil {
			t.Errorf("challenge of %d bytes accepted", n)
		}
	}
}

func TestChallengeResponseRefusesLowOrderESK(t *testing.T) {
	keys := DeriveKeys(DeviceGroupKey{7})
	var zero [32]byte // a low-order point: the shared key would be all zeros
	if _, err := ChallengeResponse(keys, &zero, make([]byte, ChallengeSize)); err == nil {
		t.Fatal("ChallengeResponse accepted a low-order server ephemeral key")
	}
}

// BenchmarkChallengeResponse: one answer to a ServerHello, the device's
// whole share of the handshake crypto (BENCHMARKS.md).
func BenchmarkChallengeResponse(b *testing.B) {
	keys := DeriveKeys(DeviceGroupKey{7})
	esk, _, err := box.GenerateKey(rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	challenge := make([]byte, ChallengeSize)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ChallengeResponse(keys, esk, challenge); err != nil {
			b.Fatal(err)
		}
	}
}
