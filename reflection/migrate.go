package reflection

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/rs/zerolog"
	"go.etcd.io/bbolt"
)

// Migration of a schema-1 file (one bucket per group, one queue bucket and
// a qmeta key per slot, every copy of a reflection stored per recipient) to
// schema 2 (layout.go), on the first Open. It is crash-safe because every
// step is a transaction that leaves the file in a state the next Open can
// continue from:
//
//  1. one transaction copies everything but queue contents (slots with
//     born = 1, tombstones, shared data, held reflections, one cursor
//     record per group with each slot's counter and watermark 0), deletes
//     groups/ and sets meta/"migrating". Its size is that of the group
//     metadata, not of the queues.
//  2. chunks of DeleteChunk queue entries: each moves entries, in qmeta key
//     and then Seq order, into log/ as one-recipient records (sender 0:
//     schema 1 did not store it) and deletes them from their queue bucket
//     in the same transaction; an emptied queue loses its bucket and qmeta
//     key. What is left in queues/ is exactly what is still to do.
//  3. one transaction drops the schema-1 buckets (qmeta/, queues/ with
//     any queues left in the trash, trash/) and sets the schema to 2.
//
// Killed anywhere, the next Open sees either schema 1 without the marker
// (step 1 starts again) or the marker (step 2 continues, step 3 follows).
var (
	bucketV1Groups = []byte("groups")
	bucketV1QMeta  = []byte("qmeta")
	bucketV1Queues = []byte("queues")
	bucketV1Trash  = []byte("trash")
	keyV1Shared    = []byte("shared")
)

// testHookMigrateChunk, if set, runs inside every step-2 transaction; an
// error aborts it (tests: a migration killed half-way).
var testHookMigrateChunk func(chunk int) error

