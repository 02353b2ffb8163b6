package pgstore

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"d2m-mediator/internal/faultproxy"
	"d2m-mediator/internal/pgtest"
	"d2m-mediator/reflection"
	"d2m-mediator/reflection/storetest"
)

// A primary that stops answering (a blackholed link): the batch in flight
// fails after the statement timeout, and so does the write queued
// behind it, at the same time, not after a second timeout; once the link
// is back the store works and Check finds it consistent. The statement
// timeout comes from the DSN.
func TestSilentPrimaryFailsQueuedWrites(t *testing.T) {
	dsn := pgtest.Shared(t).NewDatabase(t)
	u, err := url.Parse(dsn)
	if err != nil {
		t.Fatal(err)
	}
	p, err := faultproxy.Start(u.Host)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	u.Host = p.Addr()
	q := u.Query()
	q.Set("statement_timeout", "500ms")
	u.RawQuery = q.Encode()
	ctx := context.Background()
	s, err := Open(ctx, u.String(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.opts.StatementTimeout != 500*time.Millisecond {
		t.Fatalf("statement timeout %v, want the DSN's 500ms", s.opts.StatementTimeout)
	}
	g := storetest.GID(7)
	putSlots(t, s, g, 1, 2)
	p.Blackhole(true)
	type outcome struct {
		err  error
		took time.Duration
	}
	appendAsync := func(env string) <-chan outcome {
		ch := make(chan outcome, 1)
		start := time.Now()
		s.Append(reflection.AppendRequest{Group: g, Sender: 1, Envelope: []byte(env)}, func(_ reflection.AppendResult, err error) {
			ch <- outcome{err, time.Since(start)}
		})
		return ch
	}
	first := appendAsync("in-flight")
	time.Sleep(100 * time.Millisecond) // the first batch is under way (its length, not an order)
	second := appendAsync("queued")
	for name, ch := range map[string]<-chan outcome{"in flight": first, "queued": second} {
		select {
		case o := <-ch:
			if o.err == nil {
				t.Fatalf("%s append through a silent link succeeded", name)
			}
			if o.took > 500*time.Millisecond+300*time.Millisecond {
				t.Errorf("%s append failed after %v, want within the statement timeout (500 ms) + 300 ms: %v", name, o.took, o.err)
			}
			t.Logf("%s append failed after %v: %v", name, o.took.Round(time.Millisecond), o.err)
			if name == "queued" && !strings.Contains(o.err.Error(), "not attempted") {
				t.Errorf("queued append: %v, want it failed unattempted", o.err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s append still pending 10 s into the blackhole", name)
		}
	}
	p.Blackhole(false)
	if _, err := reflection.SyncAppend(func(done func(reflection.AppendResult, error)) {
		s.Append(reflection.AppendRequest{Group: g, Sender: 1, Envelope: []byte("after")}, done)
	}); err != nil {
		t.Fatalf("append after the heal: %v", err)
	}
	if _, err := Check(ctx, dsn); err != nil {
		t.Fatalf("check after the heal: %v", err)
	}
}

// A commit that timed out waiting for a silent synchronous standby is
// settled by ending its backend, which makes it visible on the primary at
// once. Its reflections must not be read (and so delivered) before the
// standby has them: a failover then would lose what devices received and
// give the ids to other envelopes. While the standby stays silent the
// store reads nothing of it and fails the next writes; once the standby
// is back everything appears, in order, with consecutive seqs.
func TestSettledCommitWaitsForTheStandby(t *testing.T) {
	t.Parallel()
	c := pgtest.Start(t, pgtest.Options{Standby: true, ReplicationProxy: true})
	dsn := c.NewDatabase(t)
	ctx := context.Background()
	s, err := Open(ctx, dsn, Options{StatementTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	g := storetest.GID(11)
	putSlots(t, s, g, 1, 2)
	appendOne := func(env string) error { return appendEnvelope(s, g, env) }
	queued := func() []string {
		es, err := s.ReadQueue(g, 2, 0, 1<<20)
		if err != nil {
			return []string{"error: " + err.Error()}
		}
		var out []string
		for i, e := range es {
			if e.Seq != uint64(i+1) {
				t.Errorf("entry %d has seq %d", i, e.Seq)
			}
			out = append(out, string(e.Envelope))
		}
		return out
	}
	if err := appendOne("acked"); err != nil {
		t.Fatal(err)
	}
	if got := queued(); len(got) != 1 || got[0] != "acked" {
		t.Fatalf("queue before the fault: %q", got)
	}
	c.Replication.Blackhole(true)
	if err := appendOne("unknown"); err == nil {
		t.Fatal("an append acked while the synchronous standby was silent")
	}
	// A write to another shard settles "unknown" first, then fails too
	// (the standby is still silent): "unknown"'s shard must stay unread.
	h := storetest.GID(12)
	if h[0] == g[0] {
		t.Fatal("the two groups share a shard")
	}
	if err := reflection.Sync(func(done func(error)) { s.PutSlot(h, reflection.Slot{DeviceID: 1, CreatedAt: 1}, done) }); err == nil {
		t.Fatal("a write to another shard acked while the synchronous standby was silent")
	}
	if got := queued(); len(got) > 1 || len(got) == 1 && got[0] != "acked" {
		t.Fatalf("after a write to another shard the queue reads %q: a commit the standby does not have is readable", got)
	}
	// The next writes of the group settle "unknown" first; the standby is
	// still silent.
	for i := range 3 {
		if err := appendOne(fmt.Sprintf("behind-%d", i)); err == nil {
			t.Fatalf("append %d acked while the synchronous standby was silent", i)
		}
		// The failed commits' shard is read again from the database,
		// which the store refuses while the settled commit waits for the
		// standby: the queue reads empty (nothing to deliver now), never
		// with "unknown" in it.
		if got := queued(); len(got) > 1 || len(got) == 1 && got[0] != "acked" {
			t.Fatalf("after settle attempt %d the queue reads %q: a commit the standby does not have is readable", i, got)
		}
		if _, err := s.Group(g); err == nil {
			t.Fatalf("after settle attempt %d the group's state reads from a database the standby is behind", i)
		}
	}
	c.Replication.Blackhole(false)
	if err := appendOne("after"); err != nil {
		t.Fatalf("append after the standby is back: %v", err)
	}
	got := queued()
	if len(got) < 3 || got[0] != "acked" || got[1] != "unknown" || got[len(got)-1] != "after" {
		t.Fatalf("queue after the heal: %q, want acked, unknown, …, after", got)
	}
	t.Logf("queue after the heal: %q", got)
	if _, err := Check(ctx, dsn); err != nil {
		t.Fatal(err)
	}
}
