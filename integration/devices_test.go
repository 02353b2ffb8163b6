package integration

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
)

func TestDevicesInfoAndDrop(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	cfgA := g.config(s, 1)
	cfgA.DeviceInfo = []byte("info-a")
	a, _ := connectReady(t, s, cfgA)
	cfgB := g.config(s, 2)
	cfgB.DeviceInfo = []byte("info-b")
	cfgB.ExpirationPolicy = d2mpb.DeviceSlotExpirationPolicy_VOLATILE
	b, _ := connectReady(t, s, cfgB)
	cfgC := g.config(s, 3)
	cfgC.DeviceInfo = []byte("info-c")
	c, _ := connectReady(t, s, cfgC)
	c.Close()
	time.Sleep(100 * time.Millisecond)

	info := devicesInfo(t, a)
	if len(info) != 3 {
		t.Fatalf("slots %v", keys(info))
	}
	if !bytes.Equal(info[1].EncryptedDeviceInfo, []byte("info-a")) || info[1].GetConnectedSince() == 0 {
		t.Fatalf("self entry %v", info[1])
	}
	if info[2].DeviceSlotExpirationPolicy != d2mpb.DeviceSlotExpirationPolicy_VOLATILE || info[2].GetConnectedSince() == 0 {
		t.Fatalf("device 2 entry %v", info[2])
	}
	if info[3].GetLastDisconnectAt() == 0 || info[3].GetConnectedSince() != 0 {
		t.Fatalf("offline entry %v", info[3])
	}

	// Drop the connected device 2: it gets 4113, then the requester the ack.
	a.SendMessage(ctxT(t, time.Second), d2m.TypeDropDevice, &d2mpb.DropDevice{DeviceId: 2})
	expectClose(t, b.Conn, d2m.CloseDropped)
	ack, _ := d2m.DecodeDropDeviceAck(recvType(t, a.Conn, d2m.TypeDropDeviceAck))
	if ack.DeviceId != 2 {
		t.Fatalf("ack %v", ack)
	}
	// Unknown ids are acked too (idempotent).
	a.SendMessage(ctxT(t, time.Second), d2m.TypeDropDevice, &d2mpb.DropDevice{DeviceId: 99})
	ack, _ = d2m.DecodeDropDeviceAck(recvType(t, a.Conn, d2m.TypeDropDeviceAck))
	if ack.DeviceId != 99 {
		t.Fatalf("ack %v", ack)
	}
	if info := devicesInfo(t, a); len(info) != 2 {
		t.Fatalf("after drop: %v", keys(info))
	}
	// The dropped device learns why when it comes back expecting EXISTING.
	back := g.config(s, 2)
	back.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	expectRejected(t, back, d2m.CloseDropped)
}

func TestSharedDeviceData(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	if len(a.ServerInfo.EncryptedSharedDeviceData) != 0 {
		t.Fatal("shared data before any was set")
	}
	a.SendMessage(ctxT(t, time.Second), d2m.TypeSetSharedDeviceData, &d2mpb.SetSharedDeviceData{EncryptedSharedDeviceData: []byte("sdd-1")})
	// No ack exists; a round trip through GetDevicesInfo orders it.
	devicesInfo(t, a)
	b := connect(t, s, g.config(s, 2))
	if !bytes.Equal(b.ServerInfo.EncryptedSharedDeviceData, []byte("sdd-1")) {
		t.Fatalf("shared data %q", b.ServerInfo.EncryptedSharedDeviceData)
	}
	time.Sleep(100 * time.Millisecond)
	s.restart()
	c := connect(t, s, g.config(s, 3))
	if !bytes.Equal(c.ServerInfo.EncryptedSharedDeviceData, []byte("sdd-1")) {
		t.Fatalf("after restart: %q", c.ServerInfo.EncryptedSharedDeviceData)
	}
}

