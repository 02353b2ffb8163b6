package integration

import (
	"bytes"
	"testing"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
)

func begin(t testing.TB, c *d2mclient.Client, scope []byte, ttl uint32) {
	t.Helper()
	if err := c.SendMessage(ctxT(t, time.Second), d2m.TypeBeginTransaction, &d2mpb.BeginTransaction{EncryptedScope: scope, Ttl: ttl}); err != nil {
		t.Fatal(err)
	}
}

func commit(t testing.TB, c *d2mclient.Client) {
	t.Helper()
	if err := c.SendMessage(ctxT(t, time.Second), d2m.TypeCommitTransaction, &d2mpb.CommitTransaction{}); err != nil {
		t.Fatal(err)
	}
}

func expectEnded(t testing.TB, c *d2mclient.Client, holder uint64, scope []byte) {
	t.Helper()
	m, err := d2m.DecodeTransactionEnded(recvType(t, c.Conn, d2m.TypeTransactionEnded))
	if err != nil || m.DeviceId != holder || !bytes.Equal(m.EncryptedScope, scope) {
		t.Fatalf("TransactionEnded %v %v", m, err)
	}
}

func TestTransactionBeginRejectCommit(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	c, _ := connectReady(t, s, g.config(s, 3))
	scopeA := []byte("scope-of-a")
	begin(t, a, scopeA, 0)
	recvType(t, a.Conn, d2m.TypeBeginTransactionAck)

	begin(t, b, []byte("scope-of-b"), 0)
	rej, err := d2m.DecodeTransactionRejected(recvType(t, b.Conn, d2m.TypeTransactionRejected))
	if err != nil || rej.DeviceId != 1 || !bytes.Equal(rej.EncryptedScope, scopeA) {
		t.Fatalf("rejected %v %v", rej, err)
	}
	// Reflections by the holder are acked at once but held.
	id, _ := a.Reflect(ctxT(t, time.Second), []byte("held-1"), 0)
	expectAck(t, a, id)
	// A non-holder's reflection is delivered normally meanwhile.
	idb, _ := b.Reflect(ctxT(t, time.Second), []byte("free"), 0)
	expectAck(t, b, idb)
	expectReflected(t, c, []byte("free"))
	expectSilence(t, c.Conn, 150*time.Millisecond)

	expectReflected(t, a, []byte("free")) // the holder is another device for b
	commit(t, a)
	recvType(t, a.Conn, d2m.TypeCommitTransactionAck)
	// Held reflections reach the queues before TransactionEnded.
	expectReflected(t, b, []byte("held-1"))
	expectEnded(t, b, 1, scopeA)
	expectReflected(t, c, []byte("held-1"))
	expectEnded(t, c, 1, scopeA)
	expectSilence(t, a.Conn, 150*time.Millisecond)

	// Now b gets the lock.
	begin(t, b, []byte("scope-of-b"), 0)
	recvType(t, b.Conn, d2m.TypeBeginTransactionAck)
}

func TestTransactionProtocolErrors(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	commit(t, a)
	expectClose(t, a.Conn, d2m.CloseProtocolError)

	a, _ = connectReady(t, s, g.config(s, 1))
	begin(t, a, []byte("s"), 0)
	recvType(t, a.Conn, d2m.TypeBeginTransactionAck)
	begin(t, a, []byte("s"), 0)
	expectClose(t, a.Conn, d2m.CloseProtocolError)
}

func TestTransactionTTL(t *testing.T) {
	s := startServer(t, "--max-transaction-ttl", "1s")
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	begin(t, a, []byte("s"), 0) // 0 means the server maximum (1s here)
	recvType(t, a.Conn, d2m.TypeBeginTransactionAck)
	id, _ := a.Reflect(ctxT(t, time.Second), []byte("held"), 0)
	expectAck(t, a, id)
	start := time.Now()
	expectClose(t, a.Conn, d2m.CloseTransactionTTL)
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("ttl close after %v", d)
	}
	// Ended without commit: the held reflection is still delivered, first.
	expectReflected(t, b, []byte("held"))
	expectEnded(t, b, 1, []byte("s"))

	// A client TTL below the maximum wins.
	c, _ := connectReady(t, s, g.config(s, 3))
	_ = c
}

func TestTransactionHolderDisconnects(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	begin(t, a, []byte("scope"), 0)
	recvType(t, a.Conn, d2m.TypeBeginTransactionAck)
	id, _ := a.Reflect(ctxT(t, time.Second), []byte("held"), 0)
	expectAck(t, a, id)
	a.CloseNow()
	expectReflected(t, b, []byte("held"))
	expectEnded(t, b, 1, []byte("scope"))
}

func TestHeldReflectionsSurviveCrash(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	b.Close()
	begin(t, a, []byte("scope"), 0)
	recvType(t, a.Conn, d2m.TypeBeginTransactionAck)
	for i := 0; i < 3; i++ {
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		expectAck(t, a, id)
	}
	s.restart() // SIGKILL mid-transaction
	_, backlog := connectReady(t, s, g.config(s, 2))
	if len(backlog) != 3 {
		t.Fatalf("after crash: %d held reflections delivered", len(backlog))
	}
	for i, r := range backlog {
		if !bytes.Equal(r.Envelope, envelope(i)) {
			t.Fatalf("entry %d: %q", i, r.Envelope)
		}
	}
}

func TestDropSelfMidTransaction(t *testing.T) {
	s := startServer(t)
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
	expectClose(t, a.Conn, d2m.CloseDropped)
	expectReflected(t, b, []byte("held"))
	expectEnded(t, b, 1, []byte("scope"))
	info := devicesInfo(t, b)
	if _, ok := info[1]; ok || len(info) != 1 {
		t.Fatalf("slots after self-drop: %v", keys(info))
	}
}
