package integration

import (
	"context"
	"encoding/hex"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
)

func TestHandshakeNewThenExisting(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	c := connect(t, s, g.config(s, 1))
	si := c.ServerInfo
	if si.DeviceSlotState != d2mpb.DeviceSlotState_NEW || si.MaxDeviceSlots != 5 || si.ReflectionQueueLength != 0 {
		t.Fatalf("first ServerInfo: %v", si)
	}
	if d := time.Since(time.UnixMilli(int64(si.CurrentTime))); d < -time.Minute || d > time.Minute {
		t.Fatalf("current_time off by %v", d)
	}
	recvType(t, c.Conn, d2m.TypeReflectionQueueDry)
	c.Close()

	cfg := g.config(s, 1)
	cfg.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	c = connect(t, s, cfg)
	if c.ServerInfo.DeviceSlotState != d2mpb.DeviceSlotState_EXISTING {
		t.Fatalf("second ServerInfo: %v", c.ServerInfo)
	}
}

func TestExpectedStateMismatch(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	cfg := g.config(s, 7)
	cfg.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	expectRejected(t, cfg, d2m.CloseSlotStateMismatch)
	// Nothing was created: the device is still NEW.
	cfg.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_NEW)
	c := connect(t, s, cfg)
	if c.ServerInfo.DeviceSlotState != d2mpb.DeviceSlotState_NEW {
		t.Fatal("slot was created by a rejected handshake")
	}
	c.Close()
	// Absent expectation: no check (seed-era clients).
	cfg.ExpectedState = nil
	c2 := connect(t, s, cfg)
	if c2.ServerInfo.DeviceSlotState != d2mpb.DeviceSlotState_EXISTING {
		t.Fatal("want EXISTING")
	}
	c2.Close()
	cfg.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_NEW)
	expectRejected(t, cfg, d2m.CloseSlotStateMismatch)
}

func TestUnsupportedVersion(t *testing.T) {
	s := startServer(t)
	cfg := newGroup().config(s, 1)
	cfg.Version = 1
	expectRejected(t, cfg, d2m.CloseUnsupportedVersion)
}

func TestWrongGroupKeyRejected(t *testing.T) {
	s := startServer(t)
	g, other := newGroup(), newGroup()
	// The URL names g, but the response is made with other's key.
	conn, _, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), d2mclient.URLFor(s.wsURL, g.keys, "7f"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseNow()
	hello, _ := d2m.DecodeServerHello(recvType(t, conn, d2m.TypeServerHello))
	var esk [32]byte
	copy(esk[:], hello.Esk)
	resp, _ := d2d.ChallengeResponse(other.keys, &esk, hello.Challenge)
	conn.SendMessage(ctxT(t, time.Second), d2m.TypeClientHello, &d2mpb.ClientHello{Response: resp, DeviceId: 1})
	expectClose(t, conn, d2m.CloseProtocolError)
}

func TestReplayedResponseRejected(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	url := d2mclient.URLFor(s.wsURL, g.keys, "7f")
	first, _, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), url, nil)
	if err != nil {
		t.Fatal(err)
	}
	hello, _ := d2m.DecodeServerHello(recvType(t, first, d2m.TypeServerHello))
	var esk [32]byte
	copy(esk[:], hello.Esk)
	resp, _ := d2d.ChallengeResponse(g.keys, &esk, hello.Challenge)
	first.CloseNow()
	// The same response on a new connection (new ESK and challenge) fails.
	second, _, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), url, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer second.CloseNow()
	recvType(t, second, d2m.TypeServerHello)
	second.SendMessage(ctxT(t, time.Second), d2m.TypeClientHello, &d2mpb.ClientHello{Response: resp, DeviceId: 1})
	expectClose(t, second, d2m.CloseProtocolError)
}

func TestBadURLIsHTTP400(t *testing.T) {
	s := startServer(t)
	httpURL := "http" + strings.TrimPrefix(s.wsURL, "ws")
	short, _ := proto.Marshal(&d2mpb.ClientUrlInfo{DeviceGroupId: make([]byte, 31), ServerGroup: "7f"})
	for _, path := range []string{"/", "/zz", "/" + hex.EncodeToString(short), "/e7/0a20"} {
		req, _ := http.NewRequest("GET", httpURL+path, nil)
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", "websocket")
		req.Header.Set("Sec-WebSocket-Version", "13")
		req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s: status %d, want 400", path, resp.StatusCode)
		}
	}
}

func TestDeviceLimitReject(t *testing.T) {
	s := startServer(t, "--max-device-slots", "2")
	g := newGroup()
	connect(t, s, g.config(s, 1))
	connect(t, s, g.config(s, 2))
	expectRejected(t, g.config(s, 3), d2m.CloseDeviceLimit)
	// An existing device still gets in.
	c := connect(t, s, g.config(s, 1))
	if c.ServerInfo.MaxDeviceSlots != 2 {
		t.Fatalf("max slots %d", c.ServerInfo.MaxDeviceSlots)
	}
}

