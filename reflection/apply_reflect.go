package reflection

import (
	"bytes"
	"fmt"

	"go.etcd.io/bbolt"
)

// Reflection writes of a batch: fan-out with queue limits, ephemeral
// numbering, held reflections, acks and purges.

func (bt *batchTx) append(r *request) error {
	a := &r.app
	r.result.Timestamp = uint64(bt.now)
	if a.Hold {
		gb, err := bt.group(a.Group, true)
		if err != nil {
			return err
		}
		held, err := sub(gb, bucketHeld, true)
		if err != nil {
			return err
		}
		n, err := held.NextSequence()
		if err != nil {
			return fmt.Errorf("reflection: held sequence: %w", err)
		}
		if err := held.Put(heldKey(a.Sender, n), encodeEntry(uint64(bt.now), a.Envelope)); err != nil {
			return fmt.Errorf("reflection: put held reflection: %w", err)
		}
		return nil
	}
	gb, _ := bt.group(a.Group, false)
	if gb == nil {
		return nil
	}
	to := recipients(gb, a.Sender)
	if a.Ephemeral {
		// Only the counters move: the Seq keeps the ephemeral reflection's
		// place in each online recipient's delivery order (§18 row 4).
		for _, d := range to {
			q := bt.queue(a.Group, d)
			if !q.present {
				return fmt.Errorf("reflection: group %s: slot %d has no queue", a.Group, d)
			}
			q.meta.lastSeq++
			q.dirty = true
			r.result.Delivered = append(r.result.Delivered, Delivery{DeviceID: d, Seq: q.meta.lastSeq})
		}
		return nil
	}
	return bt.fanOut(gb, a.Group, to, encodeEntry(uint64(bt.now), a.Envelope), &r.result)
}

// fanOut writes value (timestamp ‖ envelope) into the queue of every slot
// in to. A queue that is full, or would exceed its byte limit, costs its
// slot: dropped in this transaction with a QueueLimit tombstone (§10 "Queue
// length limit", §18 rows 7 and 9).
func (bt *batchTx) fanOut(gb *bbolt.Bucket, g GroupID, to []DeviceID, value []byte, res *AppendResult) error {
	envLen := uint64(len(value) - entryHeaderLen)
	maxLen := uint64(bt.db.opts.MaxQueueLength)
	maxBytes := uint64(bt.db.opts.MaxQueueBytes)
	for _, d := range to {
		q := bt.queue(g, d)
		if !q.present {
			continue // dropped earlier in this fan-out (ReleaseHeld) or inconsistent
		}
		if q.meta.length >= maxLen || q.meta.bytes+envLen > maxBytes {
			if err := bt.removeSlot(gb, g, d); err != nil {
				return err
			}
			if err := bt.putTombstone(gb, g, Tombstone{DeviceID: d, Reason: QueueLimit, At: bt.now}); err != nil {
				return err
			}
			res.Dropped = append(res.Dropped, d)
			continue
		}
		qb, err := bt.queueBucket(g, d, q.meta)
		if err != nil {
			return err
		}
		seq := q.meta.lastSeq + 1
		if err := qb.Put(u64key(seq), value); err != nil {
			return fmt.Errorf("reflection: put reflection %s/%d/%d: %w", g, d, seq, err)
		}
		q.meta.lastSeq = seq
		q.meta.length++
		q.meta.bytes += envLen
		q.dirty = true
		res.Delivered = append(res.Delivered, Delivery{DeviceID: d, Seq: seq})
	}
	return nil
}

func (bt *batchTx) releaseHeld(r *request) error {
	g, sender := r.g, r.d
	r.result.Timestamp = uint64(bt.now)
	gb, _ := bt.group(g, false)
	held, _ := sub(gb, bucketHeld, false)
	if held == nil {
		return nil
	}
	prefix := deviceKey(sender)
	type heldEntry struct{ k, v []byte }
	var entries []heldEntry
	c := held.Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		if len(k) != 16 || len(v) < entryHeaderLen {
			return fmt.Errorf("reflection: group %s: corrupt held reflection", g)
		}
		// Copied: the value is reused as the queue value and must stay
		// valid after the held key is deleted.
		entries = append(entries, heldEntry{append([]byte(nil), k...), append([]byte(nil), v...)})
	}
	for _, e := range entries {
		// The held value already is timestamp ‖ envelope, with the
		// timestamp the sender's ReflectAck carried.
		if err := bt.fanOut(gb, g, recipients(gb, sender), e.v, &r.result); err != nil {
			return err
		}
		if err := held.Delete(e.k); err != nil {
			return fmt.Errorf("reflection: delete held reflection: %w", err)
		}
	}
	if len(entries) > 0 {
		bt.groupsTouched[g] = true
	}
	return nil
}

func (bt *batchTx) ack(g GroupID, d DeviceID, seq uint64) error {
	q := bt.queue(g, d)
	if !q.present || q.meta.length == 0 {
		return nil
	}
	qb, err := bt.queueBucket(g, d, q.meta)
	if err != nil {
		return err
	}
	key := u64key(seq)
	v := qb.Get(key)
	if v == nil {
		return nil
	}
	envLen := uint64(len(v) - entryHeaderLen)
	if err := qb.Delete(key); err != nil {
		return fmt.Errorf("reflection: ack %s/%d/%d: %w", g, d, seq, err)
	}
	q.meta.length--
	q.meta.bytes -= envLen
	q.dirty = true
	return nil
}

func (bt *batchTx) purgeQueue(g GroupID, d DeviceID) error {
	q := bt.queue(g, d)
	if !q.present || q.meta.length == 0 {
		return nil
	}
	if err := bt.discardQueue(g, d, q.meta); err != nil {
		return err
	}
	return bt.newQueue(g, d, q, q.meta.lastSeq)
}
