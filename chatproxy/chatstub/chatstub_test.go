package chatstub_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"d2m-mediator/chatproxy"
	"d2m-mediator/chatproxy/chatstub"
	"d2m-mediator/chatproxy/csp"
	"d2m-mediator/chatproxy/cspclient"
)

func startStub(t *testing.T, cfg chatstub.Config) (*chatstub.Server, string) {
	t.Helper()
	if cfg.SecretKey == nil {
		key, err := chatstub.LoadOrCreateKey(filepath.Join(t.TempDir(), "key"))
		if err != nil {
			t.Fatal(err)
		}
		cfg.SecretKey = key
	}
	s, err := chatstub.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	addr, err := s.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, addr.String()
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

type device struct {
	*cspclient.Client
	tr *cspclient.TCPTransport
}

func login(t *testing.T, s *chatstub.Server, addr, id string, opts cspclient.LoginOptions) device {
	t.Helper()
	ident, err := cspclient.NewIdentity(id)
	if err != nil {
		t.Fatal(err)
	}
	tr, err := cspclient.DialTCP(ctxT(t), addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tr.Close() })
	c, err := cspclient.Login(ctxT(t), tr, ident, s.PublicKey(), opts)
	if err != nil {
		t.Fatal(err)
	}
	return device{c, tr}
}

// expect receives the next frame and checks its type.
func (d device) expect(t *testing.T, want csp.PayloadType) []byte {
	t.Helper()
	typ, data, err := d.Recv(ctxT(t))
	if err != nil {
		t.Fatalf("waiting for %s: %v", want, err)
	}
	if typ != want {
		t.Fatalf("got %s, want %s", typ, want)
	}
	return data
}

// expectNothing checks that no frame arrives: an echo sent now must be the
// next thing to come back.
func (d device) expectNothing(t *testing.T) {
	t.Helper()
	if err := d.Echo([]byte("barrier")); err != nil {
		t.Fatal(err)
	}
	if data := d.expect(t, csp.EchoResponse); string(data) != "barrier" {
		t.Fatalf("echo data %q", data)
	}
}

func TestLoginAndEcho(t *testing.T) {
	s, addr := startStub(t, chatstub.Config{})
	for _, split := range []bool{false, true} {
		d := login(t, s, addr, "ECHOECHO", cspclient.LoginOptions{SplitLogin: split, ClientInfo: "test", CSPDeviceID: 7})
		for _, data := range [][]byte{{}, []byte("ping"), bytes.Repeat([]byte{0xab}, csp.MaxPayloadSize)} {
			if err := d.Echo(data); err != nil {
				t.Fatal(err)
			}
			if got := d.expect(t, csp.EchoResponse); !bytes.Equal(got, data) {
				t.Fatalf("split=%v: echo of %d bytes came back as %d", split, len(data), len(got))
			}
		}
		// Accepted silently.
		for _, typ := range []csp.PayloadType{csp.SetConnectionIdleTimeout, csp.SetPushToken, csp.DeletePushTokens, csp.ClearDeviceCookieChange} {
			if err := d.SendFrame(typ, []byte{30, 0}); err != nil {
				t.Fatal(err)
			}
		}
		d.expectNothing(t)
	}
}

