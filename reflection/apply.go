package reflection

import (
	"bytes"
	"fmt"
	"slices"

	"go.etcd.io/bbolt"
)

// batchTx applies requests inside one bbolt write transaction. It keeps the
// batch's view of every slot it touches in its own overlay (bslot) and only
// hands it to the in-memory index in publish, which runs after the commit
// succeeded; a failed commit just drops the batchTx.
type batchTx struct {
	db  *DB
	tx  *bbolt.Tx
	now int64 // unix ms, one value per batch: "storage time" of every copy

	slots   map[slotRef]*bslot
	cursors map[GroupID]bool // groups whose cursor record is rewritten in flush
	logs    []stagedLog
	nextLSN uint64

	tombTouched map[GroupID]bool
	tombMin     map[GroupID]int64 // computed in flush; 0 = no tombstones left
	shardGens   map[byte]int64    // shard generations recorded by this batch

	slotsB, tombsB, sharedB, heldB, cursorsB, logB *bbolt.Bucket
}

type slotRef struct {
	g GroupID
	d DeviceID
}

// bslot is one slot's state within the batch.
type bslot struct {
	present bool // the slot exists at this point of the batch
	// reset: the committed queue is gone (slot dropped, purged or created
	// again); publish releases its entries. The new queue is appended.
	reset    bool
	born     uint64
	counter  uint64
	length   int   // for the limits: committed (as loaded) + appended
	bytes    int64 // likewise
	appended []qent
}

type stagedLog struct {
	lsn uint64
	rec []byte
}

func newBatchTx(db *DB, now int64) *batchTx {
	return &batchTx{
		db:          db,
		now:         now,
		slots:       make(map[slotRef]*bslot),
		cursors:     make(map[GroupID]bool),
		nextLSN:     db.nextLSN,
		tombTouched: make(map[GroupID]bool),
		tombMin:     make(map[GroupID]int64),
	}
}

func (bt *batchTx) begin(tx *bbolt.Tx) {
	bt.tx = tx
	bt.slotsB = tx.Bucket(bucketSlots)
	bt.tombsB = tx.Bucket(bucketTombs)
	bt.sharedB = tx.Bucket(bucketShared)
	bt.heldB = tx.Bucket(bucketHeld)
	bt.cursorsB = tx.Bucket(bucketCursors)
	bt.logB = tx.Bucket(bucketLog)
	bt.logB.FillPercent = logFillPercent
}

func (bt *batchTx) apply(r *request) error {
	r.result = AppendResult{}
	switch r.op {
	case opPutSlot:
		return bt.putSlot(r.g, r.slot)
	case opDeleteSlot:
		return bt.deleteSlot(r.g, r.d, r.tomb)
	case opSetShared:
		return bt.setShared(r.g, r.data)
	case opAppend:
		return bt.append(r)
	case opReleaseHeld:
		return bt.releaseHeld(r)
	case opPurgeQueue:
		return bt.purgeQueue(r.g, r.d)
	case opPruneTombstones:
		return bt.pruneTombstones(r.olderThan)
	case opImportShard:
		return bt.importShard(r.shard)
	case opDropShard:
		return bt.dropShard(r.shard)
	case opSettleShard:
		return bt.settle(r.shard)
	case opBarrier:
		return nil
	}
	return fmt.Errorf("reflection: unknown request kind %d", r.op)
}

// slot returns the batch's state of a slot, loading it from the index
// (which equals the disk as of the last commit, plus acks) on first use.
func (bt *batchTx) slot(g GroupID, d DeviceID) *bslot {
	k := slotRef{g, d}
	s, ok := bt.slots[k]
	if !ok {
		s = &bslot{}
		m := bt.db.mem
		m.mu.RLock()
		if ms := m.slot(g, d); ms != nil {
			s.present, s.born, s.counter, s.length, s.bytes = true, ms.born, ms.counter, ms.length, ms.bytes
		}
		m.mu.RUnlock()
		bt.slots[k] = s
	}
	return s
}

// recipients lists the slots of the group other than sender, in id order,
// as they exist in this transaction: that is what makes fan-out ordered
// exactly like PutSlot/DeleteSlot in submission order.
func (bt *batchTx) recipients(g GroupID, sender DeviceID) []DeviceID {
	var out []DeviceID
	c := bt.slotsB.Cursor()
	for k, _ := c.Seek(g[:]); k != nil && bytes.HasPrefix(k, g[:]); k, _ = c.Next() {
		if d := DeviceID(beUint64(k[32:])); d != sender {
			out = append(out, d)
		}
	}
	return out
}

