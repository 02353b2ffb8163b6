package reflection

import (
	"bytes"
	"fmt"
)

// Slot, tombstone and shared-data writes of a batch.

func (bt *batchTx) putSlot(g GroupID, sl Slot) error {
	s := bt.slot(g, sl.DeviceID)
	if !s.present {
		// A new slot (or a new incarnation of a dropped one): empty queue,
		// counter from 1, and only log entries from here on are its own.
		*s = bslot{present: true, reset: true, born: bt.nextLSN}
		bt.cursors[g] = true
	}
	key := slotKey(g, sl.DeviceID)
	if err := bt.slotsB.Put(key, encodeSlot(sl, s.born)); err != nil {
		return fmt.Errorf("reflection: put slot %d: %w", sl.DeviceID, err)
	}
	if bt.tombsB.Get(key) != nil {
		if err := bt.tombsB.Delete(key); err != nil {
			return fmt.Errorf("reflection: clear tombstone %d: %w", sl.DeviceID, err)
		}
		bt.tombTouched[g] = true
	}
	return nil
}

// removeSlot deletes the slot record; publish releases its queue's entries
// (reclaimed later, DeleteChunk per commit).
func (bt *batchTx) removeSlot(g GroupID, d DeviceID) error {
	if err := bt.slotsB.Delete(slotKey(g, d)); err != nil {
		return fmt.Errorf("reflection: delete slot %d: %w", d, err)
	}
	s := bt.slot(g, d)
	if s.present {
		*s = bslot{reset: true}
		bt.cursors[g] = true
	}
	return nil
}

func (bt *batchTx) putTombstone(g GroupID, t Tombstone) error {
	if err := bt.tombsB.Put(slotKey(g, t.DeviceID), encodeTombstone(t)); err != nil {
		return fmt.Errorf("reflection: put tombstone %d: %w", t.DeviceID, err)
	}
	bt.tombTouched[g] = true
	return nil
}

func (bt *batchTx) deleteSlot(g GroupID, d DeviceID, t *Tombstone) error {
	if err := bt.removeSlot(g, d); err != nil {
		return err
	}
	if t != nil {
		tc := *t
		if tc.At == 0 {
			tc.At = bt.now
		}
		return bt.putTombstone(g, tc)
	}
	return nil
}

func (bt *batchTx) setShared(g GroupID, data []byte) error {
	if len(data) == 0 {
		if err := bt.sharedB.Delete(g[:]); err != nil {
			return fmt.Errorf("reflection: clear shared device data: %w", err)
		}
		return nil
	}
	if err := bt.sharedB.Put(g[:], data); err != nil {
		return fmt.Errorf("reflection: put shared device data: %w", err)
	}
	return nil
}

func (bt *batchTx) pruneTombstones(olderThan int64) error {
	// Candidates: groups whose oldest tombstone (as of the last commit) is
	// old enough, plus groups this batch changed (not yet in db.tombMin).
	var candidates []GroupID
	for g, minAt := range bt.db.tombMin {
		if minAt < olderThan && !bt.tombTouched[g] {
			candidates = append(candidates, g)
		}
	}
	for g := range bt.tombTouched {
		candidates = append(candidates, g)
	}
	for _, g := range candidates {
		var old [][]byte
		c := bt.tombsB.Cursor()
		for k, v := c.Seek(g[:]); k != nil && bytes.HasPrefix(k, g[:]); k, v = c.Next() {
			t, err := decodeTombstone(k, v)
			if err != nil {
				return fmt.Errorf("reflection: group %s: %w", g, err)
			}
			if t.At < olderThan {
				old = append(old, append([]byte(nil), k...))
			}
		}
		for _, k := range old {
			if err := bt.tombsB.Delete(k); err != nil {
				return fmt.Errorf("reflection: prune tombstone: %w", err)
			}
		}
		if len(old) > 0 {
			bt.tombTouched[g] = true
		}
	}
	return nil
}
