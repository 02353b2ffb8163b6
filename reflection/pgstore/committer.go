package pgstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"d2m-mediator/reflection"
)

// maxBatch caps the requests per commit (as the bbolt engine's).
const maxBatch = 4096

// errShardFenced is the fence statement's failure: some shard's epoch in
// the database is not the one this batch carries.
var errShardFenced = errors.New("pgstore: fence check failed")

// run is the committer, the only goroutine that writes: it drains what is
// pending (up to maxBatch) into one PostgreSQL transaction, sent as one
// pipeline of statements (fence, deletes, multi-row inserts from arrays)
// and committed with one round trip, whose commit waits for the
// synchronous standby. There is no timer for writes: the next batch is
// what arrived during the previous commit. Lazy acks ride along with a
// batch once due, or get a commit of their own when the committer is idle.
func (s *Store) run() {
	defer close(s.stopped)
	var batch []*request
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		var closing bool
		batch, closing = s.take(batch[:0])
		if len(batch) > 0 {
			t := time.Now()
			if onlyBarriers(batch) {
				// Every earlier request is complete: the committer is
				// sequential. No round trip for nothing.
				for _, r := range batch {
					r.complete(nil)
				}
			} else {
				unanswered := len(s.unsettled)
				if err := s.commitBatch(batch, s.flushDue()); err != nil && len(s.unsettled) > unanswered {
					s.failPending(err)
				}
			}
			s.busy.Add(int64(time.Since(t)))
			clear(batch)
			continue
		}
		if closing {
			if !s.abandoned {
				s.closeFlush()
			}
			return
		}
		if s.flushDue() {
			t := time.Now()
			err := s.commitBatch(nil, true)
			s.busy.Add(int64(time.Since(t)))
			if err == nil {
				continue
			}
			s.flushRetry = time.Now().Add(s.so.AckFlushInterval)
		}
		if wait, ok := s.flushWait(); ok {
			timer.Reset(wait)
			select {
			case <-s.wake:
			case <-timer.C:
			}
			timer.Stop()
		} else {
			<-s.wake
		}
	}
}

// failPending fails every request queued while a commit went
// unanswered: the database has not answered for the statement
// timeout, and the next batch would first have to settle that commit,
// through the same silent link, for as long again. Their writers hear of
// it now (1011, and they redo the writes after reconnecting) instead of
// after two timeouts. (Found by TestFaultPostgresPrimaryBlackhole in
// integration/cluster: writers behind a silent primary waited 4 × the
// statement timeout.)
func (s *Store) failPending(cause error) {
	s.mu.Lock()
	queued := s.pending
	s.pending = nil
	s.mu.Unlock()
	if len(queued) == 0 {
		return
	}
	err := fmt.Errorf("pgstore: not attempted: the database did not answer the commit before it: %w", cause)
	for _, r := range queued {
		r.complete(err)
	}
}

// CommitterBusy is how long the committer has been working (committing,
// completing requests) since Open; its rate of increase is the fraction
// of time the committer is busy.
func (s *Store) CommitterBusy() time.Duration { return time.Duration(s.busy.Load()) }

func onlyBarriers(batch []*request) bool {
	for _, r := range batch {
		if r.op != opBarrier {
			return false
		}
	}
	return true
}

// take moves up to maxBatch pending requests into buf. A PruneTombstones
// goes in a batch of its own, so it applies exactly at its place in the
// submission order.
func (s *Store) take(buf []*request) ([]*request, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := min(len(s.pending), maxBatch)
	for i, r := range s.pending[:n] {
		if r.op == opPruneTombstones {
			n = max(i, 1)
			break
		}
	}
	buf = append(buf, s.pending[:n]...)
	m := copy(s.pending, s.pending[n:])
	clear(s.pending[m:])
	s.pending = s.pending[:m]
	return buf, s.closed
}

func (s *Store) flushDue() bool {
	if time.Now().Before(s.flushRetry) {
		return false
	}
	m := s.mem
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.workSince.IsZero() {
		return false
	}
	return len(m.acks) >= s.so.AckFlushAcks || time.Since(m.workSince) >= s.so.AckFlushInterval
}

