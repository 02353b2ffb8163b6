package reflection

import (
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Benchmarks for the group-commit writer. Each reports msgs/s (appends per
// second, each with its acks) and the append latency p50/p99 seen by one
// writer, next to the usual ns/op (wall time per message over all writers).
//
//	go test -run '^$' -bench . -benchtime=2s ./reflection/

var writerCounts = []int{1, 10, 100, 1000}

const benchEnvelope = 100

// benchGroups creates one group of `slots` slots per writer.
func benchGroups(b *testing.B, db *DB, writers, slots int) []GroupID {
	groups := make([]GroupID, writers)
	var wg sync.WaitGroup
	for w := range groups {
		groups[w][0], groups[w][1] = byte(w>>8), byte(w)
		for d := 1; d <= slots; d++ {
			wg.Add(1)
			db.PutSlot(groups[w], Slot{DeviceID: DeviceID(d)}, func(err error) {
				if err != nil {
					b.Error(err)
				}
				wg.Done()
			})
		}
	}
	wg.Wait()
	return groups
}

// runWriters runs b.N messages spread over `writers` goroutines; each
// message is one call of op(writer). It reports msgs/s and latency.
func runWriters(b *testing.B, writers int, op func(w int)) {
	b.ReportAllocs()
	var n atomic.Int64
	lat := make([][]time.Duration, writers)
	var wg sync.WaitGroup
	b.ResetTimer()
	start := time.Now()
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n.Add(1) <= int64(b.N) {
				t0 := time.Now()
				op(w)
				lat[w] = append(lat[w], time.Since(t0))
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	all := slices.Concat(lat...)
	slices.Sort(all)
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	if len(all) > 0 {
		b.ReportMetric(float64(all[len(all)/2].Microseconds()), "p50-µs")
		b.ReportMetric(float64(all[len(all)*99/100].Microseconds()), "p99-µs")
	}
}

// BenchmarkAppendAck: a group of 4 slots per writer; each message is an
// Append with fan-out 3, then the Acks of its 3 copies. A writer waits for
// its append (the ReflectAck) but, like the server, does not wait for the
// acks: they ride in a later batch. All acks are complete before the clock
// stops.
func BenchmarkAppendAck(b *testing.B) {
	for _, writers := range writerCounts {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			db := openAt(b, dbPath(b), Options{})
			groups := benchGroups(b, db, writers, 4)
			env := make([]byte, benchEnvelope)
			defer reportWrites(b, db)()
			var acks sync.WaitGroup
			ackDone := func(err error) {
				if err != nil {
					b.Error(err)
				}
				acks.Done()
			}
			runWriters(b, writers, func(w int) {
				g := groups[w]
				res, err := SyncAppend(func(done func(AppendResult, error)) {
					db.Append(AppendRequest{Group: g, Sender: 1, Envelope: env}, done)
				})
				if err != nil || len(res.Delivered) != 3 {
					b.Fatalf("append: %v %v", res, err)
				}
				acks.Add(len(res.Delivered))
				for _, d := range res.Delivered {
					db.Ack(g, d.DeviceID, d.Seq, ackDone)
				}
			})
			b.StartTimer()
			acks.Wait()
		})
	}
}

// BenchmarkUpdatePerMessage is the baseline: the same data, but one
// db.Update per message (the append plus the acks of the writer's previous
// message), without the committer's batching.
func BenchmarkUpdatePerMessage(b *testing.B) {
	for _, writers := range writerCounts {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			db := openAt(b, dbPath(b), Options{})
			groups := benchGroups(b, db, writers, 4)
			env := make([]byte, benchEnvelope)
			defer reportWrites(b, db)()
			prev := make([][]Delivery, writers)
			runWriters(b, writers, func(w int) {
				g := groups[w]
				app := &request{op: opAppend, g: g, d: 1, app: AppendRequest{Group: g, Sender: 1, Envelope: env},
					doneAppend: func(AppendResult, error) {}}
				for _, d := range prev[w] {
					db.Ack(g, d.DeviceID, d.Seq, nil) // lazy: written by the committer's flush
				}
				if err := db.commitDirect(app); err != nil || len(app.result.Delivered) != 3 {
					b.Fatalf("append: %v %v", app.result, err)
				}
				prev[w] = app.result.Delivered
			})
		})
	}
}

// BenchmarkAppendDeepQueue compares append+ack with an empty recipient
// queue and with one holding 1,000,000 unacked entries (group of 2 slots,
// fan-out 1; each writer appends and then acks its own copy, both waited
// for). The deep queue is built once, directly with 100,000 puts per
// transaction.
func BenchmarkAppendDeepQueue(b *testing.B) {
	depths := []int{0, 1_000_000}
	if testing.Short() {
		depths = depths[:1]
	}
	for _, depth := range depths {
		db := openAt(b, dbPath(b), Options{MaxQueueLength: 1 << 30, MaxQueueBytes: 1 << 40})
		g := benchGroups(b, db, 1, 2)[0]
		if depth > 0 {
			start := time.Now()
			bulkFill(b, db, g, 2, depth, make([]byte, benchEnvelope))
			b.Logf("built a %d-entry queue in %v", depth, time.Since(start).Round(time.Millisecond))
		}
		for _, writers := range []int{1, 100} {
			b.Run(fmt.Sprintf("queue=%d/writers=%d", depth, writers), func(b *testing.B) {
				env := make([]byte, benchEnvelope)
				runWriters(b, writers, func(int) {
					res := appendSync(b, db, AppendRequest{Group: g, Sender: 1, Envelope: env})
					ack(b, db, g, 2, res.Delivered[0].Seq)
				})
			})
		}
		if st, _ := db.QueueStats(g, 2); st.Length != depth {
			b.Fatalf("queue length %d after the benchmark, want %d", st.Length, depth)
		}
	}
}

// reportWrites reports bbolt page writes per message: what group commit
// saves (each commit rewrites the touched leaf-to-root paths plus a meta
// page). Call as defer reportWrites(b, db)().
func reportWrites(b *testing.B, db *DB) func() {
	before := db.bolt.Stats()
	return func() {
		after := db.bolt.Stats()
		d := after.Sub(&before)
		b.ReportMetric(float64(d.TxStats.GetWrite())/float64(b.N), "writes/msg")
	}
}

// bulkFill appends n entries to d's queue (group of two slots, sender the
// other one) in transactions of 100,000 appends each, bypassing the queue.
func bulkFill(b *testing.B, db *DB, g GroupID, d DeviceID, n int, env []byte) {
	sender := DeviceID(1)
	if d == 1 {
		sender = 2
	}
	for done := 0; done < n; {
		chunk := min(100_000, n-done)
		reqs := make([]*request, chunk)
		for i := range reqs {
			reqs[i] = &request{op: opAppend, g: g, d: sender, app: AppendRequest{Group: g, Sender: sender, Envelope: env}}
		}
		if err := db.commitDirect(reqs...); err != nil {
			b.Fatal(err)
		}
		done += chunk
	}
}
