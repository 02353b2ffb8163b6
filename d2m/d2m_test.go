package d2m

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"golang.org/x/crypto/nacl/box"
	"google.golang.org/protobuf/proto"

	"d2m-mediator/proto/d2mpb"
)

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestContainer(t *testing.T) {
	for _, tc := range []struct {
		name    string
		frame   []byte
		typ     PayloadType
		payload []byte
		bad     bool
	}{
		{"empty", nil, 0, nil, true},
		{"three bytes", []byte{0x20, 0, 0}, 0, nil, true},
		{"header only", []byte{0x20, 0, 0, 0}, TypeReflectionQueueDry, []byte{}, false},
		{"reserved ignored", []byte{0x83, 8, 0, 0, 1, 2}, TypeReflectedAck, []byte{1, 2}, false},
		{"max size", append([]byte{0, 0, 0, 0}, make([]byte, MaxPayloadSize)...), TypeProxy, make([]byte, MaxPayloadSize), false},
		{"too large", make([]byte, MaxFrameSize+1), 0, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			typ, payload, err := DecodeContainer(tc.frame)
			if tc.bad {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("err = %v, want ErrMalformed", err)
				}
				return
			}
			if err != nil || typ != tc.typ || !bytes.Equal(payload, tc.payload) {
				t.Fatalf("got %v %x %v", typ, payload, err)
			}
		})
	}
}

func TestEmptyMessagesAreBareHeaders(t *testing.T) {
	for _, tc := range []struct {
		t    PayloadType
		m    proto.Message
		want string
	}{
		{TypeReflectionQueueDry, &d2mpb.ReflectionQueueDry{}, "20000000"},
		{TypeRolePromotedToLeader, &d2mpb.RolePromotedToLeader{}, "21000000"},
		{TypeBeginTransactionAck, &d2mpb.BeginTransactionAck{}, "41000000"},
		{TypeCommitTransactionAck, &d2mpb.CommitTransactionAck{}, "43000000"},
		{TypeDropDeviceAck, &d2mpb.DropDeviceAck{DeviceId: 0x0102030405060708}, "33000000090807060504030201"},
	} {
		got := hex.EncodeToString(MustEncodeMessage(tc.t, tc.m))
		if got != tc.want {
			t.Errorf("%v: got %s want %s", tc.t, got, tc.want)
		}
	}
}

