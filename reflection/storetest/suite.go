package storetest

//lint:file-ignore ST1001 the tests read like the store's own code, which names these types unqualified

import (
	"bytes"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	. "d2m-mediator/reflection"
)

// The store test suite: what every engine of reflection.Store must do,
// written against the Store interface and the Engine's Open and Stop.
// Tests that need an engine's internals (bbolt's file modes, lock file,
// reclaim chunks, fault-injection hooks) stay with that engine.

// Reclaimer is implemented by an engine that deletes dead queue entries in
// the background, after the commit that made them dead (bbolt: log
// records that no slot needs any more). The suite then also waits for and
// checks that work; an engine that deletes within the commit has nothing
// to wait for.
type Reclaimer interface {
	// ReclaimPending reports whether s holds dead entries not yet deleted.
	ReclaimPending(s Store) bool
	// StoredLog reports, after Stop, how many stored entries some slot
	// still needs (live) and how many no slot needs (dead).
	StoredLog(t testing.TB) (live, dead int)
}

// Pager is implemented by an engine whose ForEachGroup reads groups in
// pages of ForEachPage: the suite then walks more than two pages.
type Pager interface{ ForEachPage() int }

// Run runs the suite, each test as a subtest on a fresh engine from
// newEngine (which may call t.Parallel).
func Run(t *testing.T, newEngine func(t *testing.T) Engine) {
	for _, tc := range []struct {
		name string
		fn   func(t *testing.T, e Engine)
	}{
		{"FanOutOrderSeqsAndAck", testFanOutOrderSeqsAndAck},
		{"ReopenKeepsStateAndCounters", testReopenKeepsStateAndCounters},
		{"NewSlotStartsEmpty", testNewSlotStartsEmpty},
		{"GroupStateAndTombstones", testGroupStateAndTombstones},
		{"PruneTombstonesAndEmptyGroups", testPruneTombstonesAndEmptyGroups},
		{"ForEachGroupPages", testForEachGroupPages},
		{"OpenMarksConnectedSlotsDisconnected", testOpenMarksConnectedSlotsDisconnected},
		{"EphemeralStoresNothingButAdvancesSeq", testEphemeralStoresNothingButAdvancesSeq},
		{"HoldAndRelease", testHoldAndRelease},
		{"HeldReleasedOnOpenAfterCrash", testHeldReleasedOnOpenAfterCrash},
		{"ReleaseHeldRespectsLimits", testReleaseHeldRespectsLimits},
		{"QueueLimitByCount", testQueueLimitByCount},
		{"QueueLimitByBytes", testQueueLimitByBytes},
		{"EphemeralIgnoresLimits", testEphemeralIgnoresLimits},
		{"LazyAckVisibleAtOnceDurableAfterDone", testLazyAckVisibleAtOnceDurableAfterDone},
		{"LazyAckFlushByCount", testLazyAckFlushByCount},
		{"LazyAckFlushByTime", testLazyAckFlushByTime},
		{"DoneCallbacksFireInSubmissionOrder", testDoneCallbacksFireInSubmissionOrder},
		{"CloseCompletesQueuedWritesThenRejects", testCloseCompletesQueuedWritesThenRejects},
		{"BarrierWaitsForEarlierWrites", testBarrierWaitsForEarlierWrites},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, newEngine(t)) })
	}
}

// reopen stops s cleanly and opens the store again.
func reopen(t testing.TB, e Engine, s Store, opts Options) Store {
	t.Helper()
	e.Stop(t, s, false)
	return e.Open(t, opts)
}

// crash stops s as a crash right after its last commit would, and opens
// the store again.
func crash(t testing.TB, e Engine, s Store, opts Options) Store {
	t.Helper()
	e.Stop(t, s, true)
	return e.Open(t, opts)
}

