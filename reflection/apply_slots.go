package reflection

import (
	"errors"
	"fmt"

	"go.etcd.io/bbolt"
	bberrors "go.etcd.io/bbolt/errors"
)

// Slot, tombstone and shared-data writes of a batch.

func (bt *batchTx) putSlot(g GroupID, s Slot) error {
	gb, err := bt.group(g, true)
	if err != nil {
		return err
	}
	slots, err := sub(gb, bucketSlots, true)
	if err != nil {
		return err
	}
	key := deviceKey(s.DeviceID)
	if err := slots.Put(key, encodeSlot(s)); err != nil {
		return fmt.Errorf("reflection: put slot %d: %w", s.DeviceID, err)
	}
	if tombs := gb.Bucket(bucketTombs); tombs != nil && tombs.Get(key) != nil {
		if err := tombs.Delete(key); err != nil {
			return fmt.Errorf("reflection: clear tombstone %d: %w", s.DeviceID, err)
		}
		bt.tombTouched[g] = true
	}
	if q := bt.queue(g, s.DeviceID); !q.present {
		return bt.newQueue(g, s.DeviceID, q, 0)
	}
	return nil
}

// newQueue gives q a fresh, empty bucket; lastSeq carries the counter over
// (PurgeQueue) or starts it at 0 (a new slot).
func (bt *batchTx) newQueue(g GroupID, d DeviceID, q *batchQueue, lastSeq uint64) error {
	root := bt.tx.Bucket(bucketQueues)
	inc, err := root.NextSequence()
	if err != nil {
		return fmt.Errorf("reflection: queue incarnation: %w", err)
	}
	if _, err := root.CreateBucket(queueName(g, d, inc)); err != nil {
		return fmt.Errorf("reflection: create queue %s/%d/%d: %w", g, d, inc, err)
	}
	q.meta = queueMeta{incarnation: inc, lastSeq: lastSeq}
	q.present, q.dirty = true, true
	return nil
}

// discardQueue detaches a queue bucket: an empty one is deleted at once,
// anything else goes to trash/ for chunked deletion by the committer.
func (bt *batchTx) discardQueue(g GroupID, d DeviceID, m queueMeta) error {
	name := queueName(g, d, m.incarnation)
	if m.length == 0 {
		err := bt.tx.Bucket(bucketQueues).DeleteBucket(name)
		if err != nil && !errors.Is(err, bberrors.ErrBucketNotFound) {
			return fmt.Errorf("reflection: delete empty queue %s/%d: %w", g, d, err)
		}
		return nil
	}
	if err := bt.tx.Bucket(bucketTrash).Put(name, []byte{}); err != nil {
		return fmt.Errorf("reflection: trash queue %s/%d: %w", g, d, err)
	}
	bt.trashed++
	return nil
}

// removeSlot deletes the slot record and its queue (meta now, keys later).
func (bt *batchTx) removeSlot(gb *bbolt.Bucket, g GroupID, d DeviceID) error {
	key := deviceKey(d)
	if slots := gb.Bucket(bucketSlots); slots != nil {
		if err := slots.Delete(key); err != nil {
			return fmt.Errorf("reflection: delete slot %d: %w", d, err)
		}
	}
	if err := bt.tx.Bucket(bucketQMeta).Delete(qmetaKey(g, d)); err != nil {
		return fmt.Errorf("reflection: delete queue meta %d: %w", d, err)
	}
	q := bt.queue(g, d)
	if q.present {
		if err := bt.discardQueue(g, d, q.meta); err != nil {
			return err
		}
		q.present, q.dirty = false, true
	}
	bt.groupsTouched[g] = true
	return nil
}

func (bt *batchTx) putTombstone(gb *bbolt.Bucket, g GroupID, t Tombstone) error {
	tombs, err := sub(gb, bucketTombs, true)
	if err != nil {
		return err
	}
	if err := tombs.Put(deviceKey(t.DeviceID), encodeTombstone(t)); err != nil {
		return fmt.Errorf("reflection: put tombstone %d: %w", t.DeviceID, err)
	}
	bt.tombTouched[g] = true
	return nil
}

func (bt *batchTx) deleteSlot(g GroupID, d DeviceID, t *Tombstone) error {
	gb, err := bt.group(g, t != nil)
	if err != nil || gb == nil {
		return err
	}
	if err := bt.removeSlot(gb, g, d); err != nil {
		return err
	}
	if t != nil {
		tc := *t
		if tc.At == 0 {
			tc.At = bt.now
		}
		return bt.putTombstone(gb, g, tc)
	}
	return nil
}

func (bt *batchTx) setShared(g GroupID, data []byte) error {
	gb, err := bt.group(g, len(data) > 0)
	if err != nil || gb == nil {
		return err
	}
	if len(data) == 0 {
		bt.groupsTouched[g] = true
		if err := gb.Delete(keyShared); err != nil {
			return fmt.Errorf("reflection: clear shared device data: %w", err)
		}
		return nil
	}
	if err := gb.Put(keyShared, data); err != nil {
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
		gb, _ := bt.group(g, false)
		tombs, _ := sub(gb, bucketTombs, false)
		if tombs == nil {
			continue
		}
		var old [][]byte
		c := tombs.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			t, err := decodeTombstone(k, v)
			if err != nil {
				return fmt.Errorf("reflection: group %s: %w", g, err)
			}
			if t.At < olderThan {
				old = append(old, append([]byte(nil), k...))
			}
		}
		for _, k := range old {
			if err := tombs.Delete(k); err != nil {
				return fmt.Errorf("reflection: prune tombstone: %w", err)
			}
		}
		if len(old) > 0 {
			bt.tombTouched[g] = true
			bt.groupsTouched[g] = true
		}
	}
	return nil
}