func TestProtobufRoundTrip(t *testing.T) {
	state := d2mpb.DeviceSlotState_EXISTING
	msgs := map[PayloadType]proto.Message{
		TypeServerHello:          &d2mpb.ServerHello{Version: 0, Esk: bytes.Repeat([]byte{1}, 32), Challenge: bytes.Repeat([]byte{2}, 32)},
		TypeClientHello:          &d2mpb.ClientHello{Response: make([]byte, 72), DeviceId: 42, DeviceSlotsExhaustedPolicy: d2mpb.ClientHello_DROP_LEAST_RECENT, DeviceSlotExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT, EncryptedDeviceInfo: []byte("info"), ExpectedDeviceSlotState: &state},
		TypeServerInfo:           &d2mpb.ServerInfo{MaxDeviceSlots: 5, DeviceSlotState: d2mpb.DeviceSlotState_EXISTING, EncryptedSharedDeviceData: []byte("sdd"), CurrentTime: 1700000000000, ReflectionQueueLength: 7},
		TypeReflectionQueueDry:   &d2mpb.ReflectionQueueDry{},
		TypeRolePromotedToLeader: &d2mpb.RolePromotedToLeader{},
		TypeGetDevicesInfo:       &d2mpb.GetDevicesInfo{},
		TypeDevicesInfo: &d2mpb.DevicesInfo{AugmentedDeviceInfo: map[uint64]*d2mpb.DevicesInfo_AugmentedDeviceInfo{
			1: {EncryptedDeviceInfo: []byte("a"), ConnectionState: &d2mpb.DevicesInfo_AugmentedDeviceInfo_ConnectedSince{ConnectedSince: 5}},
			2: {EncryptedDeviceInfo: []byte("b"), ConnectionState: &d2mpb.DevicesInfo_AugmentedDeviceInfo_LastDisconnectAt{LastDisconnectAt: 6}, DeviceSlotExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT},
		}},
		TypeDropDevice:           &d2mpb.DropDevice{DeviceId: 9},
		TypeDropDeviceAck:        &d2mpb.DropDeviceAck{DeviceId: 9},
		TypeSetSharedDeviceData:  &d2mpb.SetSharedDeviceData{EncryptedSharedDeviceData: []byte("x")},
		TypeBeginTransaction:     &d2mpb.BeginTransaction{EncryptedScope: []byte("scope"), Ttl: 30},
		TypeBeginTransactionAck:  &d2mpb.BeginTransactionAck{},
		TypeCommitTransaction:    &d2mpb.CommitTransaction{},
		TypeCommitTransactionAck: &d2mpb.CommitTransactionAck{},
		TypeTransactionRejected:  &d2mpb.TransactionRejected{DeviceId: 3, EncryptedScope: []byte("s")},
		TypeTransactionEnded:     &d2mpb.TransactionEnded{DeviceId: 3, EncryptedScope: []byte("s")},
	}
	for typ, m := range msgs {
		frame := MustEncodeMessage(typ, m)
		gotType, payload, err := DecodeContainer(frame)
		if err != nil || gotType != typ {
			t.Fatalf("%v: container %v %v", typ, gotType, err)
		}
		if frame[1] != 0 || frame[2] != 0 || frame[3] != 0 {
			t.Fatalf("%v: reserved bytes not zero", typ)
		}
		got, err := DecodeMessage(typ, payload)
		if err != nil {
			t.Fatalf("%v: %v", typ, err)
		}
		if !proto.Equal(got, m) {
			t.Fatalf("%v: round trip %v != %v", typ, got, m)
		}
	}
}

func TestClientHelloExpectedStatePresence(t *testing.T) {
	// Field 7 is optional: absent (seed-era clients) must be told apart from
	// NEW sent explicitly, as the desktop does (§4.3, §18 row 6).
	absent, _ := proto.Marshal(&d2mpb.ClientHello{DeviceId: 1})
	m, err := DecodeClientHello(absent)
	if err != nil || m.ExpectedDeviceSlotState != nil {
		t.Fatalf("absent: %v %v", m, err)
	}
	explicitNew := append(append([]byte{}, absent...), 0x38, 0x00) // field 7 varint 0
	m, err = DecodeClientHello(explicitNew)
	if err != nil || m.ExpectedDeviceSlotState == nil || *m.ExpectedDeviceSlotState != d2mpb.DeviceSlotState_NEW {
		t.Fatalf("explicit NEW: %v %v", m, err)
	}
}

func TestSeedLastLoginAtReadsAsConnectedSince(t *testing.T) {
	// Seed AugmentedDeviceInfo field 2 was last_login_at (uint64); the newest
	// layout puts connected_since there, so seed bytes still decode.
	seed := []byte{0x10, 0x05}
	var m d2mpb.DevicesInfo_AugmentedDeviceInfo
	if err := proto.Unmarshal(seed, &m); err != nil || m.GetConnectedSince() != 5 {
		t.Fatalf("%v %v", m.GetConnectedSince(), err)
	}
}

func TestMalformedProtobuf(t *testing.T) {
	for _, typ := range []PayloadType{TypeClientHello, TypeDropDevice, TypeBeginTransaction, TypeSetSharedDeviceData, TypeGetDevicesInfo} {
		if _, err := DecodeMessage(typ, []byte{0xff, 0xff, 0xff}); !errors.Is(err, ErrMalformed) {
			t.Errorf("%v: err = %v", typ, err)
		}
	}
	if _, err := DecodeMessage(TypeReflect, nil); !errors.Is(err, ErrMalformed) {
		t.Errorf("binary type accepted as protobuf")
	}
	if _, err := DecodeServerHello([]byte{0x12, 0x01, 0x00}); !errors.Is(err, ErrMalformed) {
		t.Errorf("short esk accepted")
	}
}

