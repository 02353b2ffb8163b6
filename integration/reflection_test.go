package integration

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"testing"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
)

func envelope(i int) []byte { return []byte(fmt.Sprintf("envelope-%06d", i)) }

// expectAck receives the next message and requires a ReflectAck for id.
func expectAck(t testing.TB, c *d2mclient.Client, id uint32) d2m.ReflectAck {
	t.Helper()
	a, err := d2m.DecodeReflectAck(recvType(t, c.Conn, d2m.TypeReflectAck))
	if err != nil || a.ID != id {
		t.Fatalf("ReflectAck %+v %v, want id %d", a, err, id)
	}
	return a
}

func expectReflected(t testing.TB, c *d2mclient.Client, env []byte) d2m.Reflected {
	t.Helper()
	r, err := d2m.DecodeReflected(recvType(t, c.Conn, d2m.TypeReflected))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(r.Envelope, env) {
		t.Fatalf("envelope %q, want %q", r.Envelope, env)
	}
	return r
}

func TestReflectOnlineAndOffline(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	// Device 3 exists but is offline.
	c3, _ := connectReady(t, s, g.config(s, 3))
	c3.Close()
	time.Sleep(50 * time.Millisecond)

	var acks []d2m.ReflectAck
	for i := 0; i < 5; i++ {
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		acks = append(acks, expectAck(t, a, id))
	}
	var lastID uint32
	for i := 0; i < 5; i++ {
		r := expectReflected(t, b, envelope(i))
		if r.Timestamp != acks[i].Timestamp {
			t.Fatalf("timestamp %d, ack said %d", r.Timestamp, acks[i].Timestamp)
		}
		if i > 0 && r.ID != lastID+1 {
			t.Fatalf("reflected id %d after %d", r.ID, lastID)
		}
		lastID = r.ID
		b.AckReflected(ctxT(t, time.Second), r.ID)
	}
	// Never to the sender.
	expectSilence(t, a.Conn, 200*time.Millisecond)

	// The offline device gets all five on reconnect, in order, then RQD.
	c3, backlog := connectReady(t, s, g.config(s, 3))
	if c3.ServerInfo.ReflectionQueueLength != 5 || len(backlog) != 5 {
		t.Fatalf("queue length %d, backlog %d", c3.ServerInfo.ReflectionQueueLength, len(backlog))
	}
	for i, r := range backlog {
		if !bytes.Equal(r.Envelope, envelope(i)) || r.Timestamp != acks[i].Timestamp {
			t.Fatalf("backlog %d: %q", i, r.Envelope)
		}
		if binary.LittleEndian.Uint16(d2m.EncodeReflected(r.Flags, r.ID, 0, nil)[6:8]) != 0 {
			t.Fatal("durable entry flagged")
		}
	}
}

func TestRedeliveryOfUnacked(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	for i := 0; i < 4; i++ {
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		expectAck(t, a, id)
	}
	var ids []uint32
	for i := 0; i < 4; i++ {
		ids = append(ids, expectReflected(t, b, envelope(i)).ID)
	}
	// Ack only the first two, then reconnect: the rest come again with
	// their ids.
	b.AckReflected(ctxT(t, time.Second), ids[0])
	b.AckReflected(ctxT(t, time.Second), ids[1])
	time.Sleep(100 * time.Millisecond)
	b.Close()
	b, backlog := connectReady(t, s, g.config(s, 2))
	if len(backlog) != 2 || backlog[0].ID != ids[2] || backlog[1].ID != ids[3] ||
		!bytes.Equal(backlog[0].Envelope, envelope(2)) {
		t.Fatalf("redelivered %v", backlog)
	}
	if b.ServerInfo.ReflectionQueueLength != 2 {
		t.Fatalf("queue length %d", b.ServerInfo.ReflectionQueueLength)
	}
}

