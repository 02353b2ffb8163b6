package cluster

import (
	"context"
	"errors"
	"sort"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// controllerLoop campaigns for the controller role (one per cluster,
// concurrency.Election under <prefix>controller) and leads while elected.
// The election has its own session lease: losing the controller role
// must not cost the node its shards, nor the reverse.
func (n *Node) controllerLoop() {
	ttl := int(n.cfg.LeaseTTL / time.Second)
	for n.ctx.Err() == nil {
		sess, err := concurrency.NewSession(n.cli, concurrency.WithTTL(ttl), concurrency.WithContext(n.ctx))
		if err != nil {
			select {
			case <-n.ctx.Done():
			case <-time.After(n.cfg.LeaseTTL / 5):
			}
			continue
		}
		el := concurrency.NewElection(sess, n.k.electionPrefix())
		cctx, cancel := context.WithCancel(n.ctx)
		go func() {
			select {
			case <-sess.Done():
			case <-cctx.Done():
			}
			cancel()
		}()
		if err := el.Campaign(cctx, n.cfg.NodeID); err == nil {
			n.log.Info().Str("node", n.cfg.NodeID).Msg("cluster: elected controller")
			n.lead(cctx, el)
			rctx, rcancel := context.WithTimeout(context.Background(), n.cfg.LeaseTTL)
			_ = el.Resign(rctx)
			rcancel()
		}
		cancel()
		n.controllerRev.Store(0)
		_ = sess.Close()
	}
}

// ctrlState is what the controller remembers between passes of one term.
type ctrlState struct {
	live      string    // sorted ids of the live nodes at the last pass
	liveSince time.Time // when that set was first seen
	// movedAt is the revision of the last move this controller started:
	// it plans again only from a view that shows it (else a pass woken by
	// the timer would plan the same moves again).
	movedAt int64
}

// lead runs reconciliation passes while this node is the controller:
// after every change of the view, and every TTL. It ends when ctx ends or
// its election key goes (deleted, or its session's lease expired): every
// write compares that key, so a controller that lost it writes nothing
// and must campaign again rather than fail forever.
func (n *Node) lead(ctx context.Context, el *concurrency.Election) {
	leader := clientv3.Compare(clientv3.CreateRevision(el.Key()), "=", el.Rev())
	st := &ctrlState{}
	timer := time.NewTimer(0)
	defer timer.Stop()
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	gone := n.cli.Watch(wctx, el.Key(), clientv3.WithRev(el.Rev()+1))
	for {
		select {
		case <-ctx.Done():
			return
		case resp, ok := <-gone:
			if !ok || resp.Canceled {
				return
			}
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypeDelete {
					n.log.Warn().Str("node", n.cfg.NodeID).Msg("cluster: controller's election key is gone; campaigning again")
					return
				}
			}
			continue
		case <-n.ctrlKick:
		case <-timer.C:
		}
		next := n.reconcileCluster(ctx, leader, st)
		if next <= 0 {
			next = n.cfg.LeaseTTL
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(next)
	}
}

type plannedWrite struct {
	cmps []clientv3.Cmp
	op   clientv3.Op
}

// reconcileCluster is one controller pass over a copy of the view:
//   - a shard never assigned goes to the least loaded live node;
//   - a shard whose assigned node is not live and that has no owner goes
//     to the least loaded live node only with AutoFailover;
//   - finished moves are deleted, moves that can no longer finish are
//     aborted;
//   - with AutoRebalance, moves even out the load.
//
// Every write compares the revisions it was decided on and that this node
// still holds the election key, so a stale controller writes nothing.
// Assignments wait until the live set has been stable for SettleDelay.
// It returns when it wants to run again (0: on the next change).
func (n *Node) reconcileCluster(ctx context.Context, leader clientv3.Cmp, st *ctrlState) time.Duration {
	n.mu.Lock()
	v := n.view.snapshot()
	live := make(map[string]bool, len(n.view.nodes))
	ids := make([]string, 0, len(n.view.nodes))
	for id := range n.view.nodes {
		live[id] = true
		ids = append(ids, id)
	}
	load := n.view.targets()
	n.mu.Unlock()

	sort.Strings(ids)
	if key := strings.Join(ids, ","); key != st.live || st.liveSince.IsZero() {
		st.live, st.liveSince = key, time.Now()
	}
	wait := n.cfg.SettleDelay - time.Since(st.liveSince)
	settled := wait <= 0 && len(ids) > 0

	var writes []plannedWrite
	var cleanups []plannedWrite
	for i := range NumShards {
		s := Shard(i)
		if rev := v.badMoves[s]; rev != 0 {
			n.log.Error().Str("shard", s.String()).Int64("revision", rev).
				Msg("cluster: controller deletes an unreadable move record (it would block every move and claim of the shard)")
			cleanups = append(cleanups, plannedWrite{
				cmps: []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(n.k.move(s)), "=", rev)},
				op:   clientv3.OpDelete(n.k.move(s)),
			})
			continue
		}
		if m := v.moves[s]; m != nil {
			switch o := v.owner[s]; {
			case m.finished():
				cleanups = append(cleanups, plannedWrite{
					cmps: []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(n.k.move(s)), "=", m.rev)},
					op:   clientv3.OpDelete(n.k.move(s)),
				})
			case o == nil || o.epoch != m.FromEpoch || !live[m.From]:
				rec := m.moveRecord
				rec.State, rec.Reason = StateAborted, "the donor no longer serves the shard at the move's epoch"
				cleanups = append(cleanups, plannedWrite{
					cmps: []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(n.k.move(s)), "=", m.rev)},
					op:   clientv3.OpPut(n.k.move(s), mustJSON(rec)),
				})
			}
			continue
		}
		a := v.assign[s]
		failover := a != nil && !live[a.Node] && v.owner[s] == nil && n.cfg.AutoFailover && len(ids) > 0
		if !settled && !failover {
			// A failover does not wait for the live set to settle: the
			// shard's devices are waiting, and the data is in the
			// replicated store.
			continue
		}
		switch {
		case a == nil:
			to, _ := leastLoaded(load, "")
			load[to]++
			writes = append(writes, plannedWrite{
				cmps: []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(n.k.assign(s)), "=", 0)},
				op:   clientv3.OpPut(n.k.assign(s), mustJSON(assignRecord{Node: to, By: "controller"})),
			})
		case failover:
			to, _ := leastLoaded(load, "")
			load[to]++
			writes = append(writes, plannedWrite{
				cmps: []clientv3.Cmp{
					clientv3.Compare(clientv3.ModRevision(n.k.assign(s)), "=", a.rev),
					clientv3.Compare(clientv3.CreateRevision(n.k.owner(s)), "=", 0),
					clientv3.Compare(clientv3.CreateRevision(n.k.move(s)), "=", 0),
				},
				op: clientv3.OpPut(n.k.assign(s), mustJSON(assignRecord{Node: to, By: "failover"})),
			})
		}
	}
	ok := n.applyWrites(ctx, leader, cleanups, 1)
	ok = n.applyWrites(ctx, leader, writes, claimBatch) && ok
	if !settled {
		return max(wait, time.Millisecond)
	}
	if n.cfg.AutoRebalance && v.rev >= st.movedAt {
		// Start a budget's worth of moves and let the cluster carry
		// them: the next passes (each move's states wake the watch) see
		// them in flight, and a new controller finds them there too.
		for _, pm := range v.planRebalance(n.cfg.MaxConcurrentMoves - v.movesInFlight()) {
			sctx, cancel := context.WithTimeout(ctx, n.cfg.LeaseTTL)
			info, rev, err := n.StartMove(sctx, pm.Shard, pm.To)
			cancel()
			if errors.Is(err, ErrMoveInProgress) || errors.Is(err, ErrAlreadyOwner) {
				continue // someone else's move, not yet in this view
			}
			if err != nil {
				n.log.Warn().Err(err).Str("shard", pm.Shard.String()).Str("to", pm.To).Msg("cluster: controller could not start a planned move")
				continue
			}
			st.movedAt = max(st.movedAt, rev)
			n.log.Info().Str("shard", pm.Shard.String()).Str("from", pm.From).Str("to", pm.To).Str("reason", pm.Reason).Str("move", info.ID).
				Msg("cluster: controller started a planned move")
			n.watchPlanned(pm, info)
		}
	}
	if ok {
		n.controllerRev.Store(v.rev)
	}
	return 0
}

