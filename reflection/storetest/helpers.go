package storetest

//lint:file-ignore ST1001 the tests read like the store's own code, which names these types unqualified

import (
	"bytes"
	"fmt"
	"slices"
	"testing"
	"time"

	. "d2m-mediator/reflection"
)

// Helpers of the suite: each submits through the Store interface and
// fails the test on an error.

// waitLimit bounds every wait of the suite for a done callback: a lost
// callback fails the test at the request's call site (the failure names
// its line) instead of hanging the package until the binary's timeout.
const waitLimit = 20 * time.Second

// await waits for one value of ch, or fails the test.
func await[T any](t testing.TB, what string, ch <-chan T) T {
	t.Helper()
	timer := time.NewTimer(waitLimit)
	defer timer.Stop()
	select {
	case v := <-ch:
		return v
	case <-timer.C:
		t.Fatalf("%s: no done callback within %v (lost callback?)", what, waitLimit)
		panic("unreachable")
	}
}

// syncWrite submits one write and waits (bounded) for its done.
func syncWrite(t testing.TB, what string, fn func(done func(error))) error {
	t.Helper()
	ch := make(chan error, 1)
	fn(func(err error) { ch <- err })
	return await(t, what, ch)
}

// syncAppend is syncWrite for Append and ReleaseHeld.
func syncAppend(t testing.TB, what string, fn func(done func(AppendResult, error))) (AppendResult, error) {
	t.Helper()
	type out struct {
		res AppendResult
		err error
	}
	ch := make(chan out, 1)
	fn(func(res AppendResult, err error) { ch <- out{res, err} })
	o := await(t, what, ch)
	return o.res, o.err
}

func mustDo(t testing.TB, fn func(done func(error))) {
	t.Helper()
	if err := syncWrite(t, "write", fn); err != nil {
		t.Fatal(err)
	}
}

func putSlots(t testing.TB, s Store, g GroupID, ids ...DeviceID) {
	t.Helper()
	for _, d := range ids {
		sl := Slot{DeviceID: d, DeviceInfo: []byte(fmt.Sprintf("info-%d", d)), Policy: Persistent, CreatedAt: 1}
		mustDo(t, func(done func(error)) { s.PutSlot(g, sl, done) })
	}
}

func appendSync(t testing.TB, s Store, r AppendRequest) AppendResult {
	t.Helper()
	res, err := syncAppend(t, "Append", func(done func(AppendResult, error)) { s.Append(r, done) })
	if err != nil {
		t.Fatalf("Append: %v", err)
	}
	return res
}

func releaseSync(t testing.TB, s Store, g GroupID, sender DeviceID) AppendResult {
	t.Helper()
	res, err := syncAppend(t, "ReleaseHeld", func(done func(AppendResult, error)) { s.ReleaseHeld(g, sender, done) })
	if err != nil {
		t.Fatalf("ReleaseHeld: %v", err)
	}
	return res
}

// ack acks without waiting: an ack takes effect in memory before Ack
// returns.
func ack(s Store, g GroupID, d DeviceID, seq uint64) { s.Ack(g, d, seq, nil) }

func readAll(t testing.TB, s Store, g GroupID, d DeviceID) []Entry {
	t.Helper()
	es, err := s.ReadQueue(g, d, 0, 1<<30)
	if err != nil {
		t.Fatalf("ReadQueue: %v", err)
	}
	return es
}

func wantStats(t testing.TB, s Store, g GroupID, d DeviceID, want QueueStats) {
	t.Helper()
	got, ok := s.QueueStats(g, d)
	if !ok {
		t.Fatalf("QueueStats(%d): slot missing", d)
	}
	if got != want {
		t.Fatalf("QueueStats(%d) = %+v, want %+v", d, got, want)
	}
}

func envelopesEqual(t testing.TB, es []Entry, want ...string) {
	t.Helper()
	if len(es) != len(want) {
		t.Fatalf("got %d entries, want %d", len(es), len(want))
	}
	for i := range es {
		if !bytes.Equal(es[i].Envelope, []byte(want[i])) {
			t.Fatalf("entry %d = %q, want %q", i, es[i].Envelope, want[i])
		}
	}
}

var equalSeqs = slices.Equal[[]uint64]

// waitReclaimed waits until an engine with background deletion has
// deleted every dead entry (at once for the others).
func waitReclaimed(t testing.TB, e Engine, s Store) {
	t.Helper()
	r, ok := e.(Reclaimer)
	if !ok {
		return
	}
	deadline := time.Now().Add(20 * time.Second)
	for r.ReclaimPending(s) {
		if time.Now().After(deadline) {
			t.Fatal("dead log entries not reclaimed")
		}
		time.Sleep(2 * time.Millisecond)
	}
}
