package integration

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
)

// TestBadInputMatrix sends one kind of bad input per row to a shared real
// server (§2, §3, §5, §6, §13, §18 rows 5, 12, 13) and asserts the close
// code or HTTP status of the row AND that a healthy device pair of another
// group keeps its reflect/ack round trip working after every row. At the
// end the server log must hold no recovered panic (a panic in a handler
// leaves a connection registered forever; one in the committer kills the
// process, which the healthy pair would notice first).
func TestBadInputMatrix(t *testing.T) {
	main := startServer(t)
	unreachable := startServer(t, "--chat-server", "127.0.0.1:1")
	servers := []*server{main, unreachable}
	healthy := []*healthyPair{newHealthyPair(t, main), newHealthyPair(t, unreachable)}

	rows := badInputRows()
	if len(rows) < 40 {
		t.Fatalf("only %d rows", len(rows))
	}
	for _, r := range rows {
		t.Run(r.name, func(t *testing.T) { r.run(t, servers[r.srv]) })
		// The other group sees no disruption, whatever the row did.
		for i, h := range healthy {
			h.roundTrip(t, fmt.Sprintf("after %s (server %d)", r.name, i))
		}
	}
	for i, s := range servers {
		if logs := s.Logs(); strings.Contains(logs, "panic") {
			t.Errorf("server %d logged a panic:\n%s", i, tailString(logs, 8000))
		}
	}
	t.Logf("%d rows", len(rows))
}

// healthyPair is two devices of their own group that reflect to each other
// between the rows of a bad-input test.
type healthyPair struct {
	a, b *d2mclient.Client
	n    int
}

func newHealthyPair(t *testing.T, s *server) *healthyPair {
	t.Helper()
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	return &healthyPair{a: a, b: b}
}

// roundTrip reflects one envelope from a and requires its ReflectAck on a
// and its Reflected on b (which acks it), within a few seconds.
func (h *healthyPair) roundTrip(t *testing.T, when string) {
	t.Helper()
	h.n++
	env := []byte(fmt.Sprintf("healthy-%06d", h.n))
	ctx := ctxT(t, 10*time.Second)
	id, err := h.a.Reflect(ctx, env, 0)
	if err != nil {
		t.Fatalf("%s: healthy device cannot send: %v", when, err)
	}
	if m := nextMessage(ctx, h.a.Conn); m.Type != d2m.TypeReflectAck {
		t.Fatalf("%s: healthy device got %v (close %d), want ReflectAck", when, m.Type, m.code)
	} else if a, _ := d2m.DecodeReflectAck(m.Payload); a.ID != id {
		t.Fatalf("%s: ReflectAck id %d, want %d", when, a.ID, id)
	}
	m := nextMessage(ctx, h.b.Conn)
	if m.Type != d2m.TypeReflected {
		t.Fatalf("%s: healthy peer got %v (close %d), want Reflected", when, m.Type, m.code)
	}
	r, err := d2m.DecodeReflected(m.Payload)
	if err != nil || !bytes.Equal(r.Envelope, env) {
		t.Fatalf("%s: healthy peer got %q %v", when, r.Envelope, err)
	}
	if err := h.b.AckReflected(ctx, r.ID); err != nil {
		t.Fatalf("%s: %v", when, err)
	}
}

// message is a received message or, with Type 0xff and code set, the end
// of the connection.
type message struct {
	d2mclient.Message
	code int
}

const typeClosed = d2m.PayloadType(0xff)

// nextMessage returns the next message other than RolePromotedToLeader,
// or the close code once the connection ended.
func nextMessage(ctx context.Context, c *d2mclient.Conn) message {
	for {
		m, err := c.Recv(ctx)
		if err != nil {
			return message{Message: d2mclient.Message{Type: typeClosed}, code: c.CloseCode(ctx)}
		}
		if m.Type != d2m.TypeRolePromotedToLeader {
			return message{Message: m}
		}
	}
}

// wsFrame is one WebSocket message a row sends.
type wsFrame struct {
	text bool
	b    []byte
}

func bin(b []byte) wsFrame { return wsFrame{b: b} }

func sendFrames(ctx context.Context, c *d2mclient.Conn, frames []wsFrame) {
	for _, f := range frames {
		var err error
		if f.text {
			err = c.SendText(ctx, string(f.b))
		} else {
			err = c.Send(ctx, f.b)
		}
		if err != nil {
			return // the server closed already; the close code tells why
		}
	}
}

