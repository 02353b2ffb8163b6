package cluster

import (
	"context"
	"errors"
	"fmt"
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

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine the node starts

	kick     chan struct{} // wakes the watch loop (after a rejoin)
	ctrlKick chan struct{} // wakes the controller

	mu        sync.Mutex // guards view, donating, receiving, joined; lock order: mu → fence.mu
	view      view
	donating  map[Shard]donation // moves this node is giving a shard away in
	receiving map[Shard]int      // Receive calls running, per shard
	joined    bool

	controllerRev atomic.Int64 // revision of the view the controller last reconciled (0: not leading)
	processedRev  atomic.Int64 // revision the watch loop has fully acted on (events queued)
	lastLease     atomic.Int64 // the last lease granted, revoked by Close
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
		fence:     f,
		keep:      keeper{lease: cli.Lease, fence: f, ttl: cfg.LeaseTTL, observe: cfg.OnKeepAlive},
		ctx:       ctx,
		cancel:    cancel,
		kick:      make(chan struct{}, 1),
		ctrlKick:  make(chan struct{}, 1),
		view:      newView(),
		donating:  make(map[Shard]donation),
		receiving: make(map[Shard]int),
	}
	n.events = newEventQueue(cfg.OnEvent)
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

	lease, err := n.register(ctx)
	if err != nil {
		return err
	}
	rev, err := n.resync(ctx)
	if err != nil {
		_, _ = n.cli.Revoke(context.WithoutCancel(ctx), lease)
		return err
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

// register grants a lease and writes nodes/<id> with it.
func (n *Node) register(ctx context.Context) (clientv3.LeaseID, error) {
	lease, err := n.keep.grant(ctx)
	if err != nil {
		return 0, fmt.Errorf("cluster: grant lease: %w", err)
	}
	n.lastLease.Store(int64(lease))
	key := n.k.node(n.cfg.NodeID)
	val := mustJSON(nodeRecord{Advertise: n.cfg.Advertise, Started: time.Now().UTC()})
	for {
		resp, err := n.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, val, clientv3.WithLease(lease))).
			Else(clientv3.OpGet(key)).Commit()
		if err != nil {
			return 0, fmt.Errorf("cluster: register node %s: %w", n.cfg.NodeID, err)
		}
		if resp.Succeeded {
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
		n.events.push(n.fence.leaseLost(lease)...)
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

// watchLoop keeps the view current and acts on every change.
func (n *Node) watchLoop(rev int64) {
	for n.ctx.Err() == nil {
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
		for n.ctx.Err() == nil {
			r, err := n.resync(n.ctx)
			if err == nil {
				rev = r
				n.reconcileLocal()
				n.processedRev.Store(rev)
				n.kickController()
				break
			}
			select {
			case <-n.ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
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
}

// reconcileLocal compares the view with what this node holds and acts:
// releases shards it no longer owns, claims shards assigned to it that
// have no owner, starts the donor side of moves, updates the routes.
func (n *Node) reconcileLocal() {
	me := n.cfg.NodeID
	var (
		events  []Event
		claims  []claimReq
		donate  []donationStart
		stale   []moveEntry
		resumed []Shard
	)
	n.mu.Lock()
	v := &n.view
	lease := n.fence.currentLease()
	for i := range NumShards {
		s := Shard(i)
		o := v.owner[s]
		n.setRoute(s, o)
		epoch, paused, owned := n.fence.ownedAt(s)
		switch {
		case owned && v.rev >= epoch && (o == nil || o.Node != me || o.epoch != epoch):
			reason := "owner key deleted"
			if o != nil {
				reason = "now owned by " + o.Node
			}
			n.fence.release(s)
			owned = false
			events = append(events, Event{Kind: ShardLost, Shard: s, Epoch: epoch, Reason: reason})
		case !owned && o != nil && o.Node == me && lease != 0 && o.lease == lease:
			// Ours under the current lease but not yet recorded (a flip
			// this node made, seen by the watch first).
			if n.fence.claim(s, lease, o.epoch) {
				owned, epoch = true, o.epoch
				events = append(events, Event{Kind: ShardGained, Shard: s, Epoch: o.epoch})
			}
		}
		m := v.moves[s]
		d, donating := n.donating[s]
		if donating && (m == nil || m.ID != d.id || m.State == StateAborted) {
			// Aborted by someone else (the caller gave up, the
			// controller): stop the donor's work.
			d.cancel()
		}
		if owned && paused && !donating && (m == nil || m.State == StateAborted || m.From != me) {
			// The move that paused it ended without a flip.
			if n.fence.resume(s, epoch) {
				resumed = append(resumed, s)
			}
		}
		if a := v.assign[s]; !owned && o == nil && a != nil && a.Node == me && m == nil && lease != 0 {
			claims = append(claims, claimReq{shard: s, assignRev: a.rev})
		}
		if m != nil && m.From == me && m.State == StateDraining && !donating {
			if owned && epoch == m.FromEpoch && n.fence.pause(s, epoch) {
				ctx, cancel := context.WithTimeout(n.ctx, n.cfg.MoveTimeout)
				n.donating[s] = donation{id: m.ID, cancel: cancel}
				donate = append(donate, donationStart{m: *m, ctx: ctx, cancel: cancel})
			} else if v.rev >= m.FromEpoch {
				stale = append(stale, *m)
			}
		}
	}
	n.mu.Unlock()

	n.events.push(events...)
	for _, d := range donate {
		n.spawn(func() { n.donate(d.ctx, d.cancel, d.m) })
	}
	for _, m := range stale {
		n.abortMove(n.ctx, m, "donor does not own the shard at the move's epoch")
	}
	if n.cfg.Hooks != nil {
		for _, s := range resumed {
			n.cfg.Hooks.Resume(s)
		}
	}
	if len(claims) > 0 {
		n.claim(lease, claims)
	}
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
func (n *Node) claim(lease clientv3.LeaseID, claims []claimReq) {
	val := mustJSON(ownerRecord{Node: n.cfg.NodeID, Advertise: n.cfg.Advertise})
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
			n.log.Warn().Err(err).Msg("cluster: claim shards")
			return true // nothing to retry shard by shard; the watch or rejoin comes back
		}
		if !resp.Succeeded {
			return false
		}
		var events []Event
		for _, c := range batch {
			if n.fence.claim(c.shard, lease, resp.Header.Revision) {
				events = append(events, Event{Kind: ShardGained, Shard: c.shard, Epoch: resp.Header.Revision})
			}
		}
		n.events.push(events...)
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

// MayAck reports whether this node may still send a ReflectAck for a
// reflection of shard s: it owns s, no move drains it, and the fence
// clock (last keepalive send + TTL − margin) has not passed. Lock-free,
// no etcd call: this is the only thing the reflect path asks.
func (n *Node) MayAck(s Shard) bool { return n.fence.mayAck(s) }

// Draining reports whether a planned move has paused this node's acks for
// s (it still owns s; the move's flip or abort ends the pause).
func (n *Node) Draining(s Shard) bool {
	_, paused, ok := n.fence.ownedAt(s)
	return ok && paused
}

// Incoming reports whether a planned move is giving s to this node right
// now: the donor drains or exports it, or Receive is importing it or
// flipping ownership. The donor closes the shard's devices as soon as it
// sees the flip, which can be before this node has recorded it; a device
// reconnecting here meanwhile must wait for the flip, not be forwarded to
// the donor, which no longer serves it by the time the forward arrives.
func (n *Node) Incoming(s Shard) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.receiving[s] > 0 {
		return true
	}
	m := n.view.moves[s]
	return m != nil && m.To == n.cfg.NodeID && (m.State == StateDraining || m.State == StateExported)
}

// Owns reports whether this node owns s and the epoch it owns it at, even
// while acks are fenced (a draining move, an expiring lease).
func (n *Node) Owns(s Shard) (epoch int64, ok bool) {
	epoch, _, ok = n.fence.ownedAt(s)
	return epoch, ok
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
		out = append(out, e.Member)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
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
	n.fence.leaseLost(n.fence.currentLease())
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
	lease := clientv3.LeaseID(n.lastLease.Load())
	if lease == 0 {
		return nil
	}
	if _, err := n.cli.Revoke(ctx, lease); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("cluster: revoke lease: %w", err)
	}
	return nil
}

// Leave moves every shard of this node to the other nodes (DrainNode),
// then closes it.
func (n *Node) Leave(ctx context.Context) error {
	res, err := n.DrainNode(ctx, n.cfg.NodeID)
	if err != nil {
		return err
	}
	// Let the watch loop act on the last flip, so that every ShardLost
	// is delivered before Close.
	var last int64
	for _, r := range res {
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

// eventQueue delivers events to OnEvent in order on one goroutine, so
// that the loops that produce them never wait for the mediator.
type eventQueue struct {
	fn     func(Event)
	mu     sync.Mutex
	queue  []Event
	wake   chan struct{}
	done   chan struct{}
	closed bool
}

func newEventQueue(fn func(Event)) *eventQueue {
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
		for _, ev := range batch {
			q.fn(ev)
		}
		if stopped {
			return
		}
	}
}
