package cluster

import (
	"context"
	crand "crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Node is one mediator process in the cluster: its lease and fence clock,
// its copy of the shard map, the shards it owns, and (when elected) the
// controller. Create it with New, start it with Join, end it with Close
// (keeps its shards assigned: a restart) or Leave (moves them away first).
type Node struct {
	cfg   Config
	cli   *clientv3.Client
	k     keys
	log   zerolog.Logger
	fence *fence
	keep  keeper

	route  [NumShards]atomic.Pointer[routeEntry] // owner of each shard, for routing
	events *eventQueue

	secret []byte // the cluster's shared secret, set by Join

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine the node starts

	kick     chan struct{} // wakes the watch loop (after a rejoin)
	ctrlKick chan struct{} // wakes the controller

	// lc is the lifecycle of every shard on this node: the one place its
	// state changes (lifecycle.go).
	lc lifecycle

	reconcileMu sync.Mutex // one reconcileLocal pass at a time; taken before mu

	mu     sync.Mutex // guards view, copies, joined; lock order: mu → a lifecycle cell's mu → fence.mu
	view   view
	copies [NumShards]shardCopy // this node's copies of shards (not with SharedStore)
	joined bool

	controllerRev  atomic.Int64            // revision of the view the controller last reconciled (0: not leading)
	claimLeaseGone atomic.Bool             // a claim failed because the lease expired (logged once until the next grant)
	adoptRefused   [NumShards]atomic.Int64 // assignment revision whose copy mismatch was logged
	processedRev   atomic.Int64            // revision the watch loop has fully acted on (events queued)
	lastLease      atomic.Int64            // the last lease granted, revoked by Close
}

// shardCopy is what this node's store holds of a shard: whether any data,
// and its generation; read from Hooks.Generation at Join and after each
// drop or reset, set by an import. It finds strays (copies of shards
// assigned elsewhere); for a shard served here, writes may have added
// data since (has is then stale, which nothing relies on: a hand-over
// drops the copy whatever has says).
type shardCopy struct {
	has bool
	gen int64
}

// routeEntry is where a shard is served: the owner node, its advertise address
// and the epoch of its ownership.
type routeEntry struct {
	Node  string
	Addr  string
	Epoch int64
}

// New returns a node that uses cli; the caller keeps ownership of cli and
// closes it after the node.
func New(cli *clientv3.Client, cfg Config) (*Node, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	f := newFence(cfg.FenceMargin)
	n := &Node{
		cfg: cfg, cli: cli, k: newKeys(cfg.Prefix), log: cfg.Log,
		fence:    f,
		keep:     keeper{lease: cli.Lease, fence: f, ttl: cfg.LeaseTTL, observe: cfg.OnKeepAlive},
		ctx:      ctx,
		cancel:   cancel,
		kick:     make(chan struct{}, 1),
		ctrlKick: make(chan struct{}, 1),
		view:     newView(),
	}
	n.events = newEventQueue(cfg.OnEvents)
	return n, nil
}

// ID is the node's id.
func (n *Node) ID() string { return n.cfg.NodeID }

func (n *Node) spawn(fn func()) {
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		fn()
	}()
}

// Join creates the node's lease, registers the node (waiting, if a
// previous process with the same id is still registered, for its lease to
// end), loads the shard map and starts the node's loops: keepalive, watch,
// event delivery and the controller campaign. The node then claims the
// shards assigned to it.
func (n *Node) Join(ctx context.Context) error {
	n.mu.Lock()
	if n.joined {
		n.mu.Unlock()
		return errors.New("cluster: Join called twice")
	}
	n.joined = true
	n.mu.Unlock()

	if err := n.loadSecret(ctx); err != nil {
		return err
	}
	lease, err := n.register(ctx)
	if err != nil {
		return err
	}
	rev, err := n.resync(ctx)
	if err != nil {
		_, _ = n.cli.Revoke(context.WithoutCancel(ctx), lease)
		return err
	}
	if n.ownCopies() {
		n.mu.Lock()
		for i := range NumShards {
			gen, has := n.cfg.Hooks.Generation(Shard(i))
			n.copies[i] = shardCopy{has: has, gen: gen}
		}
		n.mu.Unlock()
	}
	n.spawn(n.events.run)
	n.spawn(func() { n.lifeLoop(lease) })
	n.spawn(func() { n.watchLoop(rev) })
	if !n.cfg.NoController {
		n.spawn(n.controllerLoop)
	}
	n.reconcileLocal()
	return nil
}