func (s *Store) flushWait() (time.Duration, bool) {
	m := s.mem
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.workSince.IsZero() {
		return 0, false
	}
	return max(s.so.AckFlushInterval-time.Since(m.workSince), time.Millisecond), true
}

// ackFlush is the lazy acks one commit writes.
type ackFlush struct {
	acks []ackRef
	done []func(error)
}

func (s *Store) takeAcks() *ackFlush {
	m := s.mem
	m.mu.Lock()
	defer m.mu.Unlock()
	af := &ackFlush{acks: m.acks, done: m.ackDone}
	m.acks, m.ackDone, m.workSince = nil, nil, time.Time{}
	return af
}

// putBack returns the acks of a failed commit to memory.
func (s *Store) putBack(af *ackFlush) {
	m := s.mem
	m.mu.Lock()
	m.acks = append(af.acks, m.acks...)
	m.ackDone = append(af.done, m.ackDone...)
	m.noteWork()
	m.mu.Unlock()
}

// closeFlush writes the acks still in memory before the committer exits.
func (s *Store) closeFlush() {
	if err := s.commitBatch(nil, true); err != nil {
		af := s.takeAcks()
		for _, d := range af.done {
			d(err)
		}
	}
}

// commitBatch commits batch (and, if withAcks, the due lazy acks) and
// completes every request after the commit. It returns the commit's error.
//
// Failure policy: a failed commit fails every request of the batch and
// leaves memory as it was (the index is only published after a commit);
// the acks go back to memory. A fence failure is narrower: only the
// requests of the fenced shards fail (ErrFenced, OnFenced is told), the
// shard's memory is forgotten, and the batch is re-run without them.
func (s *Store) commitBatch(batch []*request, withAcks bool) error {
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.StatementTimeout)
	defer cancel()
	now := s.so.Now().UnixMilli()
	var af *ackFlush
	if withAcks {
		af = s.takeAcks()
	}
	for _, r := range batch {
		r.err = nil
	}
	err := s.settle(ctx)
	var epochs map[byte]int64
	if err == nil {
		epochs, err = s.prepareShards(ctx, batch)
	}
	var bt *batchTx
	for err == nil {
		if err = s.loadForBatch(ctx, batch); err != nil {
			break
		}
		var held map[slotRef][]heldRow
		if held, err = s.loadHeld(ctx, batch); err != nil {
			break
		}
		bt = newBatchTx(s, now, held)
		for _, r := range batch {
			if r.err == nil {
				if r.err = bt.apply(r); r.err != nil {
					s.log.Error().Err(r.err).Msg("pgstore: request failed")
				}
			}
		}
		var fenced []byte
		fenced, err = s.exec(ctx, bt, batch, af, epochs)
		if err == nil || len(fenced) == 0 {
			break
		}
		// Fenced: fail those shards' requests and acks, run the rest again.
		for _, sh := range fenced {
			s.fenced(sh, epochs[sh])
			delete(epochs, sh)
		}
		for _, r := range batch {
			if sh, ok := r.shardOf(); ok && r.err == nil && slices.Contains(fenced, sh) {
				r.err = fmt.Errorf("%w (shard %02x)", reflection.ErrFenced, sh)
			}
		}
		if af != nil {
			kept := af.acks[:0]
			for _, a := range af.acks {
				if !slices.Contains(fenced, a.g[0]) {
					kept = append(kept, a)
				}
			}
			af.acks = kept
		}
		err = nil
	}
	if err == nil {
		if bt != nil {
			bt.publish()
		}
		done := time.Now()
		for _, r := range batch {
			r.result.CommitStart, r.result.CommitDone = start, done
		}
	} else {
		err = fmt.Errorf("pgstore: commit of %d requests: %w", len(batch), err)
		s.log.Error().Err(err).Msg("pgstore: commit failed")
		// The outcome may be unknown (a connection lost or a timeout
		// while the commit waited for the standby: PostgreSQL may have
		// committed locally). Nothing is acked either way, but memory
		// may now be behind the database: forget the batch's shards, so
		// they are read again from what the database really holds.
		m := s.mem
		m.mu.Lock()
		for sh := range epochs {
			m.forgetShard(sh)
		}
		m.mu.Unlock()
		if af != nil {
			s.putBack(af)
			af = nil
		}
	}
	if s.so.OnCommit != nil && (len(batch) > 0 || af != nil && len(af.acks) > 0) {
		s.so.OnCommit(len(batch), time.Since(start), err)
	}
	if af != nil {
		for _, d := range af.done {
			d(nil)
		}
	}
	if h := s.hooks.Load(); h != nil && len(batch) > 0 {
		h.begin()
		defer h.end()
	}
	for _, r := range batch {
		if r.err != nil {
			r.complete(r.err)
		} else {
			r.complete(err)
		}
	}
	return err
}