func TestAckOrderWithRandomIDs(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	connectReady(t, s, g.config(s, 2))
	var ids []uint32
	for i := 0; i < 200; i++ {
		var b [4]byte
		rand.Read(b[:])
		id := binary.LittleEndian.Uint32(b[:])
		if i%50 == 0 {
			id = 0 // zero and repeated ids are fine
		}
		ids = append(ids, id)
		if err := a.ReflectWithID(ctxT(t, time.Second), id, envelope(i), 0); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range ids {
		expectAck(t, a, id)
	}
}

func TestDryAfterBacklogAndLiveInterleave(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	b.Close()
	const n = 600 // more than the delivery window
	for i := 0; i < n; i++ {
		a.Reflect(ctxT(t, time.Second), envelope(i), 0)
	}
	for i := 0; i < n; i++ {
		recvType(t, a.Conn, d2m.TypeReflectAck)
	}
	b = connect(t, s, g.config(s, 2))
	if b.ServerInfo.ReflectionQueueLength != n {
		t.Fatalf("queue length %d", b.ServerInfo.ReflectionQueueLength)
	}
	got := 0
	for {
		m := recv(t, b.Conn)
		if m.Type == d2m.TypeReflectionQueueDry {
			break
		}
		r, _ := d2m.DecodeReflected(m.Payload)
		if !bytes.Equal(r.Envelope, envelope(got)) {
			t.Fatalf("entry %d: %q", got, r.Envelope)
		}
		got++
		b.AckReflected(ctxT(t, time.Second), r.ID)
	}
	if got != n {
		t.Fatalf("dry after %d of %d", got, n)
	}
}

func TestUnknownAck(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	a.AckReflected(ctxT(t, time.Second), 12345)
	expectClose(t, a.Conn, d2m.CloseUnknownAck)
}

func TestEphemeral(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	c, _ := connectReady(t, s, g.config(s, 3))
	c.Close() // offline: never gets the ephemeral one
	time.Sleep(50 * time.Millisecond)

	id, _ := a.Reflect(ctxT(t, time.Second), []byte("durable-1"), 0)
	a.Reflect(ctxT(t, time.Second), []byte("typing"), d2m.FlagEphemeral)
	id3, _ := a.Reflect(ctxT(t, time.Second), []byte("durable-2"), 0)
	// Acks only for the durable ones, in order.
	expectAck(t, a, id)
	expectAck(t, a, id3)
	r1 := expectReflected(t, b, []byte("durable-1"))
	re := expectReflected(t, b, []byte("typing"))
	r2 := expectReflected(t, b, []byte("durable-2"))
	if !re.Ephemeral() || r1.Ephemeral() || re.ID != r1.ID+1 || r2.ID != re.ID+1 {
		t.Fatalf("ids %d %d %d flags %x", r1.ID, re.ID, r2.ID, re.Flags)
	}
	// Clients ack ephemeral ids anyway: tolerated, no 4012.
	for _, id := range []uint32{r1.ID, re.ID, r2.ID} {
		b.AckReflected(ctxT(t, time.Second), id)
	}
	expectSilence(t, b.Conn, 200*time.Millisecond)
	c, backlog := connectReady(t, s, g.config(s, 3))
	if len(backlog) != 2 || string(backlog[0].Envelope) != "durable-1" || string(backlog[1].Envelope) != "durable-2" {
		t.Fatalf("offline device got %d entries", len(backlog))
	}
	_ = c
}

func TestOversizeEnvelope(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	a.Reflect(ctxT(t, time.Second), make([]byte, d2m.MaxEnvelopeSize+1), 0)
	expectClose(t, a.Conn, d2m.CloseProtocolError)
	// The maximum is fine.
	a, _ = connectReady(t, s, g.config(s, 1))
	id, _ := a.Reflect(ctxT(t, time.Second), make([]byte, d2m.MaxEnvelopeSize), 0)
	expectAck(t, a, id)
}

func TestQueueLimitDropsSlot(t *testing.T) {
	s := startServer(t, "--max-queue-length", "10")
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	b.Close()
	// Device 3 is online but never acks: its queue overflows too.
	c, _ := connectReady(t, s, g.config(s, 3))
	for i := 0; i < 11; i++ {
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		expectAck(t, a, id)
	}
	for i := 0; i < 10; i++ {
		recvType(t, c.Conn, d2m.TypeReflected)
	}
	expectClose(t, c.Conn, d2m.CloseQueueLimit)
	back := g.config(s, 2)
	back.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	expectRejected(t, back, d2m.CloseQueueLimit)
	// Without expecting EXISTING it starts a new, empty slot.
	b, backlog := connectReady(t, s, g.config(s, 2))
	if b.ServerInfo.DeviceSlotState != d2mpb.DeviceSlotState_NEW || len(backlog) != 0 {
		t.Fatalf("state %v backlog %d", b.ServerInfo.DeviceSlotState, len(backlog))
	}
}