func migrate(b *bbolt.DB, opts Options, log zerolog.Logger) error {
	var v1, resume bool
	err := b.View(func(tx *bbolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if meta == nil {
			return nil
		}
		v := meta.Get(keySchema)
		v1 = len(v) == 4 && beUint32(v) == 1
		resume = meta.Get(keyMigrating) != nil
		return nil
	})
	if err != nil || !v1 {
		return err
	}
	log.Info().Bool("resuming", resume).Msg("reflection: migrating the database from schema 1 to 2")
	if !resume {
		if err := b.Update(migrateMetadata); err != nil {
			return fmt.Errorf("reflection: migrate: %w", err)
		}
	}
	moved := 0
	for chunk := 0; ; chunk++ {
		n := 0
		err := b.Update(func(tx *bbolt.Tx) error {
			var err error
			if n, err = migrateQueueChunk(tx, opts.DeleteChunk); err != nil {
				return err
			}
			if testHookMigrateChunk != nil {
				return testHookMigrateChunk(chunk)
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("reflection: migrate: %w", err)
		}
		moved += n
		if n == 0 {
			break
		}
	}
	if err := b.Update(migrateFinish); err != nil {
		return fmt.Errorf("reflection: migrate: %w", err)
	}
	log.Info().Int("queue_entries_moved", moved).Msg("reflection: migration to schema 2 finished")
	return nil
}

func migrateMetadata(tx *bbolt.Tx) error {
	for _, name := range rootBuckets {
		if _, err := tx.CreateBucketIfNotExists(name); err != nil {
			return err
		}
	}
	slotsB, tombsB, sharedB := tx.Bucket(bucketSlots), tx.Bucket(bucketTombs), tx.Bucket(bucketShared)
	heldB, cursorsB := tx.Bucket(bucketHeld), tx.Bucket(bucketCursors)
	qmeta := tx.Bucket(bucketV1QMeta)
	groups := tx.Bucket(bucketV1Groups)
	if groups == nil || qmeta == nil {
		return fmt.Errorf("schema-1 buckets missing")
	}
	var maxHeld uint64
	c := groups.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if v != nil || len(k) != 32 {
			return fmt.Errorf("unexpected key %x in groups", k)
		}
		g := GroupID(k)
		gb := groups.Bucket(k)
		var cursors []slotCursor
		if sb := gb.Bucket([]byte("slots")); sb != nil {
			sc := sb.Cursor()
			for sk, sv := sc.First(); sk != nil; sk, sv = sc.Next() {
				s, err := decodeSlotV1(sk, sv)
				if err != nil {
					return fmt.Errorf("group %s: %w", g, err)
				}
				if err := slotsB.Put(slotKey(g, s.DeviceID), encodeSlot(s, 1)); err != nil {
					return err
				}
				cur := slotCursor{d: s.DeviceID}
				if mv := qmeta.Get(slotKey(g, s.DeviceID)); len(mv) == 32 {
					cur.counter = beUint64(mv[8:])
				}
				cursors = append(cursors, cur)
			}
		}
		if len(cursors) > 0 {
			if err := cursorsB.Put(g[:], encodeCursors(cursors)); err != nil {
				return err
			}
		}
		if tb := gb.Bucket([]byte("tombs")); tb != nil {
			tc := tb.Cursor()
			for tk, tv := tc.First(); tk != nil; tk, tv = tc.Next() {
				t, err := decodeTombstone(tk, tv)
				if err != nil {
					return fmt.Errorf("group %s: %w", g, err)
				}
				if err := tombsB.Put(slotKey(g, t.DeviceID), encodeTombstone(t)); err != nil {
					return err
				}
			}
		}
		if hb := gb.Bucket([]byte("held")); hb != nil {
			hc := hb.Cursor()
			for hk, hv := hc.First(); hk != nil; hk, hv = hc.Next() {
				if len(hk) != 16 || len(hv) < entryHeaderLen {
					return fmt.Errorf("group %s: corrupt held reflection %x", g, hk)
				}
				n := beUint64(hk[8:])
				maxHeld = max(maxHeld, n)
				if err := heldB.Put(heldKey(g, DeviceID(beUint64(hk)), n), hv); err != nil {
					return err
				}
			}
		}
		if v := gb.Get(keyV1Shared); v != nil {
			if err := sharedB.Put(g[:], v); err != nil {
				return err
			}
		}
	}
	if err := heldB.SetSequence(maxHeld); err != nil {
		return err
	}
	if err := tx.DeleteBucket(bucketV1Groups); err != nil {
		return err
	}
	return tx.Bucket(bucketMeta).Put(keyMigrating, []byte{1})
}

// migrateQueueChunk moves up to chunk queue entries into the log and
// returns how many it moved (0: nothing left).
func migrateQueueChunk(tx *bbolt.Tx, chunk int) (int, error) {
	qmeta, queues := tx.Bucket(bucketV1QMeta), tx.Bucket(bucketV1Queues)
	lb := tx.Bucket(bucketLog)
	lb.FillPercent = logFillPercent
	lsn := lb.Sequence()
	moved := 0
	var emptied [][]byte
	mc := qmeta.Cursor()
	for k, v := mc.First(); k != nil && moved < chunk; k, v = mc.Next() {
		if len(k) != 40 || len(v) != 32 {
			return 0, fmt.Errorf("corrupt queue meta %x", k)
		}
		g, d := GroupID(k[:32]), DeviceID(beUint64(k[32:]))
		name := make([]byte, 48)
		copy(name, k)
		copy(name[40:], v[:8]) // incarnation
		qb := queues.Bucket(name)
		if qb != nil {
			var keys [][]byte
			qc := qb.Cursor()
			for qk, qv := qc.First(); qk != nil && moved < chunk; qk, qv = qc.Next() {
				if len(qk) != 8 || len(qv) < entryHeaderLen {
					return 0, fmt.Errorf("group %s: slot %d: corrupt queue entry %x", g, d, qk)
				}
				lsn++
				rec := encodeLog(beUint64(qv), g, 0, []Delivery{{DeviceID: d, Seq: beUint64(qk)}}, qv[entryHeaderLen:])
				if err := lb.Put(u64key(lsn), rec); err != nil {
					return 0, err
				}
				keys = append(keys, append([]byte(nil), qk...))
				moved++
			}
			for _, qk := range keys {
				if err := qb.Delete(qk); err != nil {
					return 0, err
				}
			}
			if first, _ := qb.Cursor().First(); first != nil {
				break // chunk full
			}
			if err := queues.DeleteBucket(name); err != nil {
				return 0, err
			}
		}
		emptied = append(emptied, append([]byte(nil), k...))
	}
	for _, k := range emptied {
		if err := qmeta.Delete(k); err != nil {
			return 0, err
		}
	}
	if err := lb.SetSequence(lsn); err != nil {
		return 0, err
	}
	// An emptied queue alone is progress too: report it so the loop goes on.
	return moved + len(emptied), nil
}

func migrateFinish(tx *bbolt.Tx) error {
	for _, name := range [][]byte{bucketV1QMeta, bucketV1Queues, bucketV1Trash} {
		if tx.Bucket(name) != nil {
			if err := tx.DeleteBucket(name); err != nil {
				return err
			}
		}
	}
	meta := tx.Bucket(bucketMeta)
	if err := meta.Delete(keyMigrating); err != nil {
		return err
	}
	return meta.Put(keySchema, u32bytes(schemaVersion))
}

// decodeSlotV1 decodes a schema-1 slot: key device u64, value version 1 ‖
// policy ‖ created ‖ connected since ‖ last disconnect ‖ device info.
func decodeSlotV1(k, v []byte) (Slot, error) {
	const hdr = 1 + 1 + 8 + 8 + 8
	if len(k) != 8 || len(v) < hdr || v[0] != 1 {
		return Slot{}, fmt.Errorf("corrupt schema-1 slot %x (%d bytes)", k, len(v))
	}
	s := Slot{
		DeviceID:         DeviceID(binary.BigEndian.Uint64(k)),
		Policy:           ExpirationPolicy(v[1]),
		CreatedAt:        int64(beUint64(v[2:])),
		ConnectedSince:   int64(beUint64(v[10:])),
		LastDisconnectAt: int64(beUint64(v[18:])),
	}
	if len(v) > hdr {
		s.DeviceInfo = bytes.Clone(v[hdr:])
	}
	return s, nil
}
