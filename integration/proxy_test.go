package integration

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"d2m-mediator/chatproxy/csp"
	"d2m-mediator/chatproxy/cspclient"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
)

// --- leader promotion ---

func TestLeaderPromotionAfterDry(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a := connect(t, s, g.config(s, 1))
	// Order: ReflectionQueueDry, then RolePromotedToLeader, never before.
	if m := recvAny(t, a.Conn); m.Type != d2m.TypeReflectionQueueDry {
		t.Fatalf("first after ServerInfo: %v", m.Type)
	}
	if m := recvAny(t, a.Conn); m.Type != d2m.TypeRolePromotedToLeader {
		t.Fatalf("then: %v", m.Type)
	}
	b := connect(t, s, g.config(s, 2))
	recvType(t, b.Conn, d2m.TypeReflectionQueueDry)
	expectNoPromotion(t, b.Conn, 200*time.Millisecond)
	expectNoPromotion(t, a.Conn, 50*time.Millisecond) // never twice

	// Handover when the leader's connection ends.
	a.CloseNow()
	if m := recvAny(t, b.Conn); m.Type != d2m.TypeRolePromotedToLeader {
		t.Fatalf("after leader left: %v", m.Type)
	}
}

func TestLeaderPromotionWaitsForBacklog(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	recvAnyType(t, a.Conn, d2m.TypeRolePromotedToLeader)
	b, _ := connectReady(t, s, g.config(s, 2))
	b.Close()
	for i := 0; i < 10; i++ {
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		expectAck(t, a, id)
	}
	a.Close()
	time.Sleep(100 * time.Millisecond)
	b = connect(t, s, g.config(s, 2))
	for i := 0; i < 10; i++ {
		if m := recvAny(t, b.Conn); m.Type != d2m.TypeReflected {
			t.Fatalf("message %d: %v before the backlog was sent", i, m.Type)
		}
	}
	recvAnyType(t, b.Conn, d2m.TypeReflectionQueueDry)
	recvAnyType(t, b.Conn, d2m.TypeRolePromotedToLeader)
}

func TestLeaderPrefersProxyingDevice(t *testing.T) {
	up := newScriptedUpstream(t)
	s := startServer(t, "--chat-server", up.addr)
	g := newGroup()
	leader := connect(t, s, g.config(s, 1))
	recvAnyType(t, leader.Conn, d2m.TypeReflectionQueueDry)
	recvAnyType(t, leader.Conn, d2m.TypeRolePromotedToLeader)
	// d2m-only device connects first, a proxying device later.
	quiet := connect(t, s, g.config(s, 2))
	recvAnyType(t, quiet.Conn, d2m.TypeReflectionQueueDry)
	time.Sleep(20 * time.Millisecond)
	cfg := g.config(s, 3)
	cfg.EarlyProxy = [][]byte{bytes.Repeat([]byte{0xcc}, 48)}
	proxying := connect(t, s, cfg)
	recvAnyType(t, proxying.Conn, d2m.TypeReflectionQueueDry)
	up.accept(t)
	leader.CloseNow()
	recvAnyType(t, proxying.Conn, d2m.TypeRolePromotedToLeader)
	expectNoPromotion(t, quiet.Conn, 200*time.Millisecond)
}

func expectNoPromotion(t testing.TB, c *d2mclient.Conn, d time.Duration) {
	t.Helper()
	ctx := ctxT(t, d)
	for {
		m, err := c.Recv(ctx)
		if err != nil {
			return
		}
		if m.Type == d2m.TypeRolePromotedToLeader {
			t.Fatal("unexpected RolePromotedToLeader")
		}
	}
}

func recvAnyType(t testing.TB, c *d2mclient.Conn, want d2m.PayloadType) []byte {
	t.Helper()
	m := recvAny(t, c)
	if m.Type != want {
		t.Fatalf("got %v, want %v", m.Type, want)
	}
	return m.Payload
}

// --- a scripted chat server ---

type scriptedUpstream struct {
	ln    net.Listener
	addr  string
	conns chan net.Conn
}

