package reflection

import (
	"context"
	"fmt"

	"go.etcd.io/bbolt"
)

// Shard writes of a batch: ImportShard and DropShard (shard.go). Both are
// ordinary requests, so they are ordered with every other write and their
// changes reach memory only through publish, after the commit.

// shardOp is the payload of an import, drop or reset request.
type shardOp struct {
	ctx     context.Context
	shard   byte
	gen     int64       // import, reset: the generation recorded; drop: the newest one dropped
	mode    shardMode   // opDropShard only
	img     *shardImage // import only
	dropped ShardStats  // drop, reset: what was removed (set by apply)
	kept    bool        // drop: the copy held was newer than gen (set by apply)
}

type shardMode uint8

const (
	shardDrop  shardMode = iota // delete if the copy is of generation ≤ gen
	shardReset                  // delete whatever there is, record gen
)

// shardGeneration is the shard's generation as of this point of the batch.
func (bt *batchTx) shardGeneration(shard byte) int64 {
	if g, ok := bt.shardGens[shard]; ok {
		return g
	}
	return bt.db.shardGen[shard].Load()
}

// setShardGeneration records gen in meta/ (published after the commit).
func (bt *batchTx) setShardGeneration(shard byte, gen int64) error {
	if bt.shardGens == nil {
		bt.shardGens = make(map[byte]int64)
	}
	bt.shardGens[shard] = gen
	if err := bt.tx.Bucket(bucketMeta).Put(shardGenKey(shard), u64key(uint64(gen))); err != nil {
		return fmt.Errorf("reflection: record shard %02x generation: %w", shard, err)
	}
	return nil
}

// clearShard deletes every key of the shard's groups from slots/, tombs/,
// shared/ and held/, and marks their cursor records for rewriting (flush
// deletes the record of a group left without slots). The dropped slots'
// queues are released by publish; their log entries become dead and are
// reclaimed in chunks.
func (bt *batchTx) clearShard(shard byte) (ShardStats, error) {
	var st ShardStats
	groups := make(map[GroupID]bool)
	keys := func(b *bbolt.Bucket, keyLen int) ([][]byte, error) {
		var out [][]byte
		c := b.Cursor()
		for k, _ := c.Seek([]byte{shard}); k != nil && k[0] == shard; k, _ = c.Next() {
			if len(k) != keyLen {
				return nil, fmt.Errorf("reflection: shard %02x: key %x has the wrong length", shard, k)
			}
			out = append(out, append([]byte(nil), k...))
			groups[GroupID(k[:32])] = true
		}
		return out, nil
	}
	slotKeys, err := keys(bt.slotsB, 40)
	if err != nil {
		return st, err
	}
	for _, k := range slotKeys {
		g, d := GroupID(k[:32]), DeviceID(beUint64(k[32:]))
		if s := bt.slot(g, d); s.present {
			st.Slots++
			st.Entries += s.length
			st.Bytes += s.bytes
		}
		if err := bt.removeSlot(g, d); err != nil {
			return st, err
		}
	}
	tombKeys, err := keys(bt.tombsB, 40)
	if err != nil {
		return st, err
	}
	for _, k := range tombKeys {
		if err := bt.tombsB.Delete(k); err != nil {
			return st, fmt.Errorf("reflection: delete tombstone: %w", err)
		}
		bt.tombTouched[GroupID(k[:32])] = true
	}
	for _, b := range []struct {
		b      *bbolt.Bucket
		keyLen int
	}{{bt.sharedB, 32}, {bt.heldB, 48}} {
		ks, err := keys(b.b, b.keyLen)
		if err != nil {
			return st, err
		}
		for _, k := range ks {
			if err := b.b.Delete(k); err != nil {
				return st, fmt.Errorf("reflection: shard %02x: delete: %w", shard, err)
			}
		}
	}
	// A cursor record without slots should not exist; one is rewritten
	// (deleted) all the same.
	curKeys, err := keys(bt.cursorsB, 32)
	if err != nil {
		return st, err
	}
	for _, k := range curKeys {
		bt.cursors[GroupID(k)] = true
	}
	st.Groups = len(groups)
	return st, nil
}

func (bt *batchTx) dropShard(op *shardOp) error {
	if err := op.ctx.Err(); err != nil {
		return err
	}
	op.kept, op.dropped = false, ShardStats{}
	if op.mode == shardDrop && bt.shardGeneration(op.shard) > op.gen {
		// Imported again after this drop was decided: not the copy the
		// caller meant.
		op.kept = true
		return nil
	}
	st, err := bt.clearShard(op.shard)
	op.dropped = st
	if err != nil || op.mode != shardReset {
		return err
	}
	return bt.setShardGeneration(op.shard, op.gen)
}

