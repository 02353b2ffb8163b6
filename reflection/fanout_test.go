package reflection

import (
	"bytes"
	"testing"
)

func TestFanOutOrderSeqsAndAck(t *testing.T) {
	clk := newClock(1_700_000_000_000)
	db := openAt(t, dbPath(t), Options{Now: clk.now})
	g := gid(1)
	putSlots(t, db, g, 3, 1, 2)

	var results []AppendResult
	for i, env := range []string{"a", "bb", "ccc"} {
		clk.set(1_700_000_000_000 + int64(i)*10)
		res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte(env)})
		if len(res.Dropped) != 0 {
			t.Fatalf("dropped %v", res.Dropped)
		}
		want := []Delivery{{2, uint64(i + 1)}, {3, uint64(i + 1)}}
		if len(res.Delivered) != 2 || res.Delivered[0] != want[0] || res.Delivered[1] != want[1] {
			t.Fatalf("append %d delivered %v, want %v", i, res.Delivered, want)
		}
		if res.Timestamp != uint64(clk.now().UnixMilli()) {
			t.Fatalf("timestamp %d, want %d", res.Timestamp, clk.now().UnixMilli())
		}
		results = append(results, res)
	}

	if es := readAll(t, db, g, 1); len(es) != 0 {
		t.Fatalf("sender got its own reflection: %v", seqs(es))
	}
	for _, d := range []DeviceID{2, 3} {
		es := readAll(t, db, g, d)
		envelopesEqual(t, es, "a", "bb", "ccc")
		if !equalSeqs(seqs(es), []uint64{1, 2, 3}) {
			t.Fatalf("slot %d seqs %v", d, seqs(es))
		}
		for i, e := range es {
			if e.Timestamp != results[i].Timestamp {
				t.Fatalf("slot %d entry %d timestamp %d, want %d (same for every copy)", d, i, e.Timestamp, results[i].Timestamp)
			}
		}
		wantStats(t, db, g, d, QueueStats{Length: 3, Bytes: 6, NextSeq: 4})
	}
	wantStats(t, db, g, 1, QueueStats{Length: 0, Bytes: 0, NextSeq: 1})

	// afterSeq and max
	es, err := db.ReadQueue(g, 2, 1, 1)
	if err != nil || len(es) != 1 || es[0].Seq != 2 {
		t.Fatalf("ReadQueue(after 1, max 1) = %v, %v", seqs(es), err)
	}

	ack(t, db, g, 2, 2)
	ack(t, db, g, 2, 2)  // again: no-op
	ack(t, db, g, 2, 99) // unknown: no-op
	ack(t, db, g, 9, 1)  // unknown slot: no-op
	if got := seqs(readAll(t, db, g, 2)); !equalSeqs(got, []uint64{1, 3}) {
		t.Fatalf("after ack: %v", got)
	}
	wantStats(t, db, g, 2, QueueStats{Length: 2, Bytes: 4, NextSeq: 4})
	wantStats(t, db, g, 3, QueueStats{Length: 3, Bytes: 6, NextSeq: 4})
}

func TestReopenKeepsStateAndCounters(t *testing.T) {
	path := dbPath(t)
	db := openAt(t, path, Options{})
	g := gid(2)
	putSlots(t, db, g, 1, 2)
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(g, []byte("shared"), done) })
	for range 3 {
		appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("x")})
	}
	ack(t, db, g, 2, 1)
	before, _ := db.Group(g)
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	db = openAt(t, path, Options{})
	after, err := db.Group(g)
	if err != nil {
		t.Fatal(err)
	}
	if len(after.Slots) != 2 || !bytes.Equal(after.SharedDeviceData, []byte("shared")) ||
		!bytes.Equal(after.Slots[0].DeviceInfo, before.Slots[0].DeviceInfo) {
		t.Fatalf("group after reopen: %+v", after)
	}
	if got := seqs(readAll(t, db, g, 2)); !equalSeqs(got, []uint64{2, 3}) {
		t.Fatalf("queue after reopen: %v", got)
	}
	wantStats(t, db, g, 2, QueueStats{Length: 2, Bytes: 2, NextSeq: 4})
	ack(t, db, g, 2, 2)
	ack(t, db, g, 2, 3)
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	// An empty queue still remembers its counter: Reflected IDs are never
	// reused within a slot's life (§5.4).
	db = openAt(t, path, Options{})
	wantStats(t, db, g, 2, QueueStats{Length: 0, Bytes: 0, NextSeq: 4})
	res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("y")})
	if len(res.Delivered) != 1 || res.Delivered[0].Seq != 4 {
		t.Fatalf("after reopen delivered %v, want seq 4", res.Delivered)
	}
}