func expectCloseIn(t *testing.T, c *d2mclient.Conn, want ...int) {
	t.Helper()
	got := c.CloseCode(ctxT(t, 20*time.Second))
	if !slices.Contains(want, got) {
		t.Fatalf("close code %d, want one of %v (err %v)", got, want, c.Err())
	}
}

type badRow struct {
	name string
	srv  int // 0: default server (stand-in chat server); 1: --chat-server 127.0.0.1:1
	run  func(t *testing.T, s *server)
}

// preRow authenticates nothing: it opens a socket of a fresh group, reads
// ServerHello, sends the frames made by mk and expects a close code.
func preRow(name string, want []int, mk func(hello *d2mpb.ServerHello, keys d2d.Keys) []wsFrame) badRow {
	return badRow{name: "pre/" + name, run: func(t *testing.T, s *server) {
		g := newGroup()
		conn, _, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), d2mclient.URLFor(s.wsURL, g.keys, "7f"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.CloseNow()
		hello, err := d2m.DecodeServerHello(recvType(t, conn, d2m.TypeServerHello))
		if err != nil {
			t.Fatal(err)
		}
		sendFrames(ctxT(t, 5*time.Second), conn, mk(hello, g.keys))
		expectCloseIn(t, conn, want...)
	}}
}

func preFrames(name string, want []int, frames ...wsFrame) badRow {
	return preRow(name, want, func(*d2mpb.ServerHello, d2d.Keys) []wsFrame { return frames })
}

// postRow authenticates a device of a fresh group, waits for its
// ReflectionQueueDry, sends frames and expects a close code.
func postRow(name string, want []int, frames ...wsFrame) badRow {
	return badRow{name: "post/" + name, run: func(t *testing.T, s *server) {
		g := newGroup()
		c, _ := connectReady(t, s, g.config(s, 1))
		sendFrames(ctxT(t, 5*time.Second), c.Conn, frames)
		expectCloseIn(t, c.Conn, want...)
	}}
}

// urlRow asks for a WebSocket upgrade on path and expects an HTTP status
// (and no upgrade).
func urlRow(name, path string, want int) badRow {
	return badRow{name: "url/" + name, run: func(t *testing.T, s *server) {
		if got := upgradeStatus(t, s.wsURL, path); got != want {
			t.Fatalf("status %d, want %d", got, want)
		}
	}}
}

