// Package storetest holds the engine-independent tests of reflection.Store:
// a model-based test (random writes, acks, restarts, crashes and ownership
// changes against a plain in-memory model of what the store must hold)
// that every engine runs with its own Engine, so the bbolt file and the
// PostgreSQL store are held to the same behaviour. It is imported by
// tests only.
package storetest

//lint:file-ignore ST1001 the tests read like the store's own code, which names these types unqualified

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	. "d2m-mediator/reflection"
)

// Engine is one store implementation under test.
type Engine interface {
	// Open opens the store the engine keeps (creating it the first time).
	Open(t testing.TB, opts Options) Store
	// Stop closes the store; crash: as if the process died right after
	// its last commit (acks not yet written are lost). Open follows.
	Stop(t testing.TB, s Store, crash bool)
	// Stored returns the seqs of d's queue as stored (after Stop, or as
	// Move found them), to check what a crash or a move brought back.
	Stored(t testing.TB, g GroupID, d DeviceID) []uint64
	// Check checks the stored data's consistency (after Stop).
	Check(t testing.TB)
	// Move takes the group's shard away from s and gives it back, as the
	// engine does it (bbolt: export, import on a peer and back; a shared
	// database: another node claims the shard, then s claims it again).
	// It reports whether the move released held reflections and may have
	// lost acks not yet written (both only re-deliver).
	Move(t testing.TB, s Store, g GroupID) (releasedHeld, lostAcks bool)
}

// Clock is a settable Options.Now.
type Clock struct{ ms atomic.Int64 }

func NewClock(ms int64) *Clock {
	c := &Clock{}
	c.ms.Store(ms)
	return c
}
func (c *Clock) Now() time.Time { return time.UnixMilli(c.ms.Load()) }
func (c *Clock) Set(ms int64)   { c.ms.Store(ms) }
func (c *Clock) Ms() int64      { return c.ms.Load() }

// GID returns a group id made of n.
func GID(n byte) GroupID {
	var g GroupID
	for i := range g {
		g[i] = n
	}
	return g
}

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