func TestNewSlotStartsEmpty(t *testing.T) {
	db := openAt(t, dbPath(t), Options{})
	g := gid(3)
	putSlots(t, db, g, 1, 2)
	appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("before 3")})

	putSlots(t, db, g, 3) // created after the append: must not get it
	wantStats(t, db, g, 3, QueueStats{NextSeq: 1})
	if es := readAll(t, db, g, 3); len(es) != 0 {
		t.Fatalf("new slot has %d entries", len(es))
	}
	res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("after 3")})
	if len(res.Delivered) != 2 || res.Delivered[0] != (Delivery{2, 2}) || res.Delivered[1] != (Delivery{3, 1}) {
		t.Fatalf("delivered %v", res.Delivered)
	}

	// Replacing a slot (a reconnect with new device info) keeps its queue.
	mustDo(t, func(done func(error)) {
		db.PutSlot(g, Slot{DeviceID: 2, DeviceInfo: []byte("new info"), ConnectedSince: 5}, done)
	})
	wantStats(t, db, g, 2, QueueStats{Length: 2, Bytes: 15, NextSeq: 3})
	st, _ := db.Group(g)
	if st.Slots[1].DeviceID != 2 || string(st.Slots[1].DeviceInfo) != "new info" || st.Slots[1].ConnectedSince != 5 {
		t.Fatalf("slot 2 after replace: %+v", st.Slots[1])
	}

	// Dropping and re-creating a slot starts a new life: empty queue, counter from 1.
	mustDo(t, func(done func(error)) { db.DeleteSlot(g, 2, nil, done) })
	if _, ok := db.QueueStats(g, 2); ok {
		t.Fatal("QueueStats for a deleted slot")
	}
	if es := readAll(t, db, g, 2); len(es) != 0 {
		t.Fatalf("deleted slot still readable: %v", seqs(es))
	}
	putSlots(t, db, g, 2)
	wantStats(t, db, g, 2, QueueStats{NextSeq: 1})
	if es := readAll(t, db, g, 2); len(es) != 0 {
		t.Fatalf("re-created slot has old entries: %v", seqs(es))
	}
	waitReclaimed(t, db)
}

func TestGroupStateAndTombstones(t *testing.T) {
	clk := newClock(1000)
	db := openAt(t, dbPath(t), Options{Now: clk.now})
	g := gid(4)
	if st, err := db.Group(g); err != nil || st.Slots != nil || st.Tombstones != nil || st.SharedDeviceData != nil {
		t.Fatalf("unknown group: %+v, %v", st, err)
	}
	putSlots(t, db, g, 30, 10, 20)
	mustDo(t, func(done func(error)) { db.DeleteSlot(g, 20, &Tombstone{Reason: Dropped, At: 500}, done) })
	st, err := db.Group(g)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Slots) != 2 || st.Slots[0].DeviceID != 10 || st.Slots[1].DeviceID != 30 {
		t.Fatalf("slots not sorted or wrong: %+v", st.Slots)
	}
	if len(st.Tombstones) != 1 || st.Tombstones[0] != (Tombstone{20, Dropped, 500}) {
		t.Fatalf("tombstones %+v", st.Tombstones)
	}
	// A tombstone for a device that never had a slot is still written.
	mustDo(t, func(done func(error)) { db.DeleteSlot(g, 40, &Tombstone{Reason: Dropped, At: 2000}, done) })
	// Re-creating the slot clears its tombstone (§18 row 7).
	putSlots(t, db, g, 20)
	st, _ = db.Group(g)
	if len(st.Tombstones) != 1 || st.Tombstones[0].DeviceID != 40 {
		t.Fatalf("tombstones after re-create: %+v", st.Tombstones)
	}
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(g, []byte{1, 2, 3}, done) })
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(g, nil, done) })
	if st, _ = db.Group(g); st.SharedDeviceData != nil {
		t.Fatalf("shared data not cleared: %x", st.SharedDeviceData)
	}
}

