package reflection

import (
	"fmt"

	"go.etcd.io/bbolt"
)

// rebuildResult is what a scan of slots/, cursors/ and log/ found besides
// the index itself.
type rebuildResult struct {
	nextLSN  uint64 // the next log position to assign
	entries  int    // live log entries
	findings []error
}

// rebuild fills mem (empty) from the committed state: slots and their
// incarnation (born), counters and ack state from cursors/, then one pass
// over log/ that gives each slot, in log order, the entries addressed to
// its incarnation that it has not acked, and counts the references of each
// entry. Entries nobody needs (all recipients acked or gone; left by a
// crash before the lazy flush deleted them, or by an unfinished drop) go to
// mem.dead and are reclaimed by the committer in chunks. Inconsistencies
// that do not stop the store from working are returned as findings: Open
// logs them, Check reports them.
func rebuild(tx *bbolt.Tx, mem *memIndex) (rebuildResult, error) {
	var res rebuildResult
	finding := func(format string, a ...any) {
		res.findings = append(res.findings, fmt.Errorf("reflection: "+format, a...))
	}
	var maxBorn uint64
	sc := tx.Bucket(bucketSlots).Cursor()
	for k, v := sc.First(); k != nil; k, v = sc.Next() {
		g, s, born, err := decodeSlot(k, v)
		if err != nil {
			return res, err
		}
		mem.setSlot(g, s.DeviceID, &slotMem{born: born})
		maxBorn = max(maxBorn, born)
	}
	type ackState struct {
		acked uint64
		above []seqRange
		last  uint64 // last seq seen in the log, for the order check
	}
	acks := make(map[*slotMem]*ackState)
	cc := tx.Bucket(bucketCursors).Cursor()
	for k, v := cc.First(); k != nil; k, v = cc.Next() {
		if len(k) != 32 {
			finding("cursor key %x has the wrong length", k)
			continue
		}
		g := GroupID(k)
		cs, err := decodeCursors(v)
		if err != nil {
			finding("group %s: %v", g, err)
			continue
		}
		for _, c := range cs {
			s := mem.slot(g, c.d)
			if s == nil {
				finding("group %s: cursor for missing slot %d", g, c.d)
				continue
			}
			if c.acked > c.counter {
				finding("group %s: slot %d: watermark %d above counter %d", g, c.d, c.acked, c.counter)
			}
			st := &ackState{acked: c.acked}
			prev := c.acked
			for _, r := range c.above {
				if r.lo <= prev || r.hi < r.lo || r.hi > c.counter {
					finding("group %s: slot %d: acked range %d-%d outside (%d, %d] or out of order", g, c.d, r.lo, r.hi, prev, c.counter)
				}
				prev = r.hi
			}
			st.above = c.above
			s.counter = c.counter
			acks[s] = st
		}
	}
	for g, gm := range mem.groups {
		for d, s := range gm.slots {
			if acks[s] == nil {
				finding("group %s: slot %d has no cursor", g, d)
				acks[s] = &ackState{}
			}
		}
	}
	lb := tx.Bucket(bucketLog)
	var lastKey uint64
	lc := lb.Cursor()
	for k, v := lc.First(); k != nil; k, v = lc.Next() {
		if len(k) != 8 {
			finding("log key %x has the wrong length", k)
			continue
		}
		lsn := beUint64(k)
		lastKey = lsn
		r, err := decodeLog(v)
		if err != nil {
			finding("log entry %d: %v", lsn, err)
			continue
		}
		var refs uint32
		size := uint32(len(r.envelope))
		for i := range r.n {
			d, seq := r.recipient(i)
			s := mem.slot(r.group, d)
			if s == nil || lsn < s.born {
				continue // slot dropped (or this is an earlier incarnation's)
			}
			st := acks[s]
			if seq <= st.last {
				finding("group %s: slot %d: log entry %d has seq %d after seq %d", r.group, d, lsn, seq, st.last)
				continue
			}
			st.last = seq
			s.counter = max(s.counter, seq)
			if seq <= st.acked {
				continue
			}
			if inRanges(st.above, seq) {
				// Acked out of order while an earlier entry is not: keep
				// it in the deque, marked, so the slot's next cursor
				// record still lists it.
				s.q = append(s.q, qent{seq: seq, lsn: lsn, size: size, acked: true})
				continue
			}
			s.q = append(s.q, qent{seq: seq, lsn: lsn, size: size})
			s.length++
			s.bytes += int64(size)
			refs++
		}
		if refs > 0 {
			mem.refs[lsn] = refs
			res.entries++
		} else {
			mem.dead = append(mem.dead, lsn)
		}
	}
	for _, gm := range mem.groups {
		for _, s := range gm.slots {
			s.popAcked()
			s.rebuildRanges()
		}
	}
	res.nextLSN = max(lb.Sequence(), lastKey) + 1
	res.nextLSN = max(res.nextLSN, maxBorn)
	return res, nil
}
