package reflection

import (
	"bytes"
	"cmp"
	"fmt"
	"io"
	"math"
	"slices"

	"go.etcd.io/bbolt"
)

// Reads of group state run in their own short bbolt read transactions,
// concurrently with the committer, and copy every byte they return: bbolt
// values are only valid inside the transaction. Queue reads are answered
// from the in-memory index and, for entries no longer cached, one read
// transaction over log/.

// Group returns the group's slots (sorted by DeviceID), tombstones and
// shared device data. An unknown group yields an empty state.
func (db *DB) Group(g GroupID) (GroupState, error) {
	var st GroupState
	err := db.bolt.View(func(tx *bbolt.Tx) error {
		var err error
		st, err = readGroupState(tx, g)
		return err
	})
	if err != nil {
		return GroupState{}, fmt.Errorf("reflection: group %s: %w", g, err)
	}
	return st, nil
}

func readGroupState(tx *bbolt.Tx, g GroupID) (GroupState, error) {
	var st GroupState
	c := tx.Bucket(bucketSlots).Cursor()
	for k, v := c.Seek(g[:]); k != nil && bytes.HasPrefix(k, g[:]); k, v = c.Next() {
		_, s, _, err := decodeSlot(k, v)
		if err != nil {
			return GroupState{}, err
		}
		st.Slots = append(st.Slots, s)
	}
	c = tx.Bucket(bucketTombs).Cursor()
	for k, v := c.Seek(g[:]); k != nil && bytes.HasPrefix(k, g[:]); k, v = c.Next() {
		t, err := decodeTombstone(k, v)
		if err != nil {
			return GroupState{}, err
		}
		st.Tombstones = append(st.Tombstones, t)
	}
	if v := tx.Bucket(bucketShared).Get(g[:]); v != nil {
		st.SharedDeviceData = append([]byte{}, v...)
	}
	return st, nil
}

// QueueStats answers from the in-memory index: O(1), no disk read, safe
// for concurrent use. It reflects the last successful commit and every Ack
// made so far.
func (db *DB) QueueStats(g GroupID, d DeviceID) (QueueStats, bool) {
	m := db.mem
	m.mu.RLock()
	defer m.mu.RUnlock()
	s := m.slot(g, d)
	if s == nil {
		return QueueStats{}, false
	}
	return QueueStats{Length: s.length, Bytes: s.bytes, NextSeq: s.counter + 1}, true
}

// ReadQueue returns up to max unacked entries of d's queue with Seq >
// afterSeq, in Seq order. An unknown slot yields no entries. Entries still
// in the cache cost no disk read; the others are read in one read
// transaction.
func (db *DB) ReadQueue(g GroupID, d DeviceID, afterSeq uint64, max int) ([]Entry, error) {
	if max <= 0 || afterSeq == math.MaxUint64 {
		return nil, nil
	}
	type want struct {
		seq, lsn uint64
		rec      []byte
	}
	var wants []want
	missing := 0
	m := db.mem
	m.mu.RLock()
	if s := m.slot(g, d); s != nil {
		live := s.live()
		i, _ := slices.BinarySearchFunc(live, afterSeq+1, func(e qent, seq uint64) int { return cmp.Compare(e.seq, seq) })
		for _, e := range live[i:] {
			if len(wants) == max {
				break
			}
			if e.acked {
				continue
			}
			rec := m.cache.m[e.lsn]
			if rec == nil {
				missing++
			}
			wants = append(wants, want{e.seq, e.lsn, rec})
		}
	}
	m.mu.RUnlock()
	if missing > 0 {
		err := db.bolt.View(func(tx *bbolt.Tx) error {
			lb := tx.Bucket(bucketLog)
			for i := range wants {
				if wants[i].rec == nil {
					if v := lb.Get(u64key(wants[i].lsn)); v != nil {
						wants[i].rec = append([]byte(nil), v...)
					}
				}
			}
			return nil
		})
		if err != nil {
			return nil, fmt.Errorf("reflection: read queue %s/%d: %w", g, d, err)
		}
	}
	out := make([]Entry, 0, len(wants))
	for _, w := range wants {
		if w.rec == nil {
			continue // acked or purged since the index was read
		}
		r, err := decodeLog(w.rec)
		if err != nil {
			return nil, fmt.Errorf("reflection: read queue %s/%d: log entry %d: %w", g, d, w.lsn, err)
		}
		out = append(out, Entry{Seq: w.seq, Timestamp: r.ts, Envelope: r.envelope})
	}
	return out, nil
}

// forEachPage is how many groups ForEachGroup reads per read transaction.
// fn runs outside any transaction: a long-lived read transaction would make
// the committer wait whenever bbolt needs to grow its memory map.
const forEachPage = 64

// groupBuckets hold keys that start with a group id; a group exists while
// any of them has a key of it.
var groupBuckets = [][]byte{bucketSlots, bucketTombs, bucketShared, bucketHeld}

// ForEachGroup calls fn for every group in id order; an error from fn stops
// the walk and is returned. Each group's state is consistent; groups
// written during the walk may or may not be seen.
func (db *DB) ForEachGroup(fn func(g GroupID, st GroupState) error) error {
	type item struct {
		g  GroupID
		st GroupState
	}
	var from []byte // first group id not yet visited
	for {
		page := make([]item, 0, forEachPage)
		done := false
		err := db.bolt.View(func(tx *bbolt.Tx) error {
			ids := nextGroups(tx, from, forEachPage)
			done = len(ids) < forEachPage
			for _, g := range ids {
				st, err := readGroupState(tx, g)
				if err != nil {
					return fmt.Errorf("reflection: group %s: %w", g, err)
				}
				page = append(page, item{g, st})
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
		if done {
			return nil
		}
		last := page[len(page)-1].g
		if from = nextPrefix(last[:]); from == nil {
			return nil
		}
	}
}

// nextGroups returns up to n group ids ≥ from, ascending, from every bucket
// keyed by group id.
func nextGroups(tx *bbolt.Tx, from []byte, n int) []GroupID {
	var ids []GroupID
	for _, name := range groupBuckets {
		c := tx.Bucket(name).Cursor()
		var k []byte
		if from == nil {
			k, _ = c.First()
		} else {
			k, _ = c.Seek(from)
		}
		for found := 0; len(k) >= 32 && found < n; found++ {
			g := GroupID(k[:32])
			ids = append(ids, g)
			next := nextPrefix(g[:])
			if next == nil {
				break
			}
			k, _ = c.Seek(next)
		}
	}
	slices.SortFunc(ids, func(a, b GroupID) int { return bytes.Compare(a[:], b[:]) })
	ids = slices.Compact(ids)
	if len(ids) > n {
		ids = ids[:n]
	}
	return ids
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
