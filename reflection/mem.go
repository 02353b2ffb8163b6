package reflection

import (
	"cmp"
	"slices"
	"sync"
	"time"
)

// The in-memory index: per slot an ordered deque of its unacked log
// entries, per live log entry a reference count, the lazily persisted ack
// state, and a bounded cache of recent log records. It is rebuilt at Open
// from log/ and cursors/ (rebuild.go), so nothing here is the only copy of
// anything acked to a device.
//
// Ownership: everything is guarded by mem.mu. The committer publishes a
// committed batch under mu (so readers see a batch entirely or not at all,
// and only once it is on disk); Ack changes it directly under mu, which is
// what lets the server's delivery window move on without waiting for a
// commit. No I/O happens under mu.

// qent is one entry of a slot's queue.
type qent struct {
	seq   uint64
	lsn   uint64
	size  uint32 // envelope bytes
	acked bool   // acked out of order; dropped from the deque once at the head
}

// slotMem is one slot's queue.
type slotMem struct {
	born    uint64 // first lsn this incarnation of the slot can receive
	counter uint64 // last Seq handed out (durable or ephemeral)
	q       []qent // q[head:] ascending by seq; q[head] is unacked if present
	head    int
	length  int   // unacked entries
	bytes   int64 // their envelope bytes
	// above: the runs of acked entries in q[head:] as seq ranges, so the
	// cursor costs O(runs), not O(queue length).
	above []seqRange
}

// seqRange is an inclusive range of seqs.
type seqRange struct{ lo, hi uint64 }

// searchRange returns the index of the first range with hi ≥ seq.
func searchRange(rs []seqRange, seq uint64) int {
	i, _ := slices.BinarySearchFunc(rs, seq, func(r seqRange, seq uint64) int {
		if r.hi < seq {
			return -1
		}
		return 1
	})
	return i
}

// inRanges reports whether seq lies in one of rs.
func inRanges(rs []seqRange, seq uint64) bool {
	i := searchRange(rs, seq)
	return i < len(rs) && rs[i].lo <= seq
}

// ack marks q[i] acked and records it in above, merging with the runs of
// its acked neighbours in the deque. The caller pops the head afterwards.
func (s *slotMem) ack(i int) {
	e := &s.q[i]
	e.acked = true
	s.length--
	s.bytes -= int64(e.size)
	left := i > s.head && s.q[i-1].acked
	right := i+1 < len(s.q) && s.q[i+1].acked
	switch {
	case left && right:
		j := searchRange(s.above, s.q[i-1].seq)
		s.above[j].hi = s.above[j+1].hi
		s.above = slices.Delete(s.above, j+1, j+2)
	case left:
		j := searchRange(s.above, s.q[i-1].seq)
		s.above[j].hi = e.seq
	case right:
		j := searchRange(s.above, s.q[i+1].seq)
		s.above[j].lo = e.seq
	default:
		j := searchRange(s.above, e.seq)
		s.above = slices.Insert(s.above, j, seqRange{e.seq, e.seq})
	}
}

// rebuildRanges recomputes above from the deque (after Open's scan).
func (s *slotMem) rebuildRanges() {
	s.above = nil
	live := s.live()
	for i, e := range live {
		switch {
		case !e.acked:
		case i > 0 && live[i-1].acked:
			s.above[len(s.above)-1].hi = e.seq
		default:
			s.above = append(s.above, seqRange{e.seq, e.seq})
		}
	}
}

func (s *slotMem) live() []qent { return s.q[s.head:] }

// watermark: every entry with Seq ≤ it is acked (or was never stored).
func (s *slotMem) watermark() uint64 {
	if s.head < len(s.q) {
		return s.q[s.head].seq - 1
	}
	return s.counter
}

// cursor is the persisted form of the slot's ack state.
func (s *slotMem) cursor(d DeviceID) slotCursor {
	return slotCursor{d: d, counter: s.counter, acked: s.watermark(), above: slices.Clone(s.above)}
}

// find returns the index in q of seq, or -1.
func (s *slotMem) find(seq uint64) int {
	live := s.live()
	i, ok := slices.BinarySearchFunc(live, seq, func(e qent, seq uint64) int { return cmp.Compare(e.seq, seq) })
	if !ok {
		return -1
	}
	return s.head + i
}

// popAcked drops acked entries from the head and compacts the slice once
// most of it is dead, so a long-lived slot's memory is bounded by its
// unacked entries.
func (s *slotMem) popAcked() {
	for s.head < len(s.q) && s.q[s.head].acked {
		s.head++
	}
	// Runs now below the watermark are implied by it.
	w := s.watermark()
	n := 0
	for n < len(s.above) && s.above[n].hi <= w {
		n++
	}
	if n > 0 {
		s.above = slices.Delete(s.above, 0, n)
	}
	if s.head == len(s.q) {
		s.q, s.head = s.q[:0], 0
		return
	}
	if s.head >= 64 && s.head*2 >= len(s.q) {
		n := copy(s.q, s.q[s.head:])
		s.q, s.head = s.q[:n], 0
	}
}