func testFanOutOrderSeqsAndAck(t *testing.T, e Engine) {
	clk := NewClock(1_700_000_000_000)
	s := e.Open(t, Options{Now: clk.Now})
	g := GID(1)
	putSlots(t, s, g, 3, 1, 2)

	var results []AppendResult
	for i, env := range []string{"a", "bb", "ccc"} {
		clk.Set(1_700_000_000_000 + int64(i)*10)
		res := appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte(env)})
		if len(res.Dropped) != 0 {
			t.Fatalf("dropped %v", res.Dropped)
		}
		want := []Delivery{{DeviceID: 2, Seq: uint64(i + 1)}, {DeviceID: 3, Seq: uint64(i + 1)}}
		if len(res.Delivered) != 2 || res.Delivered[0] != want[0] || res.Delivered[1] != want[1] {
			t.Fatalf("append %d delivered %v, want %v", i, res.Delivered, want)
		}
		if res.Timestamp != uint64(clk.Now().UnixMilli()) {
			t.Fatalf("timestamp %d, want %d", res.Timestamp, clk.Now().UnixMilli())
		}
		results = append(results, res)
	}
	// Each append waited for its own commit, and the committer is
	// sequential: the commits bracket in order, without overlap, and the
	// committer was busy at least as long as they took.
	var commits time.Duration
	for i, res := range results {
		if res.CommitStart.IsZero() || res.CommitDone.Before(res.CommitStart) {
			t.Fatalf("append %d: commit started %v, done %v", i, res.CommitStart, res.CommitDone)
		}
		if i > 0 && res.CommitStart.Before(results[i-1].CommitDone) {
			t.Fatalf("append %d: commit started %v before the previous one was done (%v)", i, res.CommitStart, results[i-1].CommitDone)
		}
		commits += res.CommitDone.Sub(res.CommitStart)
	}
	if b, ok := s.(interface{ CommitterBusy() time.Duration }); ok {
		if busy := b.CommitterBusy(); busy < commits {
			t.Fatalf("committer busy %v, less than its three commits took (%v)", busy, commits)
		}
	}

	if es := readAll(t, s, g, 1); len(es) != 0 {
		t.Fatalf("sender got its own reflection: %v", Seqs(es))
	}
	for _, d := range []DeviceID{2, 3} {
		es := readAll(t, s, g, d)
		envelopesEqual(t, es, "a", "bb", "ccc")
		if !equalSeqs(Seqs(es), []uint64{1, 2, 3}) {
			t.Fatalf("slot %d seqs %v", d, Seqs(es))
		}
		for i, e := range es {
			if e.Timestamp != results[i].Timestamp {
				t.Fatalf("slot %d entry %d timestamp %d, want %d (same for every copy)", d, i, e.Timestamp, results[i].Timestamp)
			}
		}
		wantStats(t, s, g, d, QueueStats{Length: 3, Bytes: 6, NextSeq: 4})
	}
	wantStats(t, s, g, 1, QueueStats{Length: 0, Bytes: 0, NextSeq: 1})

	// afterSeq and max
	es, err := s.ReadQueue(g, 2, 1, 1)
	if err != nil || len(es) != 1 || es[0].Seq != 2 {
		t.Fatalf("ReadQueue(after 1, max 1) = %v, %v", Seqs(es), err)
	}

	ack(s, g, 2, 2)
	ack(s, g, 2, 2)  // again: no-op
	ack(s, g, 2, 99) // unknown: no-op
	ack(s, g, 9, 1)  // unknown slot: no-op
	if got := Seqs(readAll(t, s, g, 2)); !equalSeqs(got, []uint64{1, 3}) {
		t.Fatalf("after ack: %v", got)
	}
	wantStats(t, s, g, 2, QueueStats{Length: 2, Bytes: 4, NextSeq: 4})
	wantStats(t, s, g, 3, QueueStats{Length: 3, Bytes: 6, NextSeq: 4})
}

func testReopenKeepsStateAndCounters(t *testing.T, e Engine) {
	s := e.Open(t, Options{})
	g := GID(2)
	putSlots(t, s, g, 1, 2)
	mustDo(t, func(done func(error)) { s.SetSharedDeviceData(g, []byte("shared"), done) })
	for range 3 {
		appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("x")})
	}
	ack(s, g, 2, 1)
	before, _ := s.Group(g)
	s = reopen(t, e, s, Options{})
	after, err := s.Group(g)
	if err != nil {
		t.Fatal(err)
	}
	if len(after.Slots) != 2 || !bytes.Equal(after.SharedDeviceData, []byte("shared")) ||
		!bytes.Equal(after.Slots[0].DeviceInfo, before.Slots[0].DeviceInfo) {
		t.Fatalf("group after reopen: %+v", after)
	}
	if got := Seqs(readAll(t, s, g, 2)); !equalSeqs(got, []uint64{2, 3}) {
		t.Fatalf("queue after reopen: %v", got)
	}
	wantStats(t, s, g, 2, QueueStats{Length: 2, Bytes: 2, NextSeq: 4})
	ack(s, g, 2, 2)
	ack(s, g, 2, 3)

	// An empty queue still remembers its counter: Reflected IDs are never
	// reused within a slot's life (§5.4).
	s = reopen(t, e, s, Options{})
	wantStats(t, s, g, 2, QueueStats{Length: 0, Bytes: 0, NextSeq: 4})
	res := appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("y")})
	if len(res.Delivered) != 1 || res.Delivered[0].Seq != 4 {
		t.Fatalf("after reopen delivered %v, want seq 4", res.Delivered)
	}
}

