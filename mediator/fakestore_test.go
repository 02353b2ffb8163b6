package mediator

import (
	"sort"
	"sync"

	"d2m-mediator/reflection"
)

// fakeStore is an in-memory reflection.Store for socket-free tests of the
// group state machine. Like the real store it applies writes in submission
// order on one goroutine of its own and completes each there, after
// applying it; reads see what has been applied. It keeps no history and
// does not fsync: durability is the real store's business and is tested
// there.
type fakeStore struct {
	mu       sync.Mutex
	groups   map[reflection.GroupID]*fakeGroup
	ops      []func()
	wake     chan struct{}
	stopped  chan struct{}
	closed   bool
	maxQueue int // entries per slot before the slot is dropped (4114); 0 = no limit

	appends []reflection.AppendRequest // every Append as applied, for assertions
	gate    chan struct{}              // non-nil: writes wait until it is closed
}

type fakeGroup struct {
	slots  map[reflection.DeviceID]reflection.Slot
	tombs  map[reflection.DeviceID]reflection.Tombstone
	shared []byte
	queues map[reflection.DeviceID]*fakeQueue
	held   []fakeHeld
}

type fakeQueue struct {
	last    uint64
	entries []reflection.Entry
}

type fakeHeld struct {
	sender reflection.DeviceID
	ts     uint64
	env    []byte
}

func newFakeStore() *fakeStore {
	s := &fakeStore{groups: make(map[reflection.GroupID]*fakeGroup), wake: make(chan struct{}, 1), stopped: make(chan struct{})}
	go s.run()
	return s
}

func (s *fakeStore) run() {
	defer close(s.stopped)
	for {
		s.mu.Lock()
		ops, closed, gate := s.ops, s.closed, s.gate
		s.ops = nil
		s.mu.Unlock()
		if gate != nil && len(ops) > 0 {
			<-gate
		}
		for _, op := range ops {
			op()
		}
		if len(ops) > 0 {
			continue
		}
		if closed {
			return
		}
		<-s.wake
	}
}

func (s *fakeStore) submit(op func()) {
	s.mu.Lock()
	s.ops = append(s.ops, op)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *fakeStore) group(g reflection.GroupID) *fakeGroup {
	fg := s.groups[g]
	if fg == nil {
		fg = &fakeGroup{slots: map[reflection.DeviceID]reflection.Slot{}, tombs: map[reflection.DeviceID]reflection.Tombstone{}, queues: map[reflection.DeviceID]*fakeQueue{}}
		s.groups[g] = fg
	}
	return fg
}

func (s *fakeStore) Group(g reflection.GroupID) (reflection.GroupState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var st reflection.GroupState
	fg := s.groups[g]
	if fg == nil {
		return st, nil
	}
	for _, sl := range fg.slots {
		st.Slots = append(st.Slots, sl)
	}
	sort.Slice(st.Slots, func(i, j int) bool { return st.Slots[i].DeviceID < st.Slots[j].DeviceID })
	for _, t := range fg.tombs {
		st.Tombstones = append(st.Tombstones, t)
	}
	st.SharedDeviceData = fg.shared
	return st, nil
}

func (s *fakeStore) QueueStats(g reflection.GroupID, d reflection.DeviceID) (reflection.QueueStats, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fg := s.groups[g]
	if fg == nil || fg.queues[d] == nil {
		return reflection.QueueStats{}, false
	}
	q := fg.queues[d]
	return reflection.QueueStats{Length: len(q.entries), NextSeq: q.last + 1}, true
}

func (s *fakeStore) ReadQueue(g reflection.GroupID, d reflection.DeviceID, after uint64, max int) ([]reflection.Entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	fg := s.groups[g]
	if fg == nil || fg.queues[d] == nil {
		return nil, nil
	}
	var out []reflection.Entry
	for _, e := range fg.queues[d].entries {
		if e.Seq > after && len(out) < max {
			out = append(out, e)
		}
	}
	return out, nil
}

func (s *fakeStore) ForEachGroup(fn func(reflection.GroupID, reflection.GroupState) error) error {
	s.mu.Lock()
	ids := make([]reflection.GroupID, 0, len(s.groups))
	for id := range s.groups {
		ids = append(ids, id)
	}
	s.mu.Unlock()
	for _, id := range ids {
		st, _ := s.Group(id)
		if err := fn(id, st); err != nil {
			return err
		}
	}
	return nil
}

func (s *fakeStore) PutSlot(g reflection.GroupID, sl reflection.Slot, done func(error)) {
	s.submit(func() {
		s.mu.Lock()
		fg := s.group(g)
		fg.slots[sl.DeviceID] = sl
		delete(fg.tombs, sl.DeviceID)
		if fg.queues[sl.DeviceID] == nil {
			fg.queues[sl.DeviceID] = &fakeQueue{}
		}
		s.mu.Unlock()
		complete(done, nil)
	})
}