func TestReflectGolden(t *testing.T) {
	frame := EncodeReflect(FlagEphemeral, 0x04030201, []byte("env"))
	want := "80000000" + "08000100" + "01020304" + hex.EncodeToString([]byte("env"))
	if got := hex.EncodeToString(frame); got != want {
		t.Fatalf("got %s want %s", got, want)
	}
	r, err := DecodeReflect(frame[4:])
	if err != nil || r.ID != 0x04030201 || !r.Ephemeral() || string(r.Envelope) != "env" {
		t.Fatalf("%+v %v", r, err)
	}
}

func TestDecodeReflect(t *testing.T) {
	for _, tc := range []struct {
		name    string
		payload string
		id      uint32
		flags   uint16
		env     string
		bad     bool
	}{
		{"ios header 08 00 00 00", "08000000" + "ffffffff" + "aabb", 0xffffffff, 0, "aabb", false},
		{"empty envelope", "08000000" + "00000000", 0, 0, "", false},
		{"longer header skipped", "0a000100" + "05000000" + "eeee" + "cc", 5, 1, "cc", false},
		{"header length 7", "07000000" + "00000000", 0, 0, "", true},
		{"header length beyond payload", "20000000" + "00000000", 0, 0, "", true},
		{"truncated", "080000", 0, 0, "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := DecodeReflect(mustHex(t, tc.payload))
			if tc.bad {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("err = %v", err)
				}
				return
			}
			if err != nil || r.ID != tc.id || r.Flags != tc.flags || hex.EncodeToString(r.Envelope) != tc.env {
				t.Fatalf("%+v %v", r, err)
			}
		})
	}
	big := make([]byte, 8+MaxEnvelopeSize+1)
	big[0] = 8
	if _, err := DecodeReflect(big); !errors.Is(err, ErrMalformed) {
		t.Fatal("envelope of 65517 bytes accepted")
	}
	big = big[:8+MaxEnvelopeSize]
	if _, err := DecodeReflect(big); err != nil {
		t.Fatalf("envelope of 65516 bytes rejected: %v", err)
	}
}

func TestReflectAckGolden(t *testing.T) {
	frame := EncodeReflectAck(0x0a0b0c0d, 0x0102030405060708)
	want := "81000000" + "00000000" + "0d0c0b0a" + "0807060504030201"
	if got := hex.EncodeToString(frame); got != want {
		t.Fatalf("got %s want %s", got, want)
	}
	a, err := DecodeReflectAck(frame[4:])
	if err != nil || a.ID != 0x0a0b0c0d || a.Timestamp != 0x0102030405060708 {
		t.Fatalf("%+v %v", a, err)
	}
	if _, err := DecodeReflectAck(frame[4:19]); !errors.Is(err, ErrMalformed) {
		t.Fatal("short ack accepted")
	}
}

func TestReflectedGolden(t *testing.T) {
	frame := EncodeReflected(FlagEphemeral, 7, 0x0102030405060708, []byte{0xee})
	want := "82000000" + "10000100" + "07000000" + "0807060504030201" + "ee"
	if got := hex.EncodeToString(frame); got != want {
		t.Fatalf("got %s want %s", got, want)
	}
	r, err := DecodeReflected(frame[4:])
	if err != nil || r.ID != 7 || r.Timestamp != 0x0102030405060708 || !r.Ephemeral() || !bytes.Equal(r.Envelope, []byte{0xee}) {
		t.Fatalf("%+v %v", r, err)
	}
	bad := append([]byte{}, frame[4:]...)
	bad[0] = 8
	if _, err := DecodeReflected(bad); !errors.Is(err, ErrMalformed) {
		t.Fatal("HL 8 Reflected accepted")
	}
}