func testNewSlotStartsEmpty(t *testing.T, e Engine) {
	s := e.Open(t, Options{})
	g := GID(3)
	putSlots(t, s, g, 1, 2)
	appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("before 3")})

	putSlots(t, s, g, 3) // created after the append: must not get it
	wantStats(t, s, g, 3, QueueStats{NextSeq: 1})
	if es := readAll(t, s, g, 3); len(es) != 0 {
		t.Fatalf("new slot has %d entries", len(es))
	}
	res := appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("after 3")})
	if len(res.Delivered) != 2 || res.Delivered[0] != (Delivery{DeviceID: 2, Seq: 2}) || res.Delivered[1] != (Delivery{DeviceID: 3, Seq: 1}) {
		t.Fatalf("delivered %v", res.Delivered)
	}

	// Replacing a slot (a reconnect with new device info) keeps its queue.
	mustDo(t, func(done func(error)) {
		s.PutSlot(g, Slot{DeviceID: 2, DeviceInfo: []byte("new info"), ConnectedSince: 5}, done)
	})
	wantStats(t, s, g, 2, QueueStats{Length: 2, Bytes: 15, NextSeq: 3})
	st, _ := s.Group(g)
	if st.Slots[1].DeviceID != 2 || string(st.Slots[1].DeviceInfo) != "new info" || st.Slots[1].ConnectedSince != 5 {
		t.Fatalf("slot 2 after replace: %+v", st.Slots[1])
	}

	// Dropping and re-creating a slot starts a new life: empty queue, counter from 1.
	mustDo(t, func(done func(error)) { s.DeleteSlot(g, 2, nil, done) })
	if _, ok := s.QueueStats(g, 2); ok {
		t.Fatal("QueueStats for a deleted slot")
	}
	if es := readAll(t, s, g, 2); len(es) != 0 {
		t.Fatalf("deleted slot still readable: %v", Seqs(es))
	}
	putSlots(t, s, g, 2)
	wantStats(t, s, g, 2, QueueStats{NextSeq: 1})
	if es := readAll(t, s, g, 2); len(es) != 0 {
		t.Fatalf("re-created slot has old entries: %v", Seqs(es))
	}
	waitReclaimed(t, e, s)
}

func testGroupStateAndTombstones(t *testing.T, e Engine) {
	clk := NewClock(1000)
	s := e.Open(t, Options{Now: clk.Now})
	g := GID(4)
	if st, err := s.Group(g); err != nil || st.Slots != nil || st.Tombstones != nil || st.SharedDeviceData != nil {
		t.Fatalf("unknown group: %+v, %v", st, err)
	}
	putSlots(t, s, g, 30, 10, 20)
	mustDo(t, func(done func(error)) { s.DeleteSlot(g, 20, &Tombstone{Reason: Dropped, At: 500}, done) })
	st, err := s.Group(g)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Slots) != 2 || st.Slots[0].DeviceID != 10 || st.Slots[1].DeviceID != 30 {
		t.Fatalf("slots not sorted or wrong: %+v", st.Slots)
	}
	if len(st.Tombstones) != 1 || st.Tombstones[0] != (Tombstone{DeviceID: 20, Reason: Dropped, At: 500}) {
		t.Fatalf("tombstones %+v", st.Tombstones)
	}
	// A tombstone for a device that never had a slot is still written.
	mustDo(t, func(done func(error)) { s.DeleteSlot(g, 40, &Tombstone{Reason: Dropped, At: 2000}, done) })
	// Re-creating the slot clears its tombstone (§18 row 7).
	putSlots(t, s, g, 20)
	st, _ = s.Group(g)
	if len(st.Tombstones) != 1 || st.Tombstones[0].DeviceID != 40 {
		t.Fatalf("tombstones after re-create: %+v", st.Tombstones)
	}
	mustDo(t, func(done func(error)) { s.SetSharedDeviceData(g, []byte{1, 2, 3}, done) })
	mustDo(t, func(done func(error)) { s.SetSharedDeviceData(g, nil, done) })
	if st, _ = s.Group(g); st.SharedDeviceData != nil {
		t.Fatalf("shared data not cleared: %x", st.SharedDeviceData)
	}
}