// flush writes what the batch kept in memory: the log sequence, the cursor
// records of the groups whose slots were created, dropped, purged or
// advanced by an ephemeral reflection (appends do not write cursors: Open
// recovers counters from the log), and the tombstone bookkeeping.
func (bt *batchTx) flush() error {
	if bt.nextLSN != bt.db.nextLSN {
		if err := bt.logB.SetSequence(bt.nextLSN - 1); err != nil {
			return fmt.Errorf("reflection: log sequence: %w", err)
		}
	}
	if len(bt.cursors) > 0 {
		m := bt.db.mem
		m.mu.RLock()
		recs := make(map[GroupID][]byte, len(bt.cursors))
		for g := range bt.cursors {
			if cs := bt.groupCursors(g); len(cs) > 0 {
				recs[g] = encodeCursors(cs)
			} else {
				recs[g] = nil
			}
		}
		m.mu.RUnlock()
		for g, rec := range recs {
			var err error
			if rec == nil {
				err = bt.cursorsB.Delete(g[:])
			} else {
				err = bt.cursorsB.Put(g[:], rec)
			}
			if err != nil {
				return fmt.Errorf("reflection: cursors %s: %w", g, err)
			}
		}
	}
	for g := range bt.tombTouched {
		minAt, err := bt.oldestTombstone(g)
		if err != nil {
			return err
		}
		bt.tombMin[g] = minAt
	}
	return nil
}

// groupCursors is the group's cursor record after this batch: committed
// state and acks from memory, overlaid with the batch. Caller holds mem.mu.
func (bt *batchTx) groupCursors(g GroupID) []slotCursor {
	var out []slotCursor
	c := bt.slotsB.Cursor()
	for k, _ := c.Seek(g[:]); k != nil && bytes.HasPrefix(k, g[:]); k, _ = c.Next() {
		d := DeviceID(beUint64(k[32:]))
		ms := bt.db.mem.slot(g, d)
		bs := bt.slots[slotRef{g, d}]
		switch {
		case bs == nil && ms != nil:
			out = append(out, ms.cursor(d))
		case bs != nil:
			cur := slotCursor{d: d, counter: bs.counter}
			// The watermark is just below the first unacked entry: in
			// the committed queue unless reset, else in the batch's.
			first := uint64(0)
			if !bs.reset && ms != nil {
				cur.above = slices.Clone(ms.above)
				if ms.head < len(ms.q) {
					first = ms.q[ms.head].seq
				}
			}
			if first == 0 && len(bs.appended) > 0 {
				first = bs.appended[0].seq
			}
			if first != 0 {
				cur.acked = first - 1
			} else {
				cur.acked = bs.counter
			}
			out = append(out, cur)
		}
	}
	return out
}

// publish hands the committed batch's changes to the in-memory index.
// Called only after a successful commit.
func (bt *batchTx) publish() {
	db := bt.db
	db.nextLSN = bt.nextLSN
	m := db.mem
	m.mu.Lock()
	fresh := make(map[uint64]uint32, len(bt.logs))
	for k, bs := range bt.slots {
		ms := m.slot(k.g, k.d)
		if ms != nil && (bs.reset || !bs.present) {
			m.release(ms)
		}
		if !bs.present {
			if ms != nil {
				m.deleteSlot(k.g, k.d)
			}
			continue
		}
		if ms == nil || bs.reset {
			ms = &slotMem{born: bs.born}
			m.setSlot(k.g, k.d, ms)
		}
		ms.counter = bs.counter
		for _, e := range bs.appended {
			ms.q = append(ms.q, e)
			ms.length++
			ms.bytes += int64(e.size)
			fresh[e.lsn]++
		}
	}
	for _, l := range bt.logs {
		if n := fresh[l.lsn]; n > 0 {
			m.refs[l.lsn] = n
			m.cache.add(l.lsn, l.rec)
		} else {
			// Written, but every recipient was dropped or purged later
			// in the same batch.
			m.dead = append(m.dead, l.lsn)
			m.noteWork()
		}
	}
	m.mu.Unlock()
	for g, minAt := range bt.tombMin {
		if minAt == 0 {
			delete(db.tombMin, g)
		} else {
			db.tombMin[g] = minAt
		}
	}
	for shard, gen := range bt.shardGens {
		db.shardGen[shard].Store(gen)
	}
}

// oldestTombstone returns the smallest At in the group, 0 if none.
func (bt *batchTx) oldestTombstone(g GroupID) (int64, error) {
	var minAt int64
	c := bt.tombsB.Cursor()
	for k, v := c.Seek(g[:]); k != nil && bytes.HasPrefix(k, g[:]); k, v = c.Next() {
		t, err := decodeTombstone(k, v)
		if err != nil {
			return 0, fmt.Errorf("reflection: group %s: %w", g, err)
		}
		// At 0 would read as "none": clamp, it is older than anything anyway.
		at := max(t.At, 1)
		if minAt == 0 || at < minAt {
			minAt = at
		}
	}
	return minAt, nil
}
