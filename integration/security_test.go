package integration

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/nacl/secretbox"
	//lint:ignore SA1019 HSalsa20 is the NaCl box key derivation itself; box.Precompute costs twice as much (BENCHMARKS.md, "handshake").
	"golang.org/x/crypto/salsa20/salsa"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
)

// Security checks beyond handshake_test.go (TestWrongGroupKeyRejected: a
// response made with another group's key; TestReplayedResponseRejected: a
// response captured on one connection, never used, sent on another) and
// cli_serve_test.go (file modes of mediator.db and admin.token).

// TestChallengeResponseBinding: a response is bound to its connection's
// ESK and challenge and to the URL's group. A response that *succeeded*
// cannot be replayed on another connection, neither while the first is
// open nor after; a valid response made for another group's connection
// does not open this group; a response sealed for this connection's ESK
// over another connection's challenge fails too. Each is 4010, and nothing
// is created.
func TestChallengeResponseBinding(t *testing.T) {
	s := startServer(t)
	g, other := newGroup(), newGroup()
	url := d2mclient.URLFor(s.wsURL, g.keys, "7f")

	// A full, successful handshake whose response is kept.
	first, _, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), url, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer first.CloseNow()
	hello, _ := d2m.DecodeServerHello(recvType(t, first, d2m.TypeServerHello))
	resp := responseFor(t, g.keys, hello)
	first.SendMessage(ctxT(t, time.Second), d2m.TypeClientHello, &d2mpb.ClientHello{Response: resp, DeviceId: 1})
	recvType(t, first, d2m.TypeServerInfo)

	try := func(name, url string, response func(*d2mpb.ServerHello) []byte, device uint64) {
		t.Helper()
		c, _, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), url, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseNow()
		h, _ := d2m.DecodeServerHello(recvType(t, c, d2m.TypeServerHello))
		c.SendMessage(ctxT(t, time.Second), d2m.TypeClientHello, &d2mpb.ClientHello{Response: response(h), DeviceId: device})
		if code := c.CloseCode(ctxT(t, 10*time.Second)); code != int(d2m.CloseProtocolError) {
			t.Errorf("%s: close %d, want 4010", name, code)
		}
	}
	replay := func(*d2mpb.ServerHello) []byte { return resp }
	try("successful response replayed while its connection is open", url, replay, 2)
	try("successful response replayed for the same device", url, replay, 1)
	first.Close()
	try("successful response replayed after its connection closed", url, replay, 2)

	// A response that is valid for a connection of another group.
	otherURL := d2mclient.URLFor(s.wsURL, other.keys, "7f")
	oc, _, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), otherURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer oc.CloseNow()
	oh, _ := d2m.DecodeServerHello(recvType(t, oc, d2m.TypeServerHello))
	otherResp := responseFor(t, other.keys, oh)
	try("response made for another group's connection", url, func(*d2mpb.ServerHello) []byte { return otherResp }, 3)

	// This connection's ESK, but another connection's challenge.
	try("response over another connection's challenge", url, func(h *d2mpb.ServerHello) []byte {
		return responseFor(t, g.keys, &d2mpb.ServerHello{Esk: h.Esk, Challenge: hello.Challenge})
	}, 4)

	// Nothing was created by the failures: the group holds device 1 only.
	c, _ := connectReady(t, s, g.config(s, 1))
	if info := devicesInfo(t, c); len(info) != 1 {
		t.Fatalf("slots after rejected handshakes: %v", keys(info))
	}
}

