package reflection

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"slices"

	"go.etcd.io/bbolt"
)

// Shard export and import, for a planned move of a shard between cluster
// nodes (the stream format is in shard_codec.go, the writes in
// apply_shard.go).
//
// Consistency of an export: ExportShard takes commitMu, which the committer
// holds from the start of a write transaction until its batch is published
// to memory, so while ExportShard holds it the file's last commit and the
// in-memory index agree and no commit is half done. Under it, and for a
// moment only, it begins a bbolt read transaction and copies, under mem.mu,
// each of the shard's slots' counter and unacked entries (seq, lsn): acks
// that are still only in memory count as acked. Then it releases commitMu
// and streams from the read transaction, which keeps seeing exactly that
// commit (bbolt MVCC) while the committer goes on with other shards' work.
// So the export contains every commit completed before ExportShard was
// called and nothing of any later one, without holding up the committer
// or doing I/O under a mutex. The price is Backup's: while the stream is
// written, a commit that must grow bbolt's memory map waits for it.

// ExportShard writes a consistent snapshot of every group of shard (the
// first byte of the group id) to w: slots with their counters, tombstones,
// shared device data, held reflections and every unacked queue entry.
func (db *DB) ExportShard(ctx context.Context, shard byte, w io.Writer) (ShardStats, error) {
	var st ShardStats
	snap, tx, err := db.snapshotShard(shard)
	if err != nil {
		return st, fmt.Errorf("reflection: export shard %02x: %w", shard, err)
	}
	defer func() { _ = tx.Rollback() }()
	st, err = writeShard(ctx, tx, shard, snap, w)
	if err != nil {
		return st, fmt.Errorf("reflection: export shard %02x: %w", shard, err)
	}
	return st, nil
}

// shardSnap is the in-memory part of an export: counters and the unacked
// copies per log entry.
type shardSnap struct {
	counters map[slotRef]uint64
	copies   map[uint64][]Delivery // lsn → recipients that still need it
	groups   map[GroupID]bool
	slots    int
	entries  int
}

func (db *DB) snapshotShard(shard byte) (*shardSnap, *bbolt.Tx, error) {
	db.commitMu.Lock()
	defer db.commitMu.Unlock()
	tx, err := db.bolt.Begin(false)
	if err != nil {
		return nil, nil, err
	}
	snap := &shardSnap{counters: make(map[slotRef]uint64), copies: make(map[uint64][]Delivery), groups: make(map[GroupID]bool)}
	m := db.mem
	m.mu.RLock()
	defer m.mu.RUnlock()
	prefix := []byte{shard}
	c := tx.Bucket(bucketSlots).Cursor()
	for k, _ := c.Seek(prefix); k != nil && k[0] == shard; k, _ = c.Next() {
		if len(k) != 40 {
			_ = tx.Rollback()
			return nil, nil, fmt.Errorf("slot key %x has the wrong length", k)
		}
		g, d := GroupID(k[:32]), DeviceID(beUint64(k[32:]))
		s := m.slot(g, d)
		if s == nil {
			_ = tx.Rollback()
			return nil, nil, fmt.Errorf("group %s: slot %d not in the index", g, d)
		}
		snap.counters[slotRef{g, d}] = s.counter
		snap.slots++
		for _, e := range s.live() {
			if !e.acked {
				snap.copies[e.lsn] = append(snap.copies[e.lsn], Delivery{DeviceID: d, Seq: e.seq})
				snap.entries++
			}
		}
	}
	return snap, tx, nil
}