// completionHooks bracket the completion callbacks of one commit.
type completionHooks struct{ begin, end func() }

// SetCompletionHooks makes the committer call begin before the completion
// callbacks of each commit and end after them, on its own goroutine (see
// reflection.DB.SetCompletionHooks). nil functions remove the hooks.
func (s *Store) SetCompletionHooks(begin, end func()) {
	if begin == nil || end == nil {
		s.hooks.Store(nil)
		return
	}
	s.hooks.Store(&completionHooks{begin, end})
}

// unsettled is a commit whose outcome the committer does not know: the
// backend that ran it and the shards it wrote (none for a standby probe,
// see awaitStandby).
type unsettled struct {
	pid    uint32
	shards []byte
	probe  bool
}

// settle ends every commit of unknown outcome before the next batch. A
// backend whose client gave up keeps waiting for the synchronous standby
// and would make its transaction visible whenever the standby returns,
// behind the back of a memory that was rebuilt without it (and the next
// batch would reuse its Seqs). Terminating it ends the wait: PostgreSQL
// keeps the transaction committed locally (never acked, so never
// promised; the standby gets it with the rest of the WAL), and it is
// visible at once. Its shards are read again only once the synchronous
// standby has it too (awaitStandby): read before, its reflections would
// be delivered to other devices, and a failover at that moment would
// lose what they received and give their ids to other envelopes.
func (s *Store) settle(ctx context.Context) error {
	for len(s.unsettled) > 0 {
		u := s.unsettled[0]
		var gone bool
		err := s.pool.QueryRow(ctx, `SELECT pg_terminate_backend($1) IS NOT NULL
			AND NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND pid <> pg_backend_pid())`, int32(u.pid)).Scan(&gone)
		for err == nil && !gone {
			select {
			case <-ctx.Done():
				err = ctx.Err()
			case <-time.After(10 * time.Millisecond):
				err = s.pool.QueryRow(ctx, `SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)`, int32(u.pid)).Scan(&gone)
			}
		}
		if err == nil && !u.probe {
			err = s.awaitStandby(ctx)
		}
		if err != nil {
			return fmt.Errorf("settling an earlier commit of unknown outcome (backend %d): %w", u.pid, err)
		}
		if u.probe {
			s.unsettled = s.unsettled[1:]
			continue
		}
		m := s.mem
		m.mu.Lock()
		for _, sh := range u.shards {
			m.forgetShard(sh)
			m.shards[sh].settling--
		}
		m.mu.Unlock()
		s.unsettled = s.unsettled[1:]
		s.log.Warn().Uint32("backend", u.pid).Ints("shards", shardInts(u.shards)).
			Msg("pgstore: ended a commit of unknown outcome (it may have committed without an ack); its shards are read again")
	}
	return nil
}

// awaitStandby returns once the synchronous standbys hold everything the
// primary has written so far. It commits a transaction whose only write
// is a logical-decoding message (one WAL record, no table touched, no
// privilege needed): with synchronous_commit on, a commit that wrote WAL
// waits until its WAL, and so all WAL before it, is confirmed as
// synchronous_standby_names asks (FIRST n or ANY n alike). A transaction
// that only took a transaction id would not wait: it wrote no WAL before
// its commit record. On a primary without a synchronous
// standby (AllowAsync) it returns at once. If the standby does not answer
// within ctx, the probe's backend is left waiting: it is settled like a
// commit, without shards, so that no such backend stays behind.
func (s *Store) awaitStandby(ctx context.Context) error {
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	pid := conn.Conn().PgConn().PID()
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `SELECT pg_logical_emit_message(true, 'd2m-mediator', 'settle')`)
		return err
	})
	conn.Release()
	var pe *pgconn.PgError
	if err != nil && !errors.As(err, &pe) {
		s.unsettled = append(s.unsettled, unsettled{pid: pid, probe: true})
	}
	if err != nil {
		return fmt.Errorf("waiting for the synchronous standby: %w", err)
	}
	return nil
}