func TestPruneTombstonesAndEmptyGroups(t *testing.T) {
	path := dbPath(t)
	db := openAt(t, path, Options{})
	ga, gb, gc := gid(5), gid(6), gid(7)
	putSlots(t, db, ga, 1)
	mustDo(t, func(done func(error)) { db.DeleteSlot(ga, 2, &Tombstone{Reason: Dropped, At: 100}, done) })
	mustDo(t, func(done func(error)) { db.DeleteSlot(ga, 3, &Tombstone{Reason: QueueLimit, At: 300}, done) })
	mustDo(t, func(done func(error)) { db.DeleteSlot(gb, 1, &Tombstone{Reason: Dropped, At: 100}, done) })
	mustDo(t, func(done func(error)) { db.DeleteSlot(gc, 1, &Tombstone{Reason: Dropped, At: 100}, done) })
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(gc, []byte("keep"), done) })
	if err := db.Close(); err != nil { // tombstone index must be rebuilt on Open
		t.Fatal(err)
	}
	db = openAt(t, path, Options{})
	mustDo(t, func(done func(error)) { db.PruneTombstones(200, done) })

	st, _ := db.Group(ga)
	if len(st.Tombstones) != 1 || st.Tombstones[0].DeviceID != 3 || len(st.Slots) != 1 {
		t.Fatalf("group a: %+v", st)
	}
	var seen []GroupID
	if err := db.ForEachGroup(func(g GroupID, _ GroupState) error { seen = append(seen, g); return nil }); err != nil {
		t.Fatal(err)
	}
	// gb had only a tombstone: gone. gc keeps its shared data.
	if len(seen) != 2 || seen[0] != ga || seen[1] != gc {
		t.Fatalf("groups after prune: %v", seen)
	}
	mustDo(t, func(done func(error)) { db.PruneTombstones(1000, done) })
	if st, _ := db.Group(ga); len(st.Tombstones) != 0 {
		t.Fatalf("tombstones left: %+v", st.Tombstones)
	}
}

func TestForEachGroupPages(t *testing.T) {
	db := openAt(t, dbPath(t), Options{})
	const n = forEachPage*2 + 5
	for i := range n {
		var g GroupID
		g[0], g[1] = byte(i>>8), byte(i)
		db.SetSharedDeviceData(g, []byte{byte(i)}, nil)
	}
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(gid(0xff), []byte{1}, done) })
	count := 0
	var last GroupID
	err := db.ForEachGroup(func(g GroupID, st GroupState) error {
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

func TestOpenMarksConnectedSlotsDisconnected(t *testing.T) {
	path := dbPath(t)
	db := openAt(t, path, Options{})
	g := gid(8)
	mustDo(t, func(done func(error)) {
		db.PutSlot(g, Slot{DeviceID: 1, ConnectedSince: 100}, done)
	})
	mustDo(t, func(done func(error)) {
		db.PutSlot(g, Slot{DeviceID: 2, LastDisconnectAt: 50}, done)
	})
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openAt(t, path, Options{Now: newClock(7777).now})
	st, _ := db.Group(g)
	if st.Slots[0].ConnectedSince != 0 || st.Slots[0].LastDisconnectAt != 7777 {
		t.Fatalf("slot 1 after crash recovery: %+v", st.Slots[0])
	}
	if st.Slots[1].LastDisconnectAt != 50 {
		t.Fatalf("offline slot changed: %+v", st.Slots[1])
	}
}
