package reflection

import (
	"bytes"
	"fmt"
	"io"
	"math"

	"go.etcd.io/bbolt"
)

// Reads run in their own short bbolt read transactions, concurrently with
// the committer, and copy every byte they return: bbolt values are only
// valid inside the transaction.

// Group returns the group's slots (sorted by DeviceID), tombstones and
// shared device data. An unknown group yields an empty state.
func (db *DB) Group(g GroupID) (GroupState, error) {
	var st GroupState
	err := db.bolt.View(func(tx *bbolt.Tx) error {
		gb := tx.Bucket(bucketGroups).Bucket(g[:])
		if gb == nil {
			return nil
		}
		var err error
		st, err = readGroupState(gb)
		return err
	})
	if err != nil {
		return GroupState{}, fmt.Errorf("reflection: group %s: %w", g, err)
	}
	return st, nil
}

func readGroupState(gb *bbolt.Bucket) (GroupState, error) {
	var st GroupState
	if slots := gb.Bucket(bucketSlots); slots != nil {
		c := slots.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			s, err := decodeSlot(k, v)
			if err != nil {
				return GroupState{}, err
			}
			st.Slots = append(st.Slots, s)
		}
	}
	if tombs := gb.Bucket(bucketTombs); tombs != nil {
		c := tombs.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			t, err := decodeTombstone(k, v)
			if err != nil {
				return GroupState{}, err
			}
			st.Tombstones = append(st.Tombstones, t)
		}
	}
	if v := gb.Get(keyShared); v != nil {
		st.SharedDeviceData = append([]byte{}, v...)
	}
	return st, nil
}

// QueueStats answers from the in-memory index: O(1), no disk read, safe
// for concurrent use. It reflects the last successful commit.
func (db *DB) QueueStats(g GroupID, d DeviceID) (QueueStats, bool) {
	return db.index.stats(queueKey{g, d})
}

// ReadQueue returns up to max entries of d's queue with Seq > afterSeq, in
// Seq order. An unknown slot yields no entries.
func (db *DB) ReadQueue(g GroupID, d DeviceID, afterSeq uint64, max int) ([]Entry, error) {
	if max <= 0 || afterSeq == math.MaxUint64 {
		return nil, nil
	}
	var out []Entry
	err := db.bolt.View(func(tx *bbolt.Tx) error {
		v := tx.Bucket(bucketQMeta).Get(qmetaKey(g, d))
		if v == nil {
			return nil
		}
		m, err := decodeQueueMeta(v)
		if err != nil {
			return err
		}
		qb := tx.Bucket(bucketQueues).Bucket(queueName(g, d, m.incarnation))
		if qb == nil {
			return fmt.Errorf("reflection: queue bucket %d missing", m.incarnation)
		}
		out = make([]Entry, 0, min(max, int(m.length)))
		c := qb.Cursor()
		for k, v := c.Seek(u64key(afterSeq + 1)); k != nil && len(out) < max; k, v = c.Next() {
			e, err := decodeEntry(k, v)
			if err != nil {
				return err
			}
			out = append(out, e)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reflection: read queue %s/%d: %w", g, d, err)
	}
	return out, nil
}

// forEachPage is how many groups ForEachGroup reads per read transaction.
// fn runs outside any transaction: a long-lived read transaction would make
// the committer wait whenever bbolt needs to grow its memory map.
const forEachPage = 64

// ForEachGroup calls fn for every group in id order; an error from fn stops
// the walk and is returned. Each group's state is consistent; groups
// written during the walk may or may not be seen.
func (db *DB) ForEachGroup(fn func(g GroupID, st GroupState) error) error {
	type item struct {
		g  GroupID
		st GroupState
	}
	var after []byte
	for {
		page := make([]item, 0, forEachPage)
		err := db.bolt.View(func(tx *bbolt.Tx) error {
			root := tx.Bucket(bucketGroups)
			c := root.Cursor()
			k, _ := c.First()
			if after != nil {
				k, _ = c.Seek(after)
				if k != nil && bytes.Equal(k, after) {
					k, _ = c.Next()
				}
			}
			for ; k != nil && len(page) < forEachPage; k, _ = c.Next() {
				gb := root.Bucket(k)
				if gb == nil || len(k) != 32 {
					return fmt.Errorf("reflection: unexpected key %x in groups", k)
				}
				st, err := readGroupState(gb)
				if err != nil {
					return fmt.Errorf("reflection: group %x: %w", k, err)
				}
				page = append(page, item{GroupID(k), st})
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, it := range page {
			if err := fn(it.g, it.st); err != nil {
				return err
			}
		}
		if len(page) < forEachPage {
			return nil
		}
		last := page[len(page)-1].g
		after = last[:]
	}
}

// Backup streams a consistent snapshot of the whole file to w while the
// server keeps running (one read transaction, bbolt's tx.WriteTo). The
// result is a valid database file. Note: while it runs, a commit that must
// grow bbolt's memory map waits for it (see Options.InitialMmapSize).
func (db *DB) Backup(w io.Writer) (int64, error) {
	var n int64
	err := db.bolt.View(func(tx *bbolt.Tx) error {
		var err error
		n, err = tx.WriteTo(w)
		return err
	})
	if err != nil {
		return n, fmt.Errorf("reflection: backup: %w", err)
	}
	return n, nil
}
