package cspclient_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"d2m-mediator/chatproxy/csp"
	"d2m-mediator/chatproxy/cspclient"
	"d2m-mediator/d2d/blake2b"

	"golang.org/x/crypto/nacl/box"
)

// recordingTransport remembers the size of every Send, to check how the
// login is split into units (docs/protocol.md §9.1).
type recordingTransport struct {
	cspclient.Transport
	sends []int
}

func (r *recordingTransport) Send(p []byte) error {
	r.sends = append(r.sends, len(p))
	return r.Transport.Send(p)
}

// serverSideVouch computes the vouch the way a real chat server checks it,
// from its own secrets and the identity's public key (docs/protocol.md §9.3).
func serverSideVouch(t *testing.T, skSecret, tskSecret, ckPublic *[32]byte, sck csp.Cookie, tckPublic [32]byte) [32]byte {
	var ss1, ss2 [32]byte
	box.Precompute(&ss1, ckPublic, skSecret)
	box.Precompute(&ss2, ckPublic, tskSecret)
	key, err := blake2b.Sum256(append(ss1[:], ss2[:]...), []byte("v2"), []byte("3ma-csp"), nil)
	if err != nil {
		t.Fatal(err)
	}
	v, err := blake2b.Sum256(key[:], nil, nil, append(sck[:], tckPublic[:]...))
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// fakeServer is a minimal, strict CSP server on one end of a pipe: it checks
// every byte of the login, including the vouch, and answers one echo.
func fakeServer(t *testing.T, conn net.Conn, skSecret *[32]byte, ckPublic [32]byte, wantDeviceID uint64, errc chan<- error) {
	defer conn.Close()
	fail := func(err error) { errc <- err }
	buf := make([]byte, csp.LoginBoxSize)
	if _, err := io.ReadFull(conn, buf[:csp.ClientHelloSize]); err != nil {
		fail(err)
		return
	}
	hello, _ := csp.ParseClientHello(buf[:csp.ClientHelloSize])
	tskPub, tskSec, _ := box.GenerateKey(rand.Reader)
	sh := csp.ServerHello{Cookie: csp.Cookie{0x5c}, TempPublicKey: *tskPub, ClientCookie: hello.Cookie}
	conn.Write(sh.Seal(skSecret, &hello.TempPublicKey))
	sess := csp.NewSession(&hello.TempPublicKey, tskSec, csp.NewNonceCounter(sh.Cookie, csp.LoginAckSeq), csp.NewNonceCounter(hello.Cookie, csp.LoginSeq))
	if _, err := io.ReadFull(conn, buf); err != nil {
		fail(err)
		return
	}
	plain, err := sess.Open(buf)
	if err != nil {
		fail(err)
		return
	}
	ld, err := csp.ParseLoginData(plain)
	if err != nil {
		fail(err)
		return
	}
	if !bytes.Equal(plain[56:80], make([]byte, 24)) || !bytes.Equal(plain[112:], make([]byte, 16)) {
		fail(errors.New("reserved login-data bytes not zero"))
		return
	}
	if want := serverSideVouch(t, skSecret, tskSec, &ckPublic, sh.Cookie, hello.TempPublicKey); ld.Vouch != want {
		fail(errors.New("vouch does not verify"))
		return
	}
	extBox := make([]byte, ld.ExtensionsBoxLength)
	if _, err := io.ReadFull(conn, extBox); err != nil {
		fail(err)
		return
	}
	plain, err = sess.Open(extBox)
	if err != nil {
		fail(err)
		return
	}
	ext, err := csp.ParseExtensions(plain)
	if err != nil || !ext.HasCSPDeviceID || ext.CSPDeviceID != wantDeviceID || ext.ClientInfo != "unit-test" {
		fail(errors.New("extensions not as sent"))
		return
	}
	conn.Write(csp.SealLoginAck(sess))
	var frame [csp.MaxFrameSize]byte
	if _, err := io.ReadFull(conn, frame[:2]); err != nil {
		fail(err)
		return
	}
	n := int(frame[0]) | int(frame[1])<<8
	if _, err := io.ReadFull(conn, frame[2:2+n]); err != nil {
		fail(err)
		return
	}
	typ, data, err := sess.OpenFrame(frame[:2+n])
	if err != nil || typ != csp.EchoRequest {
		fail(errors.New("expected an echo-request"))
		return
	}
	reply, _ := sess.SealFrame(csp.EchoResponse, data)
	conn.Write(reply)
	errc <- nil
}

func TestLoginVouchAndUnits(t *testing.T) {
	skPub, skSec, _ := box.GenerateKey(rand.Reader)
	ident, err := cspclient.NewIdentity("*TESTID1")
	if err != nil {
		t.Fatal(err)
	}
	for _, split := range []bool{false, true} {
		clientEnd, serverEnd := net.Pipe()
		errc := make(chan error, 1)
		go fakeServer(t, serverEnd, skSec, ident.PublicKey, 42, errc)
		tr := &recordingTransport{Transport: cspclient.NewTCPTransport(clientEnd)}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := cspclient.Login(ctx, tr, ident, *skPub, cspclient.LoginOptions{CSPDeviceID: 42, ClientInfo: "unit-test", SplitLogin: split})
		if err != nil {
			cancel()
			t.Fatalf("split=%v: %v (server: %v)", split, err, <-errc)
		}
		c.Echo([]byte("hi"))
		if data, err := c.RecvType(ctx, csp.EchoResponse); err != nil || string(data) != "hi" {
			t.Fatalf("echo: %q %v", data, err)
		}
		if err := <-errc; err != nil {
			t.Fatalf("server: %v", err)
		}
		cancel()
		tr.Transport.(*cspclient.TCPTransport).Close()

		extLen := tr.sends[1] - csp.LoginBoxSize
		want := []int{csp.ClientHelloSize, csp.LoginBoxSize + extLen}
		if split {
			want = []int{csp.ClientHelloSize, csp.LoginBoxSize, tr.sends[2]}
		}
		if len(tr.sends) != len(want)+1 || tr.sends[0] != want[0] || tr.sends[1] != want[1] {
			t.Fatalf("split=%v: sends %v, want %v then one frame", split, tr.sends, want)
		}
	}
}

func TestVouchMatchesServerSide(t *testing.T) {
	ident, _ := cspclient.NewIdentity("ABCDEFGH")
	skPub, skSec, _ := box.GenerateKey(rand.Reader)
	tskPub, tskSec, _ := box.GenerateKey(rand.Reader)
	tckPub, _, _ := box.GenerateKey(rand.Reader)
	sck := csp.Cookie{1, 2, 3}
	got, err := cspclient.Vouch(&ident.SecretKey, skPub, tskPub, sck, tckPub)
	if err != nil {
		t.Fatal(err)
	}
	if want := serverSideVouch(t, skSec, tskSec, &ident.PublicKey, sck, *tckPub); got != want {
		t.Fatalf("vouch %x, server computes %x", got, want)
	}
	again, _ := cspclient.IdentityFromSecret("ABCDEFGH", ident.SecretKey)
	if again.PublicKey != ident.PublicKey {
		t.Fatal("IdentityFromSecret derives another public key")
	}
}

func TestRecvHonoursContext(t *testing.T) {
	clientEnd, serverEnd := net.Pipe()
	defer serverEnd.Close()
	tr := cspclient.NewTCPTransport(clientEnd)
	defer tr.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := tr.Recv(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v", err)
	}
	// Nothing was lost: the next unit still arrives whole.
	go serverEnd.Write(make([]byte, csp.ServerHelloSize))
	u, err := tr.Recv(context.Background())
	if err != nil || len(u) != csp.ServerHelloSize {
		t.Fatalf("%d bytes, %v", len(u), err)
	}
}

func TestNewIdentityRejectsBadIDs(t *testing.T) {
	if _, err := cspclient.NewIdentity("short"); !errors.Is(err, csp.ErrMalformed) {
		t.Fatalf("got %v", err)
	}
}
