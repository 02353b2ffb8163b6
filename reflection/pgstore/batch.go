package pgstore

import (
	"fmt"
	"slices"

	"d2m-mediator/reflection"
)

// batchTx computes what one commit batch writes. Like the bbolt engine it
// keeps the batch's view of every slot it touches in an overlay (bslot)
// over the in-memory index, so fan-out, Seqs and queue limits follow
// submission order exactly; the overlay becomes SQL in sql.go and reaches
// the index only in publish, after the commit succeeded.
type batchTx struct {
	s   *Store
	now int64

	slots  map[slotRef]*bslot
	groups map[reflection.GroupID][]reflection.DeviceID // overlay slots per group
	tombs  map[slotRef]*reflection.Tombstone            // nil: delete
	shared map[reflection.GroupID][]byte                // empty: delete

	heldPos  map[reflection.GroupID]int64
	heldIns  []heldRow
	heldDone map[slotRef]int64 // released up to this position
	held     map[slotRef][]heldRow
}

type bslot struct {
	present bool
	reset   bool // the committed queue is gone (dropped, purged, created again)
	removed bool // the row was deleted at some point of the batch
	counter uint64
	length  int
	bytes   int64
	// dirty: the counter column must be written (an ephemeral
	// reflection, a purge); record: a PutSlot's row.
	dirty    bool
	record   *reflection.Slot
	appended []qent
}

type heldRow struct {
	g      reflection.GroupID
	sender reflection.DeviceID
	pos    int64
	ts     uint64
	env    []byte
}

func newBatchTx(s *Store, now int64, held map[slotRef][]heldRow) *batchTx {
	return &batchTx{
		s: s, now: now,
		slots:    make(map[slotRef]*bslot),
		groups:   make(map[reflection.GroupID][]reflection.DeviceID),
		tombs:    make(map[slotRef]*reflection.Tombstone),
		shared:   make(map[reflection.GroupID][]byte),
		heldPos:  make(map[reflection.GroupID]int64),
		heldDone: make(map[slotRef]int64),
		held:     held,
	}
}

func (bt *batchTx) apply(r *request) error {
	r.result = reflection.AppendResult{}
	switch r.op {
	case opPutSlot:
		bt.putSlot(r.g, r.slot)
		return nil
	case opDeleteSlot:
		bt.deleteSlot(r.g, r.d, r.tomb)
		return nil
	case opSetShared:
		bt.shared[r.g] = r.data
		return nil
	case opAppend:
		return bt.append(r)
	case opReleaseHeld:
		return bt.releaseHeld(r)
	case opPurgeQueue:
		if s := bt.slot(r.g, r.d); s.present && s.length > 0 {
			// The rows go: the counter column must hold the counter.
			s.reset, s.appended, s.length, s.bytes, s.dirty = true, nil, 0, 0, true
		}
		return nil
	case opClaim, opPruneTombstones, opBarrier:
		return nil // claims run before the batch (prepareShards), prunes are SQL only (buildSQL), barriers write nothing
	}
	return fmt.Errorf("pgstore: unknown request kind %d", r.op)
}

// slot returns the batch's state of a slot, from the index on first use.
// The committer loaded every group of the batch before applying it.
func (bt *batchTx) slot(g reflection.GroupID, d reflection.DeviceID) *bslot {
	k := slotRef{g, d}
	s, ok := bt.slots[k]
	if !ok {
		s = &bslot{}
		m := bt.s.mem
		m.mu.RLock()
		if ms := m.slot(g, d); ms != nil {
			s.present, s.counter, s.length, s.bytes = true, ms.counter, ms.length, ms.bytes
		}
		m.mu.RUnlock()
		bt.slots[k] = s
		bt.groups[g] = append(bt.groups[g], d)
	}
	return s
}

// recipients lists the group's slots other than sender as they exist at
// this point of the batch, in id order.
func (bt *batchTx) recipients(g reflection.GroupID, sender reflection.DeviceID) []reflection.DeviceID {
	var out []reflection.DeviceID
	m := bt.s.mem
	m.mu.RLock()
	if gm := m.group(g); gm != nil {
		for d := range gm.slots {
			if _, over := bt.slots[slotRef{g, d}]; !over && d != sender {
				out = append(out, d)
			}
		}
	}
	m.mu.RUnlock()
	for _, d := range bt.groups[g] {
		if d != sender && bt.slots[slotRef{g, d}].present {
			out = append(out, d)
		}
	}
	slices.Sort(out)
	return out
}

func (bt *batchTx) putSlot(g reflection.GroupID, sl reflection.Slot) {
	s := bt.slot(g, sl.DeviceID)
	if !s.present {
		// A new slot (or a new incarnation): empty queue, counter from 1.
		*s = bslot{present: true, reset: true, removed: s.removed}
	}
	rec := sl
	s.record = &rec
	bt.tombs[slotRef{g, sl.DeviceID}] = nil
}

func (bt *batchTx) removeSlot(g reflection.GroupID, d reflection.DeviceID) {
	s := bt.slot(g, d)
	*s = bslot{reset: true, removed: true}
}