func TestReflectedAckGolden(t *testing.T) {
	frame := EncodeReflectedAck(0x11223344)
	if got := hex.EncodeToString(frame); got != "83000000"+"00000000"+"44332211" {
		t.Fatalf("got %s", got)
	}
	// iOS puts 08 00 00 00 in the reserved bytes; they are ignored.
	id, err := DecodeReflectedAck(mustHex(t, "08000000"+"44332211"))
	if err != nil || id != 0x11223344 {
		t.Fatalf("%x %v", id, err)
	}
	if _, err := DecodeReflectedAck([]byte{1, 2, 3}); !errors.Is(err, ErrMalformed) {
		t.Fatal("short ack accepted")
	}
}

// The §2 test vector: DGPK.public of the desktop's official DGK with server
// group "7f".
const vectorGroupID = "e77d9b02195b880c1374650ec136b44e7b0b6d9e47b479dbd5d97c470acb0b40"
const vectorSegment = "0a20e77d9b02195b880c1374650ec136b44e7b0b6d9e47b479dbd5d97c470acb0b401a023766"

func TestClientURLInfoVector(t *testing.T) {
	var info ClientURLInfo
	copy(info.DeviceGroupID[:], mustHex(t, vectorGroupID))
	info.ServerGroup = "7f"
	if got := EncodeClientURLInfo(info); got != vectorSegment {
		t.Fatalf("encode: got %s want %s", got, vectorSegment)
	}
	if got := ClientURLPath(info); got != "/e7/"+vectorSegment {
		t.Fatalf("path: %s", got)
	}
	for _, path := range []string{
		"/e7/" + vectorSegment,
		"/" + vectorSegment,
		"/e7//" + vectorSegment,
		"/e7/" + vectorSegment + "/",
		"/anything/else/" + strings.ToUpper(vectorSegment),
	} {
		got, err := ParseClientURLPath(path)
		if err != nil || got != info {
			t.Errorf("%s: %+v %v", path, got, err)
		}
	}
}

func TestClientURLInfoInvalid(t *testing.T) {
	legacy, _ := proto.Marshal(&d2mpb.ClientUrlInfo{DeviceGroupId: make([]byte, 32), LegacyServerGroup: 0x7f})
	got, err := ParseClientURLPath("/" + hex.EncodeToString(legacy))
	if err != nil || got.ServerGroup != "7f" {
		t.Fatalf("legacy numeric group: %+v %v", got, err)
	}
	short, _ := proto.Marshal(&d2mpb.ClientUrlInfo{DeviceGroupId: make([]byte, 31), ServerGroup: "7f"})
	noGroup, _ := proto.Marshal(&d2mpb.ClientUrlInfo{DeviceGroupId: make([]byte, 32)})
	badGroup, _ := proto.Marshal(&d2mpb.ClientUrlInfo{DeviceGroupId: make([]byte, 32), ServerGroup: "7f-x"})
	// Invalid UTF-8 in field 3, written by hand because Marshal refuses it.
	badUTF8 := append([]byte{0x0a, 0x20}, make([]byte, 32)...)
	badUTF8 = append(badUTF8, 0x1a, 0x02, 0xff, 0xfe)
	for name, path := range map[string]string{
		"empty":          "/",
		"not hex":        "/zz",
		"odd hex":        "/abc",
		"bad protobuf":   "/ffff",
		"short group id": "/" + hex.EncodeToString(short),
		"no group":       "/" + hex.EncodeToString(noGroup),
		"bad group":      "/" + hex.EncodeToString(badGroup),
		"bad utf8":       "/" + hex.EncodeToString(badUTF8),
	} {
		if _, err := ParseClientURLPath(path); !errors.Is(err, ErrBadURL) {
			t.Errorf("%s: err = %v", name, err)
		}
	}
}