type groupMem struct {
	slots map[DeviceID]*slotMem
}

type memIndex struct {
	// mu: readers (QueueStats, ReadQueue, the committer loading a slot)
	// share it; Ack, publish and taking a flush hold it exclusively.
	mu     sync.RWMutex
	groups map[GroupID]*groupMem
	refs   map[uint64]uint32 // lsn → slots that still need the entry
	// dead lists log entries nobody needs any more; the committer deletes
	// them (DeleteChunk per commit) together with the cursors that made
	// them dead.
	dead []uint64
	// Lazy ack state: groups whose cursor changed since it was last
	// written, acks (and their done callbacks) not yet on disk.
	dirty   map[GroupID]struct{}
	acks    int
	ackDone []func(error)
	// workSince is when the oldest unflushed ack or dead entry appeared;
	// zero if there is none.
	workSince time.Time
	cache     envCache
}

func newMemIndex(cacheBytes int64) *memIndex {
	return &memIndex{
		groups: make(map[GroupID]*groupMem),
		refs:   make(map[uint64]uint32),
		dirty:  make(map[GroupID]struct{}),
		cache:  envCache{m: make(map[uint64][]byte), max: cacheBytes},
	}
}

// slot is for holders of mu.
func (m *memIndex) slot(g GroupID, d DeviceID) *slotMem {
	if gm := m.groups[g]; gm != nil {
		return gm.slots[d]
	}
	return nil
}

func (m *memIndex) setSlot(g GroupID, d DeviceID, s *slotMem) {
	gm := m.groups[g]
	if gm == nil {
		gm = &groupMem{slots: make(map[DeviceID]*slotMem)}
		m.groups[g] = gm
	}
	gm.slots[d] = s
}

func (m *memIndex) deleteSlot(g GroupID, d DeviceID) {
	if gm := m.groups[g]; gm != nil {
		delete(gm.slots, d)
		if len(gm.slots) == 0 {
			delete(m.groups, g)
		}
	}
}

// unref drops one reference to lsn; at zero the entry is dead.
func (m *memIndex) unref(lsn uint64) {
	n := m.refs[lsn]
	if n <= 1 {
		delete(m.refs, lsn)
		m.dead = append(m.dead, lsn)
		m.noteWork()
		m.cache.remove(lsn)
		return
	}
	m.refs[lsn] = n - 1
}

// release drops the references of every unacked entry of s (slot dropped
// or queue purged).
func (m *memIndex) release(s *slotMem) {
	for _, e := range s.live() {
		if !e.acked {
			m.unref(e.lsn)
		}
	}
	s.q, s.head, s.length, s.bytes, s.above = nil, 0, 0, 0, nil
}

// cursors returns the group's cursor record, sorted by device id; nil if
// the group has no slots.
func (m *memIndex) cursors(g GroupID) []slotCursor {
	gm := m.groups[g]
	if gm == nil {
		return nil
	}
	out := make([]slotCursor, 0, len(gm.slots))
	for d, s := range gm.slots {
		out = append(out, s.cursor(d))
	}
	slices.SortFunc(out, func(a, b slotCursor) int { return cmp.Compare(a.d, b.d) })
	return out
}

// envCache keeps recent log records (as stored) so that ReadQueue serves a
// device that keeps up from memory, without a read transaction. Oldest
// first out; entries are removed as soon as they are dead.
type envCache struct {
	m     map[uint64][]byte
	fifo  []uint64
	head  int
	bytes int64
	max   int64
}

func (c *envCache) add(lsn uint64, rec []byte) {
	if c.max <= 0 || int64(len(rec)) > c.max {
		return
	}
	c.m[lsn] = rec
	c.fifo = append(c.fifo, lsn)
	c.bytes += int64(len(rec))
	for c.bytes > c.max && c.head < len(c.fifo) {
		c.remove(c.fifo[c.head])
		c.head++
	}
	// Removed entries leave stale lsns in fifo: compact now and then.
	if c.head > 1024 && c.head*2 > len(c.fifo) || len(c.fifo)-c.head > 2*len(c.m)+1024 {
		live := c.fifo[:0]
		for _, l := range c.fifo[c.head:] {
			if _, ok := c.m[l]; ok {
				live = append(live, l)
			}
		}
		c.fifo, c.head = live, 0
	}
}

func (c *envCache) remove(lsn uint64) {
	if v, ok := c.m[lsn]; ok {
		c.bytes -= int64(len(v))
		delete(c.m, lsn)
	}
}

// noteWork records that the lazy flush has something to do (acks, dead
// entries); the flush is due AckFlushInterval after the first such thing.
func (m *memIndex) noteWork() {
	if m.workSince.IsZero() {
		m.workSince = time.Now()
	}
}

// reclaimPending reports whether dead log entries wait to be deleted.
func (db *DB) reclaimPending() bool {
	db.mem.mu.RLock()
	defer db.mem.mu.RUnlock()
	return len(db.mem.dead) > 0
}
