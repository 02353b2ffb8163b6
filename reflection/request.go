package reflection

// opKind says which write a request carries.
type opKind uint8

const (
	opPutSlot opKind = iota + 1
	opDeleteSlot
	opSetShared
	opAppend
	opReleaseHeld
	opPurgeQueue
	opPruneTombstones
	opImportShard
	opDropShard
	opSettleShard
	opBarrier
)

// request is one queued write. Only the fields of its op are set.
type request struct {
	op        opKind
	g         GroupID
	d         DeviceID // slot or sender (ReleaseHeld)
	slot      Slot
	tomb      *Tombstone
	data      []byte
	app       AppendRequest
	olderThan int64
	shard     *shardOp

	done       func(error)
	doneAppend func(AppendResult, error)
	result     AppendResult // filled by apply; rebuilt if the batch is re-run
}

func (r *request) complete(err error) {
	if r.doneAppend != nil {
		if err != nil {
			r.doneAppend(AppendResult{}, err)
			return
		}
		r.doneAppend(r.result, nil)
		return
	}
	if r.done != nil {
		r.done(err)
	}
}

// PutSlot creates or replaces a slot. Creating one clears the device's
// tombstone and starts an empty queue whose counter starts at 1; replacing
// one keeps its queue and counter.
func (db *DB) PutSlot(g GroupID, s Slot, done func(error)) {
	db.submit(&request{op: opPutSlot, g: g, d: s.DeviceID, slot: s, done: done})
}

// DeleteSlot removes the slot and its queue (log entries nobody else needs
// are deleted in the background, DeleteChunk per commit). t != nil also writes a tombstone
// for d; t.DeviceID is ignored and t.At == 0 means the apply time. Deleting
// an unknown slot is not an error.
// Held reflections of d are kept: they are delivered by ReleaseHeld or at
// the next Open, because an acked reflection is never lost (§18 row 3).
func (db *DB) DeleteSlot(g GroupID, d DeviceID, t *Tombstone, done func(error)) {
	r := &request{op: opDeleteSlot, g: g, d: d, done: done}
	if t != nil {
		tc := *t
		tc.DeviceID = d
		r.tomb = &tc
	}
	db.submit(r)
}

// SetSharedDeviceData stores the group's opaque shared data; empty data
// removes it.
func (db *DB) SetSharedDeviceData(g GroupID, data []byte, done func(error)) {
	// Copied because bbolt keeps a reference to the value until the
	// commit, and the caller will reuse its read buffer long before that.
	db.submit(&request{op: opSetShared, g: g, data: append([]byte(nil), data...), done: done})
}

// Append stores a reflection for every other slot of the group that exists
// when the write is applied (see AppendRequest for Ephemeral and Hold). The
// envelope must not be modified until done is called.
func (db *DB) Append(r AppendRequest, done func(AppendResult, error)) {
	db.submit(&request{op: opAppend, g: r.Group, d: r.Sender, app: r, doneAppend: done})
}

// ReleaseHeld moves every held reflection of sender, in order, into the
// queue of every other slot existing at apply time, with the same limit rules
// as Append. Each copy keeps the timestamp it got when it was held (that is
// the one its ReflectAck carried); the result's Timestamp is the release
// time.
func (db *DB) ReleaseHeld(g GroupID, sender DeviceID, done func(AppendResult, error)) {
	db.submit(&request{op: opReleaseHeld, g: g, d: sender, doneAppend: done})
}

// Ack removes the entry seq from d's queue. An unknown seq (already acked,
// ephemeral, never existed) is a no-op: the protocol decision on 4012 is the
// server's (§10, §18 row 4).
//
// Unlike the other writes, an Ack takes effect in memory before Ack
// returns (QueueStats, ReadQueue and the limits see it at once) and is
// written lazily, with the next commit after Options.AckFlushInterval or
// AckFlushAcks acks; done is called once it is on disk. A crash before
// that delivers the entry again, which the protocol allows (§10
// "Re-delivery"): an ack never needs its own fsync.
func (db *DB) Ack(g GroupID, d DeviceID, seq uint64, done func(error)) {
	// db.mu is held throughout so that an Ack either sees closed or is
	// registered before the committer's final flush (lock order: db.mu,
	// then mem.mu).
	db.mu.Lock()
	defer db.mu.Unlock()
	if db.closed {
		if done != nil {
			go done(ErrClosed)
		}
		return
	}
	m := db.mem
	m.mu.Lock()
	if s := m.slot(g, d); s != nil {
		if i := s.find(seq); i >= 0 && !s.q[i].acked {
			s.ack(i)
			m.unref(s.q[i].lsn)
			s.popAcked()
			m.dirty[g] = struct{}{}
		}
	}
	m.noteWork()
	m.acks++
	if done != nil {
		m.ackDone = append(m.ackDone, done)
	}
	poke := m.acks == 1 || m.acks == db.opts.AckFlushAcks
	m.mu.Unlock()
	if poke {
		db.poke() // arm the flush timer, or flush now
	}
}

// PurgeQueue empties d's queue (admin), keeping the slot and its counter.
// Like a dropped queue's, the old entries are reclaimed in the background.
func (db *DB) PurgeQueue(g GroupID, d DeviceID, done func(error)) {
	db.submit(&request{op: opPurgeQueue, g: g, d: d, done: done})
}

// PruneTombstones removes tombstones with At < olderThan (unix ms). It only
// visits groups that have tombstones (kept in memory), not every group.
func (db *DB) PruneTombstones(olderThan int64, done func(error)) {
	db.submit(&request{op: opPruneTombstones, olderThan: olderThan, done: done})
}

// Barrier calls done once every write submitted before it is durable
// (writes complete in submission order). It writes nothing itself: a
// batch of barriers alone completes without a transaction.
func (db *DB) Barrier(done func(error)) {
	db.submit(&request{op: opBarrier, done: done})
}

// submit queues r for the committer. It never blocks for long: the server
// calls it while holding a per-group mutex, so it takes one short mutex and
// pokes a 1-slot wake channel instead of sending on a channel that could
// fill up.
func (db *DB) submit(r *request) {
	db.mu.Lock()
	if db.closed {
		db.mu.Unlock()
		go r.complete(ErrClosed)
		return
	}
	db.pending = append(db.pending, r)
	db.mu.Unlock()
	db.poke()
}
