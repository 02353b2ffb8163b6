package integration

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/internal/pgtest"
	"d2m-mediator/proto/d2mpb"
)

// The tests of the PostgreSQL store run the real binary with --store on
// real PostgreSQL servers (package pgtest): a shared primary with a
// synchronous standby where nothing is stopped, a private cluster where a
// test stops or kills a server (commits on the shared primary would block
// for every other test while its standby is down).

// startupStore is the store field of the server's last startup line.
func startupStore(t testing.TB, s *server) string {
	t.Helper()
	var store string
	for _, line := range strings.Split(s.Logs(), "\n") {
		if !strings.Contains(line, `"mediator listening"`) {
			continue
		}
		var v struct{ Store string }
		if err := json.Unmarshal([]byte(line), &v); err != nil {
			t.Fatalf("startup line %q: %v", line, err)
		}
		store = v.Store
	}
	if store == "" {
		t.Fatalf("no store field in a startup line:\n%s", s.Logs())
	}
	return store
}

// storeDSN is the --store the server was started with, "" for bbolt.
func (s *server) storeDSN() string {
	for i, a := range s.args {
		if (a == "--store" || a == "-store") && i+1 < len(s.args) {
			return s.args[i+1]
		}
	}
	return ""
}

// pgCheck runs `mediator db check DSN` and requires exit 0.
func pgCheck(t *testing.T, dsn string) {
	t.Helper()
	out, code := runMediator(t, nil, "db", "check", dsn)
	if code != 0 || !strings.HasPrefix(out, "ok: ") {
		t.Fatalf("mediator db check %s: exit %d:\n%s", dsn, code, out)
	}
	t.Logf("mediator db check: %s", strings.TrimSpace(out))
}

// reflectAcked reflects envelope(i) from c and requires its ReflectAck,
// returning the ack.
func reflectAcked(t testing.TB, c *d2mclient.Client, i int) d2m.ReflectAck {
	t.Helper()
	id, err := c.Reflect(ctxT(t, time.Second), envelope(i), 0)
	if err != nil {
		t.Fatal(err)
	}
	return expectAck(t, c, id)
}

// TestPostgresReflectRoundTrip: the binary on a PostgreSQL store names it
// and its synchronous standby in the startup line; 200 reflections reach
// the other device in order with consecutive ids; after a clean restart
// exactly the entries the device did not ack come again, with their ids.
func TestPostgresReflectRoundTrip(t *testing.T) {
	dsn := pgtest.Shared(t).NewDatabase(t)
	s := startServer(t, "--store", dsn)
	store := startupStore(t, s)
	if !strings.HasPrefix(store, "postgres ") || !strings.Contains(store, "synchronous standby") ||
		strings.Contains(store, "asynchronous") {
		t.Fatalf("startup store field %q, want postgres … (synchronous standby …)", store)
	}

	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	const n, acked = 200, 150
	ids := make([]uint32, n)
	for i := range n {
		var err error
		if ids[i], err = a.Reflect(ctxT(t, time.Second), envelope(i), 0); err != nil {
			t.Fatal(err)
		}
	}
	acks := make([]d2m.ReflectAck, n)
	for i := range n {
		acks[i] = expectAck(t, a, ids[i])
	}
	got := make([]d2m.Reflected, n)
	for i := range n {
		got[i] = expectReflected(t, b, envelope(i))
		if got[i].Timestamp != acks[i].Timestamp {
			t.Fatalf("entry %d: timestamp %d, ack said %d", i, got[i].Timestamp, acks[i].Timestamp)
		}
		if i > 0 && got[i].ID != got[i-1].ID+1 {
			t.Fatalf("entry %d: id %d after %d", i, got[i].ID, got[i-1].ID)
		}
		if i < acked {
			if err := b.AckReflected(ctxT(t, time.Second), got[i].ID); err != nil {
				t.Fatal(err)
			}
		}
	}
	expectSilence(t, a.Conn, 100*time.Millisecond) // never to the sender
	// A request answered after the acks: the server has handled them.
	devicesInfo(t, b)

	s.stop()
	s.start()
	store2 := startupStore(t, s)
	if store2 != store {
		t.Fatalf("store field %q after the restart, %q before", store2, store)
	}
	exist := d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	cfgB := g.config(s, 2)
	cfgB.ExpectedState = exist
	b2, backlog := connectReady(t, s, cfgB)
	if b2.ServerInfo.ReflectionQueueLength != n-acked || len(backlog) != n-acked {
		t.Fatalf("after the restart: queue length %d, backlog %d, want the %d unacked",
			b2.ServerInfo.ReflectionQueueLength, len(backlog), n-acked)
	}
	for j, r := range backlog {
		i := acked + j
		if r.ID != got[i].ID || !bytes.Equal(r.Envelope, envelope(i)) || r.Timestamp != got[i].Timestamp {
			t.Fatalf("redelivery %d: id %d %q ts %d, want id %d %q ts %d",
				j, r.ID, r.Envelope, r.Timestamp, got[i].ID, envelope(i), got[i].Timestamp)
		}
	}
	cfgA := g.config(s, 1)
	cfgA.ExpectedState = exist
	a2, backlogA := connectReady(t, s, cfgA)
	if len(backlogA) != 0 {
		t.Fatalf("the sender got %d entries after the restart", len(backlogA))
	}
	// Live again: the next reflection follows on with the next id.
	reflectAcked(t, a2, n)
	if r := expectReflected(t, b2, envelope(n)); r.ID != got[n-1].ID+1 {
		t.Fatalf("after the restart: id %d, want %d", r.ID, got[n-1].ID+1)
	}
}

