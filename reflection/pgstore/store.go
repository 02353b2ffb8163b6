package pgstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/rs/zerolog"

	"d2m-mediator/reflection"
)

// Options configures Open. Zero values select the defaults.
type Options struct {
	// Store carries the engine-independent settings: queue limits, lazy
	// ack window, cache size, OnCommit, Logger and Now.
	Store reflection.Options

	// Epoch returns this node's epoch for a shard (cluster mode: the
	// revision of its etcd owner key) and whether the node owns the
	// shard now. nil runs a single node: Open claims every shard with an
	// epoch one above the database's, which fences any other process
	// still writing with the same database.
	Epoch func(shard byte) (epoch int64, ok bool)
	// OnFenced is told when a commit was refused because the database's
	// epoch for a shard is no longer this node's. It runs on the
	// committer and must not block.
	OnFenced func(shard byte, epoch int64)
	// NodeID is recorded as the owner of the shards this node claims.
	NodeID string
	// AllowAsync lets Open accept a primary without a synchronous
	// standby: acks then mean "on the primary's disk" only.
	AllowAsync bool
	// StatementTimeout bounds every statement on the server (5s;
	// statement_timeout in the DSN takes precedence, here too) and the
	// node's own wait for a commit batch as a whole, the synchronous
	// standby's confirmation included (PostgreSQL bounds no such wait):
	// a writer behind a database that does not answer hears 1011 within
	// it. A read gives up after it too.
	StatementTimeout time.Duration
	// MaxConns bounds the connection pool (16; pool_max_conns in the
	// DSN takes precedence).
	MaxConns int32
}

// Store is the PostgreSQL implementation of reflection.Store.
type Store struct {
	pool *pgxpool.Pool
	opts Options
	so   reflection.Options
	log  zerolog.Logger

	mem *memIndex
	// claimed is the epoch this node last claimed for each shard in the
	// database (0: not claimed). Written only by the committer.
	claimed [256]atomic.Int64

	mu      sync.Mutex // guards pending and closed
	pending []*request
	closed  bool
	// abandoned (tests): the committer exits without writing the lazy
	// acks, as a process killed after its last commit would.
	abandoned bool
	wake      chan struct{}
	stopped   chan struct{}
	// busy is the committer's working time in nanoseconds (commits and
	// completions, not waiting for work): CommitterBusy.
	busy atomic.Int64
	// hooks bracket the completions of each commit (SetCompletionHooks).
	hooks atomic.Pointer[completionHooks]

	// flushRetry: after a failed flush no flush of its own before this
	// (committer only).
	flushRetry time.Time
	// unsettled: commits of unknown outcome to end before the next batch
	// (committer only).
	unsettled []unsettled

	closeOnce sync.Once
	// Replication describes how an ack is replicated, for the startup
	// line ("synchronous standby …" or "asynchronous").
	Replication string
}

var _ reflection.Store = (*Store)(nil)

// IsDSN reports whether a --store value names a PostgreSQL database.
func IsDSN(s string) bool {
	return strings.HasPrefix(s, "postgres://") || strings.HasPrefix(s, "postgresql://")
}

func (o Options) withDefaults() Options {
	so := &o.Store
	if so.MaxQueueLength <= 0 {
		so.MaxQueueLength = reflection.DefaultMaxQueueLength
	}
	if so.MaxQueueBytes <= 0 {
		so.MaxQueueBytes = reflection.DefaultMaxQueueBytes
	}
	if so.AckFlushInterval <= 0 {
		so.AckFlushInterval = reflection.DefaultAckFlushInterval
	}
	if so.AckFlushAcks <= 0 {
		so.AckFlushAcks = reflection.DefaultAckFlushAcks
	}
	if so.CacheBytes == 0 {
		so.CacheBytes = reflection.DefaultCacheBytes
	}
	if so.Now == nil {
		so.Now = time.Now
	}
	if o.StatementTimeout <= 0 {
		o.StatementTimeout = 5 * time.Second
	}
	if o.MaxConns <= 0 {
		o.MaxConns = 16
	}
	if o.NodeID == "" {
		o.NodeID = "single"
	}
	return o
}