// applyWrites commits writes in transactions of up to batch, each guarded
// by leader; a failed batch is retried write by write. It reports whether
// every write went through.
func (n *Node) applyWrites(ctx context.Context, leader clientv3.Cmp, writes []plannedWrite, batch int) bool {
	all := true
	try := func(ws []plannedWrite) bool {
		cmps := []clientv3.Cmp{leader}
		ops := make([]clientv3.Op, 0, len(ws))
		for _, w := range ws {
			cmps = append(cmps, w.cmps...)
			ops = append(ops, w.op)
		}
		tctx, cancel := context.WithTimeout(ctx, n.cfg.LeaseTTL)
		resp, err := n.cli.Txn(tctx).If(cmps...).Then(ops...).Commit()
		cancel()
		if err != nil {
			n.log.Warn().Err(err).Msg("cluster: controller write")
			return false
		}
		return resp.Succeeded
	}
	for len(writes) > 0 {
		b := writes[:min(batch, len(writes))]
		writes = writes[len(b):]
		if try(b) {
			continue
		}
		if len(b) == 1 {
			all = false
			continue
		}
		for i := range b {
			if !try(b[i : i+1]) {
				all = false
			}
		}
	}
	return all
}

// watchPlanned follows a move the controller started, on a goroutine of
// the node, to report its end (log, OnPlannedMove). It stops waiting when
// the node closes, never aborting the move.
func (n *Node) watchPlanned(pm PlannedMove, info MoveInfo) {
	n.spawn(func() {
		ctx, cancel := context.WithTimeout(n.ctx, n.cfg.MoveTimeout+n.cfg.LeaseTTL)
		defer cancel()
		r, err := n.WaitMove(ctx, info, 0)
		if n.ctx.Err() == nil {
			n.notePlanned(pm, r, err)
		}
	})
}
