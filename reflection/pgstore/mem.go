package pgstore

import (
	"cmp"
	"slices"
	"sync"
	"time"

	"d2m-mediator/reflection"
)

// The in-memory index of the shards this node owns: per slot its counter
// and the ordered (seq, timestamp, size) of its unacked entries, with the
// envelopes of recent entries cached so a device that is online is served
// without a query. It answers QueueStats in O(1) and lets the committer
// compute fan-out, Seqs and queue limits without reading the database.
//
// The index is only valid while the database's epoch for the shard is the
// one this node claimed: nobody else can have written the shard since.
// When the claimed epoch changes, the shard's groups are forgotten and
// loaded again from the database on first use.
//
// Ownership: mem.mu guards everything here. The committer is the only
// writer of counters and queues (publish, after a successful commit); Ack
// changes queues directly, so the delivery window moves without a commit.
// Loads of a group run outside mu and are inserted only if the group is
// still absent and the shard's generation has not changed meanwhile. No
// I/O happens under mu.

type qent struct {
	seq   uint64
	ts    uint64
	size  uint32
	acked bool
	env   []byte // cached envelope; nil = read it from the database
}

type slotMem struct {
	counter uint64
	q       []qent // q[head:] ascending by seq
	head    int
	length  int
	bytes   int64
}

type groupMem struct {
	slots   map[reflection.DeviceID]*slotMem
	heldPos int64 // last held position used
}

type shardMem struct {
	groups map[reflection.GroupID]*groupMem
	gen    uint64 // bumped whenever the shard's groups are forgotten
	// settling counts the commits of unknown outcome that wrote the
	// shard and are not settled yet (committer.go, settle): the
	// database may show them before the synchronous standby has them,
	// so nothing of the shard is loaded from it meanwhile.
	settling int
}

type slotRef struct {
	g reflection.GroupID
	d reflection.DeviceID
}

type ackRef struct {
	g   reflection.GroupID
	d   reflection.DeviceID
	seq uint64
}

type memIndex struct {
	mu     sync.RWMutex
	shards [256]shardMem

	cacheBytes, cacheMax int64

	// Lazy acks not yet written: deleted from the database with the next
	// commit once due.
	acks      []ackRef
	ackDone   []func(error)
	workSince time.Time
}

func newMemIndex(cacheMax int64) *memIndex {
	m := &memIndex{cacheMax: cacheMax}
	for i := range m.shards {
		m.shards[i].groups = make(map[reflection.GroupID]*groupMem)
	}
	return m
}

func (m *memIndex) group(g reflection.GroupID) *groupMem { return m.shards[g[0]].groups[g] }

func (m *memIndex) slot(g reflection.GroupID, d reflection.DeviceID) *slotMem {
	if gm := m.group(g); gm != nil {
		return gm.slots[d]
	}
	return nil
}

// forgetShard drops the shard's groups (its epoch changed). Caller holds mu.
func (m *memIndex) forgetShard(s byte) {
	for _, gm := range m.shards[s].groups {
		for _, sm := range gm.slots {
			m.releaseSlot(sm)
		}
	}
	m.shards[s].groups = make(map[reflection.GroupID]*groupMem)
	m.shards[s].gen++
	kept := m.acks[:0]
	for _, a := range m.acks {
		if a.g[0] != s {
			kept = append(kept, a)
		}
	}
	m.acks = kept
}

// releaseSlot returns the slot's cached envelopes to the cache budget.
func (m *memIndex) releaseSlot(sm *slotMem) {
	for i := sm.head; i < len(sm.q); i++ {
		if sm.q[i].env != nil {
			m.cacheBytes -= int64(len(sm.q[i].env))
		}
	}
}

// from returns the index in q of the first live entry with a Seq of at
// least seq (len(q) if none).
func (s *slotMem) from(seq uint64) int {
	live := s.q[s.head:]
	i, _ := slices.BinarySearchFunc(live, seq, func(e qent, seq uint64) int { return cmp.Compare(e.seq, seq) })
	return s.head + i
}

// find returns the index in q of seq, or -1.
func (s *slotMem) find(seq uint64) int {
	if i := s.from(seq); i < len(s.q) && s.q[i].seq == seq {
		return i
	}
	return -1
}

// ack marks entry i acked and drops acked entries at the head. Caller
// holds mu.
func (m *memIndex) ack(s *slotMem, i int) {
	e := &s.q[i]
	e.acked = true
	s.length--
	s.bytes -= int64(e.size)
	if e.env != nil {
		m.cacheBytes -= int64(len(e.env))
		e.env = nil
	}
	for s.head < len(s.q) && s.q[s.head].acked {
		s.q[s.head] = qent{}
		s.head++
	}
	if s.head == len(s.q) {
		s.q, s.head = s.q[:0], 0
	} else if s.head > 1024 && s.head > len(s.q)/2 {
		n := copy(s.q, s.q[s.head:])
		clear(s.q[n:])
		s.q, s.head = s.q[:n], 0
	}
}

func (m *memIndex) noteWork() {
	if m.workSince.IsZero() {
		m.workSince = time.Now()
	}
}
