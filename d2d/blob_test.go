package d2d

import (
	"bytes"
	"errors"
	"testing"

	"d2m-mediator/proto/d2dpb"

	"google.golang.org/protobuf/proto"
)

func testKeys(t testing.TB) Keys {
	t.Helper()
	dgk, err := ParseDeviceGroupKey(keyVectors[0].dgk)
	if err != nil {
		t.Fatal(err)
	}
	return DeriveKeys(dgk)
}

func TestSealOpen(t *testing.T) {
	key := &[32]byte{1, 2, 3}
	for _, n := range []int{0, 1, 100, 70000} {
		pt := bytes.Repeat([]byte{0xa5}, n)
		blob := Seal(key, pt)
		if len(blob) != n+BlobOverhead {
			t.Fatalf("len(blob) = %d, want %d", len(blob), n+BlobOverhead)
		}
		got, err := Open(key, blob)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, pt) {
			t.Fatalf("round trip of %d bytes changed the plaintext", n)
		}
	}
	// Random nonces: equal plaintexts give different blobs.
	if bytes.Equal(Seal(key, []byte("x")), Seal(key, []byte("x"))) {
		t.Error("two seals of the same plaintext are equal")
	}
}

func TestOpenRejects(t *testing.T) {
	key := &[32]byte{1, 2, 3}
	blob := Seal(key, []byte("hello"))

	var be *BlobError
	for n := range BlobOverhead {
		_, err := Open(key, blob[:n])
		if !errors.As(err, &be) || !be.Short || be.Len != n {
			t.Fatalf("Open(%d bytes) = %v, want short BlobError", n, err)
		}
	}
	for i := range blob {
		tampered := bytes.Clone(blob)
		tampered[i] ^= 0x01
		if _, err := Open(key, tampered); !errors.As(err, &be) || be.Short {
			t.Fatalf("byte %d flipped: err = %v, want authentication BlobError", i, err)
		}
	}
	if _, err := Open(&[32]byte{9}, blob); !errors.As(err, &be) {
		t.Errorf("wrong key: err = %v", err)
	}
	if _, err := Open(key, append(bytes.Clone(blob), 0)); err == nil {
		t.Error("blob with a trailing byte accepted")
	}
}

func TestTypedRoundTrips(t *testing.T) {
	k := testKeys(t)

	env := NewOutgoingMessageSentUpdate(7, "ECHOECHO", 42)
	blob, err := k.SealEnvelope(env)
	if err != nil {
		t.Fatal(err)
	}
	gotEnv, err := k.OpenEnvelope(blob)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(gotEnv, env) {
		t.Errorf("envelope: got %v, want %v", gotEnv, env)
	}

	info := NewDeviceInfo(d2dpb.DeviceInfo_DESKTOP, "Linux", "2.0", "test device")
	blob, err = k.SealDeviceInfo(info)
	if err != nil {
		t.Fatal(err)
	}
	gotInfo, err := k.OpenDeviceInfo(blob)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(gotInfo, info) {
		t.Errorf("device info: got %v, want %v", gotInfo, info)
	}

	sdd := &d2dpb.SharedDeviceData{Padding: []byte{0, 0}, Version: 3}
	blob, err = k.SealSharedDeviceData(sdd)
	if err != nil {
		t.Fatal(err)
	}
	gotSDD, err := k.OpenSharedDeviceData(blob)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(gotSDD, sdd) {
		t.Errorf("shared device data: got %v, want %v", gotSDD, sdd)
	}

	scope := &d2dpb.TransactionScope{Scope: d2dpb.TransactionScope_GROUP_SYNC}
	blob, err = k.SealTransactionScope(scope)
	if err != nil {
		t.Fatal(err)
	}
	gotScope, err := k.OpenTransactionScope(blob)
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(gotScope, scope) {
		t.Errorf("transaction scope: got %v, want %v", gotScope, scope)
	}
}

// TestTypedKeySeparation checks that each message type is sealed under its
// own key: a blob of one kind does not open as another.
func TestTypedKeySeparation(t *testing.T) {
	k := testKeys(t)
	blob, err := k.SealDeviceInfo(NewDeviceInfo(d2dpb.DeviceInfo_ANDROID, "", "1", "phone"))
	if err != nil {
		t.Fatal(err)
	}
	var be *BlobError
	if _, err := k.OpenEnvelope(blob); !errors.As(err, &be) {
		t.Errorf("device info opened as envelope: %v", err)
	}
	if _, err := k.OpenSharedDeviceData(blob); !errors.As(err, &be) {
		t.Errorf("device info opened as shared device data: %v", err)
	}
	if _, err := k.OpenTransactionScope(blob); !errors.As(err, &be) {
		t.Errorf("device info opened as transaction scope: %v", err)
	}
	if env, err := k.OpenEnvelope(nil); err == nil || env != nil {
		t.Errorf("OpenEnvelope(nil) = %v, %v", env, err)
	}
}

func TestOpenEnvelopeRejectsGarbagePlaintext(t *testing.T) {
	k := testKeys(t)
	// 0xff is an invalid protobuf tag, so this authenticates but does not
	// unmarshal.
	blob := Seal(&k.DGRK, []byte{0xff, 0xff, 0xff})
	env, err := k.OpenEnvelope(blob)
	if err == nil || env != nil {
		t.Fatalf("OpenEnvelope = %v, %v, want error", env, err)
	}
	var be *BlobError
	if errors.As(err, &be) {
		t.Errorf("unmarshal failure reported as BlobError: %v", err)
	}
}