// TestPostgresCrashLoop is TestCrashLoop on a PostgreSQL store: SIGKILL
// under reflect load, restart on the same database, every acked
// reflection delivered in order, then `mediator db check DSN` passes
// (runCrashLoop says what is asserted). PG_CRASH_ITERATIONS runs (5 by
// default, 3 with -short).
func TestPostgresCrashLoop(t *testing.T) {
	dsn := pgtest.Shared(t).NewDatabase(t)
	iterations := envIterations("PG_CRASH_ITERATIONS", 5, 3)
	s := startServer(t, "--store", dsn)
	runCrashLoop(t, s, iterations, "SIGKILLs", s.kill)
}

// TestPostgresRefusesAsyncPrimary: a primary without a synchronous standby
// is refused unless --store-allow-async, and then the startup line says
// the acks are asynchronous.
func TestPostgresRefusesAsyncPrimary(t *testing.T) {
	c := pgtest.Start(t, pgtest.Options{})
	dsn := c.NewDatabase(t)
	out, code := runMediator(t, nil, "serve", "--store", dsn, "--data", t.TempDir(),
		"--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json")
	if code == 0 || !strings.Contains(out, "synchronous standby") || !strings.Contains(out, "--store-allow-async") {
		t.Fatalf("serve on an asynchronous primary: exit %d, want non-zero naming the synchronous standby and --store-allow-async:\n%s", code, out)
	}
	if strings.Contains(out, "mediator listening") {
		t.Fatalf("the server listened before refusing:\n%s", out)
	}

	s := startServer(t, "--store", dsn, "--store-allow-async")
	if store := startupStore(t, s); !strings.HasPrefix(store, "postgres ") || !strings.Contains(store, "asynchronous") {
		t.Fatalf("startup store field %q, want postgres … (asynchronous …)", store)
	}
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	reflectAcked(t, a, 0)
	expectReflected(t, b, envelope(0))
}

// TestPostgresStandbyDown: while the synchronous standby is down a commit
// cannot finish, so a Reflect gets no ReflectAck and the other device gets
// nothing; when the standby is back the commit finishes and both arrive,
// with the next id.
func TestPostgresStandbyDown(t *testing.T) {
	c, _, _, _, a, b, first := outagePair(t)

	c.Standby.Kill(t)
	id, err := a.Reflect(ctxT(t, time.Second), envelope(1), 0)
	if err != nil {
		t.Fatal(err)
	}
	down := time.Now()
	expectSilence(t, a.Conn, 2*time.Second)
	expectSilence(t, b.Conn, 100*time.Millisecond)

	c.Standby.Start(t)
	c.WaitSync(t)
	expectAck(t, a, id)
	t.Logf("ReflectAck %v after the standby went down", time.Since(down).Round(time.Millisecond))
	if r := expectReflected(t, b, envelope(1)); r.ID != first.ID+1 {
		t.Fatalf("id %d after the standby was back, want %d", r.ID, first.ID+1)
	}
	reflectAcked(t, a, 2)
	if r := expectReflected(t, b, envelope(2)); r.ID != first.ID+2 {
		t.Fatalf("id %d, want %d", r.ID, first.ID+2)
	}
}

