package reflection

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"go.etcd.io/bbolt"
	bberrors "go.etcd.io/bbolt/errors"
)

// Check and Compact work on a file no server has open (bbolt's lock makes
// them fail with ErrLocked otherwise); the admin CLI runs them offline.

// maxCheckErrors bounds the report: past that, more detail does not help.
const maxCheckErrors = 50

// Check runs bbolt's page-level consistency check and then a schema check:
// record sizes, every slot has queue meta and a queue bucket, the meta's
// length/bytes/counter match the bucket's contents, and every queue bucket
// belongs to a slot or to the trash. All problems found (up to 50) are
// returned joined; nil means the file is sound.
func Check(path string) error {
	if _, err := os.Stat(path); err != nil {
		return fmt.Errorf("reflection: check: %w", err)
	}
	b, err := openOffline(path)
	if err != nil {
		return err
	}
	defer b.Close()
	var errs []error
	report := func(err error) bool {
		errs = append(errs, err)
		return len(errs) < maxCheckErrors
	}
	err = b.View(func(tx *bbolt.Tx) error {
		for err := range tx.Check() {
			if !report(fmt.Errorf("reflection: check: bbolt: %w", err)) {
				return nil
			}
		}
		checkSchema(tx, report)
		return nil
	})
	if err != nil {
		return fmt.Errorf("reflection: check: %w", err)
	}
	return errors.Join(errs...)
}

func checkSchema(tx *bbolt.Tx, report func(error) bool) {
	bad := func(format string, a ...any) bool {
		return report(fmt.Errorf("reflection: check: "+format, a...))
	}
	meta := tx.Bucket(bucketMeta)
	if meta == nil {
		bad("bucket meta missing")
		return
	}
	if v := meta.Get(keySchema); len(v) != 4 || beUint32(v) != schemaVersion {
		if !bad("schema version %x, want %d", v, schemaVersion) {
			return
		}
	}
	groups, qmeta := tx.Bucket(bucketGroups), tx.Bucket(bucketQMeta)
	queues, trash := tx.Bucket(bucketQueues), tx.Bucket(bucketTrash)
	if groups == nil || qmeta == nil || queues == nil || trash == nil {
		bad("root bucket missing")
		return
	}
	slots := make(map[queueKey]bool)
	c := groups.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if v != nil || len(k) != 32 {
			if !bad("unexpected key %x in groups", k) {
				return
			}
			continue
		}
		if !checkGroup(GroupID(k), groups.Bucket(k), slots, bad) {
			return
		}
	}
	owned := make(map[string]bool) // queue bucket names referenced by a slot or the trash
	withMeta := make(map[queueKey]bool)
	mc := qmeta.Cursor()
	for k, v := mc.First(); k != nil; k, v = mc.Next() {
		m, err := decodeQueueMeta(v)
		if err != nil || len(k) != 40 {
			if !bad("queue meta %x: %v", k, err) {
				return
			}
			continue
		}
		qk := queueKey{GroupID(k[:32]), DeviceID(beUint64(k[32:]))}
		withMeta[qk] = true
		if !slots[qk] {
			if !bad("group %s: queue meta for missing slot %d", qk.g, qk.d) {
				return
			}
		}
		name := queueName(qk.g, qk.d, m.incarnation)
		owned[string(name)] = true
		if !checkQueue(qk.g, qk.d, m, queues.Bucket(name), bad) {
			return
		}
	}
	for qk := range slots {
		if !withMeta[qk] {
			if !bad("group %s: slot %d has no queue meta", qk.g, qk.d) {
				return
			}
		}
	}
	tc := trash.Cursor()
	for k, _ := tc.First(); k != nil; k, _ = tc.Next() {
		if len(k) != queueNameLen {
			if !bad("trash entry %x has the wrong length", k) {
				return
			}
		}
		owned[string(k)] = true
	}
	qc := queues.Cursor()
	for k, v := qc.First(); k != nil; k, v = qc.Next() {
		if v != nil || len(k) != queueNameLen {
			if !bad("unexpected key %x in queues", k) {
				return
			}
			continue
		}
		if !owned[string(k)] {
			if !bad("orphan queue bucket %x (no slot, not in trash)", k) {
				return
			}
		}
	}
}

// checkGroup checks the group's records and adds its slots to slots.
func checkGroup(g GroupID, gb *bbolt.Bucket, slots map[queueKey]bool, bad func(string, ...any) bool) bool {
	if sb := gb.Bucket(bucketSlots); sb != nil {
		c := sb.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			s, err := decodeSlot(k, v)
			if err != nil {
				if !bad("group %s: %v", g, err) {
					return false
				}
				continue
			}
			slots[queueKey{g, s.DeviceID}] = true
		}
	}
	if tb := gb.Bucket(bucketTombs); tb != nil {
		c := tb.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if _, err := decodeTombstone(k, v); err != nil {
				if !bad("group %s: %v", g, err) {
					return false
				}
			}
		}
	}
	if hb := gb.Bucket(bucketHeld); hb != nil {
		c := hb.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if len(k) != 16 || len(v) < entryHeaderLen {
				if !bad("group %s: corrupt held reflection %x", g, k) {
					return false
				}
			}
		}
	}
	return true
}