// loadSecret reads the cluster's secret, creating it if this is the first
// node: 32 random bytes under <prefix>secret, which nodes use to
// authenticate what they send each other (shard transfers). Whoever can
// read the cluster's etcd keys can read it; whoever can write them can
// reassign shards anyway, so etcd's access control is the trust root.
func (n *Node) loadSecret(ctx context.Context) error {
	var b [32]byte
	if _, err := crand.Read(b[:]); err != nil {
		return err
	}
	fresh := base64.StdEncoding.EncodeToString(b[:])
	k := n.k.secret()
	resp, err := n.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(k), "=", 0)).
		Then(clientv3.OpPut(k, fresh)).Else(clientv3.OpGet(k)).Commit()
	if err != nil {
		return fmt.Errorf("cluster: read the cluster secret: %w", err)
	}
	val := fresh
	if !resp.Succeeded {
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 0 {
			return errors.New("cluster: the cluster secret vanished while it was read")
		}
		val = string(kvs[0].Value)
	}
	secret, err := base64.StdEncoding.DecodeString(val)
	if err != nil || len(secret) < 16 {
		return fmt.Errorf("cluster: the cluster secret at %s is not base64 of at least 16 bytes", k)
	}
	n.secret = secret
	return nil
}

// Secret is the cluster's shared secret (after Join): nodes authenticate
// their requests to each other with it (HMAC).
func (n *Node) Secret() []byte { return n.secret }

// ownCopies reports whether this node holds copies of shards of its own
// (a local store with hooks).
func (n *Node) ownCopies() bool { return !n.cfg.SharedStore && n.cfg.Hooks != nil }

// register grants a lease and writes nodes/<id> with it.
func (n *Node) register(ctx context.Context) (clientv3.LeaseID, error) {
	lease, err := n.keep.grant(ctx)
	if err != nil {
		return 0, fmt.Errorf("cluster: grant lease: %w", err)
	}
	n.lastLease.Store(int64(lease))
	key := n.k.node(n.cfg.NodeID)
	val := mustJSON(nodeRecord{Advertise: n.cfg.Advertise, Started: time.Now().UTC(), Admin: n.cfg.AdminAdvertise, TLS: n.cfg.DeviceTLS})
	for {
		resp, err := n.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, val, clientv3.WithLease(lease))).
			Else(clientv3.OpGet(key)).Commit()
		if err != nil {
			return 0, fmt.Errorf("cluster: register node %s: %w", n.cfg.NodeID, err)
		}
		if resp.Succeeded {
			n.claimLeaseGone.Store(false)
			return lease, nil
		}
		// A process with our id is still registered: a restart within its
		// TTL, or a second process with the same id. Either way it serves
		// until its lease ends; wait for that.
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 0 {
			continue
		}
		n.log.Warn().Str("node", n.cfg.NodeID).Msg("cluster: node id still registered, waiting for its lease to end")
		if err := n.waitDeleted(ctx, key, kvs[0].ModRevision); err != nil {
			return 0, fmt.Errorf("cluster: node id %s is registered by another process: %w", n.cfg.NodeID, err)
		}
	}
}

func (n *Node) waitDeleted(ctx context.Context, key string, rev int64) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for resp := range n.cli.Watch(wctx, key, clientv3.WithRev(rev+1)) {
		if err := resp.Err(); err != nil {
			return err
		}
		for _, ev := range resp.Events {
			if ev.Type == clientv3.EventTypeDelete {
				return nil
			}
		}
	}
	return ctx.Err()
}