func testPruneTombstonesAndEmptyGroups(t *testing.T, e Engine) {
	s := e.Open(t, Options{})
	ga, gb, gc := GID(5), GID(6), GID(7)
	putSlots(t, s, ga, 1)
	mustDo(t, func(done func(error)) { s.DeleteSlot(ga, 2, &Tombstone{Reason: Dropped, At: 100}, done) })
	mustDo(t, func(done func(error)) { s.DeleteSlot(ga, 3, &Tombstone{Reason: QueueLimit, At: 300}, done) })
	mustDo(t, func(done func(error)) { s.DeleteSlot(gb, 1, &Tombstone{Reason: Dropped, At: 100}, done) })
	mustDo(t, func(done func(error)) { s.DeleteSlot(gc, 1, &Tombstone{Reason: Dropped, At: 100}, done) })
	mustDo(t, func(done func(error)) { s.SetSharedDeviceData(gc, []byte("keep"), done) })
	s = reopen(t, e, s, Options{}) // the tombstone index must be rebuilt on Open
	mustDo(t, func(done func(error)) { s.PruneTombstones(200, done) })

	st, _ := s.Group(ga)
	if len(st.Tombstones) != 1 || st.Tombstones[0].DeviceID != 3 || len(st.Slots) != 1 {
		t.Fatalf("group a: %+v", st)
	}
	var seen []GroupID
	if err := s.ForEachGroup(func(g GroupID, _ GroupState) error { seen = append(seen, g); return nil }); err != nil {
		t.Fatal(err)
	}
	// gb had only a tombstone: gone. gc keeps its shared data.
	if len(seen) != 2 || seen[0] != ga || seen[1] != gc {
		t.Fatalf("groups after prune: %v", seen)
	}
	mustDo(t, func(done func(error)) { s.PruneTombstones(1000, done) })
	if st, _ := s.Group(ga); len(st.Tombstones) != 0 {
		t.Fatalf("tombstones left: %+v", st.Tombstones)
	}
}

func testForEachGroupPages(t *testing.T, e Engine) {
	page := 64
	if p, ok := e.(Pager); ok {
		page = p.ForEachPage()
	}
	s := e.Open(t, Options{})
	n := page*2 + 5
	for i := range n {
		var g GroupID
		g[0], g[1] = byte(i>>8), byte(i)
		s.SetSharedDeviceData(g, []byte{byte(i)}, nil)
	}
	mustDo(t, func(done func(error)) { s.SetSharedDeviceData(GID(0xff), []byte{1}, done) })
	count := 0
	var last GroupID
	err := s.ForEachGroup(func(g GroupID, st GroupState) error {
		if count > 0 && bytes.Compare(g[:], last[:]) <= 0 {
			t.Fatalf("not in order: %s after %s", g, last)
		}
		last = g
		count++
		return nil
	})
	if err != nil || count != n+1 {
		t.Fatalf("ForEachGroup visited %d of %d: %v", count, n+1, err)
	}
}

func testOpenMarksConnectedSlotsDisconnected(t *testing.T, e Engine) {
	s := e.Open(t, Options{})
	g := GID(8)
	mustDo(t, func(done func(error)) {
		s.PutSlot(g, Slot{DeviceID: 1, ConnectedSince: 100}, done)
	})
	mustDo(t, func(done func(error)) {
		s.PutSlot(g, Slot{DeviceID: 2, LastDisconnectAt: 50}, done)
	})
	s = reopen(t, e, s, Options{Now: NewClock(7777).Now})
	st, _ := s.Group(g)
	if st.Slots[0].ConnectedSince != 0 || st.Slots[0].LastDisconnectAt != 7777 {
		t.Fatalf("slot 1 after crash recovery: %+v", st.Slots[0])
	}
	if st.Slots[1].LastDisconnectAt != 50 {
		t.Fatalf("offline slot changed: %+v", st.Slots[1])
	}
}

