package reflection

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"testing"

	"go.etcd.io/bbolt"
)

// Model-based test: random sequences of writes, acks, restarts, crashes and
// shard moves against the store and a plain in-memory model of what the store must
// hold; after every step everything readable is compared. TestModel runs
// fixed seeds; FuzzModel drives the same steps from fuzz input.

type modelSlot struct {
	slot    Slot
	counter uint64
	queue   []Entry
	acked   []Entry // every entry ever acked (a crash may bring them back)
}

type modelHeld struct {
	sender DeviceID
	ts     uint64
	env    []byte
}

type modelGroup struct {
	slots  map[DeviceID]*modelSlot
	tombs  map[DeviceID]Tombstone
	shared []byte
	held   []modelHeld
}

type model struct {
	groups  map[GroupID]*modelGroup
	maxLen  int
	maxByte int64
}

func (m *model) group(g GroupID) *modelGroup {
	mg := m.groups[g]
	if mg == nil {
		mg = &modelGroup{slots: map[DeviceID]*modelSlot{}, tombs: map[DeviceID]Tombstone{}}
		m.groups[g] = mg
	}
	return mg
}

func (mg *modelGroup) recipients(sender DeviceID) []DeviceID {
	var out []DeviceID
	for d := range mg.slots {
		if d != sender {
			out = append(out, d)
		}
	}
	slices.Sort(out)
	return out
}

func (m *model) fanOut(mg *modelGroup, sender DeviceID, ts uint64, env []byte, now int64, res *AppendResult) {
	for _, d := range mg.recipients(sender) {
		s := mg.slots[d]
		var size int64
		for _, e := range s.queue {
			size += int64(len(e.Envelope))
		}
		if len(s.queue) >= m.maxLen || size+int64(len(env)) > m.maxByte {
			delete(mg.slots, d)
			mg.tombs[d] = Tombstone{DeviceID: d, Reason: QueueLimit, At: now}
			res.Dropped = append(res.Dropped, d)
			continue
		}
		s.counter++
		s.queue = append(s.queue, Entry{Seq: s.counter, Timestamp: ts, Envelope: env})
		res.Delivered = append(res.Delivered, Delivery{DeviceID: d, Seq: s.counter})
	}
}

func (m *model) release(g GroupID, sender DeviceID, now int64) AppendResult {
	mg := m.group(g)
	res := AppendResult{Timestamp: uint64(now)}
	var keep []modelHeld
	for _, h := range mg.held {
		if h.sender == sender {
			m.fanOut(mg, sender, h.ts, h.env, now, &res)
		} else {
			keep = append(keep, h)
		}
	}
	mg.held = keep
	return res
}

// recoverHeld is what Open does with held reflections: release them per
// sender in id order.
func (m *model) recoverHeld(now int64) {
	for g, mg := range m.groups {
		var senders []DeviceID
		for _, h := range mg.held {
			if !slices.Contains(senders, h.sender) {
				senders = append(senders, h.sender)
			}
		}
		slices.Sort(senders)
		for _, s := range senders {
			m.release(g, s, now)
		}
	}
}

type modelRun struct {
	t    testing.TB
	path string
	clk  *clock
	opts Options
	db   *DB
	m    *model
	peer *DB // the other node of shard moves, opened by the first one
}

var modelGroups = []GroupID{gid(1), gid(2)}

func newModelRun(t testing.TB) *modelRun {
	clk := newClock(1_000_000)
	r := &modelRun{t: t, path: dbPath(t), clk: clk,
		opts: Options{Now: clk.now, MaxQueueLength: 6, MaxQueueBytes: 60, DeleteChunk: 3, AckFlushAcks: 4},
		m:    &model{groups: map[GroupID]*modelGroup{}, maxLen: 6, maxByte: 60}}
	db, err := Open(r.path, r.opts)
	if err != nil {
		t.Fatal(err)
	}
	r.db = db
	t.Cleanup(func() {
		_ = r.db.Close()
		if r.peer != nil {
			_ = r.peer.Close()
		}
	})
	return r
}