// lifeLoop keeps the lease alive; when etcd says it expired (the node was
// paused or cut off past its TTL), every shard is lost and the node joins
// again under a new lease and claims again what is still assigned to it.
func (n *Node) lifeLoop(lease clientv3.LeaseID) {
	for {
		err := n.keep.run(n.ctx, lease)
		if n.ctx.Err() != nil {
			return
		}
		n.log.Warn().Err(err).Str("node", n.cfg.NodeID).Msg("cluster: lease lost, rejoining")
		n.fence.leaseLost(lease)
		n.loseLease(lease)
		backoff := n.cfg.LeaseTTL / 10
		for {
			var err error
			lease, err = n.register(n.ctx)
			if err == nil {
				break
			}
			if n.ctx.Err() != nil {
				return
			}
			n.log.Warn().Err(err).Msg("cluster: rejoin failed, retrying")
			select {
			case <-n.ctx.Done():
				return
			case <-time.After(backoff):
			}
		}
		select {
		case n.kick <- struct{}{}:
		default:
		}
	}
}

// resync replaces the view with a fresh read of every key.
func (n *Node) resync(ctx context.Context) (int64, error) {
	resp, err := n.cli.Get(ctx, n.k.prefix, clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("cluster: load shard map: %w", err)
	}
	v := newView()
	for _, kv := range resp.Kvs {
		v.apply(n.k, kv, false)
	}
	v.rev = resp.Header.Revision
	n.mu.Lock()
	n.view = v
	n.mu.Unlock()
	return v.rev, nil
}

// watchLoop keeps the view current and acts on every change. A broken
// watch (etcd without a leader, a member lost, a compaction) is followed
// by a fresh read of the whole map; while etcd keeps failing, the reads
// back off (jittered, doubling up to the lease TTL) instead of every node
// hammering it.
func (n *Node) watchLoop(rev int64) {
	backoff := newBackoff(100*time.Millisecond, n.cfg.LeaseTTL)
	for n.ctx.Err() == nil {
		started := time.Now()
		wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(n.ctx))
		wch := n.cli.Watch(wctx, n.k.prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1))
		broken := false
		for !broken {
			select {
			case <-n.kick:
				n.reconcileLocal()
			case resp, ok := <-wch:
				if !ok || resp.Err() != nil {
					broken = true
					break
				}
				n.mu.Lock()
				for _, ev := range resp.Events {
					n.view.apply(n.k, ev.Kv, ev.Type == clientv3.EventTypeDelete)
				}
				if resp.Header.Revision > n.view.rev {
					n.view.rev = resp.Header.Revision
				}
				rev = n.view.rev
				n.mu.Unlock()
				n.reconcileLocal()
				n.processedRev.Store(rev)
				n.kickController()
			}
		}
		cancel()
		if time.Since(started) > n.cfg.LeaseTTL {
			backoff.reset() // the watch worked for a while
		}
		for n.ctx.Err() == nil {
			if !backoff.wait(n.ctx) {
				return
			}
			rctx, rcancel := context.WithTimeout(n.ctx, n.cfg.LeaseTTL)
			r, err := n.resync(rctx)
			rcancel()
			if err == nil {
				rev = r
				n.reconcileLocal()
				n.processedRev.Store(rev)
				n.kickController()
				break
			}
		}
	}
}

// backoff is a jittered, doubling wait between retries.
type backoff struct {
	min, max, next time.Duration
}

func newBackoff(min, max time.Duration) *backoff {
	return &backoff{min: min, max: max, next: min}
}

func (b *backoff) reset() { b.next = b.min }

