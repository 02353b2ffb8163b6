package pgstore

import (
	"context"
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
	for _, d := range []reflection.DeviceID{1, 2} {
		if err := reflection.Sync(func(done func(error)) { s.PutSlot(g, reflection.Slot{DeviceID: d, CreatedAt: 1}, done) }); err != nil {
			t.Fatal(err)
		}
	}
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