func responseFor(t *testing.T, k d2d.Keys, hello *d2mpb.ServerHello) []byte {
	t.Helper()
	var esk [32]byte
	copy(esk[:], hello.Esk)
	resp, err := d2d.ChallengeResponse(k, &esk, hello.Challenge)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// TestLowOrderGroupKeyRejected: a device group id (DGPK.public, taken from
// the URL) that is a low-order X25519 point makes X25519(ESK.secret, DGPK)
// all zeros for every ESK, so a server that does not refuse it accepts a
// response anyone can compute: box key = HSalsa20(0). Each such response is
// sent here and must get 4010, with the low-order refusal in the log.
//
// The mirror case, a low-order ESK in a malicious ServerHello, is the
// client's to check (it reveals nothing of DGPK.secret); d2d's
// ChallengeResponse uses nacl/box and does not refuse it.
func TestLowOrderGroupKeyRejected(t *testing.T) {
	s := startServer(t)
	points := map[string]string{
		"zero":         "0000000000000000000000000000000000000000000000000000000000000000",
		"one":          "0100000000000000000000000000000000000000000000000000000000000000",
		"order-8 (a)":  "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
		"order-8 (b)":  "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
		"p-1":          "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
		"p (= 0)":      "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
		"p+1 (= 1)":    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
		"zero, high 1": "0000000000000000000000000000000000000000000000000000000000000080",
	}
	// The forged box key: HSalsa20 of an all-zero shared secret, i.e.
	// box.Precompute's result when the X25519 output is zero.
	var zero, key [32]byte
	var n16 [16]byte
	salsa.HSalsa20(&key, &n16, &zero, &salsa.Sigma)
	for name, h := range points {
		raw, _ := hex.DecodeString(h)
		var id d2m.DeviceGroupID
		copy(id[:], raw)
		url := s.wsURL + d2m.ClientURLPath(d2m.ClientURLInfo{DeviceGroupID: id, ServerGroup: "7f"})
		c, _, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), url, nil)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		hello, _ := d2m.DecodeServerHello(recvType(t, c, d2m.TypeServerHello))
		var nonce [24]byte
		rand.Read(nonce[:])
		forged := secretbox.Seal(append([]byte(nil), nonce[:]...), hello.Challenge, &nonce, &key)
		c.SendMessage(ctxT(t, time.Second), d2m.TypeClientHello, &d2mpb.ClientHello{Response: forged, DeviceId: 1})
		if code := c.CloseCode(ctxT(t, 10*time.Second)); code != int(d2m.CloseProtocolError) {
			t.Errorf("low-order group id %s: close %d, want 4010", name, code)
		}
		c.CloseNow()
	}
	// Each refusal is logged with its cause (the disconnect line may
	// trail the close a little).
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		n := strings.Count(s.Logs(), d2m.ErrLowOrderKey.Error())
		if n >= len(points) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("low-order refusal logged %d times for %d points", n, len(points))
		}
	}
}

