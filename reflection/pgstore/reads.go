package pgstore

import (
	"cmp"
	"context"
	"fmt"
	"math"
	"slices"

	"github.com/jackc/pgx/v5"

	"d2m-mediator/reflection"
)

// Reads of group state go to the database (the committed state, as the
// bbolt engine's read transactions); queue reads are answered from the
// in-memory index, with envelopes no longer cached read in one query.

func (s *Store) readCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), s.opts.StatementTimeout)
}

// Group returns the group's slots (sorted by DeviceID), tombstones and
// shared device data. For a shard this node owns it first makes sure the
// shard is claimed at the node's epoch, so what it returns cannot be
// changed behind its back by a previous owner.
func (s *Store) Group(g reflection.GroupID) (reflection.GroupState, error) {
	if _, err := s.ensureClaimed(g[0]); err != nil {
		return reflection.GroupState{}, fmt.Errorf("pgstore: group %s: %w", g, err)
	}
	s.mem.mu.RLock()
	settling := s.mem.shards[g[0]].settling > 0
	s.mem.mu.RUnlock()
	if settling {
		return reflection.GroupState{}, fmt.Errorf("pgstore: group %s: %w", g, errSettling)
	}
	ctx, cancel := s.readCtx()
	defer cancel()
	var out reflection.GroupState
	err := s.groupStates(ctx, `group_id = $1`, g[:], func(_ reflection.GroupID, st reflection.GroupState) error {
		out = st
		return nil
	})
	if err != nil {
		return reflection.GroupState{}, fmt.Errorf("pgstore: group %s: %w", g, err)
	}
	return out, nil
}

// ForEachGroup calls fn for every group of the shards this node owns and
// has claimed, in id order.
func (s *Store) ForEachGroup(fn func(g reflection.GroupID, st reflection.GroupState) error) error {
	var shards []int32
	for i := range 256 {
		if e, ok := s.ownedEpoch(byte(i)); ok && e != 0 && s.claimed[i].Load() == e {
			shards = append(shards, int32(i))
		}
	}
	if len(shards) == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*s.opts.StatementTimeout)
	defer cancel()
	return s.groupStates(ctx, `shard = ANY($1)`, shards, fn)
}

// groupStates reads slots, tombstones and shared data matching where (one
// pipeline of three ordered queries) and merges them per group.
func (s *Store) groupStates(ctx context.Context, where string, arg any, fn func(reflection.GroupID, reflection.GroupState) error) error {
	b := &pgx.Batch{}
	b.Queue(`SELECT group_id, device_id, device_info, policy, created_at, connected_since, last_disconnect_at
		FROM d2m_slots WHERE `+where+` ORDER BY group_id, device_id`, arg)
	b.Queue(`SELECT group_id, device_id, reason, at FROM d2m_tombstones WHERE `+where+` ORDER BY group_id, device_id`, arg)
	b.Queue(`SELECT group_id, shared_data FROM d2m_groups WHERE `+where+` ORDER BY group_id`, arg)
	br := s.pool.SendBatch(ctx, b)
	defer br.Close()
	states := make(map[reflection.GroupID]*reflection.GroupState)
	var order []reflection.GroupID
	get := func(gb []byte) *reflection.GroupState {
		g := reflection.GroupID(gb)
		st := states[g]
		if st == nil {
			st = &reflection.GroupState{}
			states[g] = st
			order = append(order, g)
		}
		return st
	}
	var gb, info, data []byte
	var dev, created, conn, disc, at int64
	var policy, reason int16
	rows, err := br.Query()
	if err != nil {
		return err
	}
	if _, err := pgx.ForEachRow(rows, []any{&gb, &dev, &info, &policy, &created, &conn, &disc}, func() error {
		st := get(gb)
		st.Slots = append(st.Slots, reflection.Slot{
			DeviceID: reflection.DeviceID(dev), DeviceInfo: slices.Clone(info), Policy: reflection.ExpirationPolicy(policy),
			CreatedAt: created, ConnectedSince: conn, LastDisconnectAt: disc,
		})
		return nil
	}); err != nil {
		return err
	}
	if rows, err = br.Query(); err != nil {
		return err
	}
	if _, err := pgx.ForEachRow(rows, []any{&gb, &dev, &reason, &at}, func() error {
		st := get(gb)
		st.Tombstones = append(st.Tombstones, reflection.Tombstone{DeviceID: reflection.DeviceID(dev), Reason: reflection.TombstoneReason(reason), At: at})
		return nil
	}); err != nil {
		return err
	}
	if rows, err = br.Query(); err != nil {
		return err
	}
	if _, err := pgx.ForEachRow(rows, []any{&gb, &data}, func() error {
		get(gb).SharedDeviceData = slices.Clone(data)
		return nil
	}); err != nil {
		return err
	}
	if err := br.Close(); err != nil {
		return err
	}
	// Device ids are stored as signed bigints: sort as the unsigned ids.
	slices.SortFunc(order, func(a, b reflection.GroupID) int { return slices.Compare(a[:], b[:]) })
	for _, g := range order {
		st := states[g]
		slices.SortFunc(st.Slots, func(a, b reflection.Slot) int { return cmp.Compare(a.DeviceID, b.DeviceID) })
		slices.SortFunc(st.Tombstones, func(a, b reflection.Tombstone) int { return cmp.Compare(a.DeviceID, b.DeviceID) })
		if err := fn(g, *st); err != nil {
			return err
		}
	}
	return nil
}