// TestPostgresPrimaryDown: with the primary stopped a Reflect cannot
// commit, so its sender gets no ReflectAck (it is closed with 1011) and
// the other device never gets the reflection; when the primary (and its
// standby) are back the pool reconnects, the devices reconnect and
// reflect, and ids go on without a gap.
func TestPostgresPrimaryDown(t *testing.T) {
	c, dsn, s, g, a, b, first := outagePair(t)

	c.Primary.Stop(t)
	reflectUntilClosed(t, a, 1, "the primary down")

	c.Primary.Start(t)
	c.WaitSync(t)

	exist := d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	cfgA := g.config(s, 1)
	cfgA.ExpectedState = exist
	a2, backlogA := connectReady(t, s, cfgA)
	if len(backlogA) != 0 {
		t.Fatalf("sender got %d entries on reconnect", len(backlogA))
	}
	reflectAcked(t, a2, 2)
	// b: still connected, or closed meanwhile; either way it gets #2 with
	// the id after #0, and never #1.
	var next d2m.Reflected
	select {
	case <-b.Conn.Done():
		t.Logf("receiver was closed with %d (%v) while the primary was down", b.Conn.CloseCode(ctxT(t, time.Second)), b.Conn.Err())
		cfgB := g.config(s, 2)
		cfgB.ExpectedState = exist
		_, backlog := connectReady(t, s, cfgB)
		if len(backlog) != 1 {
			t.Fatalf("receiver backlog %d entries, want 1 (#2)", len(backlog))
		}
		next = backlog[0]
	default:
		next = expectReflected(t, b, envelope(2))
	}
	if !bytes.Equal(next.Envelope, envelope(2)) || next.ID != first.ID+1 {
		t.Fatalf("receiver got id %d %q, want id %d %q", next.ID, next.Envelope, first.ID+1, envelope(2))
	}
	if out := s.Logs(); strings.Contains(out, "panic") {
		t.Fatalf("the server logged a panic:\n%s", tailString(out, 8000))
	}
	s.stop()
	pgCheck(t, dsn)
}

// TestPostgresLongStandbyOutage: the standby stays down longer than a
// commit may take (the 5 s statement timeout), so the sender is
// closed with 1011 without a ReflectAck, although PostgreSQL has already
// committed the reflection locally and finishes the commit once the
// standby is back. The store must come out of that state: after the
// outage the group reflects again, ids go on without a gap or a
// repetition, and `mediator db check` passes.
//
// The store settles such a commit before its next batch (it terminates
// the backend that still waits for the standby, so the transaction is
// visible, and reads the shard again); before that fix the group's next
// reflection failed with a duplicate key in d2m_queue for good.
func TestPostgresLongStandbyOutage(t *testing.T) {
	c, dsn, s, g, a, b, first := outagePair(t)

	c.Standby.Kill(t)
	reflectUntilClosed(t, a, 1, "the standby down")
	c.Standby.Start(t)
	c.WaitSync(t)

	cfgA := g.config(s, 1)
	cfgA.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	a2, _ := connectReady(t, s, cfgA)
	reflectAcked(t, a2, 2)
	// #1 was not acked, but PostgreSQL committed it: it may reach b,
	// before #2 and with the next id.
	want := first.ID + 1
	r, err := d2m.DecodeReflected(recvType(t, b.Conn, d2m.TypeReflected))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(r.Envelope, envelope(1)) {
		if r.ID != want {
			t.Fatalf("#1 with id %d, want %d", r.ID, want)
		}
		want++
		r = expectReflected(t, b, envelope(2))
	}
	if !bytes.Equal(r.Envelope, envelope(2)) || r.ID != want {
		t.Fatalf("got id %d %q, want id %d %q", r.ID, r.Envelope, want, envelope(2))
	}
	s.stop()
	pgCheck(t, dsn)
}

// outagePair starts a server on a private primary with a synchronous
// standby, and two devices of one group that have passed one reflection
// (a to b, acked by b).
func outagePair(t *testing.T) (*pgtest.Cluster, string, *server, *group, *d2mclient.Client, *d2mclient.Client, d2m.Reflected) {
	t.Helper()
	c := pgtest.Start(t, pgtest.Options{Standby: true})
	dsn := c.NewDatabase(t)
	s := startServer(t, "--store", dsn)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	reflectAcked(t, a, 0)
	first := expectReflected(t, b, envelope(0))
	b.AckReflected(ctxT(t, time.Second), first.ID)
	devicesInfo(t, b)
	return c, dsn, s, g, a, b, first
}

// reflectUntilClosed sends reflection i from a while the store cannot
// commit (what names the outage) and reads until a is closed: no
// ReflectAck may come, only a leader promotion, and the close is 1011.
func reflectUntilClosed(t *testing.T, a *d2mclient.Client, i int, what string) {
	t.Helper()
	if _, err := a.Reflect(ctxT(t, time.Second), envelope(i), 0); err != nil {
		t.Fatal(err)
	}
	for {
		m, err := a.Conn.Recv(ctxT(t, 30*time.Second))
		if errors.Is(err, d2mclient.ErrClosed) {
			break
		}
		if err != nil {
			t.Fatalf("sender neither acked nor closed with %s: %v", what, err)
		}
		if m.Type == d2m.TypeReflectAck {
			t.Fatalf("ReflectAck with %s", what)
		}
		if m.Type != d2m.TypeRolePromotedToLeader {
			t.Fatalf("unexpected %v with %s", m.Type, what)
		}
	}
	if code := a.Conn.CloseCode(ctxT(t, time.Second)); code != int(d2m.CloseInternalError) {
		t.Fatalf("sender closed with %d (%v), want 1011", code, a.Conn.Err())
	}
}