func testEphemeralStoresNothingButAdvancesSeq(t *testing.T, e Engine) {
	s := e.Open(t, Options{})
	g := GID(20)
	putSlots(t, s, g, 1, 2, 3)
	appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("one")})
	res := appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("typing"), Ephemeral: true})
	if len(res.Delivered) != 2 || res.Delivered[0] != (Delivery{DeviceID: 2, Seq: 2}) || res.Delivered[1] != (Delivery{DeviceID: 3, Seq: 2}) {
		t.Fatalf("ephemeral delivered %v", res.Delivered)
	}
	if res.Timestamp == 0 {
		t.Fatal("ephemeral without timestamp")
	}
	appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("three")})
	for _, d := range []DeviceID{2, 3} {
		es := readAll(t, s, g, d)
		if !equalSeqs(Seqs(es), []uint64{1, 3}) {
			t.Fatalf("slot %d seqs %v", d, Seqs(es))
		}
		wantStats(t, s, g, d, QueueStats{Length: 2, Bytes: 8, NextSeq: 4})
	}
	ack(s, g, 2, 2) // the clients ack ephemeral ids anyway: no-op
	wantStats(t, s, g, 2, QueueStats{Length: 2, Bytes: 8, NextSeq: 4})
	s = reopen(t, e, s, Options{})
	wantStats(t, s, g, 3, QueueStats{Length: 2, Bytes: 8, NextSeq: 4})
}

func testHoldAndRelease(t *testing.T, e Engine) {
	clk := NewClock(1000)
	s := e.Open(t, Options{Now: clk.Now})
	g := GID(21)
	putSlots(t, s, g, 1, 2, 3)

	var heldTS []uint64
	for i, env := range []string{"h1", "h2"} {
		clk.Set(1000 + int64(i))
		res := appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte(env), Hold: true})
		if len(res.Delivered) != 0 || len(res.Dropped) != 0 || res.Timestamp != uint64(1000+i) {
			t.Fatalf("hold result %+v", res)
		}
		heldTS = append(heldTS, res.Timestamp)
	}
	for _, d := range []DeviceID{2, 3} {
		wantStats(t, s, g, d, QueueStats{NextSeq: 1})
	}
	// Another device reflects while 1 holds the lock: delivered at once.
	clk.Set(2000)
	res := appendSync(t, s, AppendRequest{Group: g, Sender: 2, Envelope: []byte("other")})
	if len(res.Delivered) != 2 {
		t.Fatalf("non-holder delivered %v", res.Delivered)
	}
	clk.Set(3000)
	res = releaseSync(t, s, g, 1)
	if res.Timestamp != 3000 {
		t.Fatalf("release timestamp %d", res.Timestamp)
	}
	want := []Delivery{{DeviceID: 2, Seq: 1}, {DeviceID: 3, Seq: 2}, {DeviceID: 2, Seq: 2}, {DeviceID: 3, Seq: 3}}
	if len(res.Delivered) != len(want) {
		t.Fatalf("release delivered %v, want %v", res.Delivered, want)
	}
	for i := range want {
		if res.Delivered[i] != want[i] {
			t.Fatalf("release delivered %v, want %v", res.Delivered, want)
		}
	}
	es := readAll(t, s, g, 3)
	envelopesEqual(t, es, "other", "h1", "h2")
	if es[1].Timestamp != heldTS[0] || es[2].Timestamp != heldTS[1] {
		t.Fatalf("released copies should keep the held (ReflectAck) timestamps: %d %d", es[1].Timestamp, es[2].Timestamp)
	}
	envelopesEqual(t, readAll(t, s, g, 2), "h1", "h2")
	if es := readAll(t, s, g, 1); len(es) != 1 || string(es[0].Envelope) != "other" {
		t.Fatalf("holder's own queue: %v", es)
	}
	// Nothing left to release.
	if res := releaseSync(t, s, g, 1); len(res.Delivered) != 0 {
		t.Fatalf("second release delivered %v", res.Delivered)
	}
}

func testHeldReleasedOnOpenAfterCrash(t *testing.T, e Engine) {
	s := e.Open(t, Options{})
	g := GID(22)
	putSlots(t, s, g, 1, 2)
	// 3 held reflections of 1, then the "crash": Close without ReleaseHeld.
	for _, env := range []string{"a", "b", "c"} {
		appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte(env), Hold: true})
	}
	appendSync(t, s, AppendRequest{Group: GID(23), Sender: 9, Envelope: []byte("no group yet"), Hold: true})
	s = reopen(t, e, s, Options{})
	envelopesEqual(t, readAll(t, s, g, 2), "a", "b", "c")
	wantStats(t, s, g, 2, QueueStats{Length: 3, Bytes: 3, NextSeq: 4})
	if res := releaseSync(t, s, g, 1); len(res.Delivered) != 0 {
		t.Fatalf("held entries were not removed: %v", res.Delivered)
	}
	// A group that only had held entries and no slots is gone afterwards.
	if st, _ := s.Group(GID(23)); st.Slots != nil || st.Tombstones != nil {
		t.Fatalf("group 23: %+v", st)
	}
	e.Stop(t, s, false)
	e.Check(t)
}