// Open connects to the database, checks that an ack will be replicated
// (a synchronous standby, unless AllowAsync), applies the schema
// migrations and starts the committer. Without Options.Epoch it claims
// every shard, marks slots left connected as disconnected and delivers
// held reflections left by a crash, as the bbolt store does at Open.
func Open(ctx context.Context, dsn string, opts Options) (*Store, error) {
	opts = opts.withDefaults()
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	if !strings.Contains(dsn, "pool_max_conns") {
		cfg.MaxConns = opts.MaxConns
	}
	rp := cfg.ConnConfig.RuntimeParams
	if v, ok := rp["statement_timeout"]; !ok {
		rp["statement_timeout"] = fmt.Sprint(opts.StatementTimeout.Milliseconds())
	} else if d, ok := pgDuration(v); ok && d > 0 {
		// The DSN's value bounds the node's own waits too (a commit
		// batch, a read): otherwise a database that stops answering
		// would hold writers for the default's 5 s, not the DSN's
		// timeout an operator who set it expects.
		opts.StatementTimeout = d
	}
	// A node stopped (SIGSTOP, a VM pause) in the middle of a claim's
	// transaction would keep the shard's row locked, and so every other
	// node's claim waiting, for as long as it stays stopped.
	if _, ok := rp["idle_in_transaction_session_timeout"]; !ok {
		rp["idle_in_transaction_session_timeout"] = fmt.Sprint(opts.StatementTimeout.Milliseconds())
	}
	if _, ok := rp["application_name"]; !ok {
		rp["application_name"] = "d2m-mediator"
	}
	// Every new connection is checked as Open checks the first one: the
	// pool reconnects by itself after a failover (with
	// target_session_attrs=read-write it finds the promoted standby), and
	// a promoted standby that waits for no standby of its own would
	// otherwise take commits, and so acks, on one machine only.
	var guard *replicationGuard
	if !opts.AllowAsync {
		guard = &replicationGuard{log: opts.Store.Logger}
		cfg.AfterConnect = guard.check
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %w", err)
	}
	s := &Store{
		pool:    pool,
		opts:    opts,
		so:      opts.Store,
		log:     opts.Store.Logger,
		mem:     newMemIndex(opts.Store.CacheBytes),
		wake:    make(chan struct{}, 1),
		stopped: make(chan struct{}),
	}
	if err := s.start(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	if guard != nil {
		guard.started.Store(true)
	}
	go s.run()
	return s, nil
}

func (s *Store) start(ctx context.Context) error {
	if err := s.pool.Ping(ctx); err != nil {
		return fmt.Errorf("pgstore: connecting to %s: %w", s.pool.Config().ConnConfig.Host, err)
	}
	if err := s.checkReplication(ctx); err != nil {
		return err
	}
	applied, err := migrate(ctx, s.pool)
	if err != nil {
		return fmt.Errorf("pgstore: %w", err)
	}
	if len(applied) > 0 {
		s.log.Info().Ints("versions", applied).Msg("pgstore: applied schema migrations")
	}
	if s.opts.Epoch == nil {
		return s.claimAll(ctx)
	}
	return nil
}

// checkReplication refuses a standby, and a primary whose commits would
// not wait for a synchronous standby, unless AllowAsync.
func (s *Store) checkReplication(ctx context.Context) error {
	var inRecovery bool
	if err := s.pool.QueryRow(ctx, `SELECT pg_is_in_recovery()`).Scan(&inRecovery); err != nil {
		return fmt.Errorf("pgstore: %w", err)
	}
	if inRecovery {
		return replicationProblem(true, "", "")
	}
	var names, commit string
	if err := s.pool.QueryRow(ctx, `SELECT current_setting('synchronous_standby_names'), current_setting('synchronous_commit')`).Scan(&names, &commit); err != nil {
		return fmt.Errorf("pgstore: %w", err)
	}
	var connected int
	_ = s.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')`).Scan(&connected)
	err := replicationProblem(false, names, commit)
	switch {
	case err == nil:
		s.Replication = fmt.Sprintf("synchronous standby %q, synchronous_commit=%s, %d connected", names, commit, connected)
		if connected == 0 {
			s.log.Warn().Str("synchronous_standby_names", names).
				Msg("pgstore: no synchronous standby is connected: commits, and so acks, wait until one is")
		}
	case s.opts.AllowAsync:
		s.Replication = fmt.Sprintf("asynchronous (synchronous_standby_names=%q, synchronous_commit=%s): an ack may be on the primary only", names, commit)
	default:
		return err
	}
	return nil
}

// replicationProblem says why a session with these settings may not
// commit for an ack, or nil when every commit waits for a synchronous
// standby.
func replicationProblem(inRecovery bool, names, commit string) error {
	switch {
	case inRecovery:
		return errors.New("pgstore: the database is a standby (in recovery): point --store at the primary")
	case names == "":
		return errors.New("pgstore: the primary has no synchronous standby (synchronous_standby_names is empty), so an ack would be on one machine only: configure one, or pass --store-allow-async to accept that")
	case commit != "on" && commit != "remote_apply":
		return fmt.Errorf("pgstore: synchronous_commit is %q: an ack would not wait for the standby; set it to on or remote_apply, or pass --store-allow-async", commit)
	}
	return nil
}

// replicationGuard checks each connection the pool opens after Open: a
// connection to a primary whose commits would not wait for a synchronous
// standby (after a failover to a promoted standby that has none
// configured, say) is refused, so the commits that would have used it
// fail (1011 to their writers) instead of acking what one machine holds.
// Open's own connections are checked by checkReplication, which words
// the startup line.
type replicationGuard struct {
	log     zerolog.Logger
	started atomic.Bool
	logged  atomic.Int64 // unix nanos of the last refusal logged
}

// guardLogEvery bounds the refusal lines: every commit retries the pool.
const guardLogEvery = 10 * time.Second

func (g *replicationGuard) check(ctx context.Context, conn *pgx.Conn) error {
	if !g.started.Load() {
		return nil
	}
	var inRecovery bool
	var names, commit string
	if err := conn.QueryRow(ctx, `SELECT pg_is_in_recovery(), current_setting('synchronous_standby_names'), current_setting('synchronous_commit')`).Scan(&inRecovery, &names, &commit); err != nil {
		return fmt.Errorf("pgstore: checking the replication of a new connection: %w", err)
	}
	err := replicationProblem(inRecovery, names, commit)
	if err == nil {
		return nil
	}
	err = fmt.Errorf("%w (on a new connection to %s: after a failover, configure the new primary's synchronous standby)", err, conn.Config().Host)
	now := time.Now().UnixNano()
	if last := g.logged.Load(); now-last >= int64(guardLogEvery) && g.logged.CompareAndSwap(last, now) {
		g.log.Error().Err(err).Msg("pgstore: refusing to commit through a primary that does not wait for a synchronous standby; writes fail with 1011 until it does")
	}
	return err
}

// claimAll claims every shard for a single node.
func (s *Store) claimAll(ctx context.Context) error {
	now := s.so.Now().UnixMilli()
	var epochs [256]int64
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `UPDATE d2m_shards SET epoch = epoch + 1, owner = $1 RETURNING shard, epoch`, s.opts.NodeID)
		if err != nil {
			return err
		}
		var sh int32
		var e int64
		_, err = pgx.ForEachRow(rows, []any{&sh, &e}, func() error {
			epochs[sh&0xff] = e
			return nil
		})
		if err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `UPDATE d2m_slots SET connected_since = 0, last_disconnect_at = $1 WHERE connected_since <> 0`, now)
		return err
	})
	if err != nil {
		return fmt.Errorf("pgstore: claiming the shards: %w", err)
	}
	for i := range epochs {
		s.claimed[i].Store(epochs[i])
	}
	return s.releaseAllHeld(ctx, nil)
}

