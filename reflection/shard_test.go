package reflection

import (
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/bbolt"
)

const testShard = 0x42

// sgid is a group id in shard s.
func sgid(s, n byte) GroupID {
	g := gid(n)
	g[0] = s
	return g
}

type heldDump struct {
	Group    GroupID
	Sender   DeviceID
	TS       uint64
	Envelope string
}

// shardDump is everything the store reads back for one shard's groups,
// held reflections included.
type shardDump struct {
	Groups []groupDump
	Held   []heldDump
}

func dumpShard(t testing.TB, db *DB, shard byte) shardDump {
	t.Helper()
	var out shardDump
	for _, gd := range dumpStore(t, db).Groups {
		if gd.ID[:2] == fmt.Sprintf("%02x", shard) {
			out.Groups = append(out.Groups, gd)
		}
	}
	err := db.bolt.View(func(tx *bbolt.Tx) error {
		c := tx.Bucket(bucketHeld).Cursor()
		for k, v := c.Seek([]byte{shard}); k != nil && k[0] == shard; k, v = c.Next() {
			out.Held = append(out.Held, heldDump{GroupID(k[:32]), DeviceID(beUint64(k[32:])), beUint64(v), string(v[8:])})
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func sameDump(t testing.TB, what string, got, want any) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("%s differs:\n got  %+v\n want %+v", what, got, want)
	}
}

func exportShard(t testing.TB, db *DB, shard byte) ([]byte, ShardStats) {
	t.Helper()
	var buf bytes.Buffer
	st, err := db.ExportShard(context.Background(), shard, &buf)
	if err != nil {
		t.Fatalf("ExportShard: %v", err)
	}
	if st.Bytes != int64(buf.Len()) {
		t.Fatalf("ExportShard reports %d bytes, wrote %d", st.Bytes, buf.Len())
	}
	return buf.Bytes(), st
}

// writeShardSource fills db with a shard of several groups: slots of both
// policies (one connected), queues with gaps from acks, some flushed and
// some only in memory, a purged queue, a counter advanced by ephemeral
// reflections, held reflections of two senders, tombstones, shared data;
// and a group of another shard.
func writeShardSource(t *testing.T, db *DB, clk *clock) {
	t.Helper()
	put := func(g GroupID, d DeviceID, p ExpirationPolicy, connected int64) {
		s := Slot{DeviceID: d, DeviceInfo: []byte(fmt.Sprintf("src-%x-%d", g[1], d)), Policy: p,
			CreatedAt: clk.now().UnixMilli(), ConnectedSince: connected}
		mustDo(t, func(done func(error)) { db.PutSlot(g, s, done) })
	}
	app := func(g GroupID, from DeviceID, env string, eph, hold bool) {
		appendSync(t, db, AppendRequest{Group: g, Sender: from, Envelope: []byte(env), Ephemeral: eph, Hold: hold})
		clk.set(clk.ms.Load() + 3)
	}
	ga, gb, gc := sgid(testShard, 1), sgid(testShard, 2), sgid(testShard, 3)
	put(ga, 10, Persistent, 0)
	put(ga, 20, Volatile, 0)
	put(ga, 30, Persistent, clk.now().UnixMilli())
	for i := range 15 {
		app(ga, DeviceID(10*(i%3+1)), fmt.Sprintf("a-%02d", i), i%5 == 4, false)
	}
	// Acks with gaps: flushed ones, then some that are only in memory.
	ack(t, db, ga, 20, 1)
	ack(t, db, ga, 20, 3)
	ack(t, db, ga, 10, 2)
	if err := db.flush(false); err != nil {
		t.Fatal(err)
	}
	ack(t, db, ga, 20, 5)
	ack(t, db, ga, 30, 1)
	ack(t, db, ga, 30, 2)
	ack(t, db, ga, 10, 6)
	// Ephemeral only at the end: the counter is ahead of the queue.
	app(ga, 20, "a-eph", true, false)
	// Held reflections of two senders.
	app(ga, 10, "a-held-1", false, true)
	app(ga, 30, "a-held-2", false, true)
	app(ga, 10, "a-held-3", false, true)
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(ga, []byte("shared-a"), done) })

	put(gb, 1, Persistent, 0)
	put(gb, 2, Volatile, 0)
	put(gb, 3, Persistent, 0)
	for i := range 6 {
		app(gb, 1, fmt.Sprintf("b-%d", i), false, false)
	}
	mustDo(t, func(done func(error)) { db.PurgeQueue(gb, 2, done) })
	app(gb, 1, "b-after-purge", false, false)
	mustDo(t, func(done func(error)) { db.DeleteSlot(gb, 3, &Tombstone{Reason: QueueLimit, At: 777}, done) })

	// Tombstone and shared data only.
	put(gc, 5, Volatile, 0)
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(gc, []byte("shared-c"), done) })
	mustDo(t, func(done func(error)) { db.DeleteSlot(gc, 5, &Tombstone{Reason: Dropped, At: 555}, done) })

	// Another shard.
	writeOtherShard(t, db, clk, "src")
}