func (bt *batchTx) deleteSlot(g reflection.GroupID, d reflection.DeviceID, t *reflection.Tombstone) {
	bt.removeSlot(g, d)
	if t != nil {
		tc := *t
		if tc.At == 0 {
			tc.At = bt.now
		}
		bt.tombs[slotRef{g, d}] = &tc
	}
}

func (bt *batchTx) append(r *request) error {
	a := &r.app
	r.result.Timestamp = uint64(bt.now)
	if a.Hold {
		pos := bt.nextHeldPos(a.Group)
		bt.heldIns = append(bt.heldIns, heldRow{g: a.Group, sender: a.Sender, pos: pos, ts: uint64(bt.now), env: a.Envelope})
		return nil
	}
	to := bt.recipients(a.Group, a.Sender)
	if len(to) == 0 {
		return nil
	}
	if a.Ephemeral {
		for _, d := range to {
			s := bt.slot(a.Group, d)
			s.counter++
			s.dirty = true
			r.result.Delivered = append(r.result.Delivered, reflection.Delivery{DeviceID: d, Seq: s.counter})
		}
		return nil
	}
	bt.fanOut(a.Group, to, uint64(bt.now), a.Envelope, &r.result)
	return nil
}

func (bt *batchTx) nextHeldPos(g reflection.GroupID) int64 {
	p, ok := bt.heldPos[g]
	if !ok {
		m := bt.s.mem
		m.mu.RLock()
		if gm := m.group(g); gm != nil {
			p = gm.heldPos
		}
		m.mu.RUnlock()
	}
	p++
	bt.heldPos[g] = p
	return p
}

// fanOut gives the reflection a Seq in the queue of every slot in to; a
// queue that is full or would exceed its byte limit costs its slot
// (dropped with a QueueLimit tombstone), as in the bbolt engine.
func (bt *batchTx) fanOut(g reflection.GroupID, to []reflection.DeviceID, ts uint64, env []byte, res *reflection.AppendResult) {
	envLen := int64(len(env))
	maxLen, maxBytes := bt.s.so.MaxQueueLength, bt.s.so.MaxQueueBytes
	for _, d := range to {
		s := bt.slot(g, d)
		if s.length >= maxLen || s.bytes+envLen > maxBytes {
			bt.removeSlot(g, d)
			bt.tombs[slotRef{g, d}] = &reflection.Tombstone{DeviceID: d, Reason: reflection.QueueLimit, At: bt.now}
			res.Dropped = append(res.Dropped, d)
			continue
		}
		// The counter column is not written for a durable copy: the
		// queue row carries its seq, and a load takes the larger of the
		// two (sqlAckDelete keeps that true when rows go).
		s.counter++
		s.length++
		s.bytes += envLen
		s.appended = append(s.appended, qent{seq: s.counter, ts: ts, size: uint32(envLen), env: env})
		res.Delivered = append(res.Delivered, reflection.Delivery{DeviceID: d, Seq: s.counter})
	}
}

// releaseHeld fans out the sender's held reflections: those in the
// database (loaded before the batch) and those this batch holds, minus
// what an earlier release of the batch took.
func (bt *batchTx) releaseHeld(r *request) error {
	g, sender := r.g, r.d
	k := slotRef{g, sender}
	r.result.Timestamp = uint64(bt.now)
	rows := slices.Clone(bt.held[k])
	for _, h := range bt.heldIns {
		if h.g == g && h.sender == sender {
			rows = append(rows, h)
		}
	}
	done := bt.heldDone[k]
	for _, h := range rows {
		if h.pos <= done {
			continue
		}
		if to := bt.recipients(g, sender); len(to) > 0 {
			bt.fanOut(g, to, h.ts, h.env, &r.result)
		}
		bt.heldDone[k] = h.pos
	}
	return nil
}

// publish hands the committed batch to the index. Called only after a
// successful commit.
func (bt *batchTx) publish() {
	m := bt.s.mem
	m.mu.Lock()
	defer m.mu.Unlock()
	cached := make(map[*byte][]byte)
	for k, bs := range bt.slots {
		gm := m.group(k.g)
		if gm == nil {
			gm = &groupMem{slots: make(map[reflection.DeviceID]*slotMem)}
			m.shards[k.g[0]].groups[k.g] = gm
		}
		ms := gm.slots[k.d]
		if ms != nil && (bs.reset || !bs.present) {
			m.releaseSlot(ms)
			delete(gm.slots, k.d)
			ms = nil
		}
		if !bs.present {
			continue
		}
		if ms == nil {
			ms = &slotMem{}
			gm.slots[k.d] = ms
		}
		ms.counter = bs.counter
		for _, e := range bs.appended {
			// One cached copy per envelope, shared by its recipients:
			// the caller's buffer is its own again once done runs.
			if len(e.env) > 0 && m.cacheBytes+int64(len(e.env)) <= m.cacheMax {
				c, ok := cached[&e.env[0]]
				if !ok {
					c = append([]byte(nil), e.env...)
					cached[&e.env[0]] = c
				}
				e.env = c
				m.cacheBytes += int64(len(c))
			} else {
				e.env = nil
			}
			ms.q = append(ms.q, e)
			ms.length++
			ms.bytes += int64(e.size)
		}
	}
	for g, p := range bt.heldPos {
		if gm := m.group(g); gm != nil && p > gm.heldPos {
			gm.heldPos = p
		}
	}
}
