package reflection

import (
	"fmt"
	"os"
	"slices"

	"go.etcd.io/bbolt"
)

// Hooks into the bbolt engine's internals for the external tests
// (model_test.go runs the engine-independent model of package storetest).

// CrashImage returns the file as of the last commit, as a power cut right
// now would leave it.
func (db *DB) CrashImage() ([]byte, error) {
	db.commitMu.Lock()
	defer db.commitMu.Unlock()
	return os.ReadFile(db.Path())
}

// StoredSeqs returns the unacked seqs of d's queue as the file at path
// stores them, rebuilt as Open would.
func StoredSeqs(path string, g GroupID, d DeviceID) ([]uint64, error) {
	b, err := bbolt.Open(path, 0o600, boltOptions(Options{}, true))
	if err != nil {
		return nil, err
	}
	defer b.Close()
	mem := newMemIndex(-1)
	if err := b.View(func(tx *bbolt.Tx) error { _, err := rebuild(tx, mem); return err }); err != nil {
		return nil, err
	}
	ms := mem.slot(g, d)
	if ms == nil {
		return nil, fmt.Errorf("group %x slot %d missing", g[0], d)
	}
	var out []uint64
	for _, e := range ms.live() {
		if !e.acked {
			out = append(out, e.seq)
		}
	}
	return out, nil
}

// CheckAckRanges compares the incrementally kept ack ranges of a slot with
// the ones computed from its deque.
func (db *DB) CheckAckRanges(g GroupID, d DeviceID) error {
	db.mem.mu.Lock()
	defer db.mem.mu.Unlock()
	if ms := db.mem.slot(g, d); ms != nil {
		kept := slices.Clone(ms.above)
		ms.rebuildRanges()
		if !slices.Equal(kept, ms.above) {
			return fmt.Errorf("group %x slot %d: ack ranges %v, from the deque %v", g[0], d, kept, ms.above)
		}
	}
	return nil
}

// ReclaimPending reports whether dead log entries wait to be deleted.
func (db *DB) ReclaimPending() bool { return db.reclaimPending() }

// ForEachPage is how many groups ForEachGroup reads per read transaction.
const ForEachPage = forEachPage