// wait sleeps between half and all of the next delay, then doubles it;
// false if ctx ended.
func (b *backoff) wait(ctx context.Context) bool {
	d := b.next/2 + rand.N(b.next/2+1)
	b.next = min(2*b.next, b.max)
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func (n *Node) kickController() {
	select {
	case n.ctrlKick <- struct{}{}:
	default:
	}
}

type claimReq struct {
	shard     Shard
	assignRev int64
	gen       int64 // the generation of the copy the assignment gives this node
	fresh     bool  // serve from empty: the generation is assignRev
}

// shardEffects are the effects of one transition of one shard.
type shardEffects struct {
	shard Shard
	effs  []effect
	move  moveEntry // effStartDonor: the move
}

// reconcileLocal compares the view with what this node holds and reports
// what it sees to the lifecycle (owner key ours or not, a move freezing
// or thawing a shard); then it carries out the lifecycle's effects,
// claims shards assigned to it that have no owner, aborts moves that
// cannot start and drops copies of shards it does not hold any more.
func (n *Node) reconcileLocal() {
	// One pass at a time (Join's first pass runs beside the watch
	// loop's): two passes that both saw a shard unclaimed would both
	// settle it, the second after the first claimed it and devices
	// connected.
	n.reconcileMu.Lock()
	defer n.reconcileMu.Unlock()
	me := n.cfg.NodeID
	var (
		effs   []shardEffects
		claims []claimReq
		stale  []moveEntry
		strays []shardDrop
	)
	n.mu.Lock()
	v := &n.view
	lease := n.fence.currentLease()
	var dropping bool // this pass's transitions drop shard s's copy
	note := func(s Shard, ev lifecycleEvent, m moveEntry) {
		if e := n.lc.apply(s, ev); len(e) > 0 {
			effs = append(effs, shardEffects{shard: s, effs: e, move: m})
			for _, x := range e {
				dropping = dropping || x.kind == effDrop
			}
		}
	}
	for i := range NumShards {
		s := Shard(i)
		o, m, a := v.owner[s], v.moves[s], v.assign[s]
		dropping = false
		n.setRoute(s, o)
		st := n.lc.state(s)
		held := st.phase == PhaseServing || st.phase == PhaseFrozen || st.phase == PhaseFenced
		switch {
		case o != nil && o.Node == me && lease != 0 && o.lease == lease:
			// Ours under the current lease (a claim or flip of this node,
			// possibly seen by the watch before its writer recorded it).
			note(s, lifecycleEvent{kind: evClaimed, epoch: o.epoch, lease: lease}, moveEntry{})
		case held && v.rev >= st.epoch && (o == nil || o.Node != me || o.epoch != st.epoch):
			ev := lifecycleEvent{kind: evLost, epoch: st.epoch, cause: CauseOwnerDeleted}
			if o != nil {
				ev.cause, ev.to = CauseOwnerChanged, o.Node
				if m != nil && m.ID == st.move && m.State == StateHandedOver && m.To == o.Node {
					ev.cause, ev.move = CauseMovedAway, m.ID
				}
			}
			note(s, ev, moveEntry{})
		}
		st = n.lc.state(s)
		switch {
		case m != nil && m.From == me && m.State == StateDraining && st.phase == PhaseServing:
			if st.epoch == m.FromEpoch {
				note(s, lifecycleEvent{kind: evFreeze, epoch: m.FromEpoch, move: m.ID, to: m.To}, *m)
			} else if v.rev >= m.FromEpoch {
				stale = append(stale, *m)
			}
		case st.phase == PhaseFrozen && (m == nil || m.ID != st.move || m.State == StateAborted):
			// The move that froze it ended without a flip (aborted, or
			// its record replaced or deleted).
			note(s, lifecycleEvent{kind: evThaw, move: st.move}, moveEntry{})
		}
		st = n.lc.state(s)
		if st.phase == PhaseAbsent && o == nil && a != nil && a.Node == me && m == nil && lease != 0 {
			c := claimReq{shard: s, assignRev: a.rev, gen: a.Gen, fresh: a.Fresh}
			if a.Fresh {
				c.gen = a.rev
			}
			claims = append(claims, c)
		}
		incoming := m != nil && m.To == me && !m.finished()
		if dropping {
			n.copies[s].has = false // the hand-over's drop is on its way
		} else if n.ownCopies() && n.copies[s].has && st.phase == PhaseAbsent && (a == nil || a.Node != me) && !incoming {
			// A copy of a shard the cluster gave to another node: left by
			// a move that handed it over while this node was down, or
			// imported for a move that never flipped.
			strays = append(strays, shardDrop{shard: s, gen: n.copies[s].gen, why: "not assigned to this node"})
			n.copies[s].has = false // one drop at a time; refreshed when it is done
		}
	}
	n.mu.Unlock()

	n.carryOut(effs)
	for _, m := range stale {
		n.abortMove(m, "donor does not own the shard at the move's epoch")
	}
	for _, d := range strays {
		n.dropCopy(d)
	}
	if len(claims) > 0 {
		n.claim(lease, claims)
	}
}

// carryOut performs the effects of lifecycle transitions, in order.
func (n *Node) carryOut(all []shardEffects) {
	var events []Event
	for _, se := range all {
		for _, e := range se.effs {
			switch e.kind {
			case effNotify:
				events = append(events, e.ev)
			case effStartDonor:
				ctx, cancel := context.WithTimeout(n.ctx, n.cfg.MoveTimeout)
				n.lc.setDonor(se.shard, se.move.ID, cancel)
				m := se.move
				n.spawn(func() { n.donate(ctx, cancel, m) })
			case effDrop:
				n.dropCopy(shardDrop{shard: se.shard, gen: e.gen, why: "handed over or not imported"})
			}
			// effCancelDonor: lifecycle.apply cancelled it already.
		}
	}
	n.events.push(events...)
}

// shardDrop is one copy to delete.
type shardDrop struct {
	shard Shard
	gen   int64
	why   string
}

// dropCopy deletes this node's copy of a shard up to generation gen, in a
// goroutine the node counts; a copy imported since is kept by the store.
func (n *Node) dropCopy(d shardDrop) {
	if !n.ownCopies() {
		return
	}
	n.spawn(func() {
		ctx, cancel := context.WithTimeout(n.ctx, n.cfg.MoveTimeout)
		defer cancel()
		err := n.cfg.Hooks.Drop(ctx, d.shard, d.gen)
		n.refreshCopy(d.shard)
		if err != nil {
			n.log.Warn().Err(err).Str("shard", d.shard.String()).Int64("generation", d.gen).
				Msg("cluster: dropping a copy of a shard failed; tried again at the next change")
			return
		}
		n.log.Info().Str("shard", d.shard.String()).Int64("generation", d.gen).Str("why", d.why).
			Msg("cluster: dropped this node's copy of a shard")
	})
}

// refreshCopy reads what the store holds of s.
func (n *Node) refreshCopy(s Shard) {
	gen, has := n.cfg.Hooks.Generation(s)
	n.mu.Lock()
	n.copies[s] = shardCopy{has: has, gen: gen}
	n.mu.Unlock()
}

// loseLease reports the loss of lease to every shard held under it.
func (n *Node) loseLease(lease clientv3.LeaseID) {
	var effs []shardEffects
	for i := range NumShards {
		if e := n.lc.apply(Shard(i), lifecycleEvent{kind: evLeaseLost, lease: lease}); len(e) > 0 {
			effs = append(effs, shardEffects{shard: Shard(i), effs: e})
		}
	}
	n.carryOut(effs)
}

func (n *Node) setRoute(s Shard, o *ownerEntry) {
	cur := n.route[s].Load()
	switch {
	case o == nil && cur != nil:
		n.route[s].Store(nil)
	case o != nil && (cur == nil || cur.Epoch != o.epoch):
		n.route[s].Store(&routeEntry{Node: o.Node, Addr: o.Advertise, Epoch: o.epoch})
	}
}

// claimBatch bounds the operations of one etcd transaction (etcd's
// --max-txn-ops defaults to 128; each shard takes 3 compares + 1 put).
const claimBatch = 32

// claim writes the owner keys of shards assigned to this node, attached
// to its lease, comparing that the assignment is unchanged and that no
// owner key or move exists. All shards of one transaction get its
// revision as their epoch. A failed batch is retried shard by shard.
// Before a shard is claimed, the node's copy must be the one the
// assignment names (adopt).
func (n *Node) claim(lease clientv3.LeaseID, claims []claimReq) {
	val := mustJSON(ownerRecord{Node: n.cfg.NodeID, Advertise: n.cfg.Advertise})
	claims = n.adopt(claims)
	// The events of every batch go out together: one ShardGained batch
	// for everything a start claims.
	var effs []shardEffects
	defer func() { n.carryOut(effs) }()
	try := func(batch []claimReq) bool {
		var cmps []clientv3.Cmp
		var ops []clientv3.Op
		for _, c := range batch {
			cmps = append(cmps,
				clientv3.Compare(clientv3.ModRevision(n.k.assign(c.shard)), "=", c.assignRev),
				clientv3.Compare(clientv3.CreateRevision(n.k.owner(c.shard)), "=", 0),
				clientv3.Compare(clientv3.CreateRevision(n.k.move(c.shard)), "=", 0))
			ops = append(ops, clientv3.OpPut(n.k.owner(c.shard), val, clientv3.WithLease(lease)))
		}
		// Bounded, so that an unreachable etcd does not hold the watch
		// loop; the next change or rejoin tries again.
		ctx, cancel := context.WithTimeout(n.ctx, n.cfg.LeaseTTL)
		resp, err := n.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
		cancel()
		if err != nil {
			n.claimFailed(err)
			return true // nothing to retry shard by shard; the watch or rejoin comes back
		}
		if !resp.Succeeded {
			return false
		}
		for _, c := range batch {
			if e := n.lc.apply(c.shard, lifecycleEvent{kind: evClaimed, epoch: resp.Header.Revision, lease: lease}); len(e) > 0 {
				effs = append(effs, shardEffects{shard: c.shard, effs: e})
			}
		}
		return true
	}
	for len(claims) > 0 {
		batch := claims[:min(claimBatch, len(claims))]
		claims = claims[len(batch):]
		if !try(batch) && len(batch) > 1 {
			for i := range batch {
				try(batch[i : i+1])
			}
		}
	}
}

// claimFailed logs a failed claim once per kind of error in a row: a
// node that comes back after its lease expired would otherwise log one
// "requested lease not found" per claim batch.
func (n *Node) claimFailed(err error) {
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		if n.claimLeaseGone.CompareAndSwap(false, true) {
			n.log.Warn().Str("node", n.cfg.NodeID).
				Msg("cluster: claiming shards failed: this node's lease expired (the process was paused or cut off); rejoining under a new lease")
		}
		return
	}
	n.log.Warn().Err(err).Msg("cluster: claim shards")
}

