package reflection

import (
	"bytes"
	"fmt"
)

// Reflection writes of a batch: fan-out with queue limits, ephemeral
// numbering, held reflections and purges. Acks do not come through here:
// they change memory directly and are written lazily (committer.go).

func (bt *batchTx) append(r *request) error {
	a := &r.app
	r.result.Timestamp = uint64(bt.now)
	if a.Hold {
		n, err := bt.heldB.NextSequence()
		if err != nil {
			return fmt.Errorf("reflection: held sequence: %w", err)
		}
		if err := bt.heldB.Put(heldKey(a.Group, a.Sender, n), encodeEntry(uint64(bt.now), a.Envelope)); err != nil {
			return fmt.Errorf("reflection: put held reflection: %w", err)
		}
		return nil
	}
	to := bt.recipients(a.Group, a.Sender)
	if len(to) == 0 {
		return nil
	}
	if a.Ephemeral {
		// Only the counters move: the Seq keeps the ephemeral reflection's
		// place in each online recipient's delivery order (§18 row 4). The
		// group's cursor record carries the counters to disk.
		for _, d := range to {
			s := bt.slot(a.Group, d)
			if !s.present {
				return fmt.Errorf("reflection: group %s: slot %d not in the index", a.Group, d)
			}
			s.counter++
			r.result.Delivered = append(r.result.Delivered, Delivery{DeviceID: d, Seq: s.counter})
		}
		bt.cursors[a.Group] = true
		return nil
	}
	return bt.fanOut(a.Group, a.Sender, to, uint64(bt.now), a.Envelope, &r.result)
}

// fanOut gives the reflection a Seq in the queue of every slot in to and
// writes it once to the log. A queue that is full, or would exceed its byte
// limit, costs its slot: dropped in this transaction with a QueueLimit
// tombstone (§10 "Queue length limit", §18 rows 7 and 9).
func (bt *batchTx) fanOut(g GroupID, sender DeviceID, to []DeviceID, ts uint64, envelope []byte, res *AppendResult) error {
	envLen := int64(len(envelope))
	maxLen := bt.db.opts.MaxQueueLength
	maxBytes := bt.db.opts.MaxQueueBytes
	lsn := bt.nextLSN
	first := len(res.Delivered)
	for _, d := range to {
		s := bt.slot(g, d)
		if !s.present {
			return fmt.Errorf("reflection: group %s: slot %d not in the index", g, d)
		}
		if s.length >= maxLen || s.bytes+envLen > maxBytes {
			if err := bt.removeSlot(g, d); err != nil {
				return err
			}
			if err := bt.putTombstone(g, Tombstone{DeviceID: d, Reason: QueueLimit, At: bt.now}); err != nil {
				return err
			}
			res.Dropped = append(res.Dropped, d)
			continue
		}
		s.counter++
		s.length++
		s.bytes += envLen
		s.appended = append(s.appended, qent{seq: s.counter, lsn: lsn, size: uint32(envLen)})
		res.Delivered = append(res.Delivered, Delivery{DeviceID: d, Seq: s.counter})
	}
	copies := res.Delivered[first:]
	if len(copies) == 0 {
		return nil
	}
	if len(copies) > maxRecipients {
		return fmt.Errorf("reflection: group %s: %d recipients", g, len(copies))
	}
	rec := encodeLog(ts, g, sender, copies, envelope)
	if err := bt.logB.Put(u64key(lsn), rec); err != nil {
		return fmt.Errorf("reflection: put log entry %d: %w", lsn, err)
	}
	bt.nextLSN++
	bt.logs = append(bt.logs, stagedLog{lsn: lsn, rec: rec})
	return nil
}

func (bt *batchTx) releaseHeld(r *request) error {
	g, sender := r.g, r.d
	r.result.Timestamp = uint64(bt.now)
	prefix := heldKey(g, sender, 0)[:40]
	type heldEntry struct{ k, v []byte }
	var entries []heldEntry
	c := bt.heldB.Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		if len(k) != 48 || len(v) < entryHeaderLen {
			return fmt.Errorf("reflection: group %s: corrupt held reflection", g)
		}
		// Copied: the value must stay valid after the key is deleted.
		entries = append(entries, heldEntry{append([]byte(nil), k...), append([]byte(nil), v...)})
	}
	for _, e := range entries {
		// Each copy keeps the timestamp the sender's ReflectAck carried.
		to := bt.recipients(g, sender)
		if len(to) > 0 {
			if err := bt.fanOut(g, sender, to, beUint64(e.v), e.v[entryHeaderLen:], &r.result); err != nil {
				return err
			}
		}
		if err := bt.heldB.Delete(e.k); err != nil {
			return fmt.Errorf("reflection: delete held reflection: %w", err)
		}
	}
	return nil
}

func (bt *batchTx) purgeQueue(g GroupID, d DeviceID) error {
	s := bt.slot(g, d)
	if !s.present || s.length == 0 {
		return nil
	}
	s.reset, s.appended, s.length, s.bytes = true, nil, 0, 0
	bt.cursors[g] = true
	return nil
}