// TestAdminAPIRequiresToken: everything on the admin listener except
// /healthz and /readyz answers 401 without the bearer token, with a wrong
// one, or with a mangled scheme, and a refused mutating request changes
// nothing.
func TestAdminAPIRequiresToken(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	connectReady(t, s, g.config(s, 2))
	begin(t, a, []byte("scope"), 0)
	recvType(t, a.Conn, d2m.TypeBeginTransactionAck)
	gid := hex.EncodeToString(g.keys.DGPK.Public[:])
	token := s.adminToken()

	do := func(method, path, auth string) int {
		t.Helper()
		req, _ := http.NewRequest(method, s.admin+path, nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	private := []struct{ method, path string }{
		{"GET", "/metrics"},
		{"GET", "/debug/pprof/"},
		{"GET", "/debug/pprof/goroutine?debug=1"},
		{"GET", "/debug/pprof/cmdline"},
		{"GET", "/api/v1/stats"},
		{"GET", "/api/v1/groups"},
		{"GET", "/api/v1/groups/" + gid},
		{"GET", "/api/v1/groups/" + gid + "/slots/1"},
		{"DELETE", "/api/v1/groups/" + gid + "/slots/2"},
		{"DELETE", "/api/v1/groups/" + gid + "/slots/1/queue"},
		{"DELETE", "/api/v1/groups/" + gid + "/lock"},
		{"GET", "/api/v1/backup"},
		{"GET", "/api/v1/nonexistent"},
		{"GET", "/"},
	}
	for _, p := range private {
		for _, auth := range []string{"", "Bearer", "Bearer ", "Bearer wrong-token", "Basic " + token, token, "Bearer " + token + "x", "Bearer " + token[:len(token)-1]} {
			if code := do(p.method, p.path, auth); code != http.StatusUnauthorized {
				t.Errorf("%s %s with Authorization %q: %d, want 401", p.method, p.path, auth, code)
			}
		}
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		if code := do("GET", path, ""); code != http.StatusOK {
			t.Errorf("%s: %d", path, code)
		}
	}
	if code := do("GET", "/metrics", "Bearer "+token); code != http.StatusOK {
		t.Errorf("/metrics with the token: %d", code)
	}
	// The refused DELETEs did nothing: both slots are there and device 1
	// still holds the lock (device 2 is rejected).
	if info := devicesInfo(t, a); len(info) != 2 {
		t.Fatalf("slots after refused admin calls: %v", keys(info))
	}
	c3, _ := connectReady(t, s, g.config(s, 3))
	begin(t, c3, []byte("other"), 0)
	recvType(t, c3.Conn, d2m.TypeTransactionRejected)
}

// secret is a payload the server must never log: random bytes, or random
// alphanumerics whose raw form would show in a text log.
type secret struct {
	name      string
	b         []byte
	printable bool
}

func newSecret(name string, printable bool) secret {
	b := make([]byte, 16)
	rand.Read(b)
	if printable {
		const alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
		for i := range b {
			b[i] = alnum[int(b[i])%len(alnum)]
		}
	}
	return secret{name, b, printable}
}

// forms are the ways a logger could render the bytes.
func (s secret) forms() []string {
	f := []string{
		hex.EncodeToString(s.b), strings.ToUpper(hex.EncodeToString(s.b)),
		hex.EncodeToString(s.b[:8]), hex.EncodeToString(s.b[8:]),
		base64.StdEncoding.EncodeToString(s.b), base64.URLEncoding.EncodeToString(s.b),
		base64.RawStdEncoding.EncodeToString(s.b[:15]), base64.RawURLEncoding.EncodeToString(s.b[:15]),
		strings.Trim(fmt.Sprint(s.b), "[]"),
	}
	if s.printable {
		f = append(f, string(s.b))
	}
	return f
}

// TestNoPayloadInLogs drives every path that carries device-encrypted
// bytes (device info, shared device data, durable, ephemeral and held
// envelopes, transaction scopes in Begin/Rejected/Ended, early and later
// Proxy bytes, and bad frames built from such bytes), including a SIGKILL
// that leaves held reflections for the start-up recovery and a clean
// SIGTERM, all at --log-level debug, and then searches the whole log for
// each payload in hex, base64, decimal and raw form. It also checks the
// modes of everything in the data directory the server created: files
// 0600, directories 0700.
func TestNoPayloadInLogs(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "fresh", "data")
	s := &server{t: t, dataDir: dataDir}
	s.start()
	t.Cleanup(s.kill)
	var secrets []secret
	sec := func(name string, printable bool) []byte {
		x := newSecret(name, printable)
		secrets = append(secrets, x)
		return x.b
	}

	g := newGroup()
	cfgA := g.config(s, 1)
	cfgA.DeviceInfo = sec("device info A", false)
	cfgA.EarlyProxy = [][]byte{sec("early proxy A", true)}
	a, _ := connectReady(t, s, cfgA)
	cfgB := g.config(s, 2)
	cfgB.DeviceInfo = sec("device info B", true)
	b, _ := connectReady(t, s, cfgB)
	a.SendMessage(ctxT(t, time.Second), d2m.TypeSetSharedDeviceData, &d2mpb.SetSharedDeviceData{EncryptedSharedDeviceData: sec("shared data", false)})
	devicesInfo(t, b)
	for _, eph := range []uint16{0, d2m.FlagEphemeral} {
		for _, printable := range []bool{false, true} {
			env := sec(fmt.Sprintf("envelope flags=%d", eph), printable)
			id, _ := b.Reflect(ctxT(t, time.Second), env, eph)
			if eph == 0 {
				expectAck(t, b, id)
			}
			r := expectReflected(t, a, env)
			a.AckReflected(ctxT(t, time.Second), r.ID)
		}
	}
	scopeA := sec("scope A", true)
	begin(t, a, scopeA, 0)
	recvType(t, a.Conn, d2m.TypeBeginTransactionAck)
	begin(t, b, sec("scope B", false), 0)
	recvType(t, b.Conn, d2m.TypeTransactionRejected)
	held := sec("held envelope", true)
	id, _ := a.Reflect(ctxT(t, time.Second), held, 0)
	expectAck(t, a, id)
	commit(t, a)
	recvType(t, a.Conn, d2m.TypeCommitTransactionAck)
	expectReflected(t, b, held)
	recvType(t, b.Conn, d2m.TypeTransactionEnded)

	// Bad frames made of secret bytes, each on its own device.
	bad := func(dev uint64, frame []byte, text bool) {
		c, _ := connectReady(t, s, g.config(s, dev))
		if text {
			c.SendText(ctxT(t, time.Second), string(frame))
		} else {
			c.Send(ctxT(t, time.Second), frame)
		}
		c.CloseCode(ctxT(t, 10*time.Second))
	}
	bad(3, d2m.EncodeRaw(d2m.TypeReflect, append([]byte{7, 0, 0, 0, 1, 0, 0, 0}, sec("bad-HL envelope", true)...)), false)
	bad(3, d2m.EncodeRaw(0x99, sec("unknown-type payload", true)), false)
	bad(3, d2m.EncodeRaw(d2m.TypeDropDevice, append([]byte{0xff}, sec("garbage DropDevice", true)...)), false)
	bad(3, sec("text frame", true), true)
	oversize := make([]byte, d2m.MaxEnvelopeSize+1)
	copy(oversize, sec("oversize envelope", true))
	bad(3, d2m.EncodeReflect(0, 1, oversize), false)
	bad(3, d2m.EncodeRaw(d2m.TypeReflectedAck, sec("reflectedack", false)[:8]), false)
	raw, _, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), d2mclient.URLFor(s.wsURL, g.keys, "7f"), nil)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, raw, d2m.TypeServerHello)
	raw.Send(ctxT(t, time.Second), d2m.EncodeRaw(d2m.TypeClientHello, append([]byte{0x12, 0x48}, sec("garbage response", false)...)))
	raw.CloseCode(ctxT(t, 10*time.Second))
	// Later Proxy bytes go to the stand-in chat server (which closes on
	// garbage).
	a.SendProxy(ctxT(t, time.Second), sec("proxy A", true))

	// A crash inside a transaction, so that start-up recovery handles a
	// held envelope, then a clean stop.
	begin(t, b, sec("scope at crash", true), 0)
	recvType(t, b.Conn, d2m.TypeBeginTransactionAck)
	id, _ = b.Reflect(ctxT(t, time.Second), sec("held at crash", false), 0)
	expectAck(t, b, id)
	s.restart()
	connectReady(t, s, g.config(s, 1))
	s.stop()

	logs := s.Logs()
	if !strings.Contains(logs, `"level":"debug"`) {
		t.Fatal("no debug lines: the server did not run at debug level")
	}
	for _, x := range secrets {
		for _, form := range x.forms() {
			if i := strings.Index(logs, form); i >= 0 {
				line := logs[strings.LastIndexByte(logs[:i], '\n')+1:]
				if j := strings.IndexByte(line, '\n'); j >= 0 {
					line = line[:j]
				}
				t.Errorf("%s appears in the log as %q:\n%s", x.name, form, line)
			}
		}
	}
	t.Logf("%d payloads, %d forms each, none in %d bytes of log", len(secrets), len(secrets[0].forms()), len(logs))

	// File modes of everything the server created.
	filepath.WalkDir(dataDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Error(err)
			return nil
		}
		st, err := os.Stat(path)
		if err != nil {
			t.Error(err)
			return nil
		}
		want := os.FileMode(0o600)
		if d.IsDir() {
			want = 0o700
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s: mode %v, want %v", path, st.Mode().Perm(), want)
		}
		return nil
	})
}
