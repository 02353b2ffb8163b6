package reflection

import (
	"fmt"

	"go.etcd.io/bbolt"
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

// flush writes what the batch kept in memory: dirty queue meta (once per
// queue per batch), and removes groups left with nothing in them.
func (bt *batchTx) flush() error {
	qm := bt.tx.Bucket(bucketQMeta)
	for k, q := range bt.queues {
		if !q.dirty || !q.present {
			continue // removed queues had their meta deleted in removeSlot
		}
		if err := qm.Put(qmetaKey(k.g, k.d), q.meta.encode()); err != nil {
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
	for _, name := range [][]byte{bucketSlots, bucketTombs, bucketHeld} {
		if b := gb.Bucket(name); b != nil {
			if k, _ := b.Cursor().First(); k != nil {
				return false
			}
		}
	}
	return gb.Get(keyShared) == nil
}