func checkQueue(g GroupID, d DeviceID, m queueMeta, qb *bbolt.Bucket, bad func(string, ...any) bool) bool {
	if qb == nil {
		return bad("group %s: slot %d: queue bucket %d missing", g, d, m.incarnation)
	}
	var n, size, last uint64
	c := qb.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		if len(k) != 8 || len(v) < entryHeaderLen {
			if !bad("group %s: slot %d: corrupt entry %x", g, d, k) {
				return false
			}
			continue
		}
		n++
		size += uint64(len(v) - entryHeaderLen)
		last = beUint64(k)
	}
	if n != m.length || size != m.bytes || last > m.lastSeq {
		return bad("group %s: slot %d: meta says %d entries, %d bytes, last seq %d; bucket has %d, %d, last %d",
			g, d, m.length, m.bytes, m.lastSeq, n, size, last)
	}
	return true
}

// FileUsage is how much a database file takes, three ways.
type FileUsage struct {
	FileBytes int64 // the file's length (ls -l); bbolt grows it in steps ahead of the data
	DiskBytes int64 // blocks allocated on disk (du); less than FileBytes for a sparse tail
	DataBytes int64 // pages that hold data (meta, buckets, keys, values); the rest is free pages
}

// CompactResult is what Compact did: the file before and after.
type CompactResult struct {
	Before, After FileUsage
}

// Compact rewrites the file at path without free pages (bbolt never
// shrinks a file on its own) into path+".compact" and renames it over path.
// It needs free disk space for the live data.
func Compact(path string) (CompactResult, error) {
	var res CompactResult
	if _, err := os.Stat(path); err != nil {
		return res, fmt.Errorf("reflection: compact: %w", err)
	}
	src, err := openOffline(path)
	if err != nil {
		return res, err
	}
	if res.Before, err = fileUsage(path, src); err != nil {
		_ = src.Close()
		return res, fmt.Errorf("reflection: compact: %w", err)
	}
	tmp := path + ".compact"
	_ = os.Remove(tmp) // left over from an interrupted run
	dst, err := bbolt.Open(tmp, 0o600, boltOptions(Options{}, false))
	if err != nil {
		_ = src.Close()
		return res, fmt.Errorf("reflection: compact: create %s: %w", tmp, err)
	}
	// 64 MiB per transaction bounds memory on large files.
	err = bbolt.Compact(dst, src, 64<<20)
	err = errors.Join(err, dst.Close(), src.Close())
	if err != nil {
		_ = os.Remove(tmp)
		return res, fmt.Errorf("reflection: compact: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return res, fmt.Errorf("reflection: compact: %w", err)
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		_ = d.Sync() // make the rename durable
		_ = d.Close()
	}
	after, err := openOffline(path)
	if err != nil {
		return res, err
	}
	res.After, err = fileUsage(path, after)
	if err = errors.Join(err, after.Close()); err != nil {
		return res, fmt.Errorf("reflection: compact: %w", err)
	}
	return res, nil
}

// Usage measures the database file at path (no server may have it open).
func Usage(path string) (FileUsage, error) {
	b, err := openOffline(path)
	if err != nil {
		return FileUsage{}, err
	}
	u, err := fileUsage(path, b)
	return u, errors.Join(err, b.Close())
}

func fileUsage(path string, b *bbolt.DB) (FileUsage, error) {
	var u FileUsage
	fi, err := os.Stat(path)
	if err != nil {
		return u, err
	}
	u.FileBytes = fi.Size()
	u.DiskBytes = diskBytes(fi)
	err = b.View(func(tx *bbolt.Tx) error {
		// Two meta pages and the root bucket's page, then every bucket's
		// pages (Stats counts nested buckets too; inline buckets live in
		// their parent's page).
		pages := 3
		err := tx.ForEach(func(_ []byte, bk *bbolt.Bucket) error {
			st := bk.Stats()
			pages += st.BranchPageN + st.BranchOverflowN + st.LeafPageN + st.LeafOverflowN
			return nil
		})
		u.DataBytes = int64(pages) * int64(b.Info().PageSize)
		return err
	})
	return u, err
}

func openOffline(path string) (*bbolt.DB, error) {
	b, err := bbolt.Open(path, 0o600, boltOptions(Options{}, true))
	if err != nil {
		if errors.Is(err, bberrors.ErrTimeout) {
			return nil, fmt.Errorf("%w: %s", ErrLocked, path)
		}
		return nil, fmt.Errorf("reflection: open %s: %w", path, err)
	}
	return b, nil
}