// errSettling refuses reads of a shard with a commit of unknown outcome
// that the synchronous standby has not confirmed (settle).
var errSettling = errors.New("a commit of unknown outcome waits for the synchronous standby's confirmation; try again")

func shardInts(sh []byte) []int {
	out := make([]int, len(sh))
	for i, s := range sh {
		out[i] = int(s)
	}
	return out
}

// fenced forgets a shard whose epoch in the database is no longer ours.
func (s *Store) fenced(sh byte, epoch int64) {
	s.claimed[sh].Store(0)
	m := s.mem
	m.mu.Lock()
	m.forgetShard(sh)
	m.mu.Unlock()
	s.log.Warn().Str("shard", fmt.Sprintf("%02x", sh)).Int64("epoch", epoch).
		Msg("pgstore: commit refused by the shard's epoch: another node owns it now; its devices must reconnect")
	if s.opts.OnFenced != nil {
		s.opts.OnFenced(sh, epoch)
	}
}

// prepareShards finds the epoch of every shard the batch writes, claiming
// shards whose epoch changed since this node last claimed them. Requests
// of shards this node does not own (or cannot claim) get ErrFenced.
func (s *Store) prepareShards(ctx context.Context, batch []*request) (map[byte]int64, error) {
	epochs := make(map[byte]int64)
	refused := make(map[byte]error)
	for _, r := range batch {
		sh, ok := r.shardOf()
		if !ok {
			continue
		}
		if err, bad := refused[sh]; bad {
			r.err = err
			continue
		}
		if _, seen := epochs[sh]; seen {
			continue
		}
		e, owned := s.ownedEpoch(sh)
		if !owned {
			refused[sh] = fmt.Errorf("%w (shard %02x not owned by this node)", reflection.ErrFenced, sh)
			r.err = refused[sh]
			continue
		}
		if s.claimed[sh].Load() != e {
			if err := s.claim(ctx, sh, e); err != nil {
				if !errors.Is(err, reflection.ErrFenced) {
					return nil, err
				}
				refused[sh] = err
				r.err = err
				continue
			}
		}
		epochs[sh] = e
	}
	for _, r := range batch {
		if r.op == opPruneTombstones {
			for i := range 256 {
				if _, ok := epochs[byte(i)]; ok {
					continue
				}
				if e, ok := s.ownedEpoch(byte(i)); ok && s.claimed[i].Load() == e && e != 0 {
					epochs[byte(i)] = e
				}
			}
		}
	}
	return epochs, nil
}

// claim raises the shard's epoch in the database to e (this node's, from
// the placement), marks its slots disconnected, forgets what memory held
// of it and delivers the reflections a previous owner's transaction held.
func (s *Store) claim(ctx context.Context, sh byte, e int64) error {
	now := s.so.Now().UnixMilli()
	var have int64
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `UPDATE d2m_shards SET epoch = $2, owner = $3 WHERE shard = $1 AND epoch < $2`, int32(sh), e, s.opts.NodeID)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			if err := tx.QueryRow(ctx, `SELECT epoch FROM d2m_shards WHERE shard = $1`, int32(sh)).Scan(&have); err != nil {
				return err
			}
			if have != e {
				return fmt.Errorf("%w (shard %02x: epoch %d in the database, this node's is %d)", reflection.ErrFenced, sh, have, e)
			}
		}
		_, err = tx.Exec(ctx, `UPDATE d2m_slots SET connected_since = 0, last_disconnect_at = $2 WHERE shard = $1 AND connected_since <> 0`, int32(sh), now)
		return err
	})
	if err != nil {
		if errors.Is(err, reflection.ErrFenced) {
			s.log.Warn().Err(err).Msg("pgstore: cannot claim shard")
		}
		return err
	}
	m := s.mem
	m.mu.Lock()
	m.forgetShard(sh)
	m.mu.Unlock()
	s.claimed[sh].Store(e)
	s.log.Info().Str("shard", fmt.Sprintf("%02x", sh)).Int64("epoch", e).Msg("pgstore: claimed shard")
	return s.releaseAllHeld(ctx, []int32{int32(sh)})
}