func TestDropLeastRecent(t *testing.T) {
	s := startServer(t, "--max-device-slots", "3")
	g := newGroup()
	// Device 2 disconnects first, device 1 later: 2 is the least recent
	// (and the higher id, so a tie-break by id could not pass for it).
	c1 := connect(t, s, g.config(s, 1))
	c2 := connect(t, s, g.config(s, 2))
	c3, _ := connectReady(t, s, g.config(s, 3))
	c2.Close()
	at2 := waitDisconnected(t, c3, 2)
	waitClockPast(at2)
	c1.Close()
	if at1 := waitDisconnected(t, c3, 1); at1 <= at2 {
		t.Fatalf("disconnect times %d then %d", at2, at1)
	}
	cfg := g.config(s, 4)
	cfg.ExhaustedPolicy = d2mpb.ClientHello_DROP_LEAST_RECENT
	connect(t, s, cfg)
	info := devicesInfo(t, c3)
	if _, ok := info[2]; ok {
		t.Fatalf("device 2 not evicted: %v", keys(info))
	}
	if len(info) != 3 {
		t.Fatalf("slots %v", keys(info))
	}
	// The evicted device coming back expecting EXISTING learns it was dropped.
	back := g.config(s, 2)
	back.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	expectRejected(t, back, d2m.CloseDropped)

	// All connected: the oldest connected_since is evicted with 4113.
	s2 := startServer(t, "--max-device-slots", "2")
	g2 := newGroup()
	old := connect(t, s2, g2.config(s2, 2))
	since := devicesInfo(t, old)[2].GetConnectedSince()
	waitClockPast(since)
	connect(t, s2, g2.config(s2, 1))
	cfg = g2.config(s2, 3)
	cfg.ExhaustedPolicy = d2mpb.ClientHello_DROP_LEAST_RECENT
	connect(t, s2, cfg)
	expectClose(t, old.Conn, d2m.CloseDropped)
}

// waitDisconnected asks through c until device dev is listed as
// disconnected, and returns its last_disconnect_at.
func waitDisconnected(t *testing.T, c *d2mclient.Client, dev uint64) uint64 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if a := devicesInfo(t, c)[dev]; a != nil && a.GetLastDisconnectAt() != 0 {
			return a.GetLastDisconnectAt()
		}
		if time.Now().After(deadline) {
			t.Fatalf("device %d never listed as disconnected", dev)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitClockPast waits until the wall clock has left the millisecond ms,
// so that the next event the server stamps is strictly later.
func waitClockPast(ms uint64) {
	for uint64(time.Now().UnixMilli()) <= ms {
		time.Sleep(time.Millisecond)
	}
}

func TestDuplicateConnection(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	old := connect(t, s, g.config(s, 5))
	connect(t, s, g.config(s, 5))
	expectClose(t, old.Conn, d2m.CloseDuplicate)
}

func TestHandshakeTimeout(t *testing.T) {
	s := startServer(t, "--handshake-timeout", "500ms")
	conn, _, err := d2mclient.DialRaw(ctxT(t, 5*time.Second), d2mclient.URLFor(s.wsURL, newGroup().keys, "7f"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.CloseNow()
	recvType(t, conn, d2m.TypeServerHello)
	start := time.Now()
	expectClose(t, conn, d2m.CloseIdleTimeout)
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("closed after %v", d)
	}
}

func TestIdleTimeout(t *testing.T) {
	s := startServer(t, "--idle-timeout", "700ms")
	g := newGroup()
	c, _ := connectReady(t, s, g.config(s, 1))
	expectClose(t, c.Conn, d2m.CloseIdleTimeout)
}

func devicesInfo(t testing.TB, c *d2mclient.Client) map[uint64]*d2mpb.DevicesInfo_AugmentedDeviceInfo {
	t.Helper()
	if err := c.SendMessage(ctxT(t, time.Second), d2m.TypeGetDevicesInfo, &d2mpb.GetDevicesInfo{}); err != nil {
		t.Fatal(err)
	}
	for {
		m := recv(t, c.Conn)
		if m.Type != d2m.TypeDevicesInfo {
			continue
		}
		info, err := d2m.DecodeDevicesInfo(m.Payload)
		if err != nil {
			t.Fatal(err)
		}
		return info.AugmentedDeviceInfo
	}
}

func keys[V any](m map[uint64]V) []uint64 {
	var out []uint64
	for k := range m {
		out = append(out, k)
	}
	return out
}

var _ = context.Background

func TestUnknownPolicyEnumsRejected(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	cfg := g.config(s, 1)
	cfg.ExpirationPolicy = 256
	expectRejected(t, cfg, d2m.CloseProtocolError)
	cfg = g.config(s, 1)
	cfg.ExhaustedPolicy = 7
	expectRejected(t, cfg, d2m.CloseProtocolError)
	cfg = g.config(s, 1)
	cfg.ExpectedState = d2mclient.Expect(2)
	expectRejected(t, cfg, d2m.CloseProtocolError)
	connect(t, s, g.config(s, 1)) // nothing was created by the rejects
}
