package d2m

import (
	"crypto/ecdh"
	"crypto/rand"
	"testing"
)

var sinkReflect Reflect
var sinkFrame []byte

func BenchmarkDecodeReflect(b *testing.B) {
	frame := EncodeReflect(0, 7, make([]byte, 100))
	b.ReportAllocs()
	b.SetBytes(int64(len(frame)))
	for b.Loop() {
		_, payload, err := DecodeContainer(frame)
		if err != nil {
			b.Fatal(err)
		}
		sinkReflect, err = DecodeReflect(payload)
		if err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncodeReflected(b *testing.B) {
	env := make([]byte, 100)
	b.ReportAllocs()
	b.SetBytes(int64(HeaderSize + ReflectedHeaderLen + len(env)))
	for b.Loop() {
		sinkFrame = EncodeReflected(0, 7, 1700000000000, env)
	}
}

func BenchmarkEncodeReflectAck(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		sinkFrame = EncodeReflectAck(7, 1700000000000)
	}
}

// TestHotPathAllocations pins the allocation budget of the per-message
// paths: decoding a Reflect allocates nothing, encoding a Reflected or a
// ReflectAck allocates exactly the frame.
func TestHotPathAllocations(t *testing.T) {
	frame := EncodeReflect(0, 7, make([]byte, 100))
	if n := testing.AllocsPerRun(100, func() {
		_, p, _ := DecodeContainer(frame)
		sinkReflect, _ = DecodeReflect(p)
	}); n != 0 {
		t.Errorf("DecodeReflect: %v allocs", n)
	}
	env := make([]byte, 100)
	if n := testing.AllocsPerRun(100, func() { sinkFrame = EncodeReflected(0, 7, 1, env) }); n != 1 {
		t.Errorf("EncodeReflected: %v allocs", n)
	}
	if n := testing.AllocsPerRun(100, func() { sinkFrame = EncodeReflectAck(7, 1) }); n != 1 {
		t.Errorf("EncodeReflectAck: %v allocs", n)
	}
}

// BenchmarkServerHandshakeCrypto is the server's cryptography per
// handshake: one ephemeral X25519 key (ESK) and the challenge check, which
// computes the X25519 shared key with the group's path key (§6.1).
func BenchmarkServerHandshakeCrypto(b *testing.B) {
	group, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	var gid DeviceGroupID
	copy(gid[:], group.PublicKey().Bytes())
	b.ReportAllocs()
	for b.Loop() {
		esk, err := NewEphemeralKey(rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := esk.sharedKey(gid[:]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkServerHandshakeCryptoECDH is BenchmarkServerHandshakeCrypto
// with crypto/ecdh for both multiplications, as before EphemeralKey.
func BenchmarkServerHandshakeCryptoECDH(b *testing.B) {
	group, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		b.Fatal(err)
	}
	var gid DeviceGroupID
	copy(gid[:], group.PublicKey().Bytes())
	b.ReportAllocs()
	for b.Loop() {
		esk, err := ecdh.X25519().GenerateKey(rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := SharedKey(esk, gid[:]); err != nil {
			b.Fatal(err)
		}
	}
}
