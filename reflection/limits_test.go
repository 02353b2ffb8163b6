package reflection

import (
	"bytes"
	"testing"
)

func TestQueueLimitByCount(t *testing.T) {
	path := dbPath(t)
	clk := newClock(5000)
	db := openAt(t, path, Options{MaxQueueLength: 3, Now: clk.now})
	g := gid(10)
	putSlots(t, db, g, 1, 2, 3)
	for i := range 3 {
		res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("m")})
		ack(t, db, g, 3, uint64(i+1)) // slot 3 keeps up, slot 2 never acks
		if len(res.Dropped) != 0 {
			t.Fatalf("append %d dropped %v", i, res.Dropped)
		}
	}
	clk.set(6000)
	res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("m")})
	if len(res.Dropped) != 1 || res.Dropped[0] != 2 {
		t.Fatalf("dropped %v, want [2]", res.Dropped)
	}
	if len(res.Delivered) != 1 || res.Delivered[0] != (Delivery{3, 4}) {
		t.Fatalf("delivered %v, want [{3 4}]", res.Delivered)
	}
	st, _ := db.Group(g)
	if len(st.Slots) != 2 || st.Slots[0].DeviceID != 1 || st.Slots[1].DeviceID != 3 {
		t.Fatalf("slots %+v", st.Slots)
	}
	if len(st.Tombstones) != 1 || st.Tombstones[0] != (Tombstone{2, QueueLimit, 6000}) {
		t.Fatalf("tombstones %+v", st.Tombstones)
	}
	if _, ok := db.QueueStats(g, 2); ok {
		t.Fatal("dropped slot still in the index")
	}
	if es := readAll(t, db, g, 2); len(es) != 0 {
		t.Fatalf("dropped slot's queue readable: %v", seqs(es))
	}
	// Later appends do not go to the dropped slot.
	res = appendSync(t, db, AppendRequest{Group: g, Sender: 3, Envelope: []byte("n")})
	if len(res.Delivered) != 1 || res.Delivered[0].DeviceID != 1 {
		t.Fatalf("delivered %v", res.Delivered)
	}

	// The device comes back as a NEW slot: tombstone cleared, empty queue.
	putSlots(t, db, g, 2)
	st, _ = db.Group(g)
	if len(st.Tombstones) != 0 {
		t.Fatalf("tombstone not cleared: %+v", st.Tombstones)
	}
	wantStats(t, db, g, 2, QueueStats{NextSeq: 1})

	waitReclaimed(t, db)
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Check(path); err != nil {
		t.Fatalf("Check: %v", err)
	}
}

func TestQueueLimitByBytes(t *testing.T) {
	db := openAt(t, dbPath(t), Options{MaxQueueBytes: 100})
	g := gid(11)
	putSlots(t, db, g, 1, 2)
	env := bytes.Repeat([]byte{7}, 40)
	for range 2 {
		if res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: env}); len(res.Dropped) != 0 {
			t.Fatalf("dropped early: %v", res.Dropped)
		}
	}
	wantStats(t, db, g, 2, QueueStats{Length: 2, Bytes: 80, NextSeq: 3})
	res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: env}) // 120 > 100
	if len(res.Dropped) != 1 || res.Dropped[0] != 2 || len(res.Delivered) != 0 {
		t.Fatalf("result %+v", res)
	}
	st, _ := db.Group(g)
	if len(st.Slots) != 1 || len(st.Tombstones) != 1 || st.Tombstones[0].Reason != QueueLimit {
		t.Fatalf("group %+v", st)
	}
}

// Ephemeral reflections never count against the limits and are not stored.
func TestEphemeralIgnoresLimits(t *testing.T) {
	db := openAt(t, dbPath(t), Options{MaxQueueLength: 1})
	g := gid(12)
	putSlots(t, db, g, 1, 2)
	appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("stored")})
	for range 5 {
		if res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("typing"), Ephemeral: true}); len(res.Dropped) != 0 {
			t.Fatalf("ephemeral dropped a slot: %+v", res)
		}
	}
	wantStats(t, db, g, 2, QueueStats{Length: 1, Bytes: 6, NextSeq: 7})
}