// adopt keeps the claims whose shard this node holds the right copy of:
// the generation the assignment names, or, for a shard given to it to
// serve from empty, a fresh start at that generation. A copy that does
// not match is not served: serving it would show devices state the
// cluster never acknowledged, or lose what it did.
func (n *Node) adopt(claims []claimReq) []claimReq {
	if !n.ownCopies() {
		return claims
	}
	kept := claims[:0]
	for _, c := range claims {
		n.mu.Lock()
		cp := n.copies[c.shard]
		n.mu.Unlock()
		switch {
		case cp.gen == c.gen:
			kept = append(kept, c)
		case c.fresh:
			ctx, cancel := context.WithTimeout(n.ctx, n.cfg.MoveTimeout)
			err := n.cfg.Hooks.Reset(ctx, c.shard, c.gen)
			cancel()
			n.refreshCopy(c.shard)
			if err != nil {
				n.log.Error().Err(err).Str("shard", c.shard.String()).Msg("cluster: resetting the shard for a fresh start failed; not serving it")
				continue
			}
			n.log.Warn().Str("shard", c.shard.String()).Int64("generation", c.gen).Bool("had_data", cp.has).
				Msg("cluster: serving the shard from empty, as the cluster assigned it (data loss accepted)")
			kept = append(kept, c)
			continue
		default:
			// Logged once per assignment, not at every pass of the watch.
			if n.adoptRefused[c.shard].Swap(c.assignRev) != c.assignRev {
				n.log.Error().Str("shard", c.shard.String()).Int64("assigned_generation", c.gen).Int64("held_generation", cp.gen).Bool("has_data", cp.has).
					Msg("cluster: this node does not hold the copy of the shard the cluster assigned to it; not serving it (restore the data directory, or reassign the shard with --accept-data-loss)")
			}
		}
	}
	if len(kept) == 0 {
		return kept
	}
	shards := make([]Shard, len(kept))
	for i, c := range kept {
		shards[i] = c.shard
	}
	ctx, cancel := context.WithTimeout(n.ctx, n.cfg.MoveTimeout)
	defer cancel()
	if err := n.cfg.Hooks.Settle(ctx, shards...); err != nil {
		n.log.Error().Err(err).Int("shards", len(shards)).Msg("cluster: settling claimed shards failed; not claiming them now")
		return nil
	}
	return kept
}