func upgradeStatus(t *testing.T, wsURL, path string) int {
	t.Helper()
	req, _ := http.NewRequest("GET", "http"+strings.TrimPrefix(wsURL, "ws")+path, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// clientHello returns a ClientHello frame answering hello with keys; m's
// other fields are kept.
func clientHello(hello *d2mpb.ServerHello, keys d2d.Keys, m *d2mpb.ClientHello) []byte {
	var esk [32]byte
	copy(esk[:], hello.Esk)
	resp, err := d2d.ChallengeResponse(keys, &esk, hello.Challenge)
	if err != nil {
		panic(err)
	}
	if m == nil {
		m = &d2mpb.ClientHello{DeviceId: 1}
	}
	if m.Response == nil {
		m.Response = resp
	}
	return d2m.MustEncodeMessage(d2m.TypeClientHello, m)
}

var (
	serverToClientTypes = []d2m.PayloadType{
		d2m.TypeServerHello, d2m.TypeServerInfo, d2m.TypeReflectionQueueDry, d2m.TypeRolePromotedToLeader,
		d2m.TypeDevicesInfo, d2m.TypeDropDeviceAck, d2m.TypeBeginTransactionAck, d2m.TypeCommitTransactionAck,
		d2m.TypeTransactionRejected, d2m.TypeTransactionEnded, d2m.TypeReflectAck, d2m.TypeReflected,
	}
	postHandshakeClientTypes = []d2m.PayloadType{
		d2m.TypeGetDevicesInfo, d2m.TypeDropDevice, d2m.TypeSetSharedDeviceData, d2m.TypeBeginTransaction,
		d2m.TypeCommitTransaction, d2m.TypeReflect, d2m.TypeReflectedAck,
	}
	unknownTypes = []d2m.PayloadType{0x01, 0x13, 0x7f, 0x84, 0xff}
)

// plausible returns a well-formed frame of type t, so that only the type
// is wrong.
func plausible(t d2m.PayloadType) []byte {
	switch t {
	case d2m.TypeReflect:
		return d2m.EncodeReflect(0, 1, []byte("early"))
	case d2m.TypeReflectAck:
		return d2m.EncodeReflectAck(1, 2)
	case d2m.TypeReflected:
		return d2m.EncodeReflected(0, 1, 2, []byte("x"))
	case d2m.TypeReflectedAck:
		return d2m.EncodeReflectedAck(1)
	case d2m.TypeDropDevice:
		return d2m.MustEncodeMessage(t, &d2mpb.DropDevice{DeviceId: 1})
	}
	return d2m.EncodeRaw(t, nil)
}

const (
	c1009 = int(d2m.CloseMessageTooBig)
	c1011 = int(d2m.CloseInternalError)
	c4001 = int(d2m.CloseUpstreamUnreachable)
	c4010 = int(d2m.CloseProtocolError)
	c4012 = int(d2m.CloseUnknownAck)
	c4110 = int(d2m.CloseUnsupportedVersion)
	c4113 = int(d2m.CloseDropped)
)

func codes(c ...int) []int { return c }

func badInputRows() []badRow {
	var rows []badRow
	garbage := []byte{0xff, 0xff, 0xff, 0xff}
	oversize := make([]byte, d2m.MaxFrameSize+1)
	oversize[0] = byte(d2m.TypeProxy)

	// Before the handshake (after ServerHello).
	for _, n := range []int{0, 1, 3} {
		rows = append(rows, preFrames(fmt.Sprintf("truncated-%d", n), codes(c4010), bin(make([]byte, n))))
	}
	for _, typ := range append(append(slices.Clone(serverToClientTypes), postHandshakeClientTypes...), unknownTypes...) {
		rows = append(rows, preFrames("type-"+typ.String(), codes(c4010), bin(plausible(typ))))
	}
	rows = append(rows,
		preFrames("text-frame", codes(c4010), wsFrame{text: true, b: []byte("hello")}),
		preFrames("oversize-frame", codes(c1009, c4010), bin(oversize)),
		preFrames("garbage-clienthello", codes(c4010), bin(d2m.EncodeRaw(d2m.TypeClientHello, garbage))),
		preFrames("empty-clienthello", codes(c4010), bin(d2m.EncodeRaw(d2m.TypeClientHello, nil))),
		preFrames("early-proxy-over-64KiB", codes(c4010),
			bin(d2m.EncodeRaw(d2m.TypeProxy, make([]byte, 40000))), bin(d2m.EncodeRaw(d2m.TypeProxy, make([]byte, 40000)))),
	)
	for _, n := range []int{0, 71, 73} {
		rows = append(rows, preRow(fmt.Sprintf("response-%d-bytes", n), codes(c4010), func(*d2mpb.ServerHello, d2d.Keys) []wsFrame {
			return []wsFrame{bin(d2m.MustEncodeMessage(d2m.TypeClientHello, &d2mpb.ClientHello{Response: make([]byte, n), DeviceId: 1}))}
		}))
	}
	rows = append(rows,
		preRow("response-72-zero-bytes", codes(c4010), func(*d2mpb.ServerHello, d2d.Keys) []wsFrame {
			return []wsFrame{bin(d2m.MustEncodeMessage(d2m.TypeClientHello, &d2mpb.ClientHello{Response: make([]byte, 72), DeviceId: 1}))}
		}),
		preRow("version-1", codes(c4110), func(h *d2mpb.ServerHello, k d2d.Keys) []wsFrame {
			return []wsFrame{bin(clientHello(h, k, &d2mpb.ClientHello{Version: 1, DeviceId: 1}))}
		}),
		preRow("early-proxy-over-64KiB-small-frames", codes(c4010), func(*d2mpb.ServerHello, d2d.Keys) []wsFrame {
			var fs []wsFrame
			for i := 0; i < 70; i++ {
				fs = append(fs, bin(d2m.EncodeRaw(d2m.TypeProxy, make([]byte, 1000))))
			}
			return fs
		}),
		preRow("early-proxy-then-type-Reflect", codes(c4010), func(*d2mpb.ServerHello, d2d.Keys) []wsFrame {
			return []wsFrame{bin(d2m.EncodeRaw(d2m.TypeProxy, make([]byte, 48))), bin(plausible(d2m.TypeReflect))}
		}),
	)

	// After the handshake.
	for _, n := range []int{0, 1, 3} {
		rows = append(rows, postRow(fmt.Sprintf("truncated-%d", n), codes(c4010), bin(make([]byte, n))))
	}
	for _, typ := range append(slices.Clone(serverToClientTypes), unknownTypes...) {
		rows = append(rows, postRow("type-"+typ.String(), codes(c4010), bin(plausible(typ))))
	}
	rows = append(rows,
		postRow("clienthello-twice", codes(c4010), bin(d2m.MustEncodeMessage(d2m.TypeClientHello, &d2mpb.ClientHello{DeviceId: 1}))),
		postRow("text-frame", codes(c4010), wsFrame{text: true, b: []byte("hello")}),
		postRow("oversize-frame", codes(c1009, c4010), bin(oversize)),
		postRow("reflect-shorter-than-8", codes(c4010), bin(d2m.EncodeRaw(d2m.TypeReflect, []byte{8, 0, 0, 0, 1, 0, 0}))),
		postRow("reflect-hl-7", codes(c4010), bin(d2m.EncodeRaw(d2m.TypeReflect, []byte{7, 0, 0, 0, 1, 0, 0, 0, 'x'}))),
		postRow("reflect-hl-0", codes(c4010), bin(d2m.EncodeRaw(d2m.TypeReflect, []byte{0, 0, 0, 0, 1, 0, 0, 0, 'x'}))),
		postRow("reflect-hl-beyond-length", codes(c4010), bin(d2m.EncodeRaw(d2m.TypeReflect, []byte{200, 0, 0, 0, 1, 0, 0, 0, 'x', 'y'}))),
		postRow("reflect-envelope-65517", codes(c4010), bin(d2m.EncodeReflect(0, 1, make([]byte, d2m.MaxEnvelopeSize+1)))),
		postRow("reflectedack-too-short", codes(c4010), bin(d2m.EncodeRaw(d2m.TypeReflectedAck, []byte{0, 0, 0, 0, 1, 0, 0}))),
		postRow("reflectedack-unknown-id", codes(c4012), bin(d2m.EncodeReflectedAck(4242))),
		postRow("begin-twice", codes(c4010),
			bin(d2m.MustEncodeMessage(d2m.TypeBeginTransaction, &d2mpb.BeginTransaction{EncryptedScope: []byte("s")})),
			bin(d2m.MustEncodeMessage(d2m.TypeBeginTransaction, &d2mpb.BeginTransaction{EncryptedScope: []byte("s")}))),
		postRow("commit-without-lock", codes(c4010), bin(d2m.EncodeRaw(d2m.TypeCommitTransaction, nil))),
	)
	for _, typ := range []d2m.PayloadType{d2m.TypeGetDevicesInfo, d2m.TypeDropDevice, d2m.TypeSetSharedDeviceData, d2m.TypeBeginTransaction, d2m.TypeCommitTransaction} {
		rows = append(rows, postRow("garbage-protobuf-"+typ.String(), codes(c4010), bin(d2m.EncodeRaw(typ, garbage))))
	}
	rows = append(rows,
		badRow{name: "post/drop-self-mid-transaction", run: dropSelfMidTransaction},
		badRow{name: "post/huge-transaction-scope", run: hugeTransactionScope},
		badRow{name: "post/huge-shared-device-data", run: hugeSharedDeviceData},
		badRow{name: "post/huge-device-info-alone", run: hugeDeviceInfoAlone},
		badRow{name: "post/huge-device-infos-together", run: hugeDeviceInfosTogether},
	)

	// No chat server reachable (--chat-server 127.0.0.1:1).
	rows = append(rows,
		badRow{name: "post/proxy-chat-server-unreachable", srv: 1, run: func(t *testing.T, s *server) {
			c, _ := connectReady(t, s, newGroup().config(s, 1))
			sendFrames(ctxT(t, 5*time.Second), c.Conn, []wsFrame{bin(d2m.EncodeRaw(d2m.TypeProxy, make([]byte, 48)))})
			expectCloseIn(t, c.Conn, c4001)
		}},
		badRow{name: "pre/early-proxy-chat-server-unreachable", srv: 1, run: func(t *testing.T, s *server) {
			cfg := newGroup().config(s, 1)
			cfg.EarlyProxy = [][]byte{make([]byte, 48)}
			c := connect(t, s, cfg) // authenticated: the upstream opens after ServerInfo
			expectCloseIn(t, c.Conn, c4001)
		}},
	)

	// Invalid ClientUrlInfo: HTTP 400 before any upgrade (§18 row 5).
	id := make([]byte, 32)
	id[0] = 0x42
	urlInfo := func(m *d2mpb.ClientUrlInfo) string {
		b, err := proto.Marshal(m)
		if err != nil {
			panic(err)
		}
		return "/42/" + hex.EncodeToString(b)
	}
	var badUTF8 []byte
	badUTF8 = protowire.AppendTag(badUTF8, 1, protowire.BytesType)
	badUTF8 = protowire.AppendBytes(badUTF8, id)
	badUTF8 = protowire.AppendTag(badUTF8, 3, protowire.BytesType)
	badUTF8 = protowire.AppendBytes(badUTF8, []byte{0xff, 0xfe, '7'})
	rows = append(rows,
		urlRow("empty", "/", 400),
		urlRow("bad-hex", "/42/zz", 400),
		urlRow("odd-hex", "/42/0a2", 400),
		urlRow("garbage-protobuf", "/42/ffffffff", 400),
		urlRow("id-31-bytes", urlInfo(&d2mpb.ClientUrlInfo{DeviceGroupId: id[:31], ServerGroup: "7f"}), 400),
		urlRow("id-33-bytes", urlInfo(&d2mpb.ClientUrlInfo{DeviceGroupId: append(slices.Clone(id), 1), ServerGroup: "7f"}), 400),
		urlRow("server-group-invalid-utf8", "/42/"+hex.EncodeToString(badUTF8), 400),
		urlRow("server-group-dash", urlInfo(&d2mpb.ClientUrlInfo{DeviceGroupId: id, ServerGroup: "7-f"}), 400),
		urlRow("server-group-empty", urlInfo(&d2mpb.ClientUrlInfo{DeviceGroupId: id}), 400),
		urlRow("segment-too-long", "/42/"+strings.Repeat("00", 1500), 400),
	)
	return rows
}

func dropSelfMidTransaction(t *testing.T, s *server) {
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	begin(t, a, []byte("scope"), 0)
	recvType(t, a.Conn, d2m.TypeBeginTransactionAck)
	id, _ := a.Reflect(ctxT(t, time.Second), []byte("held"), 0)
	expectAck(t, a, id)
	a.SendMessage(ctxT(t, time.Second), d2m.TypeDropDevice, &d2mpb.DropDevice{DeviceId: 1})
	ack, err := d2m.DecodeDropDeviceAck(recvType(t, a.Conn, d2m.TypeDropDeviceAck))
	if err != nil || ack.DeviceId != 1 {
		t.Fatalf("ack %v %v", ack, err)
	}
	expectCloseIn(t, a.Conn, c4113)
	expectReflected(t, b, []byte("held"))
	expectEnded(t, b, 1, []byte("scope"))
}

// maxScope is the largest scope a BeginTransaction frame can carry: the
// payload is tag(1) ‖ len(3) ‖ scope ≤ 65532 bytes.
const maxScope = d2m.MaxPayloadSize - 4

// hugeTransactionScope: a scope that fits a BeginTransaction but not a
// TransactionEnded/TransactionRejected (which add the 9-byte device id)
// must be refused with 4010 or handled; it must never crash the server or
// leave the lock stuck.
func hugeTransactionScope(t *testing.T, s *server) {
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 0xffffffffffffffff))
	b, _ := connectReady(t, s, g.config(s, 2))
	scope := bytes.Repeat([]byte{0x5c}, maxScope)
	begin(t, a, scope, 0)
	ctx := ctxT(t, 10*time.Second)
	switch m := nextMessage(ctx, a.Conn); m.Type {
	case typeClosed:
		if m.code != c4010 {
			t.Fatalf("holder closed with %d, want 4010", m.code)
		}
		t.Logf("huge scope refused with 4010")
	case d2m.TypeBeginTransactionAck:
		// Accepted: a rival must get TransactionRejected and, after the
		// commit, TransactionEnded, both carrying the scope.
		begin(t, b, []byte("rival"), 0)
		if m := nextMessage(ctx, b.Conn); m.Type != d2m.TypeTransactionRejected {
			t.Fatalf("rival got %v (close %d)", m.Type, m.code)
		}
		commit(t, a)
		if m := nextMessage(ctx, a.Conn); m.Type != d2m.TypeCommitTransactionAck {
			t.Fatalf("holder got %v (close %d)", m.Type, m.code)
		}
		if m := nextMessage(ctx, b.Conn); m.Type != d2m.TypeTransactionEnded {
			t.Fatalf("rival got %v (close %d)", m.Type, m.code)
		}
	default:
		t.Fatalf("holder got %v", m.Type)
	}
	// The lock is free for the other device either way.
	b2, _ := connectReady(t, s, g.config(s, 3))
	begin(t, b2, []byte("next"), 0)
	if m := nextMessage(ctx, b2.Conn); m.Type != d2m.TypeBeginTransactionAck {
		t.Fatalf("lock after huge scope: %v (close %d)", m.Type, m.code)
	}
}