func TestWrongServerKey(t *testing.T) {
	s, addr := startStub(t, chatstub.Config{})
	tr, err := cspclient.DialTCP(ctxT(t), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	ident, _ := cspclient.NewIdentity("AAAAAAAA")
	wrong := s.PublicKey()
	wrong[0] ^= 1
	if _, err := cspclient.Login(ctxT(t), tr, ident, wrong, cspclient.LoginOptions{}); !errors.Is(err, csp.ErrDecrypt) {
		t.Fatalf("got %v, want ErrDecrypt", err)
	}
}

func TestMessageDelivery(t *testing.T) {
	s, addr := startStub(t, chatstub.Config{})
	a := login(t, s, addr, "AAAAAAAA", cspclient.LoginOptions{})
	b1 := login(t, s, addr, "BBBBBBBB", cspclient.LoginOptions{})

	// Queued while B has not unblocked; A gets its server ack at once.
	if err := a.SendMessage("BBBBBBBB", 1, []byte("first")); err != nil {
		t.Fatal(err)
	}
	recv, id, err := cspclient.ParseOutgoingAck(a.expect(t, csp.OutgoingMessageAck))
	if err != nil || recv != "BBBBBBBB" || id != 1 {
		t.Fatalf("ack %q %d %v", recv, id, err)
	}
	b1.expectNothing(t) // not unblocked: nothing delivered
	if n := s.QueuedMessages("BBBBBBBB"); n != 1 {
		t.Fatalf("queued %d, want 1", n)
	}

	// Unblock: the queue, then queue-send-complete.
	if err := b1.Unblock(); err != nil {
		t.Fatal(err)
	}
	m, err := cspclient.ParseMessage(b1.expect(t, csp.IncomingMessage))
	if err != nil || m.Sender != "AAAAAAAA" || m.Receiver != "BBBBBBBB" || m.MessageID != 1 || string(m.Body) != "first" {
		t.Fatalf("incoming %+v, %v", m, err)
	}
	b1.expect(t, csp.QueueSendComplete)

	// A second connection of B gets the unacked message too.
	b2 := login(t, s, addr, "BBBBBBBB", cspclient.LoginOptions{})
	b2.Unblock()
	m, _ = cspclient.ParseMessage(b2.expect(t, csp.IncomingMessage))
	if m.MessageID != 1 {
		t.Fatalf("b2 got message %d", m.MessageID)
	}
	b2.expect(t, csp.QueueSendComplete)

	// Live delivery to every unblocked connection; no second 0xd0.
	a.SendMessage("BBBBBBBB", 2, []byte("second"))
	a.expect(t, csp.OutgoingMessageAck)
	for _, b := range []device{b1, b2} {
		m, _ := cspclient.ParseMessage(b.expect(t, csp.IncomingMessage))
		if m.MessageID != 2 || string(m.Body) != "second" {
			t.Fatalf("live message %+v", m)
		}
	}
	b1.Unblock() // a second unblock is ignored
	b1.expectNothing(t)

	// Acks remove messages from the queue, whichever connection sends them.
	b1.AckIncoming("AAAAAAAA", 1)
	b2.AckIncoming("AAAAAAAA", 2)
	b2.AckIncoming("AAAAAAAA", 99) // unknown: ignored
	b1.expectNothing(t)
	b2.expectNothing(t)
	if n := s.QueuedMessages("BBBBBBBB"); n != 0 {
		t.Fatalf("queued %d after acks, want 0", n)
	}

	// A new connection finds the queue empty.
	b3 := login(t, s, addr, "BBBBBBBB", cspclient.LoginOptions{})
	b3.Unblock()
	b3.expect(t, csp.QueueSendComplete)
}

func TestMessageFlags(t *testing.T) {
	s, addr := startStub(t, chatstub.Config{})
	a := login(t, s, addr, "AAAAAAAA", cspclient.LoginOptions{})
	// No server ack: the echo is the next frame.
	a.SendMessageFlags("BBBBBBBB", 1, csp.FlagNoServerAck, []byte("x"))
	a.expectNothing(t)
	if n := s.QueuedMessages("BBBBBBBB"); n != 1 {
		t.Fatalf("queued %d, want 1", n)
	}
	// No server queuing: acked, but not kept for an absent receiver.
	a.SendMessageFlags("BBBBBBBB", 2, csp.FlagNoServerQueuing, []byte("typing"))
	a.expect(t, csp.OutgoingMessageAck)
	if n := s.QueuedMessages("BBBBBBBB"); n != 1 {
		t.Fatalf("queued %d, want 1", n)
	}
}

func TestQueueLimit(t *testing.T) {
	s, addr := startStub(t, chatstub.Config{MaxQueuedPerIdentity: 2})
	a := login(t, s, addr, "AAAAAAAA", cspclient.LoginOptions{})
	for id := uint64(1); id <= 2; id++ {
		a.SendMessage("BBBBBBBB", id, nil)
		a.expect(t, csp.OutgoingMessageAck)
	}
	a.SendMessage("BBBBBBBB", 3, nil)
	a.expect(t, csp.Alert)
	if n := s.QueuedMessages("BBBBBBBB"); n != 2 {
		t.Fatalf("queued %d, want 2", n)
	}
}

func TestMalformedLoginCloses(t *testing.T) {
	s, addr := startStub(t, chatstub.Config{})
	_ = s
	tr, err := cspclient.DialTCP(ctxT(t), addr)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	tr.Send(make([]byte, csp.ClientHelloSize))
	if u, err := tr.Recv(ctxT(t)); err != nil || len(u) != csp.ServerHelloSize {
		t.Fatalf("server-hello: %d bytes, %v", len(u), err)
	}
	tr.Send(bytes.Repeat([]byte{1}, csp.LoginBoxSize)) // a box that does not open
	if u, err := tr.Recv(ctxT(t)); !errors.Is(err, chatproxy.ErrClosed) {
		t.Fatalf("got %d bytes, %v; want the connection closed without a login-ack", len(u), err)
	}
}

func TestMalformedFrameGetsCloseError(t *testing.T) {
	s, addr := startStub(t, chatstub.Config{})
	for name, send := range map[string]func(d device) error{
		"bad box": func(d device) error {
			return d.tr.Send([]byte{20, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20})
		},
		"unknown type": func(d device) error { return d.SendFrame(0x77, nil) },
		"bad message":  func(d device) error { return d.SendFrame(csp.OutgoingMessage, []byte{1, 2, 3}) },
		"oversize":     func(d device) error { return d.tr.Send([]byte{0x01, 0x20}) },
		"short ack":    func(d device) error { return d.SendFrame(csp.IncomingMessageAck, []byte{1}) },
	} {
		t.Run(name, func(t *testing.T) {
			d := login(t, s, addr, "CCCCCCCC", cspclient.LoginOptions{})
			if err := send(d); err != nil {
				t.Fatal(err)
			}
			ce, err := csp.ParseCloseError(d.expect(t, csp.CloseErrorType))
			if err != nil || ce.Message == "" {
				t.Fatalf("close-error %+v, %v", ce, err)
			}
			if _, _, err := d.Recv(ctxT(t)); !errors.Is(err, chatproxy.ErrClosed) {
				t.Fatalf("after close-error: %v, want the connection closed", err)
			}
		})
	}
}

func TestSenderMustBeLoggedInIdentity(t *testing.T) {
	s, addr := startStub(t, chatstub.Config{})
	d := login(t, s, addr, "AAAAAAAA", cspclient.LoginOptions{})
	m := csp.Message{Sender: csp.Identity{'X', 'X', 'X', 'X', 'X', 'X', 'X', 'X'}, Receiver: csp.Identity{'B', 'B', 'B', 'B', 'B', 'B', 'B', 'B'}}
	data, _ := m.Marshal()
	d.SendFrame(csp.OutgoingMessage, data)
	d.expect(t, csp.CloseErrorType)
}

func TestCloseEndsEverything(t *testing.T) {
	before := runtime.NumGoroutine()
	key, err := chatstub.LoadOrCreateKey(filepath.Join(t.TempDir(), "k"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := chatstub.New(chatstub.Config{SecretKey: key})
	if err != nil {
		t.Fatal(err)
	}
	addr, err := s.Start("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var devices []device
	for _, id := range []string{"AAAAAAAA", "BBBBBBBB", "BBBBBBBB"} {
		devices = append(devices, login(t, s, addr.String(), id, cspclient.LoginOptions{}))
	}
	devices[1].Unblock()
	devices[1].expect(t, csp.QueueSendComplete)
	// One more connection that never finishes its handshake.
	half, err := cspclient.DialTCP(ctxT(t), addr.String())
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s.Close() // idempotent
	for _, d := range devices {
		if _, _, err := d.Recv(ctxT(t)); !errors.Is(err, chatproxy.ErrClosed) {
			t.Fatalf("after Close: %v", err)
		}
		d.tr.Close()
	}
	if _, err := half.Recv(ctxT(t)); !errors.Is(err, chatproxy.ErrClosed) {
		t.Fatalf("half-open connection after Close: %v", err)
	}
	half.Close()
	if _, err := s.Start("127.0.0.1:0"); !errors.Is(err, chatstub.ErrServerClosed) {
		t.Fatalf("Start after Close: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Fatalf("%d goroutines after Close, %d before", n, before)
	}
}

func TestLoadOrCreateKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data", "sub")
	path := filepath.Join(dir, "chatstub.key")
	k1, err := chatstub.LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]os.FileMode{path: 0o600, dir: 0o700 | os.ModeDir} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", p, fi.Mode(), want)
		}
	}
	k2, err := chatstub.LoadOrCreateKey(path)
	if err != nil || *k1 != *k2 {
		t.Fatalf("second load: %v, same key %v", err, k1 != nil && k2 != nil && *k1 == *k2)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("%d files in key dir, want 1 (temporary file left behind?)", len(entries))
	}
	os.WriteFile(path, []byte("short"), 0o600)
	if _, err := chatstub.LoadOrCreateKey(path); err == nil {
		t.Fatal("corrupt key file accepted")
	}
	if _, err := chatstub.New(chatstub.Config{}); err == nil {
		t.Fatal("New without a key succeeded")
	}
}