// ensureLoaded brings the group into the index if the shard is this
// node's. It reports whether the index may answer for the group.
func (s *Store) ensureLoaded(g reflection.GroupID) bool {
	m := s.mem
	m.mu.RLock()
	present := m.group(g) != nil
	gen := m.shards[g[0]].gen
	settling := m.shards[g[0]].settling > 0
	m.mu.RUnlock()
	if present {
		return true
	}
	if settling {
		return false // the database may show what the standby lacks
	}
	if owned, err := s.ensureClaimed(g[0]); err != nil || !owned {
		return false
	}
	ctx, cancel := s.readCtx()
	defer cancel()
	loaded, err := s.loadGroups(ctx, []reflection.GroupID{g})
	if err != nil {
		s.log.Warn().Err(err).Str("group", g.String()).Msg("pgstore: loading a group's queues")
		return false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.group(g) == nil && m.shards[g[0]].gen == gen {
		m.shards[g[0]].groups[g] = loaded[g]
	}
	return m.group(g) != nil
}

// QueueStats answers from the index (loading the group on first use).
func (s *Store) QueueStats(g reflection.GroupID, d reflection.DeviceID) (reflection.QueueStats, bool) {
	if !s.ensureLoaded(g) {
		return reflection.QueueStats{}, false
	}
	m := s.mem
	m.mu.RLock()
	defer m.mu.RUnlock()
	sm := m.slot(g, d)
	if sm == nil {
		return reflection.QueueStats{}, false
	}
	return reflection.QueueStats{Length: sm.length, Bytes: sm.bytes, NextSeq: sm.counter + 1}, true
}

// ReadQueue returns up to max unacked entries with Seq > afterSeq, in
// order: from the cache where it still holds the envelope, the rest in one
// query.
func (s *Store) ReadQueue(g reflection.GroupID, d reflection.DeviceID, afterSeq uint64, max int) ([]reflection.Entry, error) {
	if max <= 0 || afterSeq == math.MaxUint64 || !s.ensureLoaded(g) {
		return nil, nil
	}
	m := s.mem
	m.mu.RLock()
	sm := m.slot(g, d)
	if sm == nil {
		m.mu.RUnlock()
		return nil, nil
	}
	var out []reflection.Entry
	var missing []int64
	for i := sm.from(afterSeq + 1); i < len(sm.q) && len(out) < max; i++ {
		e := sm.q[i]
		if e.acked {
			continue
		}
		env := e.env
		if env == nil && e.size == 0 {
			env = []byte{}
		}
		out = append(out, reflection.Entry{Seq: e.seq, Timestamp: e.ts, Envelope: env})
		if env == nil { // not cached: read below
			missing = append(missing, int64(e.seq))
		}
	}
	m.mu.RUnlock()
	if len(missing) == 0 {
		return out, nil
	}
	ctx, cancel := s.readCtx()
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT seq, envelope FROM d2m_queue WHERE group_id = $1 AND device_id = $2 AND seq = ANY($3)`, g[:], i64(d), missing)
	if err != nil {
		return nil, fmt.Errorf("pgstore: reading queue: %w", err)
	}
	found := make(map[uint64][]byte, len(missing))
	var seq int64
	var env []byte
	if _, err := pgx.ForEachRow(rows, []any{&seq, &env}, func() error {
		found[uint64(seq)] = slices.Clone(env)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("pgstore: reading queue: %w", err)
	}
	kept := out[:0]
	for _, e := range out {
		if e.Envelope == nil {
			env, ok := found[e.Seq]
			if !ok {
				continue // acked (or purged) meanwhile
			}
			e.Envelope = env
		}
		kept = append(kept, e)
	}
	return kept, nil
}