// hugeSharedDeviceData: data that fits a SetSharedDeviceData but not the
// ServerInfo every later handshake of the group carries.
func hugeSharedDeviceData(t *testing.T, s *server) {
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	data := bytes.Repeat([]byte{0x5d}, maxScope)
	a.SendMessage(ctxT(t, time.Second), d2m.TypeSetSharedDeviceData, &d2mpb.SetSharedDeviceData{EncryptedSharedDeviceData: data})
	a.SendMessage(ctxT(t, time.Second), d2m.TypeGetDevicesInfo, &d2mpb.GetDevicesInfo{})
	ctx := ctxT(t, 10*time.Second)
	switch m := nextMessage(ctx, a.Conn); m.Type {
	case typeClosed:
		if m.code != c4010 {
			t.Fatalf("closed with %d, want 4010", m.code)
		}
		t.Logf("huge shared data refused with 4010")
	case d2m.TypeDevicesInfo:
	default:
		t.Fatalf("got %v", m.Type)
	}
	// Every later device of the group must still get in (with the data,
	// if it was accepted).
	for dev := uint64(2); dev <= 3; dev++ {
		c, err := d2mclient.Dial(ctxT(t, 10*time.Second), g.config(s, dev))
		if err != nil {
			code := -1
			if c != nil {
				code = c.CloseCode(ctxT(t, 5*time.Second))
			}
			t.Fatalf("device %d after huge shared data: %v (close %d)", dev, err, code)
		}
		c.CloseNow()
	}
}