func (s *fakeStore) DeleteSlot(g reflection.GroupID, d reflection.DeviceID, t *reflection.Tombstone, done func(error)) {
	s.submit(func() {
		s.mu.Lock()
		fg := s.group(g)
		delete(fg.slots, d)
		delete(fg.queues, d)
		if t != nil {
			tc := *t
			tc.DeviceID = d
			fg.tombs[d] = tc
		}
		s.mu.Unlock()
		complete(done, nil)
	})
}

func (s *fakeStore) SetSharedDeviceData(g reflection.GroupID, data []byte, done func(error)) {
	s.submit(func() {
		s.mu.Lock()
		s.group(g).shared = data
		s.mu.Unlock()
		complete(done, nil)
	})
}

func (s *fakeStore) Append(r reflection.AppendRequest, done func(reflection.AppendResult, error)) {
	s.submit(func() {
		s.mu.Lock()
		s.appends = append(s.appends, r)
		fg := s.group(r.Group)
		res := reflection.AppendResult{Timestamp: 1000}
		if r.Hold {
			fg.held = append(fg.held, fakeHeld{r.Sender, res.Timestamp, r.Envelope})
		} else {
			s.fanOut(r.Group, fg, r.Sender, res.Timestamp, r.Envelope, r.Ephemeral, &res)
		}
		s.mu.Unlock()
		done(res, nil)
	})
}

func (s *fakeStore) fanOut(g reflection.GroupID, fg *fakeGroup, sender reflection.DeviceID, ts uint64, env []byte, eph bool, res *reflection.AppendResult) {
	var ids []reflection.DeviceID
	for id := range fg.slots {
		if id != sender {
			ids = append(ids, id)
		}
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, id := range ids {
		q := fg.queues[id]
		if !eph && s.maxQueue > 0 && len(q.entries) >= s.maxQueue {
			delete(fg.slots, id)
			delete(fg.queues, id)
			fg.tombs[id] = reflection.Tombstone{DeviceID: id, Reason: reflection.QueueLimit, At: int64(ts)}
			res.Dropped = append(res.Dropped, id)
			continue
		}
		q.last++
		if !eph {
			q.entries = append(q.entries, reflection.Entry{Seq: q.last, Timestamp: ts, Envelope: env})
		}
		res.Delivered = append(res.Delivered, reflection.Delivery{DeviceID: id, Seq: q.last})
	}
}

func (s *fakeStore) ReleaseHeld(g reflection.GroupID, sender reflection.DeviceID, done func(reflection.AppendResult, error)) {
	s.submit(func() {
		s.mu.Lock()
		fg := s.group(g)
		res := reflection.AppendResult{Timestamp: 2000}
		var keep []fakeHeld
		for _, h := range fg.held {
			if h.sender != sender {
				keep = append(keep, h)
				continue
			}
			s.fanOut(g, fg, sender, h.ts, h.env, false, &res)
		}
		fg.held = keep
		s.mu.Unlock()
		done(res, nil)
	})
}

func (s *fakeStore) Ack(g reflection.GroupID, d reflection.DeviceID, seq uint64, done func(error)) {
	s.submit(func() {
		s.mu.Lock()
		if fg := s.groups[g]; fg != nil && fg.queues[d] != nil {
			q := fg.queues[d]
			for i, e := range q.entries {
				if e.Seq == seq {
					q.entries = append(q.entries[:i], q.entries[i+1:]...)
					break
				}
			}
		}
		s.mu.Unlock()
		complete(done, nil)
	})
}

func (s *fakeStore) PurgeQueue(g reflection.GroupID, d reflection.DeviceID, done func(error)) {
	s.submit(func() {
		s.mu.Lock()
		if fg := s.groups[g]; fg != nil && fg.queues[d] != nil {
			fg.queues[d].entries = nil
		}
		s.mu.Unlock()
		complete(done, nil)
	})
}

func (s *fakeStore) PruneTombstones(olderThan int64, done func(error)) {
	s.submit(func() { complete(done, nil) })
}

func (s *fakeStore) Barrier(done func(error)) {
	s.submit(func() { complete(done, nil) })
}

func (s *fakeStore) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
	<-s.stopped
	return nil
}

// hold makes writes wait (submitted, not applied) until the returned
// function is called.
func (s *fakeStore) hold() (release func()) {
	gate := make(chan struct{})
	s.mu.Lock()
	s.gate = gate
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		s.gate = nil
		s.mu.Unlock()
		close(gate)
	}
}

func (s *fakeStore) heldCount(g reflection.GroupID) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if fg := s.groups[g]; fg != nil {
		return len(fg.held)
	}
	return 0
}

func complete(done func(error), err error) {
	if done != nil {
		done(err)
	}
}

var _ reflection.Store = (*fakeStore)(nil)