// MayAck reports whether this node may still send a ReflectAck for a
// reflection of shard s: it serves s (or a move has frozen it: the writes
// it admitted before the freeze are part of the export), under the lease
// whose fence clock (last keepalive send + TTL − margin) has not passed.
// Lock-free, no etcd call: this is the only thing the reflect path asks.
func (n *Node) MayAck(s Shard) bool {
	return n.fence.mayAck(clientv3.LeaseID(n.lc.ackLease[s].Load()))
}

// Admit admits one group write of shard s made by state loaded while s
// was served at epoch: at once while it is served there, after the thaw
// while a planned move has frozen it, never once it is no longer served
// here at that epoch (*ShardGoneError: the device redoes the write on
// the new owner) or when ctx ends. Every admitted write is followed by
// Release once it has been submitted to the store.
func (n *Node) Admit(ctx context.Context, s Shard, epoch int64) error {
	return n.lc.admit(ctx, s, epoch)
}

// Release ends a write that Admit admitted.
func (n *Node) Release(s Shard) { n.lc.release(s) }

// ShardStatus is one shard's lifecycle on this node.
type ShardStatus struct {
	Phase Phase
	Epoch int64  // serving, frozen, fenced
	Move  string // frozen, receiving
	To    string // frozen: the recipient
}