// releaseAllHeld delivers the held reflections of the given shards (all if
// nil) left by a crash or by the previous owner.
func (s *Store) releaseAllHeld(ctx context.Context, shards []int32) error {
	q := `SELECT DISTINCT group_id, sender FROM d2m_held`
	args := []any{}
	if shards != nil {
		q += ` WHERE shard = ANY($1)`
		args = append(args, shards)
	}
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return fmt.Errorf("pgstore: reading held reflections: %w", err)
	}
	var reqs []*request
	var gb []byte
	var sender int64
	_, err = pgx.ForEachRow(rows, []any{&gb, &sender}, func() error {
		reqs = append(reqs, &request{op: opReleaseHeld, g: reflection.GroupID(gb), d: reflection.DeviceID(sender)})
		return nil
	})
	if err != nil {
		return fmt.Errorf("pgstore: reading held reflections: %w", err)
	}
	if len(reqs) == 0 {
		return nil
	}
	released := 0
	for _, r := range reqs {
		r.doneAppend = func(res reflection.AppendResult, err error) { released += len(res.Delivered) }
	}
	if err := s.commitBatch(reqs, false); err != nil {
		return fmt.Errorf("pgstore: releasing held reflections: %w", err)
	}
	s.log.Info().Int("senders", len(reqs)).Int("held_copies_delivered", released).Msg("pgstore: released held reflections left by the previous owner")
	return nil
}

// Close completes every write already submitted, writes the acks not yet
// written, stops the committer and closes the pool.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.poke()
		<-s.stopped
		s.pool.Close()
	})
	return nil
}

func (s *Store) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *Store) submit(r *request) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		go r.complete(reflection.ErrClosed)
		return
	}
	s.pending = append(s.pending, r)
	s.mu.Unlock()
	s.poke()
}

// PutSlot creates or replaces a slot (see reflection.DB.PutSlot).
func (s *Store) PutSlot(g reflection.GroupID, sl reflection.Slot, done func(error)) {
	sl.DeviceInfo = append([]byte(nil), sl.DeviceInfo...)
	s.submit(&request{op: opPutSlot, g: g, d: sl.DeviceID, slot: sl, done: done})
}

