package reflection

import (
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestPacedLoad offers the store alone a fixed rate of reflections, the way
// the server does at moderate load: 1000 groups × 3 slots, each reflect
// from one slot of a random group (fan-out 2, 100 B), both copies acked 50
// ms after the append completed (an online device). It reports the append
// latency (what a ReflectAck waits for) from the scheduled send time, and
// commits and pages per reflect. Without WebSockets and the load tool this
// isolates the store's share of the latency.
//
//	REFLECTION_PACED=1 go test -run TestPacedLoad -v ./reflection/
//	REFLECTION_PACED=1 REFLECTION_PACED_RATES="5000" REFLECTION_PACED_HIST=1 go test ...
func TestPacedLoad(t *testing.T) {
	if os.Getenv("REFLECTION_PACED") == "" {
		t.Skip("load run; set REFLECTION_PACED=1")
	}
	rates := []int{1000, 5000, 20000}
	if v := os.Getenv("REFLECTION_PACED_RATES"); v != "" {
		rates = nil
		for _, f := range strings.Fields(v) {
			r, err := strconv.Atoi(f)
			if err != nil {
				t.Fatal(err)
			}
			rates = append(rates, r)
		}
	}
	for _, rate := range rates {
		pacedRun(t, rate, 3*time.Second)
	}
}

func pacedRun(t *testing.T, rate int, dur time.Duration) {
	var commits, batched atomic.Int64
	var commitMu sync.Mutex
	var commitTimes []time.Duration
	db := openAt(t, dbPath(t), Options{OnCommit: func(batch int, took time.Duration, err error) {
		commits.Add(1)
		if batch > 0 {
			batched.Add(1)
		}
		commitMu.Lock()
		commitTimes = append(commitTimes, took)
		commitMu.Unlock()
	}})
	const groups = 1000
	var reqs []*request
	gids := make([]GroupID, groups)
	for i := range gids {
		gids[i] = GroupID{byte(i >> 8), byte(i), 9}
		for d := 1; d <= 3; d++ {
			reqs = append(reqs, &request{op: opPutSlot, g: gids[i], d: DeviceID(d), slot: Slot{DeviceID: DeviceID(d)}})
		}
	}
	if err := db.commitDirect(reqs...); err != nil {
		t.Fatal(err)
	}
	env := make([]byte, benchEnvelope)
	var latMu sync.Mutex
	var lat []time.Duration
	var wg sync.WaitGroup
	before := db.bolt.Stats()
	commits.Store(0)
	batched.Store(0)
	commitMu.Lock()
	commitTimes = nil
	commitMu.Unlock()
	start := time.Now()
	interval := time.Second / time.Duration(rate)
	n := int(dur / interval)
	var maxLag time.Duration
	for i := range n {
		at := start.Add(time.Duration(i) * interval)
		if d := time.Until(at); d > 0 {
			time.Sleep(d)
		}
		if lag := time.Since(at); lag > maxLag {
			maxLag = lag
		}
		g := gids[rand.IntN(groups)]
		sender := DeviceID(1 + rand.IntN(3))
		wg.Add(1)
		db.Append(AppendRequest{Group: g, Sender: sender, Envelope: env}, func(res AppendResult, err error) {
			defer wg.Done()
			if err != nil {
				t.Error(err)
				return
			}
			took := time.Since(at)
			latMu.Lock()
			lat = append(lat, took)
			latMu.Unlock()
			wg.Add(1)
			time.AfterFunc(50*time.Millisecond, func() {
				defer wg.Done()
				for _, d := range res.Delivered {
					db.Ack(g, d.DeviceID, d.Seq, nil)
				}
			})
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	after := db.bolt.Stats()
	d := after.Sub(&before)
	slices.Sort(lat)
	commitMu.Lock()
	slices.Sort(commitTimes)
	ct := commitTimes
	commitMu.Unlock()
	if os.Getenv("REFLECTION_PACED_HIST") != "" {
		h := map[int]int{}
		for _, l := range lat {
			if l > 10*time.Millisecond {
				h[int(l/(10*time.Millisecond))*10]++
			}
		}
		t.Logf("latency > 10 ms by 10 ms bucket: %v; pacer max lag %v; slowest commits %v", h, maxLag, commitTimes[max(0, len(commitTimes)-5):])
	}
	q := func(s []time.Duration, p float64) time.Duration { return s[min(len(s)-1, int(p*float64(len(s))))] }
	t.Logf("rate %5d/s (achieved %5.0f/s): append p50 %v p99 %v p99.9 %v max %v; commits/reflect %.3f (with requests %.3f), pages/commit %.1f, commit p50 %v p99 %v",
		rate, float64(len(lat))/elapsed.Seconds(), q(lat, .5).Round(time.Microsecond), q(lat, .99).Round(time.Microsecond),
		q(lat, .999).Round(time.Microsecond), lat[len(lat)-1].Round(time.Microsecond),
		float64(commits.Load())/float64(n), float64(batched.Load())/float64(n),
		float64(d.TxStats.GetWrite())/float64(max(1, commits.Load())), q(ct, .5).Round(time.Microsecond), q(ct, .99).Round(time.Microsecond))
}