func TestVerifyChallengeResponse(t *testing.T) {
	dgpkPub, dgpkSec, _ := box.GenerateKey(rand.Reader)
	esk, err := NewEphemeralKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	challenge := make([]byte, ChallengeSize)
	rand.Read(challenge)
	var eskPub [32]byte
	copy(eskPub[:], esk.Public())
	var nonce [24]byte
	rand.Read(nonce[:])
	resp := box.Seal(nonce[:], challenge, &nonce, &eskPub, dgpkSec)
	group := DeviceGroupID(*dgpkPub)
	if err := VerifyChallengeResponse(esk, group, challenge, resp); err != nil {
		t.Fatalf("valid response: %v", err)
	}
	// Another group's key, a flipped bit, a wrong length, a low-order key.
	other, _, _ := box.GenerateKey(rand.Reader)
	if err := VerifyChallengeResponse(esk, DeviceGroupID(*other), challenge, resp); !errors.Is(err, ErrBadResponse) {
		t.Errorf("other group: %v", err)
	}
	flipped := append([]byte{}, resp...)
	flipped[40] ^= 1
	if err := VerifyChallengeResponse(esk, group, challenge, flipped); !errors.Is(err, ErrBadResponse) {
		t.Errorf("flipped: %v", err)
	}
	if err := VerifyChallengeResponse(esk, group, challenge, resp[:71]); !errors.Is(err, ErrResponseLength) {
		t.Errorf("short: %v", err)
	}
	// The right key, but sealing another connection's challenge (a
	// response recorded from another handshake and replayed here): the
	// box opens, the challenge differs.
	otherChallenge := make([]byte, ChallengeSize)
	rand.Read(otherChallenge)
	replayed := box.Seal(nonce[:], otherChallenge, &nonce, &eskPub, dgpkSec)
	if err := VerifyChallengeResponse(esk, group, challenge, replayed); !errors.Is(err, ErrBadResponse) {
		t.Errorf("response to another connection's challenge: %v", err)
	}
	// Another connection's whole handshake (its ESK and its challenge),
	// answered with the right key, replayed to this one.
	otherESK, _ := NewEphemeralKey(rand.Reader)
	var otherESKPub [32]byte
	copy(otherESKPub[:], otherESK.Public())
	replayedHandshake := box.Seal(nonce[:], otherChallenge, &nonce, &otherESKPub, dgpkSec)
	if err := VerifyChallengeResponse(otherESK, group, otherChallenge, replayedHandshake); err != nil {
		t.Fatalf("the other connection's own response: %v", err)
	}
	if err := VerifyChallengeResponse(esk, group, challenge, replayedHandshake); !errors.Is(err, ErrBadResponse) {
		t.Errorf("another connection's handshake replayed: %v", err)
	}
	var lowOrder DeviceGroupID // the all-zero point has order 1
	if err := VerifyChallengeResponse(esk, lowOrder, challenge, resp); !errors.Is(err, ErrLowOrderKey) {
		t.Errorf("low order: %v", err)
	}
	// SharedKey (crypto/ecdh, the device side) must equal box.Precompute.
	priv, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var want [32]byte
	box.Precompute(&want, dgpkPub, eskPubToSecret{priv.Bytes()}.get())
	got, _ := SharedKey(priv, dgpkPub[:])
	if *got != want {
		t.Error("SharedKey differs from box.Precompute")
	}
}

type eskPubToSecret struct{ b []byte }

func (e eskPubToSecret) get() *[32]byte { var a [32]byte; copy(a[:], e.b); return &a }

func TestCloseCodes(t *testing.T) {
	if !CloseUpstreamClosed.Reconnects() || CloseDropped.Reconnects() || !CloseGoingAway.Reconnects() {
		t.Fatal("reconnect policy")
	}
	for c := range closeNames {
		if len(c.String()) > 123 {
			t.Errorf("%d reason too long", c)
		}
	}
	err := Close(CloseUnknownAck, errors.New("id 5"))
	var ce *CloseError
	if !errors.As(err, &ce) || ce.Code != 4012 {
		t.Fatal("CloseError")
	}
}