// A held queue may push a recipient over its limit on release: same rule
// as Append, one aggregated result.
func testReleaseHeldRespectsLimits(t *testing.T, e Engine) {
	s := e.Open(t, Options{MaxQueueLength: 2})
	g := GID(24)
	putSlots(t, s, g, 1, 2, 3)
	for range 3 {
		appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("x"), Hold: true})
	}
	ack(s, g, 3, 1) // nothing to ack yet: no-op
	res := releaseSync(t, s, g, 1)
	if len(res.Dropped) != 2 || res.Dropped[0] != 2 || res.Dropped[1] != 3 {
		t.Fatalf("dropped %v", res.Dropped)
	}
	if len(res.Delivered) != 4 {
		t.Fatalf("delivered %v", res.Delivered)
	}
	st, _ := s.Group(g)
	if len(st.Slots) != 1 || len(st.Tombstones) != 2 {
		t.Fatalf("group %+v", st)
	}
}

func testQueueLimitByCount(t *testing.T, e Engine) {
	clk := NewClock(5000)
	s := e.Open(t, Options{MaxQueueLength: 3, Now: clk.Now})
	g := GID(10)
	putSlots(t, s, g, 1, 2, 3)
	for i := range 3 {
		res := appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("m")})
		ack(s, g, 3, uint64(i+1)) // slot 3 keeps up, slot 2 never acks
		if len(res.Dropped) != 0 {
			t.Fatalf("append %d dropped %v", i, res.Dropped)
		}
	}
	clk.Set(6000)
	res := appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("m")})
	if len(res.Dropped) != 1 || res.Dropped[0] != 2 {
		t.Fatalf("dropped %v, want [2]", res.Dropped)
	}
	if len(res.Delivered) != 1 || res.Delivered[0] != (Delivery{DeviceID: 3, Seq: 4}) {
		t.Fatalf("delivered %v, want [{3 4}]", res.Delivered)
	}
	st, _ := s.Group(g)
	if len(st.Slots) != 2 || st.Slots[0].DeviceID != 1 || st.Slots[1].DeviceID != 3 {
		t.Fatalf("slots %+v", st.Slots)
	}
	if len(st.Tombstones) != 1 || st.Tombstones[0] != (Tombstone{DeviceID: 2, Reason: QueueLimit, At: 6000}) {
		t.Fatalf("tombstones %+v", st.Tombstones)
	}
	if _, ok := s.QueueStats(g, 2); ok {
		t.Fatal("dropped slot still in the index")
	}
	if es := readAll(t, s, g, 2); len(es) != 0 {
		t.Fatalf("dropped slot's queue readable: %v", Seqs(es))
	}
	// Later appends do not go to the dropped slot.
	res = appendSync(t, s, AppendRequest{Group: g, Sender: 3, Envelope: []byte("n")})
	if len(res.Delivered) != 1 || res.Delivered[0].DeviceID != 1 {
		t.Fatalf("delivered %v", res.Delivered)
	}

	// The device comes back as a NEW slot: tombstone cleared, empty queue.
	putSlots(t, s, g, 2)
	st, _ = s.Group(g)
	if len(st.Tombstones) != 0 {
		t.Fatalf("tombstone not cleared: %+v", st.Tombstones)
	}
	wantStats(t, s, g, 2, QueueStats{NextSeq: 1})

	waitReclaimed(t, e, s)
	e.Stop(t, s, false)
	e.Check(t)
}

func testQueueLimitByBytes(t *testing.T, e Engine) {
	s := e.Open(t, Options{MaxQueueBytes: 100})
	g := GID(11)
	putSlots(t, s, g, 1, 2)
	env := bytes.Repeat([]byte{7}, 40)
	for range 2 {
		if res := appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: env}); len(res.Dropped) != 0 {
			t.Fatalf("dropped early: %v", res.Dropped)
		}
	}
	wantStats(t, s, g, 2, QueueStats{Length: 2, Bytes: 80, NextSeq: 3})
	res := appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: env}) // 120 > 100
	if len(res.Dropped) != 1 || res.Dropped[0] != 2 || len(res.Delivered) != 0 {
		t.Fatalf("result %+v", res)
	}
	st, _ := s.Group(g)
	if len(st.Slots) != 1 || len(st.Tombstones) != 1 || st.Tombstones[0].Reason != QueueLimit {
		t.Fatalf("group %+v", st)
	}
}

