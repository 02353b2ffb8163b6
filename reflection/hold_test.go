package reflection

import (
	"testing"
)

func TestEphemeralStoresNothingButAdvancesSeq(t *testing.T) {
	path := dbPath(t)
	db := openAt(t, path, Options{})
	g := gid(20)
	putSlots(t, db, g, 1, 2, 3)
	appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("one")})
	res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("typing"), Ephemeral: true})
	if len(res.Delivered) != 2 || res.Delivered[0] != (Delivery{2, 2}) || res.Delivered[1] != (Delivery{3, 2}) {
		t.Fatalf("ephemeral delivered %v", res.Delivered)
	}
	if res.Timestamp == 0 {
		t.Fatal("ephemeral without timestamp")
	}
	appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("three")})
	for _, d := range []DeviceID{2, 3} {
		es := readAll(t, db, g, d)
		if !equalSeqs(seqs(es), []uint64{1, 3}) {
			t.Fatalf("slot %d seqs %v", d, seqs(es))
		}
		wantStats(t, db, g, d, QueueStats{Length: 2, Bytes: 8, NextSeq: 4})
	}
	ack(t, db, g, 2, 2) // the clients ack ephemeral ids anyway: no-op
	wantStats(t, db, g, 2, QueueStats{Length: 2, Bytes: 8, NextSeq: 4})
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openAt(t, path, Options{})
	wantStats(t, db, g, 3, QueueStats{Length: 2, Bytes: 8, NextSeq: 4})
}

func TestHoldAndRelease(t *testing.T) {
	clk := newClock(1000)
	db := openAt(t, dbPath(t), Options{Now: clk.now})
	g := gid(21)
	putSlots(t, db, g, 1, 2, 3)

	var heldTS []uint64
	for i, env := range []string{"h1", "h2"} {
		clk.set(1000 + int64(i))
		res := appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte(env), Hold: true})
		if len(res.Delivered) != 0 || len(res.Dropped) != 0 || res.Timestamp != uint64(1000+i) {
			t.Fatalf("hold result %+v", res)
		}
		heldTS = append(heldTS, res.Timestamp)
	}
	for _, d := range []DeviceID{2, 3} {
		wantStats(t, db, g, d, QueueStats{NextSeq: 1})
	}
	// Another device reflects while 1 holds the lock: delivered at once.
	clk.set(2000)
	res := appendSync(t, db, AppendRequest{Group: g, Sender: 2, Envelope: []byte("other")})
	if len(res.Delivered) != 2 {
		t.Fatalf("non-holder delivered %v", res.Delivered)
	}
	clk.set(3000)
	res = releaseSync(t, db, g, 1)
	if res.Timestamp != 3000 {
		t.Fatalf("release timestamp %d", res.Timestamp)
	}
	want := []Delivery{{2, 1}, {3, 2}, {2, 2}, {3, 3}}
	if len(res.Delivered) != len(want) {
		t.Fatalf("release delivered %v, want %v", res.Delivered, want)
	}
	for i := range want {
		if res.Delivered[i] != want[i] {
			t.Fatalf("release delivered %v, want %v", res.Delivered, want)
		}
	}
	es := readAll(t, db, g, 3)
	envelopesEqual(t, es, "other", "h1", "h2")
	if es[1].Timestamp != heldTS[0] || es[2].Timestamp != heldTS[1] {
		t.Fatalf("released copies should keep the held (ReflectAck) timestamps: %d %d", es[1].Timestamp, es[2].Timestamp)
	}
	envelopesEqual(t, readAll(t, db, g, 2), "h1", "h2")
	if es := readAll(t, db, g, 1); len(es) != 1 || string(es[0].Envelope) != "other" {
		t.Fatalf("holder's own queue: %v", es)
	}
	// Nothing left to release.
	if res := releaseSync(t, db, g, 1); len(res.Delivered) != 0 {
		t.Fatalf("second release delivered %v", res.Delivered)
	}
}

func TestHeldReleasedOnOpenAfterCrash(t *testing.T) {
	path := dbPath(t)
	db := openAt(t, path, Options{})
	g := gid(22)
	putSlots(t, db, g, 1, 2)
	// 3 held reflections of 1, then the "crash": Close without ReleaseHeld.
	for _, env := range []string{"a", "b", "c"} {
		appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte(env), Hold: true})
	}
	appendSync(t, db, AppendRequest{Group: gid(23), Sender: 9, Envelope: []byte("no group yet"), Hold: true})
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openAt(t, path, Options{})
	envelopesEqual(t, readAll(t, db, g, 2), "a", "b", "c")
	wantStats(t, db, g, 2, QueueStats{Length: 3, Bytes: 3, NextSeq: 4})
	if res := releaseSync(t, db, g, 1); len(res.Delivered) != 0 {
		t.Fatalf("held entries were not removed: %v", res.Delivered)
	}
	// A group that only had held entries and no slots is gone afterwards.
	if st, _ := db.Group(gid(23)); st.Slots != nil || st.Tombstones != nil {
		t.Fatalf("group 23: %+v", st)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Check(path); err != nil {
		t.Fatal(err)
	}
}

// A held queue may push a recipient over its limit on release: same rule
// as Append, one aggregated result.
func TestReleaseHeldRespectsLimits(t *testing.T) {
	db := openAt(t, dbPath(t), Options{MaxQueueLength: 2})
	g := gid(24)
	putSlots(t, db, g, 1, 2, 3)
	for range 3 {
		appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte("x"), Hold: true})
	}
	ack(t, db, g, 3, 1) // nothing to ack yet: no-op
	res := releaseSync(t, db, g, 1)
	if len(res.Dropped) != 2 || res.Dropped[0] != 2 || res.Dropped[1] != 3 {
		t.Fatalf("dropped %v", res.Dropped)
	}
	if len(res.Delivered) != 4 {
		t.Fatalf("delivered %v", res.Delivered)
	}
	st, _ := db.Group(g)
	if len(st.Slots) != 1 || len(st.Tombstones) != 2 {
		t.Fatalf("group %+v", st)
	}
}