func newScriptedUpstream(t testing.TB) *scriptedUpstream {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &scriptedUpstream{ln: ln, addr: ln.Addr().String(), conns: make(chan net.Conn, 16)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.conns <- c
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return u
}

func (u *scriptedUpstream) accept(t testing.TB) net.Conn {
	t.Helper()
	select {
	case c := <-u.conns:
		t.Cleanup(func() { c.Close() })
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("no upstream connection")
		return nil
	}
}

func frame(n int, fill byte) []byte {
	b := make([]byte, 2+n)
	binary.LittleEndian.PutUint16(b, uint16(n))
	for i := range b[2:] {
		b[2+i] = fill
	}
	return b
}

func TestProxyEarlyBytesAndExactReframing(t *testing.T) {
	up := newScriptedUpstream(t)
	s := startServer(t, "--chat-server", up.addr)
	g := newGroup()
	hello := bytes.Repeat([]byte{0x11}, 48)
	cfg := g.config(s, 1)
	cfg.EarlyProxy = [][]byte{hello[:20], hello[20:]} // split, before ClientHello
	dev := connect(t, s, cfg)
	conn := up.accept(t)
	got := make([]byte, 48)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(conn, got); err != nil || !bytes.Equal(got, hello) {
		t.Fatalf("early bytes %x %v", got, err)
	}
	// Device → server: a byte stream, verbatim and in order.
	dev.SendProxy(ctxT(t, time.Second), []byte("login-part-1"))
	dev.SendProxy(ctxT(t, time.Second), []byte("login-part-2"))
	got = make([]byte, 24)
	if _, err := io.ReadFull(conn, got); err != nil || string(got) != "login-part-1login-part-2" {
		t.Fatalf("stream %q %v", got, err)
	}

	// Server → device: everything in one TCP write ...
	units := [][]byte{bytes.Repeat([]byte{0xaa}, 80), bytes.Repeat([]byte{0xbb}, 32), frame(5, 1), frame(0, 2), frame(8192, 3), frame(300, 4)}
	conn.Write(bytes.Join(units, nil))
	// ... then one frame dribbled byte by byte.
	last := frame(40, 5)
	for _, b := range last {
		conn.Write([]byte{b})
		time.Sleep(time.Millisecond)
	}
	units = append(units, last)
	for i, want := range units {
		p, err := dev.RecvProxy(ctxT(t, 10*time.Second))
		if err != nil || !bytes.Equal(p, want) {
			t.Fatalf("unit %d: got %d bytes (%v), want %d", i, len(p), err, len(want))
		}
	}
	// Upstream EOF: remaining complete units first, then 4000.
	conn.Write(frame(7, 6))
	conn.Close()
	p, err := dev.RecvProxy(ctxT(t, 5*time.Second))
	if err != nil || !bytes.Equal(p, frame(7, 6)) {
		t.Fatalf("last unit %x %v", p, err)
	}
	expectClose(t, dev.Conn, d2m.CloseUpstreamClosed)
}

func TestProxyOneUpstreamPerDevice(t *testing.T) {
	up := newScriptedUpstream(t)
	// {group} in the template: the server group is the upstream's port.
	_, port, _ := net.SplitHostPort(up.addr)
	s := startServer(t, "--chat-server", "127.0.0.1:{group}")
	g := newGroup()
	var devs []*d2mclient.Client
	for i := 1; i <= 3; i++ {
		cfg := g.config(s, uint64(i))
		cfg.ServerGroup = port
		c, _ := connectReady(t, s, cfg)
		devs = append(devs, c)
	}
	// Every device, leader or not, gets its own upstream on first Proxy.
	for i, d := range devs {
		d.SendProxy(ctxT(t, time.Second), []byte{byte(i)})
		conn := up.accept(t)
		b := make([]byte, 1)
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(conn, b); err != nil || b[0] != byte(i) {
			t.Fatalf("device %d upstream got %v %v", i, b, err)
		}
		conn.Write(bytes.Repeat([]byte{byte(i)}, 80))
		p, err := d.RecvProxy(ctxT(t, 5*time.Second))
		if err != nil || len(p) != 80 || p[0] != byte(i) {
			t.Fatalf("device %d got %x %v", i, p, err)
		}
	}
	// A device that never proxies gets no upstream.
	connectReady(t, s, g.config(s, 9))
	select {
	case <-up.conns:
		t.Fatal("upstream opened for a device that never proxied")
	case <-time.After(200 * time.Millisecond):
	}
}

func TestProxyUpstreamUnreachable(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := ln.Addr().String()
	ln.Close()
	s := startServer(t, "--chat-server", addr)
	dev, _ := connectReady(t, s, newGroup().config(s, 1))
	dev.SendProxy(ctxT(t, time.Second), []byte("client-hello"))
	expectClose(t, dev.Conn, d2m.CloseUpstreamUnreachable)
}

func TestProxyOversizeFrame(t *testing.T) {
	up := newScriptedUpstream(t)
	s := startServer(t, "--chat-server", up.addr)
	dev, _ := connectReady(t, s, newGroup().config(s, 1))
	dev.SendProxy(ctxT(t, time.Second), []byte("x"))
	conn := up.accept(t)
	conn.Write(bytes.Repeat([]byte{0}, 80+32))
	conn.Write([]byte{0x01, 0x20}) // length 8193
	for i := 0; i < 2; i++ {
		if _, err := dev.RecvProxy(ctxT(t, 5*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	expectClose(t, dev.Conn, d2m.CloseUpstreamError)
}

// --- end to end through the stand-in chat server ---

func stubPublicKey(t testing.TB, s *server) [32]byte {
	t.Helper()
	for _, line := range strings.Split(s.Logs(), "\n") {
		if !strings.Contains(line, "stand-in chat server") {
			continue
		}
		var v struct {
			PublicKey string `json:"public_key"`
		}
		json.Unmarshal([]byte(line), &v)
		b, err := hex.DecodeString(v.PublicKey)
		if err == nil && len(b) == 32 {
			var k [32]byte
			copy(k[:], b)
			return k
		}
	}
	t.Fatalf("no stand-in chat server key in the logs:\n%s", s.Logs())
	return [32]byte{}
}

func cspLogin(t testing.TB, c *d2mclient.Client, id cspclient.Identity, pub [32]byte) *cspclient.Client {
	t.Helper()
	cl, err := cspclient.Login(ctxT(t, 10*time.Second), d2mclient.Transport{C: c.Conn}, id, pub, cspclient.LoginOptions{})
	if err != nil {
		t.Fatalf("csp login %s: %v", id.ID, err)
	}
	return cl
}

func TestEndToEndThroughStandInChatServer(t *testing.T) {
	s := startServer(t) // no --chat-server: the in-process stand-in
	pub := stubPublicKey(t, s)
	x, _ := cspclient.NewIdentity("XXXXXXXX")
	y, _ := cspclient.NewIdentity("YYYYYYYY")
	gx, gy := newGroup(), newGroup()

	// Two devices of identity X, one of Y. Each has its own CSP session.
	x1, _ := connectReady(t, s, gx.config(s, 1))
	recvAnyType(t, x1.Conn, d2m.TypeRolePromotedToLeader)
	x2, _ := connectReady(t, s, gx.config(s, 2))
	y1, _ := connectReady(t, s, gy.config(s, 1))
	recvAnyType(t, y1.Conn, d2m.TypeRolePromotedToLeader)
	cx1 := cspLogin(t, x1, x, pub)
	cx2 := cspLogin(t, x2, x, pub) // non-leader: logged in, never unblocks
	cy1 := cspLogin(t, y1, y, pub)
	cx1.Unblock()
	cy1.Unblock()
	if _, err := cx1.RecvType(ctxT(t, 5*time.Second), csp.PayloadType(0xd0)); err != nil {
		t.Fatalf("queue-send-complete: %v", err)
	}
	cy1.RecvType(ctxT(t, 5*time.Second), csp.PayloadType(0xd0))
	if err := cx2.Echo([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if data, err := cx2.RecvType(ctxT(t, 5*time.Second), csp.PayloadType(0x80)); err != nil || string(data) != "ping" {
		t.Fatalf("echo through the mediator: %q %v", data, err)
	}

	// Y → X: the leader X1 receives it, reflects it to X2, then acks it.
	if err := cy1.SendMessage("XXXXXXXX", 42, []byte("hello x")); err != nil {
		t.Fatal(err)
	}
	if _, err := cy1.RecvType(ctxT(t, 5*time.Second), csp.PayloadType(0x81)); err != nil {
		t.Fatalf("server ack: %v", err)
	}
	data, err := cx1.RecvType(ctxT(t, 5*time.Second), csp.PayloadType(0x02))
	if err != nil {
		t.Fatal(err)
	}
	msg, err := cspclient.ParseMessage(data)
	if err != nil || msg.Sender != "YYYYYYYY" || msg.MessageID != 42 {
		t.Fatalf("incoming %+v %v", msg, err)
	}
	env, err := gx.keys.SealEnvelope(incomingEnvelope(1, msg.Sender, msg.MessageID, msg.Body))
	if err != nil {
		t.Fatal(err)
	}
	id, _ := x1.Reflect(ctxT(t, time.Second), env, 0)
	expectAck(t, x1, id)
	cx1.AckIncoming(msg.Sender, msg.MessageID)

	r, err := d2m.DecodeReflected(recvType(t, x2.Conn, d2m.TypeReflected))
	if err != nil {
		t.Fatal(err)
	}
	plain, err := gx.keys.OpenEnvelope(r.Envelope)
	if err != nil {
		t.Fatalf("sibling cannot decrypt: %v", err)
	}
	in := plain.GetIncomingMessage()
	if in == nil || in.SenderIdentity != "YYYYYYYY" || in.MessageId != 42 || !bytes.Equal(in.Body, msg.Body) {
		t.Fatalf("sibling decrypted %v", plain)
	}
	x2.AckReflected(ctxT(t, time.Second), r.ID)

	// X → Y from the non-leader device: reflect the outgoing message, send it.
	out, _ := gx.keys.SealEnvelope(outgoingEnvelope(2, "YYYYYYYY", 7, []byte("hello y")))
	id, _ = x2.Reflect(ctxT(t, time.Second), out, 0)
	expectAck(t, x2, id)
	cx2.SendMessage("YYYYYYYY", 7, []byte("hello y"))
	if _, err := cx2.RecvType(ctxT(t, 5*time.Second), csp.PayloadType(0x81)); err != nil {
		t.Fatal(err)
	}
	data, err = cy1.RecvType(ctxT(t, 5*time.Second), csp.PayloadType(0x02))
	if err != nil {
		t.Fatal(err)
	}
	if msg, _ := cspclient.ParseMessage(data); msg.Sender != "XXXXXXXX" || msg.MessageID != 7 {
		t.Fatalf("Y got %+v", msg)
	}
	r, _ = d2m.DecodeReflected(recvType(t, x1.Conn, d2m.TypeReflected))
	if plain, err := gx.keys.OpenEnvelope(r.Envelope); err != nil || plain.GetOutgoingMessage() == nil {
		t.Fatalf("leader got %v %v", plain, err)
	}
	fmt.Fprintln(io.Discard, cx1, cx2)
}

// TestLeaderLeavesDuringBacklog: the leader leaves while the other device
// is in the middle of a backlog larger than its delivery window and has
// not acked it. That device must not be promoted before its
// ReflectionQueueDry (Android throws otherwise, docs/protocol.md §7), and it is
// promoted right after it.
func TestLeaderLeavesDuringBacklog(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	recvAnyType(t, a.Conn, d2m.TypeRolePromotedToLeader)
	b, _ := connectReady(t, s, g.config(s, 2))
	b.Close()
	const backlog = 600 // more than the delivery window of 256
	for i := 0; i < backlog; i++ {
		id, _ := a.Reflect(ctxT(t, 5*time.Second), envelope(i), 0)
		expectAck(t, a, id)
	}
	b = connect(t, s, g.config(s, 2))
	// Take part of the backlog without acking it: the window fills and
	// the rest waits, so b is mid-backlog.
	var pending []uint32
	for i := 0; i < 100; i++ {
		m := recvAny(t, b.Conn)
		if m.Type != d2m.TypeReflected {
			t.Fatalf("message %d: %v in the middle of the backlog", i, m.Type)
		}
		r, _ := d2m.DecodeReflected(m.Payload)
		pending = append(pending, r.ID)
	}
	a.Close()
	waitAuthenticated(t, s, 1) // the leader's departure has been handled
	got := len(pending)
	for _, id := range pending {
		if err := b.AckReflected(ctxT(t, time.Second), id); err != nil {
			t.Fatal(err)
		}
	}
	for {
		m := recvAny(t, b.Conn)
		if m.Type == d2m.TypeReflectionQueueDry {
			break
		}
		if m.Type != d2m.TypeReflected {
			t.Fatalf("after %d of %d backlog entries: %v before ReflectionQueueDry", got, backlog, m.Type)
		}
		r, _ := d2m.DecodeReflected(m.Payload)
		got++
		if err := b.AckReflected(ctxT(t, time.Second), r.ID); err != nil {
			t.Fatal(err)
		}
	}
	if got != backlog {
		t.Fatalf("ReflectionQueueDry after %d of %d backlog entries", got, backlog)
	}
	recvAnyType(t, b.Conn, d2m.TypeRolePromotedToLeader)
}

// waitAuthenticated waits until the server counts n authenticated
// connections.
func waitAuthenticated(t *testing.T, s *server, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, body := s.adminGet("/metrics")
		if v, ok := metricValue(body, `mediator_connections{state="authenticated"}`); ok && int(v) == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("authenticated connections never reached %d", n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
