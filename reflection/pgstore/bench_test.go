package pgstore

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"d2m-mediator/internal/pgtest"
	"d2m-mediator/reflection"
)

// The store alone on the shared test cluster (primary + synchronous
// standby on this machine):
//
//	go test -run '^$' -bench . -benchtime 3s ./reflection/pgstore/
//
// Serial: one reflection per commit, the round trip and both fsyncs
// (primary, then standby) on every message. Concurrent: 1000 groups of 3
// with a reflection in flight per group, so the committer batches.
func benchStore(b *testing.B, groups int) (*Store, []reflection.GroupID) {
	s, err := Open(context.Background(), pgtest.Shared(b).NewDatabase(b), Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	gs := make([]reflection.GroupID, groups)
	var wg sync.WaitGroup
	for i := range gs {
		gs[i][0], gs[i][1], gs[i][2] = byte(i), byte(i>>8), 0xbe
		for d := reflection.DeviceID(1); d <= 3; d++ {
			wg.Add(1)
			s.PutSlot(gs[i], reflection.Slot{DeviceID: d, CreatedAt: 1}, func(err error) {
				if err != nil {
					b.Error(err)
				}
				wg.Done()
			})
		}
	}
	wg.Wait()
	return s, gs
}

func BenchmarkAppendSerial(b *testing.B) {
	s, gs := benchStore(b, 1)
	env := make([]byte, 100)
	b.ResetTimer()
	for range b.N {
		if _, err := reflection.SyncAppend(func(done func(reflection.AppendResult, error)) {
			s.Append(reflection.AppendRequest{Group: gs[0], Sender: 1, Envelope: env}, done)
		}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendConcurrent(b *testing.B) {
	s, gs := benchStore(b, 1000)
	env := make([]byte, 100)
	var mu sync.Mutex
	var lat []time.Duration
	b.ResetTimer()
	var wg sync.WaitGroup
	per := (b.N + len(gs) - 1) / len(gs)
	for _, g := range gs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range per {
				start := time.Now()
				if _, err := reflection.SyncAppend(func(done func(reflection.AppendResult, error)) {
					s.Append(reflection.AppendRequest{Group: g, Sender: 1, Envelope: env}, done)
				}); err != nil {
					b.Error(err)
					return
				}
				d := time.Since(start)
				mu.Lock()
				lat = append(lat, d)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	if len(lat) > 0 {
		b.ReportMetric(float64(len(lat))/b.Elapsed().Seconds(), "appends/s")
		b.ReportMetric(pct(lat, 0.5), "p50-ms")
		b.ReportMetric(pct(lat, 0.99), "p99-ms")
	}
}

func pct(d []time.Duration, q float64) float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	return float64(s[int(q*float64(len(s)-1))]) / float64(time.Millisecond)
}