func writeShard(ctx context.Context, tx *bbolt.Tx, shard byte, snap *shardSnap, w io.Writer) (ShardStats, error) {
	var st ShardStats
	sw, err := newShardWriter(w, shard)
	if err != nil {
		return st, err
	}
	prefix := []byte{shard}
	groups := make(map[GroupID]bool)
	c := tx.Bucket(bucketSlots).Cursor()
	for k, v := c.Seek(prefix); k != nil && k[0] == shard; k, v = c.Next() {
		g, s, _, err := decodeSlot(k, v)
		if err != nil {
			return st, err
		}
		groups[g] = true
		if err := sw.slot(g, s, snap.counters[slotRef{g, s.DeviceID}]); err != nil {
			return st, err
		}
	}
	c = tx.Bucket(bucketTombs).Cursor()
	for k, v := c.Seek(prefix); k != nil && k[0] == shard; k, v = c.Next() {
		t, err := decodeTombstone(k, v)
		if err != nil || len(k) != 40 {
			return st, fmt.Errorf("tombstone %x: %v", k, err)
		}
		g := GroupID(k[:32])
		groups[g] = true
		if err := sw.tomb(g, t); err != nil {
			return st, err
		}
	}
	c = tx.Bucket(bucketShared).Cursor()
	for k, v := c.Seek(prefix); k != nil && k[0] == shard; k, v = c.Next() {
		if len(k) != 32 || len(v) == 0 {
			return st, fmt.Errorf("shared data key %x: malformed", k)
		}
		g := GroupID(k)
		groups[g] = true
		if err := sw.shared(g, v); err != nil {
			return st, err
		}
	}
	c = tx.Bucket(bucketHeld).Cursor()
	for k, v := c.Seek(prefix); k != nil && k[0] == shard; k, v = c.Next() {
		if len(k) != 48 || len(v) < entryHeaderLen {
			return st, fmt.Errorf("held reflection %x: malformed", k)
		}
		g := GroupID(k[:32])
		groups[g] = true
		if err := sw.held(g, DeviceID(beUint64(k[32:])), beUint64(v), v[entryHeaderLen:]); err != nil {
			return st, err
		}
	}
	// Entries in log order: within a slot that is Seq order.
	lsns := make([]uint64, 0, len(snap.copies))
	for lsn := range snap.copies {
		lsns = append(lsns, lsn)
	}
	slices.Sort(lsns)
	lb := tx.Bucket(bucketLog)
	for i, lsn := range lsns {
		if i%1024 == 0 {
			if err := ctx.Err(); err != nil {
				return st, err
			}
		}
		v := lb.Get(u64key(lsn))
		if v == nil {
			return st, fmt.Errorf("log entry %d missing", lsn)
		}
		r, err := decodeLog(v)
		if err != nil {
			return st, fmt.Errorf("log entry %d: %w", lsn, err)
		}
		if r.group[0] != shard {
			return st, fmt.Errorf("log entry %d: group %s is not in the shard", lsn, r.group)
		}
		to := snap.copies[lsn]
		sortDeliveries(to)
		if err := sw.entry(encodeLog(r.ts, r.group, r.sender, to, r.envelope)); err != nil {
			return st, err
		}
	}
	if err := sw.finish(); err != nil {
		return st, err
	}
	st = ShardStats{Groups: len(groups), Slots: snap.slots, Entries: snap.entries, Bytes: sw.n}
	return st, nil
}

// ImportShard replaces this store's state of shard with the stream's and
// records gen as the copy's generation. It reads and checks the whole
// stream first (shard byte, framing, checksum, references), so a
// truncated, corrupted or foreign stream changes nothing. Then one request
// through the committer, in submission order with every other write,
// deletes what the store held for the shard, writes the imported state
// and settles it for this node (slots marked disconnected, held
// reflections released into the other queues: the devices and their
// transactions stayed with the donor), all in one transaction; once it is
// on disk the in-memory index serves the imported queues. Imported entries
// get new log positions here but keep their Seq and timestamp; counters
// continue. The stream is held in memory while it is imported.
func (db *DB) ImportShard(ctx context.Context, shard byte, gen int64, r io.Reader) (ShardStats, error) {
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(r); err != nil {
		return ShardStats{}, fmt.Errorf("reflection: import shard %02x: read: %w", shard, err)
	}
	img, err := decodeShard(buf.Bytes(), shard)
	if err != nil {
		return ShardStats{}, fmt.Errorf("reflection: import shard %02x: %w", shard, err)
	}
	op := &shardOp{ctx: ctx, shard: shard, gen: gen, img: img}
	if err := db.shardRequest(ctx, &request{op: opImportShard, shard: op}); err != nil {
		return ShardStats{}, fmt.Errorf("reflection: import shard %02x: %w", shard, err)
	}
	return img.stats, nil
}

