package mediator_test

import (
	"bytes"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/mediator"
	"d2m-mediator/mediator/mediatortest"
	"d2m-mediator/reflection"
)

// relayStore hands the store's completions of Append to one relay
// goroutine, in order, so that a test can hold completions back while the
// committer goes on committing: the state the store has published then
// runs ahead of the completions the server has handled, which is the
// window in which an entry could overtake an ephemeral reflection
// numbered before it (docs/protocol.md §18 row 4).
type relayStore struct {
	reflection.Store
	mu     sync.Mutex
	paused bool
	held   []func()
	heldCh chan struct{} // a completion was held
}

func (s *relayStore) Append(r reflection.AppendRequest, done func(reflection.AppendResult, error)) {
	s.Store.Append(r, func(res reflection.AppendResult, err error) {
		s.mu.Lock()
		if s.paused {
			s.held = append(s.held, func() { done(res, err) })
			s.mu.Unlock()
			s.heldCh <- struct{}{}
			return
		}
		s.mu.Unlock()
		done(res, err)
	})
}

// pause holds every later Append completion until resume.
func (s *relayStore) pause() {
	s.mu.Lock()
	s.paused = true
	s.mu.Unlock()
}

// resume runs the held completions in order, on one goroutine, as the
// committer would have.
func (s *relayStore) resume() {
	s.mu.Lock()
	held := s.held
	s.held, s.paused = nil, false
	s.mu.Unlock()
	for _, f := range held {
		f()
	}
}

// TestEphemeralKeepsQueueOrderWhileCompletionsLag reproduces the ordering
// race deterministically: an ephemeral and a durable reflection are
// committed, their completions are held, and the recipient's writer is
// woken (by its own ack). It must not send the durable entry before the
// ephemeral one numbered ahead of it.
func TestEphemeralKeepsQueueOrderWhileCompletionsLag(t *testing.T) {
	db, err := reflection.Open(filepath.Join(t.TempDir(), "mediator.db"), reflection.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	rs := &relayStore{Store: db, heldCh: make(chan struct{}, 16)}
	srv := mediatortest.NewServer(t, mediator.Config{}, mediatortest.WithStore(rs))
	keys := newKeys()
	a, _ := readyDevice(t, srv.URL, keys, 1)
	b, _ := readyDevice(t, srv.URL, keys, 2)

	a.reflectAcked([]byte("durable-1"))
	m := b.next()
	r1, err := d2m.DecodeReflected(m.Payload)
	if m.Type != d2m.TypeReflected || err != nil || string(r1.Envelope) != "durable-1" {
		t.Fatalf("got %v %q", m.Type, r1.Envelope)
	}

	rs.pause()
	if _, err := a.Reflect(tctx(t, time.Second), []byte("typing"), d2m.FlagEphemeral); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Reflect(tctx(t, time.Second), []byte("durable-2"), 0); err != nil {
		t.Fatal(err)
	}
	// Both are committed (their completions are held), so the store
	// already serves durable-2 to a reader.
	<-rs.heldCh
	<-rs.heldCh
	// The ack wakes b's writer with durable-2 readable in the store.
	if err := b.AckReflected(tctx(t, time.Second), r1.ID); err != nil {
		t.Fatal(err)
	}
	expectNothing(t, b, 200*time.Millisecond)
	rs.resume()

	re := b.next()
	rd := b.next()
	eph, _ := d2m.DecodeReflected(re.Payload)
	dur, _ := d2m.DecodeReflected(rd.Payload)
	if !bytes.Equal(eph.Envelope, []byte("typing")) || !bytes.Equal(dur.Envelope, []byte("durable-2")) {
		t.Fatalf("order: %q then %q, want typing then durable-2", eph.Envelope, dur.Envelope)
	}
	if !eph.Ephemeral() || eph.ID != r1.ID+1 || dur.ID != r1.ID+2 {
		t.Fatalf("ids %d (ephemeral %v) %d after %d", eph.ID, eph.Ephemeral(), dur.ID, r1.ID)
	}
}

// expectNothing requires that no message other than ReflectAck or
// RolePromotedToLeader arrives within d.
func expectNothing(t *testing.T, d *device, within time.Duration) {
	t.Helper()
	for {
		m, err := d.Recv(tctx(t, within))
		if err != nil {
			return
		}
		if m.Type != d2m.TypeReflectAck && m.Type != d2m.TypeRolePromotedToLeader {
			r, _ := d2m.DecodeReflected(m.Payload)
			t.Fatalf("device %d: got %v %q while completions were held", d.DeviceID(), m.Type, r.Envelope)
		}
	}
}