func writeOtherShard(t *testing.T, db *DB, clk *clock, tag string) {
	t.Helper()
	g := sgid(testShard+1, 9)
	putSlots(t, db, g, 1, 2)
	for i := range 4 {
		appendSync(t, db, AppendRequest{Group: g, Sender: 1, Envelope: []byte(fmt.Sprintf("%s-other-%d", tag, i))})
		clk.set(clk.ms.Load() + 1)
	}
	ack(t, db, g, 2, 2)
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(g, []byte(tag+"-other"), done) })
}

// writeStaleShard gives db its own, different state of the shard: the
// same group id with another slot, a group the source does not have, a
// held reflection, a tombstone and shared data.
func writeStaleShard(t *testing.T, db *DB, clk *clock) {
	t.Helper()
	ga, gd := sgid(testShard, 1), sgid(testShard, 4)
	putSlots(t, db, ga, 10, 99)
	for i := range 30 {
		appendSync(t, db, AppendRequest{Group: ga, Sender: 99, Envelope: []byte(fmt.Sprintf("stale-%d", i))})
	}
	ack(t, db, ga, 10, 3)
	putSlots(t, db, gd, 1, 2, 3)
	appendSync(t, db, AppendRequest{Group: gd, Sender: 1, Envelope: []byte("stale-d")})
	appendSync(t, db, AppendRequest{Group: gd, Sender: 2, Envelope: []byte("stale-held"), Hold: true})
	mustDo(t, func(done func(error)) { db.DeleteSlot(gd, 3, &Tombstone{Reason: Dropped, At: 1}, done) })
	mustDo(t, func(done func(error)) { db.SetSharedDeviceData(gd, []byte("stale-shared"), done) })
	clk.set(clk.ms.Load() + 1)
}