// moveShard moves g's shard to the peer and back: export, import on the
// peer (replacing what an earlier move left there), DropShard here,
// export from the peer (which must give the same stream) and import here.
// The model does not change: a move loses nothing and adds nothing.
func (r *modelRun) moveShard(g GroupID) {
	t, ctx, shard := r.t, context.Background(), g[0]
	if r.peer == nil {
		peer, err := Open(dbPath(t), r.opts)
		if err != nil {
			t.Fatal(err)
		}
		r.peer = peer
	}
	var out, back bytes.Buffer
	if _, err := r.db.ExportShard(ctx, shard, &out); err != nil {
		t.Fatal(err)
	}
	if _, err := r.peer.ImportShard(ctx, shard, bytes.NewReader(out.Bytes())); err != nil {
		t.Fatal(err)
	}
	if _, err := r.db.DropShard(ctx, shard); err != nil {
		t.Fatal(err)
	}
	if st, err := r.db.Group(g); err != nil || len(st.Slots)+len(st.Tombstones)+len(st.SharedDeviceData) != 0 {
		t.Fatalf("group %x after DropShard: %+v %v", shard, st, err)
	}
	if _, err := r.peer.ExportShard(ctx, shard, &back); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), back.Bytes()) {
		t.Fatalf("shard %x: the peer's export differs from the one it imported", shard)
	}
	if _, err := r.db.ImportShard(ctx, shard, &back); err != nil {
		t.Fatal(err)
	}
}

