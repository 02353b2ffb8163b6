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
// every record decodes; every slot has a cursor and every cursor belongs to
// a slot; watermarks and acked seqs lie within the slot's counter; each
// slot's log entries have ascending seqs; every held key is well-formed.
// Log entries no slot needs any more are expected after a crash (lazy acks,
// an unfinished slot drop: the next Open reclaims them) but are reported as
// leaked if the file was closed cleanly. All problems found (up to 50) are
// returned joined; nil means the file is sound.
func Check(path string) error {
	_, err := CheckReport(path)
	return err
}

// CheckResult describes a checked file.
type CheckResult struct {
	Schema      int
	Migrating   bool // a schema-1 migration was interrupted; Open finishes it
	Clean       bool // the last Close left nothing to reclaim
	Slots       int
	LogEntries  int // live log entries (needed by at least one slot)
	Reclaimable int // log entries nobody needs (Open reclaims them)
}

// CheckReport is Check with a description of the file.
func CheckReport(path string) (CheckResult, error) {
	var res CheckResult
	if _, err := os.Stat(path); err != nil {
		return res, fmt.Errorf("reflection: check: %w", err)
	}
	b, err := openOffline(path)
	if err != nil {
		return res, err
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
		checkSchema(tx, &res, report)
		return nil
	})
	if err != nil {
		return res, fmt.Errorf("reflection: check: %w", err)
	}
	return res, errors.Join(errs...)
}

func checkSchema(tx *bbolt.Tx, res *CheckResult, report func(error) bool) {
	bad := func(format string, a ...any) bool {
		return report(fmt.Errorf("reflection: check: "+format, a...))
	}
	meta := tx.Bucket(bucketMeta)
	if meta == nil {
		bad("bucket meta missing")
		return
	}
	v := meta.Get(keySchema)
	if len(v) == 4 {
		res.Schema = int(beUint32(v))
	}
	res.Migrating = meta.Get(keyMigrating) != nil
	res.Clean = meta.Get(keyClean) != nil
	if res.Schema == 1 || res.Migrating {
		bad("schema %d (migration to %d pending: start the server once to migrate)", res.Schema, schemaVersion)
		return
	}
	if res.Schema != schemaVersion {
		bad("schema version %x, want %d", v, schemaVersion)
		return
	}
	for _, name := range rootBuckets {
		if tx.Bucket(name) == nil {
			bad("bucket %s missing", name)
			return
		}
	}
	mem := newMemIndex(-1)
	rb, err := rebuild(tx, mem)
	if err != nil {
		bad("%v", err)
		return
	}
	for _, f := range rb.findings {
		if !report(fmt.Errorf("reflection: check: %w", f)) {
			return
		}
	}
	for _, gm := range mem.groups {
		res.Slots += len(gm.slots)
	}
	res.LogEntries = rb.entries
	res.Reclaimable = len(mem.dead)
	if res.Clean && res.Reclaimable > 0 {
		if !bad("%d leaked log entries: no slot needs them, yet the file was closed cleanly", res.Reclaimable) {
			return
		}
	}
	for _, name := range [][]byte{bucketTombs, bucketShared} {
		c := tx.Bucket(name).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			var err error
			switch {
			case string(name) == string(bucketTombs):
				if len(k) != 40 {
					err = fmt.Errorf("key of %d bytes", len(k))
				} else {
					_, err = decodeTombstone(k, v)
				}
			case len(k) != 32:
				err = fmt.Errorf("key of %d bytes", len(k))
			}
			if err != nil && !bad("%s %x: %v", name, k, err) {
				return
			}
		}
	}
	hc := tx.Bucket(bucketHeld).Cursor()
	for k, v := hc.First(); k != nil; k, v = hc.Next() {
		if len(k) != 48 || len(v) < entryHeaderLen {
			if !bad("corrupt held reflection %x", k) {
				return
			}
		}
	}
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