// loadForBatch reads the groups the batch touches that memory does not
// hold yet.
func (s *Store) loadForBatch(ctx context.Context, batch []*request) error {
	var missing []reflection.GroupID
	seen := make(map[reflection.GroupID]bool)
	m := s.mem
	m.mu.RLock()
	for _, r := range batch {
		if r.err != nil || r.op == opPruneTombstones || r.op == opClaim || r.op == opBarrier || seen[r.g] {
			continue
		}
		seen[r.g] = true
		if m.group(r.g) == nil {
			missing = append(missing, r.g)
		}
	}
	m.mu.RUnlock()
	if len(missing) == 0 {
		return nil
	}
	loaded, err := s.loadGroups(ctx, missing)
	if err != nil {
		return err
	}
	m.mu.Lock()
	for g, gm := range loaded {
		if m.group(g) == nil {
			m.shards[g[0]].groups[g] = gm
		}
	}
	m.mu.Unlock()
	return nil
}

// loadHeld reads the held reflections of the senders the batch releases.
func (s *Store) loadHeld(ctx context.Context, batch []*request) (map[slotRef][]heldRow, error) {
	var gs [][]byte
	var ds []int64
	for _, r := range batch {
		if r.op == opReleaseHeld && r.err == nil {
			gs = append(gs, r.g[:])
			ds = append(ds, i64(r.d))
		}
	}
	if len(gs) == 0 {
		return nil, nil
	}
	rows, err := s.pool.Query(ctx, `SELECT h.group_id, h.sender, h.pos, h.ts, h.envelope FROM d2m_held h
		JOIN unnest($1::bytea[], $2::int8[]) AS c(g, d) ON h.group_id = c.g AND h.sender = c.d
		ORDER BY h.group_id, h.sender, h.pos`, gs, ds)
	if err != nil {
		return nil, fmt.Errorf("reading held reflections: %w", err)
	}
	out := make(map[slotRef][]heldRow)
	var gb, env []byte
	var sender, pos, ts int64
	_, err = pgx.ForEachRow(rows, []any{&gb, &sender, &pos, &ts, &env}, func() error {
		h := heldRow{g: reflection.GroupID(gb), sender: reflection.DeviceID(sender), pos: pos, ts: uint64(ts), env: slices.Clone(env)}
		k := slotRef{h.g, h.sender}
		out[k] = append(out[k], h)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("reading held reflections: %w", err)
	}
	return out, nil
}

// loadGroups reads the index of the given groups: slots with counters,
// queue entries (seq, timestamp, size), the last held position.
func (s *Store) loadGroups(ctx context.Context, gs []reflection.GroupID) (map[reflection.GroupID]*groupMem, error) {
	keys := make([][]byte, len(gs))
	out := make(map[reflection.GroupID]*groupMem, len(gs))
	for i := range gs {
		keys[i] = gs[i][:]
		out[gs[i]] = &groupMem{slots: make(map[reflection.DeviceID]*slotMem)}
	}
	b := &pgx.Batch{}
	b.Queue(`SELECT group_id, device_id, counter FROM d2m_slots WHERE group_id = ANY($1)`, keys)
	b.Queue(`SELECT group_id, device_id, seq, ts, octet_length(envelope) FROM d2m_queue WHERE group_id = ANY($1) ORDER BY group_id, device_id, seq`, keys)
	b.Queue(`SELECT group_id, max(pos) FROM d2m_held WHERE group_id = ANY($1) GROUP BY group_id`, keys)
	br := s.pool.SendBatch(ctx, b)
	defer br.Close()
	var gb []byte
	var dev, counter, seq, ts, pos int64
	var size int32
	rows, err := br.Query()
	if err != nil {
		return nil, fmt.Errorf("loading groups: %w", err)
	}
	if _, err := pgx.ForEachRow(rows, []any{&gb, &dev, &counter}, func() error {
		out[reflection.GroupID(gb)].slots[reflection.DeviceID(dev)] = &slotMem{counter: uint64(counter)}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("loading slots: %w", err)
	}
	if rows, err = br.Query(); err != nil {
		return nil, fmt.Errorf("loading queues: %w", err)
	}
	if _, err := pgx.ForEachRow(rows, []any{&gb, &dev, &seq, &ts, &size}, func() error {
		sm := out[reflection.GroupID(gb)].slots[reflection.DeviceID(dev)]
		if sm == nil {
			return nil // an orphan row (db check reports it)
		}
		sm.q = append(sm.q, qent{seq: uint64(seq), ts: uint64(ts), size: uint32(size)})
		sm.counter = max(sm.counter, uint64(seq)) // rows come in seq order
		sm.length++
		sm.bytes += int64(size)
		return nil
	}); err != nil {
		return nil, fmt.Errorf("loading queues: %w", err)
	}
	if rows, err = br.Query(); err != nil {
		return nil, fmt.Errorf("loading held positions: %w", err)
	}
	if _, err := pgx.ForEachRow(rows, []any{&gb, &pos}, func() error {
		out[reflection.GroupID(gb)].heldPos = pos
		return nil
	}); err != nil {
		return nil, fmt.Errorf("loading held positions: %w", err)
	}
	return out, br.Close()
}

// exec sends the batch as one pipeline in one implicit transaction. If
// the fence statement fails it returns the shards whose epoch moved on.
func (s *Store) exec(ctx context.Context, bt *batchTx, batch []*request, af *ackFlush, epochs map[byte]int64) ([]byte, error) {
	if af != nil {
		// Acks of shards not (or no longer) ours are dropped: losing
		// an ack only delivers the entry again, from the new owner.
		kept := af.acks[:0]
		for _, a := range af.acks {
			if _, ok := epochs[a.g[0]]; ok {
				kept = append(kept, a)
			} else if e, ok := s.ownedEpoch(a.g[0]); ok && e == s.claimed[a.g[0]].Load() && e != 0 {
				epochs[a.g[0]] = e
				kept = append(kept, a)
			}
		}
		af.acks = kept
	}
	b := buildSQL(bt, batch, af, epochs)
	if b.Len() <= 1 {
		return nil, nil // nothing to write
	}
	conn, err := s.pool.Acquire(ctx)
	if err != nil {
		return nil, err
	}
	pid := conn.Conn().PgConn().PID()
	br := conn.SendBatch(ctx, b)
	_, err = br.Exec()
	if err == nil {
		for i := 1; i < b.Len() && err == nil; i++ {
			_, err = br.Exec()
		}
	}
	cerr := br.Close()
	conn.Release()
	if err == nil {
		err = cerr
	}
	var pe *pgconn.PgError
	if err != nil && !errors.As(err, &pe) {
		// No answer from the server (timeout, connection lost): the
		// transaction may still commit, for example once the standby
		// is back. Settle it before anything else is written.
		touched := make([]byte, 0, len(epochs))
		for sh := range epochs {
			touched = append(touched, sh)
		}
		s.unsettled = append(s.unsettled, unsettled{pid: pid, shards: touched})
		m := s.mem
		m.mu.Lock()
		for _, sh := range touched {
			m.shards[sh].settling++
			m.shards[sh].gen++ // a load under way may already see it
		}
		m.mu.Unlock()
	}
	if err == nil {
		return nil, nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "22012" { // division_by_zero: the fence statement's signal
		fenced, ferr := s.whichFenced(ctx, epochs)
		if ferr != nil {
			return nil, fmt.Errorf("%w; reading the epochs: %v", errShardFenced, ferr)
		}
		if len(fenced) == 0 {
			return nil, errShardFenced
		}
		return fenced, errShardFenced
	}
	return nil, err
}

func (s *Store) whichFenced(ctx context.Context, epochs map[byte]int64) ([]byte, error) {
	rows, err := s.pool.Query(ctx, `SELECT shard, epoch FROM d2m_shards`)
	if err != nil {
		return nil, err
	}
	var out []byte
	var sh int32
	var e int64
	_, err = pgx.ForEachRow(rows, []any{&sh, &e}, func() error {
		if want, ok := epochs[byte(sh)]; ok && want != e {
			out = append(out, byte(sh))
		}
		return nil
	})
	return out, err
}