// DropShard deletes this store's state of shard (after the shard moved to
// another node, or a move that imported it here was aborted) if the copy
// held is of generation gen or older: slots, tombstones, shared data, held
// reflections and cursors, in one write through the committer, ordered
// with every other write. A copy of a newer generation (imported after
// the drop was decided) is kept and dropped is false. The log entries of
// the dropped queues become dead and are reclaimed DeleteChunk per commit,
// like those of any dropped slot. Bytes in the result is the dropped
// queues' envelope bytes.
func (db *DB) DropShard(ctx context.Context, shard byte, gen int64) (ShardStats, bool, error) {
	op := &shardOp{ctx: ctx, shard: shard, gen: gen, mode: shardDrop}
	if err := db.shardRequest(ctx, &request{op: opDropShard, shard: op}); err != nil {
		return ShardStats{}, false, fmt.Errorf("reflection: drop shard %02x: %w", shard, err)
	}
	return op.dropped, !op.kept, nil
}

// ResetShard deletes whatever the store holds of shard, whatever its
// generation, and records gen: the node serves the shard from empty.
func (db *DB) ResetShard(ctx context.Context, shard byte, gen int64) (ShardStats, error) {
	op := &shardOp{ctx: ctx, shard: shard, gen: gen, mode: shardReset}
	if err := db.shardRequest(ctx, &request{op: opDropShard, shard: op}); err != nil {
		return ShardStats{}, fmt.Errorf("reflection: reset shard %02x: %w", shard, err)
	}
	return op.dropped, nil
}

// SettleShard prepares each shard for a node none of its devices is connected
// to yet, in one write through the committer: slots still marked
// connected are marked disconnected now and held reflections are released
// into the other queues (ImportShard does the same to an imported copy).
// A cluster node calls it before it serves a shard it held before, for
// instance after its lease expired and its connections were closed
// without their disconnects being written.
// Several shards are submitted at once and share a commit.
func (db *DB) SettleShard(ctx context.Context, shards ...byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	errs := make(chan error, len(shards))
	for _, sh := range shards {
		db.submit(&request{op: opSettleShard, shard: &shardOp{ctx: ctx, shard: sh}, done: func(err error) {
			if err != nil {
				err = fmt.Errorf("reflection: settle shard %02x: %w", sh, err)
			}
			errs <- err
		}})
	}
	var first error
	for range shards {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// ShardGeneration returns the generation recorded for shard (0 if none)
// and whether the store holds any state of it (slots, tombstones, shared
// data or held reflections).
func (db *DB) ShardGeneration(shard byte) (int64, bool) {
	gen := db.shardGen[shard].Load()
	hasData := false
	_ = db.bolt.View(func(tx *bbolt.Tx) error {
		for _, name := range [][]byte{bucketSlots, bucketTombs, bucketShared, bucketHeld} {
			if k, _ := tx.Bucket(name).Cursor().Seek([]byte{shard}); k != nil && k[0] == shard {
				hasData = true
				return nil
			}
		}
		return nil
	})
	return gen, hasData
}

// loadShardGens reads the recorded generations at Open.
func (db *DB) loadShardGens(tx *bbolt.Tx) error {
	c := tx.Bucket(bucketMeta).Cursor()
	for k, v := c.Seek(keyShardGen); k != nil && bytes.HasPrefix(k, keyShardGen); k, v = c.Next() {
		if len(k) != len(keyShardGen)+1 || len(v) != 8 {
			return fmt.Errorf("reflection: meta key %q: malformed shard generation", k)
		}
		db.shardGen[k[len(k)-1]].Store(int64(beUint64(v)))
	}
	return nil
}

// shardRequest submits r and waits for its completion. The committer
// checks ctx when it applies r, so a cancelled request changes nothing;
// waiting for done itself is not cut short by ctx, because after a return
// the caller must know whether the write happened.
func (db *DB) shardRequest(ctx context.Context, r *request) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return Sync(func(done func(error)) {
		r.done = done
		db.submit(r)
	})
}
