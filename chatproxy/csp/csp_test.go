package csp

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"reflect"
	"testing"

	"golang.org/x/crypto/nacl/box"
)

func mustKey(t testing.TB) (pub, sec *[32]byte) {
	t.Helper()
	pub, sec, err := box.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return pub, sec
}

// TestHandshakeBothSides runs the §9.3 handshake between the two halves of
// this package and then a frame each way, checking every size on the wire.
func TestHandshakeBothSides(t *testing.T) {
	skPub, skSec := mustKey(t)   // server permanent key
	tckPub, tckSec := mustKey(t) // client temporary key
	tskPub, tskSec := mustKey(t) // server temporary key
	cck := Cookie{1, 2, 3}
	sck := Cookie{9, 8, 7}

	// 1. client-hello
	ch := ClientHello{TempPublicKey: *tckPub, Cookie: cck}
	wire := ch.Marshal()
	if len(wire) != ClientHelloSize {
		t.Fatalf("client-hello %d bytes", len(wire))
	}
	gotCH, err := ParseClientHello(wire)
	if err != nil || gotCH != ch {
		t.Fatalf("client-hello round trip: %+v, %v", gotCH, err)
	}

	// 2. server-hello
	sh := ServerHello{Cookie: sck, TempPublicKey: *tskPub, ClientCookie: gotCH.Cookie}
	wire = sh.Seal(skSec, &gotCH.TempPublicKey)
	if len(wire) != ServerHelloSize {
		t.Fatalf("server-hello %d bytes", len(wire))
	}
	gotSH, err := OpenServerHello(wire, skPub, tckSec)
	if err != nil || gotSH != sh {
		t.Fatalf("server-hello: %+v, %v", gotSH, err)
	}
	if err := gotSH.CheckCookies(cck); err != nil {
		t.Fatal(err)
	}
	if err := gotSH.CheckCookies(Cookie{5}); !errors.Is(err, ErrMalformed) {
		t.Fatalf("wrong echoed cookie accepted: %v", err)
	}
	otherPub, _ := mustKey(t)
	if _, err := OpenServerHello(wire, otherPub, tckSec); !errors.Is(err, ErrDecrypt) {
		t.Fatalf("server-hello opened with the wrong server key: %v", err)
	}

	client := NewSession(&gotSH.TempPublicKey, tckSec, NewNonceCounter(cck, LoginSeq), NewNonceCounter(gotSH.Cookie, LoginAckSeq))
	server := NewSession(&gotCH.TempPublicKey, tskSec, NewNonceCounter(sck, LoginAckSeq), NewNonceCounter(cck, LoginSeq))

	// 3. login
	ext := Extensions{ClientInfo: "test;O;;", HasClientInfo: true, CSPDeviceID: 0x1122334455667788, HasCSPDeviceID: true, MessagePayloadVersion: 1, HasMessagePayloadVersion: true}
	extPlain, err := ext.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	ld := LoginData{Identity: Identity{'E', 'C', 'H', 'O', 'E', 'C', 'H', 'O'}, HasExtensions: true, ExtensionsBoxLength: uint16(len(extPlain) + BoxOverhead), ServerCookie: gotSH.Cookie, Vouch: [32]byte{0xaa}}
	ldPlain, err := ld.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	loginBox := client.Seal(ldPlain)
	extBox := client.Seal(extPlain)
	if len(loginBox) != LoginBoxSize || len(extBox) != int(ld.ExtensionsBoxLength) {
		t.Fatalf("login box %d, extensions box %d", len(loginBox), len(extBox))
	}
	plain, err := server.Open(loginBox)
	if err != nil {
		t.Fatal(err)
	}
	gotLD, err := ParseLoginData(plain)
	if err != nil || gotLD != ld {
		t.Fatalf("login-data: %+v, %v", gotLD, err)
	}
	plain, err = server.Open(extBox)
	if err != nil {
		t.Fatal(err)
	}
	gotExt, err := ParseExtensions(plain)
	if err != nil || !reflect.DeepEqual(gotExt, ext) {
		t.Fatalf("extensions: %+v, %v", gotExt, err)
	}

	// 4. login-ack
	ack := SealLoginAck(server)
	if len(ack) != LoginAckSize {
		t.Fatalf("login-ack %d bytes", len(ack))
	}
	if err := OpenLoginAck(client, ack); err != nil {
		t.Fatal(err)
	}

	// Frames use sequence 3 in both directions.
	if client.send.Seq() != FirstFrameSeq || server.send.Seq() != FirstFrameSeq {
		t.Fatalf("next sequence numbers %d / %d, want %d", client.send.Seq(), server.send.Seq(), FirstFrameSeq)
	}
	frame, err := client.SealFrame(EchoRequest, []byte("ping"))
	if err != nil {
		t.Fatal(err)
	}
	if int(binary.LittleEndian.Uint16(frame)) != len(frame)-2 {
		t.Fatal("frame length prefix wrong")
	}
	typ, data, err := server.OpenFrame(frame)
	if err != nil || typ != EchoRequest || string(data) != "ping" {
		t.Fatalf("OpenFrame: %v %q %v", typ, data, err)
	}
	frame, _ = server.SealFrame(EchoResponse, data)
	typ, data, err = client.OpenFrame(frame)
	if err != nil || typ != EchoResponse || string(data) != "ping" {
		t.Fatalf("OpenFrame: %v %q %v", typ, data, err)
	}
	// A replayed frame must not open: the nonce has moved on.
	if _, _, err := client.OpenFrame(frame); !errors.Is(err, ErrDecrypt) {
		t.Fatalf("replayed frame: %v, want ErrDecrypt", err)
	}
}