// recoverHeld is what opening (or claiming) does with held reflections:
// release them per sender in id order, for the groups keep selects.
func (m *model) recoverHeld(now int64, keep func(GroupID) bool) {
	gs := make([]GroupID, 0, len(m.groups))
	for g := range m.groups {
		gs = append(gs, g)
	}
	slices.SortFunc(gs, func(a, b GroupID) int { return bytes.Compare(a[:], b[:]) })
	for _, g := range gs {
		if !keep(g) {
			continue
		}
		mg := m.groups[g]
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
	e    Engine
	clk  *Clock
	opts Options
	st   Store
	m    *model
}

var modelGroups = []GroupID{GID(1), GID(2)}

func newModelRun(t testing.TB, e Engine) *modelRun {
	clk := NewClock(1_000_000)
	r := &modelRun{t: t, e: e, clk: clk,
		opts: Options{Now: clk.Now, MaxQueueLength: 6, MaxQueueBytes: 60, DeleteChunk: 3, AckFlushAcks: 4},
		m:    &model{groups: map[GroupID]*modelGroup{}, maxLen: 6, maxByte: 60}}
	r.st = e.Open(t, r.opts)
	return r
}

func (r *modelRun) do(fn func(done func(error))) {
	r.t.Helper()
	if err := syncWrite(r.t, "write", fn); err != nil {
		r.t.Fatal(err)
	}
}

func (r *modelRun) doAppend(fn func(done func(AppendResult, error))) AppendResult {
	r.t.Helper()
	res, err := syncAppend(r.t, "append", fn)
	if err != nil {
		r.t.Fatal(err)
	}
	return res
}

// step performs one operation chosen by op and the argument bytes a, b, c.
func (r *modelRun) step(op, a, b, c byte) string {
	t, st, m := r.t, r.st, r.m
	r.clk.Set(r.clk.Ms() + 1)
	now := r.clk.Ms()
	g := modelGroups[a%2]
	d := DeviceID(1 + (a>>1)%4)
	mg := m.group(g)
	env := bytes.Repeat([]byte{b}, 1+int(c%20))
	switch op % 14 {
	case 0, 1: // put slot (create or replace)
		sl := Slot{DeviceID: d, DeviceInfo: []byte{b}, Policy: ExpirationPolicy(c % 2), CreatedAt: now}
		r.do(func(done func(error)) { st.PutSlot(g, sl, done) })
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
		r.do(func(done func(error)) { st.DeleteSlot(g, d, tomb, done) })
		delete(mg.slots, d)
		return fmt.Sprintf("drop %x/%d", g[0], d)
	case 3, 4, 5: // durable append
		got := r.doAppend(func(done func(AppendResult, error)) {
			st.Append(AppendRequest{Group: g, Sender: d, Envelope: env}, done)
		})
		want := AppendResult{Timestamp: uint64(now)}
		m.fanOut(mg, d, uint64(now), env, now, &want)
		r.sameResult(got, want)
		return fmt.Sprintf("append %x/%d %d", g[0], d, len(env))
	case 6: // ephemeral append
		got := r.doAppend(func(done func(AppendResult, error)) {
			st.Append(AppendRequest{Group: g, Sender: d, Envelope: env, Ephemeral: true}, done)
		})
		want := AppendResult{Timestamp: uint64(now)}
		for _, rd := range mg.recipients(d) {
			mg.slots[rd].counter++
			want.Delivered = append(want.Delivered, Delivery{DeviceID: rd, Seq: mg.slots[rd].counter})
		}
		r.sameResult(got, want)
		return fmt.Sprintf("ephemeral %x/%d", g[0], d)
	case 7: // held
		r.doAppend(func(done func(AppendResult, error)) {
			st.Append(AppendRequest{Group: g, Sender: d, Envelope: env, Hold: true}, done)
		})
		mg.held = append(mg.held, modelHeld{sender: d, ts: uint64(now), env: env})
		return fmt.Sprintf("hold %x/%d", g[0], d)
	case 8: // release held
		got := r.doAppend(func(done func(AppendResult, error)) { st.ReleaseHeld(g, d, done) })
		r.sameResult(got, m.release(g, d, now))
		return fmt.Sprintf("release %x/%d", g[0], d)
	case 9, 10: // ack an entry (or an unknown seq)
		s := mg.slots[d]
		seq := uint64(c)
		if s != nil && len(s.queue) > 0 && b%4 != 0 {
			i := int(c) % len(s.queue)
			seq = s.queue[i].Seq
		}
		st.Ack(g, d, seq, nil)
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
			r.do(func(done func(error)) { st.PurgeQueue(g, d, done) })
			if s := mg.slots[d]; s != nil {
				s.acked = append(s.acked, s.queue...)
				s.queue = nil
			}
			return fmt.Sprintf("purge %x/%d", g[0], d)
		case 1:
			data := env[:min(len(env), int(c%3))]
			r.do(func(done func(error)) { st.SetSharedDeviceData(g, data, done) })
			mg.shared = bytes.Clone(data)
			if len(data) == 0 {
				mg.shared = nil
			}
			return fmt.Sprintf("shared %x %d", g[0], len(data))
		default:
			older := now - int64(c)
			r.do(func(done func(error)) { st.PruneTombstones(older, done) })
			for _, mg := range m.groups {
				for d, tb := range mg.tombs {
					if tb.At < older {
						delete(mg.tombs, d)
					}
				}
			}
			return fmt.Sprintf("prune < %d", older)
		}
	case 13: // the group's shard goes to another owner and comes back
		released, lost := r.e.Move(t, st, g)
		if lost {
			r.adoptRedeliveries(func(x GroupID) bool { return x[0] == g[0] })
		}
		if released {
			m.recoverHeld(now, func(x GroupID) bool { return x[0] == g[0] })
		}
		return fmt.Sprintf("move shard %x", g[0])
	default: // restart: clean, or a crash (the store as of the last commit)
		crash := b%2 == 1
		r.e.Stop(t, st, crash)
		r.e.Check(t)
		if crash {
			// Before opening releases held reflections (whose fan-out
			// may hit a queue limit), the model takes back what the
			// crash re-delivers.
			r.adoptRedeliveries(func(GroupID) bool { return true })
		}
		m.recoverHeld(now, func(GroupID) bool { return true })
		r.st = r.e.Open(t, r.opts)
		return fmt.Sprintf("restart crash=%v", crash)
	}
}

func (r *modelRun) sameResult(got, want AppendResult) {
	r.t.Helper()
	if got.Timestamp != want.Timestamp || !slices.Equal(got.Delivered, want.Delivered) || !slices.Equal(got.Dropped, want.Dropped) {
		r.t.Fatalf("result %+v, model %+v", got, want)
	}
}

// adoptRedeliveries: acks not yet written may be lost (a crash, a change
// of owner), so a slot's queue may hold entries the model saw acked. That
// is allowed (and only that): the model takes them back.
func (r *modelRun) adoptRedeliveries(which func(GroupID) bool) {
	for g, mg := range r.m.groups {
		if !which(g) {
			continue
		}
		for d, s := range mg.slots {
			var q []Entry
			for _, seq := range r.e.Stored(r.t, g, d) {
				match := func(x Entry) bool { return x.Seq == seq }
				if i := slices.IndexFunc(s.queue, match); i >= 0 {
					q = append(q, s.queue[i])
				} else if i := slices.IndexFunc(s.acked, match); i >= 0 {
					q = append(q, s.acked[i])
				} else {
					r.t.Fatalf("group %x slot %d: entry %d after the crash was never stored", g[0], d, seq)
				}
			}
			for _, e := range s.queue {
				if !slices.ContainsFunc(q, func(x Entry) bool { return x.Seq == e.Seq }) {
					r.t.Fatalf("group %x slot %d: unacked entry %d lost", g[0], d, e.Seq)
				}
			}
			s.queue = q
		}
	}
}