// Ephemeral reflections never count against the limits and are not stored.
func testEphemeralIgnoresLimits(t *testing.T, e Engine) {
	s := e.Open(t, Options{MaxQueueLength: 1})
	g := GID(12)
	putSlots(t, s, g, 1, 2)
	appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("stored")})
	for range 5 {
		if res := appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("typing"), Ephemeral: true}); len(res.Dropped) != 0 {
			t.Fatalf("ephemeral dropped a slot: %+v", res)
		}
	}
	wantStats(t, s, g, 2, QueueStats{Length: 1, Bytes: 6, NextSeq: 7})
}

// notYet fails if done has fired.
func notYet(t testing.TB, done <-chan error) {
	t.Helper()
	select {
	case err := <-done:
		t.Fatalf("ack done fired before any flush: %v", err)
	default:
	}
}

// An ack changes memory at once; until it is flushed a crash brings the
// entry back (re-delivery), after its done fired it never does.
func testLazyAckVisibleAtOnceDurableAfterDone(t *testing.T, e Engine) {
	opts := Options{AckFlushInterval: time.Hour, AckFlushAcks: 1 << 20}
	s := e.Open(t, opts)
	g := GID(80)
	putSlots(t, s, g, 1, 2)
	appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("a")})
	appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("b")})

	done := make(chan error, 1)
	s.Ack(g, 2, 1, func(err error) { done <- err })
	wantStats(t, s, g, 2, QueueStats{Length: 1, Bytes: 1, NextSeq: 3})
	envelopesEqual(t, readAll(t, s, g, 2), "b")
	notYet(t, done)

	// Crash now: the ack is lost, the entry is delivered again.
	s = crash(t, e, s, opts)
	envelopesEqual(t, readAll(t, s, g, 2), "a", "b")

	// Ack it again: Close flushes it.
	done = make(chan error, 1)
	s.Ack(g, 2, 1, func(err error) { done <- err })
	notYet(t, done)
	e.Stop(t, s, false)
	if err := await(t, "Ack flushed by Close", done); err != nil {
		t.Fatal(err)
	}
	s = e.Open(t, Options{})
	envelopesEqual(t, readAll(t, s, g, 2), "b")
}

// AckFlushAcks acks make the flush due without waiting for the interval:
// the done of the last one fires although the interval is an hour.
func testLazyAckFlushByCount(t *testing.T, e Engine) {
	opts := Options{AckFlushInterval: time.Hour, AckFlushAcks: 3}
	s := e.Open(t, opts)
	g := GID(81)
	putSlots(t, s, g, 1, 2)
	for range 3 {
		appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("x")})
	}
	ack(s, g, 2, 1)
	ack(s, g, 2, 3) // out of order: kept as a run above the watermark
	mustDo(t, func(done func(error)) { s.Ack(g, 2, 2, done) })
	s = crash(t, e, s, Options{})
	wantStats(t, s, g, 2, QueueStats{NextSeq: 4})
}

// After the interval the flush happens on its own (the committer is idle),
// and with it the dead entries are deleted.
func testLazyAckFlushByTime(t *testing.T, e Engine) {
	s := e.Open(t, Options{AckFlushInterval: 20 * time.Millisecond})
	rc, _ := e.(Reclaimer)
	g := GID(82)
	putSlots(t, s, g, 1, 2, 3)
	res := appendSync(t, s, AppendRequest{Group: g, Sender: 1, Envelope: []byte("x")})
	ack(s, g, 2, res.Delivered[0].Seq)
	if rc != nil && rc.ReclaimPending(s) {
		t.Fatal("entry dead while slot 3 still needs it")
	}
	start := time.Now()
	mustDo(t, func(done func(error)) { s.Ack(g, 3, res.Delivered[1].Seq, done) })
	t.Logf("ack durable after %v", time.Since(start).Round(time.Millisecond))
	if rc != nil && rc.ReclaimPending(s) {
		t.Fatal("the flush left the dead entry")
	}
	e.Stop(t, s, true)
	if rc != nil {
		if live, dead := rc.StoredLog(t); live != 0 || dead != 0 {
			t.Fatalf("after a crash: %d live, %d dead entries stored", live, dead)
		}
	}
	s = e.Open(t, Options{})
	for _, d := range []DeviceID{2, 3} {
		wantStats(t, s, g, d, QueueStats{NextSeq: 2})
	}
}