func TestShardExportImport(t *testing.T) {
	clk := newClock(1_800_000_000_000)
	opts := Options{Now: clk.now, AckFlushInterval: time.Hour, AckFlushAcks: 1 << 20}
	srcPath, dstPath := dbPath(t), dbPath(t)
	src, dst := openAt(t, srcPath, opts), openAt(t, dstPath, opts)
	writeShardSource(t, src, clk)
	writeOtherShard(t, dst, clk, "dst")
	writeStaleShard(t, dst, clk)
	otherBefore := dumpShard(t, dst, testShard+1)
	want := dumpShard(t, src, testShard)
	if len(want.Groups) != 3 || len(want.Held) != 3 {
		t.Fatalf("source shard: %d groups, %d held", len(want.Groups), len(want.Held))
	}
	// The lazy acks are not on disk yet: the export must count them.
	if e := readAll(t, src, sgid(testShard, 1), 30); len(e) == 0 || e[0].Seq != 3 {
		t.Fatalf("slot 30 queue starts at %v", seqs(e))
	}

	stream, est := exportShard(t, src, testShard)
	wantStats := ShardStats{Groups: 3, Slots: 5, Bytes: int64(len(stream))}
	for _, g := range want.Groups {
		for _, qs := range g.Stats {
			wantStats.Entries += qs.Length
		}
	}
	if est != wantStats {
		t.Fatalf("export stats %+v, want %+v", est, wantStats)
	}
	ist, err := dst.ImportShard(context.Background(), testShard, 7, bytes.NewReader(stream))
	if err != nil {
		t.Fatalf("ImportShard: %v", err)
	}
	if ist != est {
		t.Fatalf("import stats %+v, export stats %+v", ist, est)
	}
	if gen, has := dst.ShardGeneration(testShard); gen != 7 || !has {
		t.Fatalf("generation after import: %d (data %v), want 7", gen, has)
	}
	// The import settles the shard for a node none of its devices is
	// connected to: the same as the donor would be after closing them.
	settleAsImported(t, src, testShard, clk)
	want = dumpShard(t, src, testShard)
	if len(want.Held) != 0 {
		t.Fatalf("held reflections after settling: %+v", want.Held)
	}
	sameDump(t, "imported shard", dumpShard(t, dst, testShard), want)
	stream, _ = exportShard(t, src, testShard)
	sameDump(t, "other shard", dumpShard(t, dst, testShard+1), otherBefore)
	if _, ok := dst.QueueStats(sgid(testShard, 1), 99); ok {
		t.Fatal("stale slot 99 survived the import")
	}
	// Exporting the imported shard gives the same stream: nothing was
	// lost or added on the way.
	if again, _ := exportShard(t, dst, testShard); !bytes.Equal(again, stream) {
		t.Fatal("export of the imported shard differs from the source's export")
	}

	// Both stores go on identically: counters continue, acks work, held
	// reflections are released with the Seqs the source would give.
	ga := sgid(testShard, 1)
	for _, db := range []*DB{src, dst} {
		qs, _ := db.QueueStats(ga, 20)
		res := appendSync(t, db, AppendRequest{Group: ga, Sender: 10, Envelope: []byte("after")})
		if got := res.Delivered[0]; got.DeviceID != 20 || got.Seq != qs.NextSeq {
			t.Fatalf("append after import delivered %+v, want seq %d", got, qs.NextSeq)
		}
		ack(t, db, ga, 20, qs.NextSeq)
		ack(t, db, ga, 10, 4)
		releaseSync(t, db, ga, 10)
	}
	sameDump(t, "shard after appends, acks and a release", dumpShard(t, dst, testShard), dumpShard(t, src, testShard))

	// Rebuilt from disk (Open also releases the held reflections left and
	// marks the connected slot disconnected, the same way on both).
	for _, db := range []*DB{src, dst} {
		if err := db.Close(); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{srcPath, dstPath} {
		if err := Check(p); err != nil {
			t.Fatalf("Check %s: %v", p, err)
		}
	}
	// From here acks and reclaiming are flushed at the default pace.
	opts.AckFlushInterval, opts.AckFlushAcks = 0, 0
	src, dst = openAt(t, srcPath, opts), openAt(t, dstPath, opts)
	got := dumpShard(t, dst, testShard)
	sameDump(t, "shard after reopen", got, dumpShard(t, src, testShard))
	if len(got.Held) != 0 {
		t.Fatalf("held reflections after reopen: %+v", got.Held)
	}
	sameDump(t, "other shard after reopen", dumpShard(t, dst, testShard+1), otherBefore)

	// A drop for an older generation than the copy keeps it.
	if _, ok, err := dst.DropShard(context.Background(), testShard, 6); err != nil || ok {
		t.Fatalf("DropShard of generation 6 over a copy of generation 7: dropped %v, %v", ok, err)
	}
	sameDump(t, "shard after a stale drop", dumpShard(t, dst, testShard), dumpShard(t, src, testShard))
	// The donor drops the shard; its log entries are reclaimed in chunks.
	dropped, ok, err := src.DropShard(context.Background(), testShard, 7)
	if err != nil || !ok {
		t.Fatalf("DropShard: dropped %v, %v", ok, err)
	}
	if dropped.Groups != 3 || dropped.Slots != 5 {
		t.Fatalf("DropShard stats %+v", dropped)
	}
	if d := dumpShard(t, src, testShard); len(d.Groups) != 0 || len(d.Held) != 0 {
		t.Fatalf("shard still has state after DropShard: %+v", d)
	}
	if _, ok := src.QueueStats(ga, 20); ok {
		t.Fatal("QueueStats of a dropped shard's slot")
	}
	if d := dumpShard(t, src, testShard+1); len(d.Groups) != 1 {
		t.Fatalf("DropShard touched another shard: %+v", d)
	}
	waitReclaimed(t, src)
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	res, err := CheckReport(srcPath)
	if err != nil {
		t.Fatalf("Check after DropShard: %v", err)
	}
	if res.Slots != 2 || !res.Clean {
		t.Fatalf("Check after DropShard: %+v", res)
	}
}

// settleAsImported does to db's copy of shard what ImportShard does to an
// imported one: connected slots disconnected now, held reflections
// released in key order.
func settleAsImported(t *testing.T, db *DB, shard byte, clk *clock) {
	t.Helper()
	for _, gd := range dumpShard(t, db, shard).Groups {
		g := mustGroupID(t, gd.ID)
		st, err := db.Group(g)
		if err != nil {
			t.Fatal(err)
		}
		for _, sl := range st.Slots {
			if sl.ConnectedSince != 0 {
				sl.ConnectedSince, sl.LastDisconnectAt = 0, clk.now().UnixMilli()
				mustDo(t, func(done func(error)) { db.PutSlot(g, sl, done) })
			}
		}
	}
	seen := map[slotRef]bool{}
	for _, h := range dumpShard(t, db, shard).Held {
		if k := (slotRef{h.Group, h.Sender}); !seen[k] {
			seen[k] = true
			releaseSync(t, db, h.Group, h.Sender)
		}
	}
}

func mustGroupID(t *testing.T, s string) GroupID {
	t.Helper()
	var g GroupID
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(g) {
		t.Fatalf("group id %q: %v", s, err)
	}
	copy(g[:], b)
	return g
}

// TestShardGenerations: ResetShard empties a shard whatever its
// generation; DropShard only drops copies that are not newer than asked;
// both survive a reopen.
func TestShardGenerations(t *testing.T) {
	clk := newClock(1_800_000_000_000)
	path := dbPath(t)
	db := openAt(t, path, Options{Now: clk.now})
	if gen, has := db.ShardGeneration(testShard); gen != 0 || has {
		t.Fatalf("empty store: generation %d, data %v", gen, has)
	}
	writeShardSource(t, db, clk)
	if gen, has := db.ShardGeneration(testShard); gen != 0 || !has {
		t.Fatalf("written store: generation %d, data %v", gen, has)
	}
	if _, err := db.ResetShard(context.Background(), testShard, 50); err != nil {
		t.Fatal(err)
	}
	if gen, has := db.ShardGeneration(testShard); gen != 50 || has {
		t.Fatalf("after ResetShard: generation %d, data %v", gen, has)
	}
	if d := dumpShard(t, db, testShard+1); len(d.Groups) != 1 {
		t.Fatalf("ResetShard touched another shard: %+v", d)
	}
	putSlots(t, db, sgid(testShard, 1), 1, 2)
	if _, ok, _ := db.DropShard(context.Background(), testShard, 49); ok {
		t.Fatal("DropShard(49) dropped a copy of generation 50")
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	db = openAt(t, path, Options{Now: clk.now})
	if gen, has := db.ShardGeneration(testShard); gen != 50 || !has {
		t.Fatalf("after reopen: generation %d, data %v", gen, has)
	}
	if _, ok, err := db.DropShard(context.Background(), testShard, 50); !ok || err != nil {
		t.Fatalf("DropShard(50) of a copy of generation 50: %v, %v", ok, err)
	}
	if gen, has := db.ShardGeneration(testShard); gen != 50 || has {
		t.Fatalf("after the drop: generation %d, data %v", gen, has)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Check(path); err != nil {
		t.Fatalf("Check: %v", err)
	}
}

func TestShardImportRefusesBadStreams(t *testing.T) {
	clk := newClock(1_800_000_000_000)
	opts := Options{Now: clk.now}
	src, dst := openAt(t, dbPath(t), opts), openAt(t, dbPath(t), opts)
	writeShardSource(t, src, clk)
	writeStaleShard(t, dst, clk)
	stream, _ := exportShard(t, src, testShard)
	before := dumpStore(t, dst)
	beforeHeld := dumpShard(t, dst, testShard).Held

	flipped := bytes.Clone(stream)
	flipped[len(flipped)/2] ^= 1
	bad := map[string][]byte{
		"empty":        nil,
		"header only":  stream[:shardHeaderLen],
		"truncated":    stream[:len(stream)-1],
		"half":         stream[:len(stream)/2],
		"flipped byte": flipped,
		"trailing":     append(bytes.Clone(stream), 0),
	}
	for name, b := range bad {
		if _, err := dst.ImportShard(context.Background(), testShard, 1, bytes.NewReader(b)); err == nil {
			t.Fatalf("%s: import accepted", name)
		}
	}
	// A valid stream for another shard.
	if _, err := dst.ImportShard(context.Background(), testShard+1, 1, bytes.NewReader(stream)); err == nil {
		t.Fatal("stream of shard 42 imported as shard 43")
	}
	other, _ := exportShard(t, src, testShard+1)
	if _, err := dst.ImportShard(context.Background(), testShard, 1, bytes.NewReader(other)); err == nil {
		t.Fatal("stream of shard 43 imported as shard 42")
	}
	// A cancelled context changes nothing either.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := dst.ImportShard(ctx, testShard, 1, bytes.NewReader(stream)); err == nil {
		t.Fatal("import with a cancelled context succeeded")
	}
	sameDump(t, "store after refused imports", dumpStore(t, dst), before)
	sameDump(t, "held after refused imports", dumpShard(t, dst, testShard).Held, beforeHeld)
}

// TestShardMove10k: a shard with 10,000 log entries queued for two
// recipients (one group, one sender; 19,999 queued copies after one ack) is exported, imported in one transaction and
// dropped on the donor.
func TestShardMove10k(t *testing.T) {
	const n = 10_000
	var commits atomic.Int64 // write transactions with requests on dst
	src := openAt(t, dbPath(t), Options{})
	dst := openAt(t, dbPath(t), Options{OnCommit: func(batch int, _ time.Duration, err error) {
		if batch > 0 && err == nil {
			commits.Add(1)
		}
	}})
	g := sgid(testShard, 7)
	putSlots(t, src, g, 1, 2, 3)
	env := bytes.Repeat([]byte{0xab}, 200)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	wg.Add(n)
	for i := range n {
		e := bytes.Clone(env)
		e[0], e[1] = byte(i>>8), byte(i)
		src.Append(AppendRequest{Group: g, Sender: 1, Envelope: e}, func(_ AppendResult, err error) {
			if err != nil {
				mu.Lock()
				firstErr = err
				mu.Unlock()
			}
			wg.Done()
		})
	}
	wg.Wait()
	if firstErr != nil {
		t.Fatal(firstErr)
	}
	ack(t, src, g, 3, 5000)
	putSlots(t, dst, g, 1, 4)
	appendSync(t, dst, AppendRequest{Group: g, Sender: 1, Envelope: []byte("stale")})

	start := time.Now()
	var buf bytes.Buffer
	est, err := src.ExportShard(context.Background(), testShard, &buf)
	if err != nil {
		t.Fatal(err)
	}
	exportTook := time.Since(start)
	start = time.Now()
	before := commits.Load()
	ist, err := dst.ImportShard(context.Background(), testShard, 1, &buf)
	if err != nil {
		t.Fatal(err)
	}
	importTook := time.Since(start)
	if c := commits.Load() - before; c != 1 {
		t.Fatalf("import took %d write transactions, want 1", c)
	}
	t.Logf("shard with %d queued entries (%d log entries, %d stream bytes): export %v, import %v",
		est.Entries, n, est.Bytes, exportTook, importTook)
	if est.Entries != 2*n-1 || ist != est {
		t.Fatalf("export %+v, import %+v", est, ist)
	}
	for _, d := range []DeviceID{2, 3} {
		w, _ := src.QueueStats(g, d)
		wantStats(t, dst, g, d, w)
		a, b := readAll(t, src, g, d), readAll(t, dst, g, d)
		if len(a) != len(b) || !equalSeqs(seqs(a), seqs(b)) || !bytes.Equal(a[len(a)-1].Envelope, b[len(b)-1].Envelope) {
			t.Fatalf("slot %d: queues differ", d)
		}
	}
	if _, ok := dst.QueueStats(g, 4); ok {
		t.Fatal("stale slot 4 survived")
	}
	start = time.Now()
	if _, _, err := src.DropShard(context.Background(), testShard, 0); err != nil {
		t.Fatal(err)
	}
	t.Logf("DropShard: %v, reclaim of the %d log entries in chunks follows", time.Since(start), n)
	waitReclaimed(t, src)
}

// TestSettleShard: SettleShard does in one write what a node does for a
// shard none of whose devices is connected: connected slots marked
// disconnected now, held reflections released; other shards untouched.
func TestSettleShard(t *testing.T) {
	clk := newClock(1_800_000_000_000)
	opts := Options{Now: clk.now, AckFlushInterval: time.Hour, AckFlushAcks: 1 << 20}
	a, b := openAt(t, dbPath(t), opts), openAt(t, dbPath(t), opts)
	writeShardSource(t, a, clk)
	stream, _ := exportShard(t, a, testShard)
	if _, err := b.ImportShard(context.Background(), testShard, 0, bytes.NewReader(stream)); err != nil {
		t.Fatal(err)
	}
	other := dumpShard(t, a, testShard+1)
	if err := a.SettleShard(context.Background(), testShard); err != nil {
		t.Fatal(err)
	}
	got := dumpShard(t, a, testShard)
	if len(got.Held) != 0 {
		t.Fatalf("held reflections after SettleShard: %+v", got.Held)
	}
	sameDump(t, "settled shard", got, dumpShard(t, b, testShard))
	sameDump(t, "other shard", dumpShard(t, a, testShard+1), other)
}
