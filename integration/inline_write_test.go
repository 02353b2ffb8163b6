package integration

// Frames are written by the goroutine that queued them when no writer
// goroutine runs (mediator/flush.go): the store's committer for the
// ReflectAcks and deliveries of a commit, up to 32 connections per commit;
// writer goroutines for larger commits.

import (
	"sync"
	"testing"
	"time"

	"d2m-mediator/d2m/d2mclient"
)

// TestReflectRoundTripsStartNoGoroutines: a reflect's ReflectAck, its
// Reflected and the ReflectedAck's effect need no goroutine on the server
// when nothing else is going on (before: three per round trip).
func TestReflectRoundTripsStartNoGoroutines(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	created := func() float64 {
		_, body := s.adminGet("/metrics")
		v, ok := metricValue(body, "go_sched_goroutines_created_goroutines_total")
		if !ok {
			t.Fatal("no go_sched_goroutines_created_goroutines_total in /metrics")
		}
		return v
	}
	const n = 50
	before := created()
	for i := 0; i < n; i++ {
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		expectAck(t, a, id)
		r := expectReflected(t, b, envelope(i))
		b.AckReflected(ctxT(t, time.Second), r.ID)
	}
	// The metrics scrapes themselves start a few (net/http).
	if got := created() - before; got > n/5 {
		t.Fatalf("%v goroutines started for %d reflect round trips", got, n)
	}
}

// TestLargeCommitReachesEveryDevice: 60 senders reflect at once, so
// commits reach more connections than are written inline; every
// ReflectAck and every Reflected arrives.
func TestLargeCommitReachesEveryDevice(t *testing.T) {
	s := startServer(t)
	const groups = 60
	senders := make([]*d2mclient.Client, groups)
	receivers := make([]*d2mclient.Client, groups)
	for i := range groups {
		g := newGroup()
		senders[i], _ = connectReady(t, s, g.config(s, 1))
		receivers[i], _ = connectReady(t, s, g.config(s, 2))
	}
	for round := 0; round < 5; round++ {
		var wg sync.WaitGroup
		for i := range groups {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id, err := senders[i].Reflect(ctxT(t, 5*time.Second), envelope(round*groups+i), 0)
				if err != nil {
					t.Error(err)
				}
				expectAck(t, senders[i], id)
				r := expectReflected(t, receivers[i], envelope(round*groups+i))
				receivers[i].AckReflected(ctxT(t, time.Second), r.ID)
			}()
		}
		wg.Wait()
		if t.Failed() {
			return
		}
	}
}