// step performs one operation chosen by op and the argument bytes a, b, c.
func (r *modelRun) step(op, a, b, c byte) string {
	t, db, m := r.t, r.db, r.m
	r.clk.set(r.clk.ms.Load() + 1)
	now := r.clk.ms.Load()
	g := modelGroups[a%2]
	d := DeviceID(1 + (a>>1)%4)
	mg := m.group(g)
	env := bytes.Repeat([]byte{b}, 1+int(c%20))
	switch op % 14 {
	case 0, 1: // put slot (create or replace)
		sl := Slot{DeviceID: d, DeviceInfo: []byte{b}, Policy: ExpirationPolicy(c % 2), CreatedAt: now}
		mustDo(t, func(done func(error)) { db.PutSlot(g, sl, done) })
		if s := mg.slots[d]; s != nil {
			s.slot = sl
		} else {
			mg.slots[d] = &modelSlot{slot: sl}
		}
		delete(mg.tombs, d)
		return fmt.Sprintf("put %x/%d", g[0], d)
	case 2: // drop slot
		var tomb *Tombstone
		if b%2 == 0 {
			tomb = &Tombstone{Reason: Dropped, At: now - int64(c)}
			mg.tombs[d] = Tombstone{DeviceID: d, Reason: Dropped, At: now - int64(c)}
		}
		mustDo(t, func(done func(error)) { db.DeleteSlot(g, d, tomb, done) })
		delete(mg.slots, d)
		return fmt.Sprintf("drop %x/%d", g[0], d)
	case 3, 4, 5: // durable append
		got := appendSync(t, db, AppendRequest{Group: g, Sender: d, Envelope: env})
		want := AppendResult{Timestamp: uint64(now)}
		m.fanOut(mg, d, uint64(now), env, now, &want)
		r.sameResult(got, want)
		return fmt.Sprintf("append %x/%d %d", g[0], d, len(env))
	case 6: // ephemeral append
		got := appendSync(t, db, AppendRequest{Group: g, Sender: d, Envelope: env, Ephemeral: true})
		want := AppendResult{Timestamp: uint64(now)}
		for _, rd := range mg.recipients(d) {
			mg.slots[rd].counter++
			want.Delivered = append(want.Delivered, Delivery{DeviceID: rd, Seq: mg.slots[rd].counter})
		}
		r.sameResult(got, want)
		return fmt.Sprintf("ephemeral %x/%d", g[0], d)
	case 7: // held
		appendSync(t, db, AppendRequest{Group: g, Sender: d, Envelope: env, Hold: true})
		mg.held = append(mg.held, modelHeld{sender: d, ts: uint64(now), env: env})
		return fmt.Sprintf("hold %x/%d", g[0], d)
	case 8: // release held
		got := releaseSync(t, db, g, d)
		r.sameResult(got, m.release(g, d, now))
		return fmt.Sprintf("release %x/%d", g[0], d)
	case 9, 10: // ack an entry (or an unknown seq)
		s := mg.slots[d]
		seq := uint64(c)
		if s != nil && len(s.queue) > 0 && b%4 != 0 {
			i := int(c) % len(s.queue)
			seq = s.queue[i].Seq
		}
		db.Ack(g, d, seq, nil)
		if s != nil {
			if i := slices.IndexFunc(s.queue, func(e Entry) bool { return e.Seq == seq }); i >= 0 {
				s.acked = append(s.acked, s.queue[i])
				s.queue = slices.Delete(s.queue, i, i+1)
			}
		}
		return fmt.Sprintf("ack %x/%d %d", g[0], d, seq)
	case 11: // purge, shared data or tombstone pruning
		switch b % 3 {
		case 0:
			mustDo(t, func(done func(error)) { db.PurgeQueue(g, d, done) })
			if s := mg.slots[d]; s != nil {
				s.acked = append(s.acked, s.queue...)
				s.queue = nil
			}
			return fmt.Sprintf("purge %x/%d", g[0], d)
		case 1:
			data := env[:min(len(env), int(c%3))]
			mustDo(t, func(done func(error)) { db.SetSharedDeviceData(g, data, done) })
			mg.shared = bytes.Clone(data)
			if len(data) == 0 {
				mg.shared = nil
			}
			return fmt.Sprintf("shared %x %d", g[0], len(data))
		default:
			older := now - int64(c)
			mustDo(t, func(done func(error)) { db.PruneTombstones(older, done) })
			for _, mg := range m.groups {
				for d, tb := range mg.tombs {
					if tb.At < older {
						delete(mg.tombs, d)
					}
				}
			}
			return fmt.Sprintf("prune < %d", older)
		}
	case 13: // move the group's shard to the peer and back
		r.moveShard(g)
		return fmt.Sprintf("move shard %x", g[0])
	default: // restart: clean, or a crash (the file as of the last commit)
		crash := b%2 == 1
		var image []byte
		if crash {
			db.commitMu.Lock()
			var err error
			image, err = os.ReadFile(r.path)
			db.commitMu.Unlock()
			if err != nil {
				t.Fatal(err)
			}
		}
		if err := db.Close(); err != nil {
			t.Fatal(err)
		}
		if crash {
			if err := os.WriteFile(r.path, image, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		if err := Check(r.path); err != nil {
			t.Fatalf("Check before reopening (crash %v): %v", crash, err)
		}
		if crash {
			// Before Open releases held reflections (whose fan-out may
			// hit a queue limit), the model takes back what the crash
			// re-delivers.
			r.adoptRedeliveries()
		}
		m.recoverHeld(now)
		ndb, err := Open(r.path, r.opts)
		if err != nil {
			t.Fatal(err)
		}
		r.db = ndb
		return fmt.Sprintf("restart crash=%v", crash)
	}
}

func (r *modelRun) sameResult(got, want AppendResult) {
	r.t.Helper()
	if got.Timestamp != want.Timestamp || !slices.Equal(got.Delivered, want.Delivered) || !slices.Equal(got.Dropped, want.Dropped) {
		r.t.Fatalf("result %+v, model %+v", got, want)
	}
}

// adoptRedeliveries: after a crash, acks not yet flushed are lost, so a
// slot's queue may hold entries the model saw acked. That is allowed (and
// only that): the model takes them back. The queues are read from the
// crash image with the same rebuild Open uses.
func (r *modelRun) adoptRedeliveries() {
	b, err := bbolt.Open(r.path, 0o600, boltOptions(Options{}, true))
	if err != nil {
		r.t.Fatal(err)
	}
	defer b.Close()
	mem := newMemIndex(-1)
	if err := b.View(func(tx *bbolt.Tx) error { _, err := rebuild(tx, mem); return err }); err != nil {
		r.t.Fatal(err)
	}
	for g, mg := range r.m.groups {
		for d, s := range mg.slots {
			ms := mem.slot(g, d)
			if ms == nil {
				r.t.Fatalf("group %x slot %d missing after the crash", g[0], d)
			}
			var q []Entry
			for _, e := range ms.live() {
				if e.acked {
					continue
				}
				match := func(x Entry) bool { return x.Seq == e.seq }
				if i := slices.IndexFunc(s.queue, match); i >= 0 {
					q = append(q, s.queue[i])
				} else if i := slices.IndexFunc(s.acked, match); i >= 0 {
					q = append(q, s.acked[i])
				} else {
					r.t.Fatalf("group %x slot %d: entry %d after the crash was never stored", g[0], d, e.seq)
				}
			}
			for _, e := range s.queue {
				if !slices.ContainsFunc(q, func(x Entry) bool { return x.Seq == e.Seq }) {
					r.t.Fatalf("group %x slot %d: unacked entry %d lost in the crash", g[0], d, e.Seq)
				}
			}
			s.queue = q
		}
	}
}

// compare checks everything readable against the model.
func (r *modelRun) compare() {
	t, db := r.t, r.db
	t.Helper()
	for _, g := range modelGroups {
		mg := r.m.group(g)
		st, err := db.Group(g)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Slots) != len(mg.slots) {
			t.Fatalf("group %x: %d slots, model %d", g[0], len(st.Slots), len(mg.slots))
		}
		for _, sl := range st.Slots {
			s := mg.slots[sl.DeviceID]
			if s == nil || sl.Policy != s.slot.Policy || !bytes.Equal(sl.DeviceInfo, s.slot.DeviceInfo) || sl.CreatedAt != s.slot.CreatedAt {
				t.Fatalf("group %x: slot %+v, model %+v", g[0], sl, s)
			}
			qs, ok := db.QueueStats(g, sl.DeviceID)
			var size int64
			for _, e := range s.queue {
				size += int64(len(e.Envelope))
			}
			// The incrementally kept ack ranges equal the ones computed
			// from the deque.
			db.mem.mu.Lock()
			if ms := db.mem.slot(g, sl.DeviceID); ms != nil {
				kept := slices.Clone(ms.above)
				ms.rebuildRanges()
				if !slices.Equal(kept, ms.above) {
					db.mem.mu.Unlock()
					t.Fatalf("group %x slot %d: ack ranges %v, from the deque %v", g[0], sl.DeviceID, kept, ms.above)
				}
			}
			db.mem.mu.Unlock()
			got := readAll(t, db, g, sl.DeviceID)
			if want := (QueueStats{Length: len(s.queue), Bytes: size, NextSeq: s.counter + 1}); !ok || qs != want {
				t.Fatalf("group %x slot %d: stats %+v, model %+v; queue %v, model %v", g[0], sl.DeviceID, qs, want, seqs(got), seqs(s.queue))
			}
			if len(got) != len(s.queue) {
				t.Fatalf("group %x slot %d: queue %v, model %v", g[0], sl.DeviceID, seqs(got), seqs(s.queue))
			}
			for i := range got {
				if got[i].Seq != s.queue[i].Seq || got[i].Timestamp != s.queue[i].Timestamp || !bytes.Equal(got[i].Envelope, s.queue[i].Envelope) {
					t.Fatalf("group %x slot %d entry %d: %+v, model %+v", g[0], sl.DeviceID, i, got[i], s.queue[i])
				}
			}
			// A partial read from the middle agrees too.
			if len(got) > 1 {
				part, err := db.ReadQueue(g, sl.DeviceID, got[0].Seq, 1)
				if err != nil || len(part) != 1 || part[0].Seq != got[1].Seq {
					t.Fatalf("group %x slot %d: ReadQueue after %d: %v %v", g[0], sl.DeviceID, got[0].Seq, part, err)
				}
			}
		}
		if len(st.Tombstones) != len(mg.tombs) {
			t.Fatalf("group %x: tombstones %+v, model %+v", g[0], st.Tombstones, mg.tombs)
		}
		for _, tb := range st.Tombstones {
			if mg.tombs[tb.DeviceID] != tb {
				t.Fatalf("group %x: tombstone %+v, model %+v", g[0], tb, mg.tombs[tb.DeviceID])
			}
		}
		if !bytes.Equal(st.SharedDeviceData, mg.shared) {
			t.Fatalf("group %x: shared %x, model %x", g[0], st.SharedDeviceData, mg.shared)
		}
	}
}

func runModel(t testing.TB, ops []byte) {
	r := newModelRun(t)
	var trace []string
	defer func() {
		if t.Failed() {
			t.Logf("steps:\n%v", trace)
		}
	}()
	for i := 0; i+3 < len(ops); i += 4 {
		trace = append(trace, r.step(ops[i], ops[i+1], ops[i+2], ops[i+3]))
		r.compare()
	}
	if err := r.db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Check(r.path); err != nil {
		t.Fatalf("Check after a clean close: %v", err)
	}
}

func TestModel(t *testing.T) {
	steps := 400
	if testing.Short() {
		steps = 100
	}
	seeds := uint64(8)
	if v, err := strconv.Atoi(os.Getenv("REFLECTION_MODEL_SEEDS")); err == nil {
		seeds = uint64(v)
	}
	for seed := range seeds {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 16))
			ops := make([]byte, 4*steps)
			for i := range ops {
				ops[i] = byte(rng.UintN(256))
			}
			runModel(t, ops)
		})
	}
}

func FuzzModel(f *testing.F) {
	f.Add([]byte{0, 0, 1, 2, 0, 2, 3, 4, 3, 0, 5, 6, 9, 2, 1, 0, 12, 0, 1, 0})
	f.Add([]byte{0, 0, 1, 2, 0, 2, 3, 4, 7, 0, 5, 6, 12, 0, 1, 0, 3, 2, 2, 2})
	f.Fuzz(func(t *testing.T, ops []byte) {
		if len(ops) > 4*300 {
			ops = ops[:4*300]
		}
		runModel(t, ops)
	})
}