// hugeDeviceInfoAlone: a device info near 64 KiB is accepted and comes
// back intact in DevicesInfo.
func hugeDeviceInfoAlone(t *testing.T, s *server) {
	g := newGroup()
	cfg := g.config(s, 1)
	cfg.DeviceInfo = bytes.Repeat([]byte{0x5e}, 65000)
	a, _ := connectReady(t, s, cfg)
	info := devicesInfo(t, a)
	if len(info) != 1 || !bytes.Equal(info[1].EncryptedDeviceInfo, cfg.DeviceInfo) {
		t.Fatalf("device info not kept (%d slots)", len(info))
	}
}

// hugeDeviceInfosTogether: two device infos that fit one ClientHello each
// but not one DevicesInfo together. The requester gets a clean close (or
// an answer); the group keeps working.
func hugeDeviceInfosTogether(t *testing.T, s *server) {
	g := newGroup()
	for dev := uint64(1); dev <= 2; dev++ {
		cfg := g.config(s, dev)
		cfg.DeviceInfo = bytes.Repeat([]byte{byte(dev)}, 40000)
		connectReady(t, s, cfg)
	}
	c, _ := connectReady(t, s, g.config(s, 3))
	c.SendMessage(ctxT(t, time.Second), d2m.TypeGetDevicesInfo, &d2mpb.GetDevicesInfo{})
	ctx := ctxT(t, 10*time.Second)
	switch m := nextMessage(ctx, c.Conn); m.Type {
	case typeClosed:
		if m.code != c1011 && m.code != c4010 {
			t.Fatalf("requester closed with %d, want a clean 1011", m.code)
		}
		t.Logf("DevicesInfo too large: requester closed with %d", m.code)
	case d2m.TypeDevicesInfo:
	default:
		t.Fatalf("got %v", m.Type)
	}
	// The requester's slot and the group's lock are not left behind by a
	// half-dead connection: it reconnects, takes the lock and commits.
	c, _ = connectReady(t, s, g.config(s, 3))
	begin(t, c, []byte("after"), 0)
	if m := nextMessage(ctx, c.Conn); m.Type != d2m.TypeBeginTransactionAck {
		t.Fatalf("begin after: %v (close %d)", m.Type, m.code)
	}
	commit(t, c)
	if m := nextMessage(ctx, c.Conn); m.Type != d2m.TypeCommitTransactionAck {
		t.Fatalf("commit after: %v (close %d)", m.Type, m.code)
	}
}

func tailString(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}