// importShard replaces the shard's state with op.img: every imported slot
// is a new incarnation here (born at this batch's next log position, so
// log entries of an earlier slot with the same id are never its own),
// with the exported counter; every entry is one new log record for the
// recipients that had not acked it, with its Seqs and timestamp.
func (bt *batchTx) importShard(op *shardOp) error {
	if err := op.ctx.Err(); err != nil {
		return err
	}
	img := op.img
	if _, err := bt.clearShard(op.shard); err != nil {
		return err
	}
	born := bt.nextLSN
	for _, is := range img.slots {
		sl := is.slot
		if err := bt.slotsB.Put(slotKey(is.g, sl.DeviceID), encodeSlot(sl, born)); err != nil {
			return fmt.Errorf("reflection: put slot %d: %w", is.slot.DeviceID, err)
		}
		s := bt.slot(is.g, is.slot.DeviceID)
		*s = bslot{present: true, reset: true, born: born, counter: is.counter}
		bt.cursors[is.g] = true
	}
	for _, t := range img.tombs {
		if err := bt.putTombstone(t.g, t.tomb); err != nil {
			return err
		}
	}
	for _, sh := range img.shared {
		if err := bt.setShared(sh.g, sh.data); err != nil {
			return err
		}
	}
	for _, h := range img.held {
		n, err := bt.heldB.NextSequence()
		if err != nil {
			return fmt.Errorf("reflection: held sequence: %w", err)
		}
		if err := bt.heldB.Put(heldKey(h.g, h.sender, n), encodeEntry(h.ts, h.envelope)); err != nil {
			return fmt.Errorf("reflection: put held reflection: %w", err)
		}
	}
	for _, e := range img.entries {
		lsn := bt.nextLSN
		size := uint32(len(e.envelope))
		for _, to := range e.to {
			s := bt.slots[slotRef{e.g, to.DeviceID}]
			s.appended = append(s.appended, qent{seq: to.Seq, lsn: lsn, size: size})
			s.length++
			s.bytes += int64(size)
		}
		rec := encodeLog(e.ts, e.g, e.sender, e.to, e.envelope)
		if err := bt.logB.Put(u64key(lsn), rec); err != nil {
			return fmt.Errorf("reflection: put log entry %d: %w", lsn, err)
		}
		bt.nextLSN++
		bt.logs = append(bt.logs, stagedLog{lsn: lsn, rec: rec})
	}
	if err := bt.settleShard(op.shard); err != nil {
		return err
	}
	return bt.setShardGeneration(op.shard, op.gen)
}

// settleShard prepares a shard for a node none of its devices is
// connected to yet (after an import, or before a claim of a shard the
// node held before it lost it): slots still marked connected are marked
// disconnected now, so their expiry counts from now, and held reflections
// are released into the other queues, because the transaction they were
// held for ended with its holder's connection (an acked reflection is
// never lost, docs/protocol.md §18 row 3). The release comes after everything
// already queued, as it would have on the node that held them.
func (bt *batchTx) settleShard(shard byte) error {
	type connected struct {
		g    GroupID
		slot Slot
		born uint64
	}
	var conns []connected
	c := bt.slotsB.Cursor()
	for k, v := c.Seek([]byte{shard}); k != nil && k[0] == shard; k, v = c.Next() {
		g, sl, born, err := decodeSlot(k, v)
		if err != nil {
			return err
		}
		if sl.ConnectedSince != 0 {
			conns = append(conns, connected{g, sl, born})
		}
	}
	for _, cs := range conns {
		cs.slot.ConnectedSince, cs.slot.LastDisconnectAt = 0, bt.now
		if err := bt.slotsB.Put(slotKey(cs.g, cs.slot.DeviceID), encodeSlot(cs.slot, cs.born)); err != nil {
			return fmt.Errorf("reflection: settle slot %d: %w", cs.slot.DeviceID, err)
		}
	}
	var holders []slotRef
	c = bt.heldB.Cursor()
	for k, _ := c.Seek([]byte{shard}); k != nil && k[0] == shard; k, _ = c.Next() {
		if len(k) != 48 {
			return fmt.Errorf("reflection: held reflection %x: malformed key", k)
		}
		ref := slotRef{GroupID(k[:32]), DeviceID(beUint64(k[32:40]))}
		if len(holders) == 0 || holders[len(holders)-1] != ref {
			holders = append(holders, ref)
		}
	}
	for _, h := range holders {
		if err := bt.releaseHeld(&request{op: opReleaseHeld, g: h.g, d: h.d}); err != nil {
			return err
		}
	}
	return nil
}

func (bt *batchTx) settle(op *shardOp) error {
	if err := op.ctx.Err(); err != nil {
		return err
	}
	return bt.settleShard(op.shard)
}