// compare checks everything readable against the model; extra, if set,
// checks engine internals per slot.
func (r *modelRun) compare(extra func(g GroupID, d DeviceID)) {
	t, st := r.t, r.st
	t.Helper()
	for _, g := range modelGroups {
		mg := r.m.group(g)
		gs, err := st.Group(g)
		if err != nil {
			t.Fatal(err)
		}
		if len(gs.Slots) != len(mg.slots) {
			t.Fatalf("group %x: %d slots, model %d", g[0], len(gs.Slots), len(mg.slots))
		}
		for _, sl := range gs.Slots {
			s := mg.slots[sl.DeviceID]
			if s == nil || sl.Policy != s.slot.Policy || !bytes.Equal(sl.DeviceInfo, s.slot.DeviceInfo) || sl.CreatedAt != s.slot.CreatedAt {
				t.Fatalf("group %x: slot %+v, model %+v", g[0], sl, s)
			}
			qs, ok := st.QueueStats(g, sl.DeviceID)
			var size int64
			for _, e := range s.queue {
				size += int64(len(e.Envelope))
			}
			if extra != nil {
				extra(g, sl.DeviceID)
			}
			got, err := st.ReadQueue(g, sl.DeviceID, 0, 1<<30)
			if err != nil {
				t.Fatal(err)
			}
			if want := (QueueStats{Length: len(s.queue), Bytes: size, NextSeq: s.counter + 1}); !ok || qs != want {
				t.Fatalf("group %x slot %d: stats %+v, model %+v; queue %v, model %v", g[0], sl.DeviceID, qs, want, Seqs(got), Seqs(s.queue))
			}
			if len(got) != len(s.queue) {
				t.Fatalf("group %x slot %d: queue %v, model %v", g[0], sl.DeviceID, Seqs(got), Seqs(s.queue))
			}
			for i := range got {
				if got[i].Seq != s.queue[i].Seq || got[i].Timestamp != s.queue[i].Timestamp || !bytes.Equal(got[i].Envelope, s.queue[i].Envelope) {
					t.Fatalf("group %x slot %d entry %d: %+v, model %+v", g[0], sl.DeviceID, i, got[i], s.queue[i])
				}
			}
			// A partial read from the middle agrees too.
			if len(got) > 1 {
				part, err := st.ReadQueue(g, sl.DeviceID, got[0].Seq, 1)
				if err != nil || len(part) != 1 || part[0].Seq != got[1].Seq {
					t.Fatalf("group %x slot %d: ReadQueue after %d: %v %v", g[0], sl.DeviceID, got[0].Seq, part, err)
				}
			}
		}
		if len(gs.Tombstones) != len(mg.tombs) {
			t.Fatalf("group %x: tombstones %+v, model %+v", g[0], gs.Tombstones, mg.tombs)
		}
		for _, tb := range gs.Tombstones {
			if mg.tombs[tb.DeviceID] != tb {
				t.Fatalf("group %x: tombstone %+v, model %+v", g[0], tb, mg.tombs[tb.DeviceID])
			}
		}
		if !bytes.Equal(gs.SharedDeviceData, mg.shared) {
			t.Fatalf("group %x: shared %x, model %x", g[0], gs.SharedDeviceData, mg.shared)
		}
	}
}

// Seqs lists the entries' Seqs.
func Seqs(es []Entry) []uint64 {
	out := make([]uint64, len(es))
	for i, e := range es {
		out[i] = e.Seq
	}
	return out
}

// RunModel runs the steps ops encodes (4 bytes each) against e; extra,
// if set, checks engine internals per slot after every step.
func RunModel(t testing.TB, e Engine, ops []byte, extra func(s Store, g GroupID, d DeviceID)) {
	r := newModelRun(t, e)
	var trace []string
	defer func() {
		if t.Failed() {
			t.Logf("steps:\n%v", trace)
		}
	}()
	var ex func(GroupID, DeviceID)
	if extra != nil {
		ex = func(g GroupID, d DeviceID) { extra(r.st, g, d) }
	}
	for i := 0; i+3 < len(ops); i += 4 {
		trace = append(trace, r.step(ops[i], ops[i+1], ops[i+2], ops[i+3]))
		r.compare(ex)
	}
	r.e.Stop(t, r.st, false)
	r.e.Check(t)
}

// Seeds runs RunModel with fixed seeds (REFLECTION_MODEL_SEEDS overrides
// their number, default n), steps steps each.
func Seeds(t *testing.T, n uint64, steps int, run func(t *testing.T, ops []byte)) {
	if v, err := strconv.Atoi(os.Getenv("REFLECTION_MODEL_SEEDS")); err == nil {
		n = uint64(v)
	}
	for seed := range n {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 16))
			ops := make([]byte, 4*steps)
			for i := range ops {
				ops[i] = byte(rng.UintN(256))
			}
			run(t, ops)
		})
	}
}

// FuzzSeeds are FuzzModel's starting inputs.
var FuzzSeeds = [][]byte{
	{0, 0, 1, 2, 0, 2, 3, 4, 3, 0, 5, 6, 9, 2, 1, 0, 12, 0, 1, 0},
	{0, 0, 1, 2, 0, 2, 3, 4, 7, 0, 5, 6, 12, 0, 1, 0, 3, 2, 2, 2},
}