func TestSlotsSurviveRestart(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	cfg := g.config(s, 1)
	cfg.DeviceInfo = []byte("info-1")
	a, _ := connectReady(t, s, cfg)
	b, _ := connectReady(t, s, g.config(s, 2))
	b.Close()
	a.SendMessage(ctxT(t, time.Second), d2m.TypeDropDevice, &d2mpb.DropDevice{DeviceId: 2})
	recvType(t, a.Conn, d2m.TypeDropDeviceAck)
	s.restart() // SIGKILL while device 1 is connected

	cfg.URL = s.wsURL // new port after the restart
	cfg.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	a, _ = connectReady(t, s, cfg)
	info := devicesInfo(t, a)
	if len(info) != 1 || !bytes.Equal(info[1].EncryptedDeviceInfo, []byte("info-1")) {
		t.Fatalf("after restart: %v", info)
	}
	back := g.config(s, 2)
	back.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	expectRejected(t, back, d2m.CloseDropped) // the tombstone survived too
}

func TestVolatileSlotExpires(t *testing.T) {
	s := startServer(t, "--volatile-slot-grace", "300ms")
	g := newGroup()
	cfg := g.config(s, 1)
	cfg.ExpirationPolicy = d2mpb.DeviceSlotExpirationPolicy_VOLATILE
	a, _ := connectReady(t, s, cfg)
	keep, _ := connectReady(t, s, g.config(s, 2))
	a.Close()
	time.Sleep(1500 * time.Millisecond)
	if info := devicesInfo(t, keep); len(info) != 1 {
		t.Fatalf("volatile slot still there: %v", keys(info))
	}
	cfg.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	expectRejected(t, cfg, d2m.CloseSlotStateMismatch)
}

func TestGracefulShutdownSends1001(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	done := make(chan struct{})
	go func() { s.stop(); close(done) }()
	expectClose(t, a.Conn, d2m.CloseGoingAway)
	expectClose(t, b.Conn, d2m.CloseGoingAway)
	<-done
}

// TestAckedReflectionsSurviveSIGKILL is the durability promise: every
// reflection whose ReflectAck the sender saw is delivered after a SIGKILL.
func TestAckedReflectionsSurviveSIGKILL(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	const senders = 4
	var clients []*d2mclient.Client
	for i := 1; i <= senders; i++ {
		c, _ := connectReady(t, s, g.config(s, uint64(i)))
		clients = append(clients, c)
	}
	offline, _ := connectReady(t, s, g.config(s, 100))
	offline.Close()
	time.Sleep(50 * time.Millisecond)

	var mu sync.Mutex
	acked := map[string]bool{}
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ids := map[uint32]string{}
			sent := 0
			deadline := time.Now().Add(time.Second)
			for time.Now().Before(deadline) || sent < 20 {
				env := fmt.Sprintf("sender-%d-msg-%d", i, sent)
				id, err := c.Reflect(ctxT(t, time.Second), []byte(env), 0)
				if err != nil {
					return
				}
				ids[id] = env
				sent++
				for {
					m, err := c.Recv(ctxT(t, 5*time.Second))
					if err != nil {
						return
					}
					if m.Type == d2m.TypeReflectAck {
						a, _ := d2m.DecodeReflectAck(m.Payload)
						mu.Lock()
						acked[ids[a.ID]] = true
						mu.Unlock()
						break
					}
				}
			}
		}()
	}
	wg.Wait()
	s.restart() // SIGKILL right after the last acks
	_, backlog := connectReady(t, s, g.config(s, 100))
	got := map[string]bool{}
	for _, r := range backlog {
		got[string(r.Envelope)] = true
	}
	mu.Lock()
	defer mu.Unlock()
	if len(acked) < senders*20 {
		t.Fatalf("only %d acks", len(acked))
	}
	for env := range acked {
		if !got[env] {
			t.Errorf("acked reflection %q lost", env)
		}
	}
	t.Logf("%d acked reflections, all delivered after SIGKILL", len(acked))
}