func TestSealFrameLimits(t *testing.T) {
	pub, sec := mustKey(t)
	s := NewSession(pub, sec, NewNonceCounter(Cookie{}, 3), NewNonceCounter(Cookie{1}, 3))
	frame, err := s.SealFrame(OutgoingMessage, make([]byte, MaxPayloadSize))
	if err != nil || len(frame) != MaxFrameSize {
		t.Fatalf("largest frame: %d bytes, %v", len(frame), err)
	}
	if _, err := s.SealFrame(OutgoingMessage, make([]byte, MaxPayloadSize+1)); !errors.Is(err, ErrMalformed) {
		t.Fatalf("oversize payload: %v", err)
	}
}

func TestParseFrame(t *testing.T) {
	for name, c := range map[string]struct {
		in []byte
		ok bool
	}{
		"empty":     {nil, false},
		"one byte":  {[]byte{0}, false},
		"zero box":  {[]byte{0, 0}, true},
		"exact":     {[]byte{2, 0, 1, 2}, true},
		"short":     {[]byte{3, 0, 1, 2}, false},
		"coalesced": {[]byte{1, 0, 1, 1, 0, 1}, false},
		"too large": {append([]byte{0x01, 0x20}, make([]byte, 8193)...), false},
	} {
		_, err := ParseFrame(c.in)
		if (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrMalformed)) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestLoginDataLegacy(t *testing.T) {
	ld := LoginData{Identity: Identity{'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H'}, LegacyClientInfo: "1.0;A;de;CH", ServerCookie: Cookie{7}}
	p, err := ld.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseLoginData(p)
	if err != nil || got != ld {
		t.Fatalf("%+v, %v", got, err)
	}
	ld.LegacyClientInfo = string(make([]byte, 33))
	if _, err := ld.Marshal(); !errors.Is(err, ErrMalformed) {
		t.Fatalf("long legacy client-info: %v", err)
	}
	// The extension indicator's length must cover at least the tag.
	p, _ = (&LoginData{HasExtensions: true, ExtensionsBoxLength: 3}).Marshal()
	if _, err := ParseLoginData(p); !errors.Is(err, ErrMalformed) {
		t.Fatalf("extensions box length 3: %v", err)
	}
}

func TestLoginDataLayout(t *testing.T) {
	ld := LoginData{Identity: Identity{'I', 'D', 'E', 'N', 'T', 'I', 'T', 'Y'}, HasExtensions: true, ExtensionsBoxLength: 0x1234, ServerCookie: Cookie{0xcc}, Vouch: [32]byte{0xdd}}
	p, _ := ld.Marshal()
	want := make([]byte, 0, 128)
	want = append(want, "IDENTITY"...)
	want = append(want, "threema-clever-extension-field"...)
	want = append(want, 0x34, 0x12)
	want = append(want, 0xcc)
	want = append(want, make([]byte, 15+24)...)
	want = append(want, 0xdd)
	want = append(want, make([]byte, 31+16)...)
	if !bytes.Equal(p, want) {
		t.Fatalf("login-data\n got %x\nwant %x", p, want)
	}
}

func TestExtensionsErrors(t *testing.T) {
	for name, in := range map[string][]byte{
		"truncated header":  {0x01, 0x08},
		"truncated payload": {0x00, 0x05, 0x00, 'a'},
		"device id size":    {0x01, 0x02, 0x00, 1, 2},
		"version size":      {0x02, 0x00, 0x00},
		"cookie size":       {0x03, 0x01, 0x00, 1},
		"duplicate":         {0x02, 0x01, 0x00, 1, 0x02, 0x01, 0x00, 3},
		"bad utf-8":         {0x00, 0x01, 0x00, 0xff},
	} {
		if _, err := ParseExtensions(in); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
	e, err := ParseExtensions([]byte{0x02, 0x01, 0x00, 0x03, 0x7f, 0x02, 0x00, 9, 9})
	if err != nil || e.MessagePayloadVersion != 3 || len(e.Unknown) != 1 || e.Unknown[0].Type != 0x7f {
		t.Fatalf("Android bitmask and unknown type: %+v, %v", e, err)
	}
}

func TestMessageRoundTrip(t *testing.T) {
	m := Message{
		Sender: Identity{'A', 'A', 'A', 'A', 'A', 'A', 'A', 'A'}, Receiver: Identity{'B', 'B', 'B', 'B', 'B', 'B', 'B', 'B'},
		MessageID: 0x0102030405060708, CreatedAt: 1700000000, Flags: FlagSendPush | FlagNoServerAck,
		Metadata: []byte("meta"), Nonce: [24]byte{5}, Box: []byte("box bytes"),
	}
	copy(m.LegacyNickname[:], "nick")
	p, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if len(p) != MinMessageSize+4+9 || p[29] != 0 || binary.LittleEndian.Uint16(p[30:]) != 4 {
		t.Fatalf("layout: %x", p)
	}
	got, err := ParseMessage(p)
	if err != nil || !reflect.DeepEqual(got, m) {
		t.Fatalf("%+v, %v", got, err)
	}
	if _, err := ParseMessage(p[:MinMessageSize-1]); !errors.Is(err, ErrMalformed) {
		t.Fatalf("short message: %v", err)
	}
	binary.LittleEndian.PutUint16(p[30:], 100)
	if _, err := ParseMessage(p); !errors.Is(err, ErrMalformed) {
		t.Fatalf("metadata past the end: %v", err)
	}
}

func TestAckAndCloseError(t *testing.T) {
	a := MessageAck{Identity: Identity{'X', 'X', 'X', 'X', 'X', 'X', 'X', 'X'}, MessageID: 42}
	got, err := ParseMessageAck(a.Marshal())
	if err != nil || got != a {
		t.Fatalf("%+v, %v", got, err)
	}
	if _, err := ParseMessageAck(make([]byte, 15)); !errors.Is(err, ErrMalformed) {
		t.Fatal(err)
	}
	ce := CloseError{CanReconnect: true, Message: "bye"}
	gotCE, err := ParseCloseError(ce.Marshal())
	if err != nil || gotCE != ce {
		t.Fatalf("%+v, %v", gotCE, err)
	}
	if _, err := ParseCloseError(nil); !errors.Is(err, ErrMalformed) {
		t.Fatal(err)
	}
}

func TestParseIdentity(t *testing.T) {
	for _, ok := range []string{"ECHOECHO", "*SUPPORT", "01234567"} {
		if id, err := ParseIdentity(ok); err != nil || id.String() != ok {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "SHORT", "lowercas", "TOOLONGID", "ABC DEFG"} {
		if _, err := ParseIdentity(bad); !errors.Is(err, ErrMalformed) {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestPayloadTypeString(t *testing.T) {
	if QueueSendComplete.String() != "queue-send-complete" || PayloadType(0x77).String() != "0x77" {
		t.Fatal(QueueSendComplete.String(), PayloadType(0x77).String())
	}
}

// FuzzParsers feeds arbitrary bytes to every parser: none may panic, and
// whatever parses must re-encode to an input that parses to the same value.
func FuzzParsers(f *testing.F) {
	m := Message{MessageID: 1, Metadata: []byte{1}, Box: []byte{2}}
	mp, _ := m.Marshal()
	ld, _ := (&LoginData{HasExtensions: true, ExtensionsBoxLength: 40}).Marshal()
	ext, _ := (&Extensions{HasCSPDeviceID: true, CSPDeviceID: 7, HasClientInfo: true, ClientInfo: "x"}).Marshal()
	for _, seed := range [][]byte{nil, {0}, mp, ld, ext, make([]byte, 48), make([]byte, 80), {1, 'h', 'i'}} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		if m, err := ParseMessage(p); err == nil {
			q, err := m.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			m2, err := ParseMessage(q)
			if err != nil || !reflect.DeepEqual(m, m2) {
				t.Fatalf("message does not round-trip: %v", err)
			}
		} else if !errors.Is(err, ErrMalformed) {
			t.Fatal(err)
		}
		if e, err := ParseExtensions(p); err == nil {
			q, err := e.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			e2, err := ParseExtensions(q)
			if err != nil || !reflect.DeepEqual(e, e2) {
				t.Fatalf("extensions do not round-trip: %+v %+v %v", e, e2, err)
			}
		} else if !errors.Is(err, ErrMalformed) {
			t.Fatal(err)
		}
		if d, err := ParseLoginData(p); err == nil {
			q, err := d.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			if d2, err := ParseLoginData(q); err != nil || d2 != d {
				t.Fatalf("login-data does not round-trip: %v", err)
			}
		}
		ParseClientHello(p)
		ParseFrame(p)
		ParseContainer(p)
		ParseMessageAck(p)
		ParseCloseError(p)
		var k [32]byte
		OpenServerHello(p, &k, &k)
	})
}