// Status returns s's lifecycle state on this node.
func (n *Node) Status(s Shard) ShardStatus {
	st := n.lc.state(s)
	return ShardStatus{Phase: st.phase, Epoch: st.epoch, Move: st.move, To: st.moveTo}
}

// Owns reports whether this node owns s and the epoch it owns it at, even
// while acks are fenced (a frozen shard, an expiring lease, an epoch the
// store refused).
func (n *Node) Owns(s Shard) (epoch int64, ok bool) {
	st := n.lc.state(s)
	switch st.phase {
	case PhaseServing, PhaseFrozen, PhaseFenced:
		return st.epoch, true
	}
	return 0, false
}

// StoreFenced tells the node that its store refused epoch for s (another
// node claimed it in the database): s is no longer served here at that
// epoch, until etcd shows what happened.
func (n *Node) StoreFenced(s Shard, epoch int64) {
	n.carryOut([]shardEffects{{shard: s, effs: n.lc.apply(s, lifecycleEvent{kind: evStoreFenced, epoch: epoch})}})
}

// Incoming reports whether a planned move is giving s to this node right
// now: the donor drains or exports it, or Receive is importing it or
// flipping ownership. The donor closes the shard's devices as soon as it
// sees the flip, which can be before this node has recorded it; a device
// reconnecting here meanwhile must wait for the flip, not be forwarded to
// the donor, which no longer serves it by the time the forward arrives.
func (n *Node) Incoming(s Shard) bool {
	if n.lc.state(s).phase == PhaseReceiving {
		return true
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	m := n.view.moves[s]
	return m != nil && m.To == n.cfg.NodeID && (m.State == StateDraining || m.State == StateExported)
}

// Moving reports whether a planned move of s is in flight as this node
// sees the shard map (draining or exported): its owner is about to change.
func (n *Node) Moving(s Shard) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	m := n.view.moves[s]
	return m != nil && !m.finished()
}

// Owner returns where s is served, from the watched shard map (no etcd
// call). ok is false while no node serves it.
func (n *Node) Owner(s Shard) (node, addr string, epoch int64, ok bool) {
	r := n.route[s].Load()
	if r == nil {
		return "", "", 0, false
	}
	return r.Node, r.Addr, r.Epoch, true
}

// Fence returns the node's fence clock.
func (n *Node) Fence() FenceStatus { return n.fence.status() }

