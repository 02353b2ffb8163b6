package reflection

import (
	"bytes"
	"errors"
	"fmt"

	"go.etcd.io/bbolt"
	bberrors "go.etcd.io/bbolt/errors"
)

// batchTx applies requests inside one bbolt write transaction. It keeps the
// batch's view of queue meta and tombstones in its own maps and only hands
// them to the shared in-memory state in publish, which runs after the
// commit succeeded; a failed commit just drops the batchTx.
type batchTx struct {
	db  *DB
	tx  *bbolt.Tx
	now int64 // unix ms, one value per batch: "storage time" of every copy

	queues        map[queueKey]*batchQueue
	tombTouched   map[GroupID]bool
	tombMin       map[GroupID]int64 // computed in flush; 0 = no tombstones left
	groupsTouched map[GroupID]bool  // candidates for removing an empty group
	trashed       int
}

// batchQueue is a queue's state within the batch; dirty ones are written to
// qmeta in flush (once per batch, not once per reflection).
type batchQueue struct {
	queueChange
	dirty bool
}

func newBatchTx(db *DB, now int64) *batchTx {
	return &batchTx{
		db:            db,
		now:           now,
		queues:        make(map[queueKey]*batchQueue),
		tombTouched:   make(map[GroupID]bool),
		tombMin:       make(map[GroupID]int64),
		groupsTouched: make(map[GroupID]bool),
	}
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
	case opAck:
		return bt.ack(r.g, r.d, r.seq)
	case opPurgeQueue:
		return bt.purgeQueue(r.g, r.d)
	case opPruneTombstones:
		return bt.pruneTombstones(r.olderThan)
	}
	return fmt.Errorf("reflection: unknown request kind %d", r.op)
}

// --- bucket helpers ---

func (bt *batchTx) group(g GroupID, create bool) (*bbolt.Bucket, error) {
	root := bt.tx.Bucket(bucketGroups)
	if !create {
		return root.Bucket(g[:]), nil
	}
	gb, err := root.CreateBucketIfNotExists(g[:])
	if err != nil {
		return nil, fmt.Errorf("reflection: group %s: %w", g, err)
	}
	return gb, nil
}

func sub(gb *bbolt.Bucket, name []byte, create bool) (*bbolt.Bucket, error) {
	if gb == nil {
		return nil, nil
	}
	if !create {
		return gb.Bucket(name), nil
	}
	b, err := gb.CreateBucketIfNotExists(name)
	if err != nil {
		return nil, fmt.Errorf("reflection: bucket %s: %w", name, err)
	}
	return b, nil
}

func (bt *batchTx) queueBucket(g GroupID, d DeviceID, m queueMeta) (*bbolt.Bucket, error) {
	qb := bt.tx.Bucket(bucketQueues).Bucket(queueName(g, d, m.incarnation))
	if qb == nil {
		return nil, fmt.Errorf("reflection: group %s device %d: queue bucket %d missing", g, d, m.incarnation)
	}
	qb.FillPercent = queueFillPercent
	return qb, nil
}

// queue returns the batch's state of d's queue, loading it from the index
// (which equals the disk as of the last commit) on first use.
func (bt *batchTx) queue(g GroupID, d DeviceID) *batchQueue {
	k := queueKey{g, d}
	q, ok := bt.queues[k]
	if !ok {
		m, present := bt.db.index.lookup(k)
		q = &batchQueue{queueChange: queueChange{meta: m, present: present}}
		bt.queues[k] = q
	}
	return q
}

// recipients lists the slots of the group other than sender, in id order,
// as they exist in this transaction: that is what makes fan-out ordered
// exactly like PutSlot/DeleteSlot in submission order.
func recipients(gb *bbolt.Bucket, sender DeviceID) []DeviceID {
	slots := gb.Bucket(bucketSlots)
	if slots == nil {
		return nil
	}
	var out []DeviceID
	c := slots.Cursor()
	for k, _ := c.First(); k != nil; k, _ = c.Next() {
		if d := DeviceID(beUint64(k)); d != sender {
			out = append(out, d)
		}
	}
	return out
}

// --- slots, tombstones, shared data ---

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
	if qm := gb.Bucket(bucketQMeta); qm != nil {
		if err := qm.Delete(key); err != nil {
			return fmt.Errorf("reflection: delete queue meta %d: %w", d, err)
		}
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
		return bt.putTombstone(gb, g, *t)
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

// --- reflections ---

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

// --- end of batch ---

// flush writes what the batch kept in memory: dirty queue meta (once per
// queue per batch), and removes groups left with nothing in them.
func (bt *batchTx) flush() error {
	for k, q := range bt.queues {
		if !q.dirty || !q.present {
			continue // removed queues had their meta deleted in removeSlot
		}
		gb, err := bt.group(k.g, true)
		if err != nil {
			return err
		}
		qm, err := sub(gb, bucketQMeta, true)
		if err != nil {
			return err
		}
		if err := qm.Put(deviceKey(k.d), q.meta.encode()); err != nil {
			return fmt.Errorf("reflection: put queue meta %s/%d: %w", k.g, k.d, err)
		}
	}
	for g := range bt.tombTouched {
		gb, _ := bt.group(g, false)
		minAt, err := oldestTombstone(gb)
		if err != nil {
			return fmt.Errorf("reflection: group %s: %w", g, err)
		}
		bt.tombMin[g] = minAt
	}
	for g := range bt.groupsTouched {
		gb, _ := bt.group(g, false)
		if gb == nil || !groupEmpty(gb) {
			continue
		}
		if err := bt.tx.Bucket(bucketGroups).DeleteBucket(g[:]); err != nil {
			return fmt.Errorf("reflection: delete empty group %s: %w", g, err)
		}
	}
	return nil
}

// publish hands the committed batch's changes to the shared in-memory
// state. Called only after a successful commit.
func (bt *batchTx) publish() {
	changes := make(map[queueKey]*queueChange, len(bt.queues))
	for k, q := range bt.queues {
		if q.dirty {
			changes[k] = &q.queueChange
		}
	}
	bt.db.index.publish(changes)
	for g, minAt := range bt.tombMin {
		if minAt == 0 {
			delete(bt.db.tombMin, g)
		} else {
			bt.db.tombMin[g] = minAt
		}
	}
	if bt.trashed > 0 {
		bt.db.setTrashPending(true)
	}
}

// oldestTombstone returns the smallest At in the group, 0 if none.
func oldestTombstone(gb *bbolt.Bucket) (int64, error) {
	tombs, _ := sub(gb, bucketTombs, false)
	if tombs == nil {
		return 0, nil
	}
	var minAt int64
	c := tombs.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		t, err := decodeTombstone(k, v)
		if err != nil {
			return 0, err
		}
		// At 0 would read as "none": clamp, it is older than anything anyway.
		at := max(t.At, 1)
		if minAt == 0 || at < minAt {
			minAt = at
		}
	}
	return minAt, nil
}

// groupEmpty: no slots, tombstones, held reflections or shared data. Such a
// group is indistinguishable from an unknown one, so its bucket goes.
func groupEmpty(gb *bbolt.Bucket) bool {
	for _, name := range [][]byte{bucketSlots, bucketTombs, bucketHeld, bucketQMeta} {
		if b := gb.Bucket(name); b != nil {
			if k, _ := b.Cursor().First(); k != nil {
				return false
			}
		}
	}
	return gb.Get(keyShared) == nil
}