// Many goroutines submit mixed writes; the submission order is fixed by a
// ticket taken under the same mutex as the submit call (as the server does
// with its per-group mutex). done callbacks must fire in ticket order.
// (Ack is not among them: it takes effect in memory at once and its done
// fires with the lazy flush, see LazyAck*.)
func testDoneCallbacksFireInSubmissionOrder(t *testing.T, e Engine) {
	s := e.Open(t, Options{})
	g := GID(30)
	putSlots(t, s, g, 1, 2, 3)

	const writers, perWriter = 32, 100
	var (
		submitMu sync.Mutex
		next     int
		gotMu    sync.Mutex
		got      []int
		wg       sync.WaitGroup
	)
	record := func(ticket int) {
		gotMu.Lock()
		got = append(got, ticket)
		gotMu.Unlock()
		wg.Done()
	}
	wg.Add(writers * perWriter)
	var start sync.WaitGroup
	start.Add(1)
	for w := range writers {
		go func() {
			start.Wait()
			for range perWriter {
				submitMu.Lock()
				ticket := next
				next++
				switch ticket % 5 {
				case 0, 1:
					s.Append(AppendRequest{Group: g, Sender: DeviceID(1 + w%3), Envelope: []byte("m")}, func(_ AppendResult, err error) {
						if err != nil {
							t.Error(err)
						}
						record(ticket)
					})
				case 2:
					s.SetSharedDeviceData(g, []byte{byte(ticket)}, func(err error) {
						if err != nil {
							t.Error(err)
						}
						record(ticket)
					})
				case 3:
					s.PutSlot(g, Slot{DeviceID: 3, ConnectedSince: int64(ticket)}, func(err error) {
						if err != nil {
							t.Error(err)
						}
						record(ticket)
					})
				case 4:
					// A barrier completes in order too: after every
					// write submitted before it.
					s.Barrier(func(err error) {
						if err != nil {
							t.Error(err)
						}
						record(ticket)
					})
				}
				submitMu.Unlock()
			}
		}()
	}
	start.Done()
	all := make(chan struct{})
	go func() {
		wg.Wait()
		close(all)
	}()
	await(t, "every write's done callback", all)
	if len(got) != writers*perWriter {
		t.Fatalf("%d callbacks, want %d", len(got), writers*perWriter)
	}
	for i, ticket := range got {
		if ticket != i {
			t.Fatalf("callback %d was ticket %d: not FIFO", i, ticket)
		}
	}
}

func testCloseCompletesQueuedWritesThenRejects(t *testing.T, e Engine) {
	s := e.Open(t, Options{})
	g := GID(33)
	putSlots(t, s, g, 1, 2)
	const n = 3000
	var ok atomic.Int64
	for range n {
		s.Append(AppendRequest{Group: g, Sender: 1, Envelope: []byte("q")}, func(_ AppendResult, err error) {
			if err == nil {
				ok.Add(1)
			}
		})
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := ok.Load(); got != n {
		t.Fatalf("%d of %d queued writes completed before Close returned", got, n)
	}
	errc := make(chan error, 1)
	s.Ack(g, 2, 1, func(err error) { errc <- err })
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("after Close: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("write after Close did not fail promptly")
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	s = e.Open(t, Options{})
	wantStats(t, s, g, 2, QueueStats{Length: n, Bytes: n, NextSeq: n + 1})
}

// A barrier completes only after every write submitted before it, and a
// barrier alone (nothing pending) completes at once.
func testBarrierWaitsForEarlierWrites(t *testing.T, e Engine) {
	s := e.Open(t, Options{})
	if err := syncWrite(t, "Barrier on an idle store", s.Barrier); err != nil {
		t.Fatal(err)
	}
	g := GID(34)
	putSlots(t, s, g, 1, 2)
	const n = 500
	var completed atomic.Int64
	for range n {
		s.Append(AppendRequest{Group: g, Sender: 1, Envelope: []byte("b")}, func(_ AppendResult, err error) {
			if err != nil {
				t.Error(err)
			}
			completed.Add(1)
		})
	}
	if err := syncWrite(t, "Barrier after appends", s.Barrier); err != nil {
		t.Fatal(err)
	}
	if got := completed.Load(); got != n {
		t.Fatalf("barrier completed with %d of %d earlier appends done", got, n)
	}
	wantStats(t, s, g, 2, QueueStats{Length: n, Bytes: n, NextSeq: n + 1})
}