// Members returns the live nodes, sorted by id.
func (n *Node) Members() []Member {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make([]Member, 0, len(n.view.nodes))
	for _, e := range n.view.nodes {
		m := e.Member
		m.Draining = n.view.draining[m.ID]
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Member returns the live node id, if it is one (no etcd call).
func (n *Node) Member(id string) (Member, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	e, ok := n.view.nodes[id]
	return e.Member, ok
}

// ShardInfo is one row of the shard map.
type ShardInfo struct {
	Shard    Shard
	Assigned string    // node holding the shard's data ("" if never assigned)
	Owner    string    // node serving it now ("" if none: its node is down)
	Addr     string    // the owner's advertise address
	Epoch    int64     // ModRevision of the owner key
	Move     MoveState // StateServing, or the state of the move in progress
	MoveTo   string
	// MoveStarted is when the move record was created (zero without one).
	MoveStarted time.Time
}

// Shards returns the shard map as this node sees it.
func (n *Node) Shards() []ShardInfo {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.view.shardInfos()
}

func (v *view) shardInfos() []ShardInfo {
	out := make([]ShardInfo, NumShards)
	for i := range NumShards {
		si := ShardInfo{Shard: Shard(i), Move: StateServing}
		if a := v.assign[i]; a != nil {
			si.Assigned = a.Node
		}
		if o := v.owner[i]; o != nil {
			si.Owner, si.Addr, si.Epoch = o.Node, o.Advertise, o.epoch
		}
		if m := v.moves[i]; m != nil {
			si.Move, si.MoveTo, si.MoveStarted = m.State, m.To, m.Started
		}
		out[i] = si
	}
	return out
}

// Revision is the etcd revision this node's view of the cluster reflects.
func (n *Node) Revision() int64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.view.rev
}

// ControllerRevision is, on the elected controller, the revision of the
// view it last finished reconciling; 0 on other nodes.
func (n *Node) ControllerRevision() int64 { return n.controllerRev.Load() }

// Close stops the node as for a restart: acks stop at once, the loops
// end, and the lease is revoked so its owner keys go now instead of after
// the TTL. Its shards stay assigned to it (they wait for it with
// AutoFailover off). No events are delivered after Close. If ctx ends
// first (etcd without quorum: the election library's resign waits on
// the client's context), Close returns its error; the remaining
// goroutines end when the client is closed.
func (n *Node) Close(ctx context.Context) error {
	n.cancel() // first, so that no rejoin starts a new lease
	lease := n.fence.currentLease()
	n.fence.leaseLost(lease)
	// Every shard stops being served before the events stop: writes
	// waiting for a frozen shard end now.
	n.loseLease(lease)
	n.events.stop()
	done := make(chan struct{})
	go func() {
		n.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		return fmt.Errorf("cluster: close: %w", ctx.Err())
	}
	// The loops have ended: no lease is granted after this read.
	lease = clientv3.LeaseID(n.lastLease.Load())
	if lease == 0 {
		return nil
	}
	if _, err := n.cli.Revoke(ctx, lease); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("cluster: revoke lease: %w", err)
	}
	return nil
}

// Leave moves every shard of this node to the other nodes (DrainNode,
// which leaves the node marked draining), then closes it.
func (n *Node) Leave(ctx context.Context) error {
	res, err := n.DrainNode(ctx, n.cfg.NodeID, RebalanceOptions{})
	if err != nil && !(errors.Is(err, ErrNoOtherNode) && len(res.Moves) == 0 && n.ownsNone()) {
		return err
	}
	// Let the watch loop act on the last flip, so that every ShardLost
	// is delivered before Close.
	var last int64
	for _, r := range res.Moves {
		last = max(last, r.ToEpoch)
	}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for n.processedRev.Load() < last {
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: leave: %w", ctx.Err())
		case <-tick.C:
		}
	}
	return n.Close(ctx)
}

func (n *Node) ownsNone() bool {
	for i := range NumShards {
		if _, ok := n.Owns(Shard(i)); ok {
			return false
		}
	}
	return true
}

// eventQueue delivers events to OnEvents in order on one goroutine, so
// that the loops that produce them never wait for the mediator.
type eventQueue struct {
	fn     func([]Event)
	mu     sync.Mutex
	queue  []Event
	wake   chan struct{}
	done   chan struct{}
	closed bool
}

func newEventQueue(fn func([]Event)) *eventQueue {
	return &eventQueue{fn: fn, wake: make(chan struct{}, 1), done: make(chan struct{})}
}

func (q *eventQueue) push(evs ...Event) {
	if len(evs) == 0 || q.fn == nil {
		return
	}
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	q.queue = append(q.queue, evs...)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *eventQueue) stop() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.closed {
		q.closed = true
		close(q.done)
	}
}

// run delivers events until stop; what was queued before stop is still
// delivered.
func (q *eventQueue) run() {
	for {
		stopped := false
		select {
		case <-q.done:
			stopped = true
		case <-q.wake:
		}
		q.mu.Lock()
		batch := q.queue
		q.queue = nil
		q.mu.Unlock()
		if len(batch) > 0 {
			q.fn(batch)
		}
		if stopped {
			return
		}
	}
}
