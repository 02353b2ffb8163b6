package reflection

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// The schema-1 fixture (testdata/v1.db) was written by the schema-1 code of
// this package (commit b6787db) with
//
//	REFLECTION_WRITE_V1_FIXTURE=1 go test -run TestWriteV1Fixture ./reflection/
//
// together with testdata/v1.expected.json: the state that code read back
// after reopening the file (which runs Open's crash repair: connected slots
// are marked disconnected, held reflections are released), at the fixed
// clock fixtureReopenMs. The migration test opens a copy of v1.db with the
// current code at the same clock and must read exactly that state.
const (
	fixtureEnv      = "REFLECTION_WRITE_V1_FIXTURE"
	fixtureWriteMs  = 1_700_000_000_000
	fixtureReopenMs = 1_700_000_900_000
)

func TestWriteV1Fixture(t *testing.T) {
	if os.Getenv(fixtureEnv) == "" {
		t.Skip("writes testdata/v1.db; set " + fixtureEnv + "=1 (only with the schema-1 code)")
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "v1.db")
	clk := newClock(fixtureWriteMs)
	db := openAt(t, path, Options{Now: clk.now, MaxQueueLength: 40})
	writeFixtureState(t, db, clk)
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile("testdata/v1.db", raw, 0o644); err != nil {
		t.Fatal(err)
	}
	re := openAt(t, path, Options{Now: newClock(fixtureReopenMs).now, MaxQueueLength: 40})
	dump := dumpStore(t, re)
	b, err := json.MarshalIndent(dump, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile("testdata/v1.expected.json", append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
}

// writeFixtureState writes, through the public API only: several groups,
// slots of both policies (one left "connected"), queues with gaps from
// acks, a purged queue, tombstones of both reasons (one from a queue-limit
// drop with MaxQueueLength 40), shared data, held reflections of two
// senders, and counters advanced by ephemeral reflections.
func writeFixtureState(t *testing.T, db *DB, clk *clock) {
	t.Helper()
	put := func(g GroupID, d DeviceID, p ExpirationPolicy, connected int64) {
		s := Slot{DeviceID: d, DeviceInfo: []byte(fmt.Sprintf("info-%d-%d", g[0], d)), Policy: p,
			CreatedAt: clk.now().UnixMilli(), ConnectedSince: connected}
		mustDo(t, func(done func(error)) { db.PutSlot(g, s, done) })
	}
	app := func(g GroupID, from DeviceID, env string, eph, hold bool) {
		appendSync(t, db, AppendRequest{Group: g, Sender: from, Envelope: []byte(env), Ephemeral: eph, Hold: hold})
		clk.set(clk.ms.Load() + 7)
	}
	// Group 1: three slots, gaps from acks, an ephemeral-advanced counter.
	g1 := gid(1)
	put(g1, 10, Persistent, 0)
	put(g1, 20, Volatile, 0)
	put(g1, 30, Persistent, fixtureWriteMs+5) // left connected
	for i := range 12 {
		app(g1, DeviceID(10*(i%3+1)), fmt.Sprintf("g1-m%02d", i), false, false)
		if i%4 == 2 {
			app(g1, 10, fmt.Sprintf("g1-eph%02d", i), true, false)
		}
	}
	for _, seq := range []uint64{1, 3, 4, 8} {
		ack(t, db, g1, 20, seq)
	}
	ack(t, db, g1, 30, 2)
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(g1, []byte("shared-g1"), done) })

	// Group 2: a dropped slot (tombstone Dropped), a queue-limit drop
	// (tombstone QueueLimit), a purged queue, held reflections.
	g2 := gid(2)
	put(g2, 1, Persistent, 0)
	put(g2, 2, Persistent, 0)
	put(g2, 3, Volatile, 0)
	put(g2, 4, Persistent, 0)
	for i := range 5 {
		app(g2, 1, fmt.Sprintf("g2-a%d", i), false, false)
	}
	mustDo(t, func(done func(error)) { db.DeleteSlot(g2, 4, &Tombstone{Reason: Dropped}, done) })
	mustDo(t, func(done func(error)) { db.PurgeQueue(g2, 3, done) })
	ack(t, db, g2, 3, 99) // unknown seq: no-op
	for i := range 40 {   // slot 1 never acks what 2 sends: 2's copies to 1 and 3
		app(g2, 2, fmt.Sprintf("g2-b%02d", i), false, false)
		if i%2 == 0 {
			ack(t, db, g2, 3, uint64(6+i))
		}
	}
	// slot 1 now has 40 entries: the next one drops it (QueueLimit).
	app(g2, 3, "g2-overflow", false, false)
	put(g2, 5, Persistent, 0)
	app(g2, 2, "g2-held-2a", false, true)
	app(g2, 3, "g2-held-3a", false, true)
	app(g2, 2, "g2-held-2b", false, true)
	app(g2, 5, "g2-after", false, false)
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(g2, []byte{0, 1, 2, 255}, done) })

	// Group 3: shared data and a tombstone only (no slots).
	g3 := gid(3)
	put(g3, 7, Volatile, 0)
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(g3, []byte("shared-g3"), done) })
	mustDo(t, func(done func(error)) { db.DeleteSlot(g3, 7, &Tombstone{Reason: Dropped, At: 12345}, done) })

	// Group 4: one slot, only ephemeral traffic (counter > 0, empty queue),
	// plus a slot re-created after a drop (counter restarts at 1).
	g4 := gid(4)
	put(g4, 1, Persistent, 0)
	put(g4, 2, Persistent, 0)
	for i := range 3 {
		app(g4, 1, fmt.Sprintf("g4-eph%d", i), true, false)
	}
	app(g4, 1, "g4-old-incarnation", false, false)
	mustDo(t, func(done func(error)) { db.DeleteSlot(g4, 2, nil, done) })
	put(g4, 2, Volatile, 0)
	app(g4, 1, "g4-new-incarnation", false, false)
}

// storeDump is everything a Store reads back, in a stable order.
type storeDump struct {
	Groups []groupDump `json:"groups"`
}

type groupDump struct {
	ID     string       `json:"id"`
	State  GroupState   `json:"state"`
	Queues []queueDump  `json:"queues"`
	Stats  []QueueStats `json:"stats"`
}

type queueDump struct {
	DeviceID DeviceID `json:"device_id"`
	Entries  []Entry  `json:"entries"`
}

func dumpStore(t testing.TB, db *DB) storeDump {
	t.Helper()
	var out storeDump
	err := db.ForEachGroup(func(g GroupID, st GroupState) error {
		gd := groupDump{ID: g.String(), State: st}
		for _, s := range st.Slots {
			qs, ok := db.QueueStats(g, s.DeviceID)
			if !ok {
				return fmt.Errorf("group %s: slot %d without queue stats", g, s.DeviceID)
			}
			gd.Stats = append(gd.Stats, qs)
			gd.Queues = append(gd.Queues, queueDump{DeviceID: s.DeviceID, Entries: readAll(t, db, g, s.DeviceID)})
		}
		out.Groups = append(out.Groups, gd)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.SortFunc(out.Groups, func(a, b groupDump) int {
		if a.ID < b.ID {
			return -1
		}
		if a.ID > b.ID {
			return 1
		}
		return 0
	})
	return out
}