// DeleteSlot removes the slot and its queue, optionally leaving a
// tombstone (see reflection.DB.DeleteSlot).
func (s *Store) DeleteSlot(g reflection.GroupID, d reflection.DeviceID, t *reflection.Tombstone, done func(error)) {
	r := &request{op: opDeleteSlot, g: g, d: d, done: done}
	if t != nil {
		tc := *t
		tc.DeviceID = d
		r.tomb = &tc
	}
	s.submit(r)
}

// SetSharedDeviceData stores the group's opaque shared data; empty data
// removes it.
func (s *Store) SetSharedDeviceData(g reflection.GroupID, data []byte, done func(error)) {
	s.submit(&request{op: opSetShared, g: g, data: append([]byte(nil), data...), done: done})
}

// Append fans a reflection out (see reflection.DB.Append).
func (s *Store) Append(r reflection.AppendRequest, done func(reflection.AppendResult, error)) {
	s.submit(&request{op: opAppend, g: r.Group, d: r.Sender, app: r, doneAppend: done})
}

// ReleaseHeld moves the sender's held reflections into the queues.
func (s *Store) ReleaseHeld(g reflection.GroupID, sender reflection.DeviceID, done func(reflection.AppendResult, error)) {
	s.submit(&request{op: opReleaseHeld, g: g, d: sender, doneAppend: done})
}

// PurgeQueue empties d's queue, keeping the slot and its counter.
func (s *Store) PurgeQueue(g reflection.GroupID, d reflection.DeviceID, done func(error)) {
	s.submit(&request{op: opPurgeQueue, g: g, d: d, done: done})
}

// PruneTombstones removes tombstones with At < olderThan in the shards
// this node owns.
// Barrier calls done once every write submitted before it is committed
// (or failed); it writes nothing and bumps no shard's epoch row.
func (s *Store) Barrier(done func(error)) {
	s.submit(&request{op: opBarrier, done: done})
}

func (s *Store) PruneTombstones(olderThan int64, done func(error)) {
	s.submit(&request{op: opPruneTombstones, olderThan: olderThan, done: done})
}

// Ack removes an entry: at once in memory, in the database with the next
// commit once due (as reflection.DB.Ack: a lost ack only re-delivers).
func (s *Store) Ack(g reflection.GroupID, d reflection.DeviceID, seq uint64, done func(error)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		if done != nil {
			go done(reflection.ErrClosed)
		}
		return
	}
	m := s.mem
	m.mu.Lock()
	if sm := m.slot(g, d); sm != nil {
		if i := sm.find(seq); i >= 0 && !sm.q[i].acked {
			m.ack(sm, i)
		}
	}
	m.acks = append(m.acks, ackRef{g, d, seq})
	if done != nil {
		m.ackDone = append(m.ackDone, done)
	}
	m.noteWork()
	poke := len(m.acks) == 1 || len(m.acks) == s.so.AckFlushAcks
	m.mu.Unlock()
	if poke {
		s.poke()
	}
}

// ownedEpoch is the epoch this node may write the shard with now.
func (s *Store) ownedEpoch(shard byte) (int64, bool) {
	if s.opts.Epoch == nil {
		return s.claimed[shard].Load(), true
	}
	return s.opts.Epoch(shard)
}

// ensureClaimed makes sure the database carries this node's current epoch
// for the shard before anything of it is read into memory. It reports
// whether the shard is this node's (claimed now).
func (s *Store) ensureClaimed(shard byte) (bool, error) {
	e, ok := s.ownedEpoch(shard)
	if !ok {
		return false, nil
	}
	if s.claimed[shard].Load() == e {
		return true, nil
	}
	err := reflection.Sync(func(done func(error)) {
		s.submit(&request{op: opClaim, shard: shard, done: done})
	})
	if err != nil {
		return false, err
	}
	return s.claimed[shard].Load() == e, nil
}

func i64(d reflection.DeviceID) int64 { return int64(d) }

// pgDuration parses a PostgreSQL time setting as statement_timeout takes
// it: an integer of milliseconds, or a number with one of PostgreSQL's
// units (us, ms, s, min, h, d).
func pgDuration(v string) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	i := 0
	for i < len(v) && (v[i] >= '0' && v[i] <= '9') {
		i++
	}
	if i == 0 {
		return 0, false
	}
	n, err := strconv.ParseInt(v[:i], 10, 64)
	if err != nil {
		return 0, false
	}
	unit := map[string]time.Duration{"": time.Millisecond, "us": time.Microsecond, "ms": time.Millisecond,
		"s": time.Second, "min": time.Minute, "h": time.Hour, "d": 24 * time.Hour}
	u, ok := unit[strings.TrimSpace(v[i:])]
	if !ok {
		return 0, false
	}
	return time.Duration(n) * u, true
}
