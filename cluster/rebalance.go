package cluster

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Rebalancing: one plan function, several executors. planRebalance looks
// at the shard map and returns the moves that bring it toward balance:
// shards of draining nodes go to the others, and every other live node
// ends within one shard of the rest. It is incremental and sticky like
// Kafka's cooperative sticky assignor: only the excess moves, a shard
// with a move in flight is never planned again, and a plan never has more
// moves than its budget (so a node joining or leaving costs a bounded
// number of concurrent moves, not a reshuffle). A node that joins and a
// node that is drained are the same case: the plan's targets change.
//
// Executors: the controller with AutoRebalance starts a budget's worth of
// moves at every pass and lets the cluster carry them (a new controller
// finds them in flight and waits); DrainNode and Rebalance run plans to
// completion on the node asked, under the node's context.

// PlannedMove is one move of a rebalance plan.
type PlannedMove struct {
	Shard  Shard
	From   string
	To     string
	Reason string // why: "drain <node>", "balance: <from> has N, <to> has M"
}

// draining nodes take no shards and give theirs away.
func (v *view) targets() map[string]int {
	load := v.load()
	for id := range v.draining {
		delete(load, id)
	}
	return load
}

// planRebalance returns at most budget moves (budget < 0: no limit), in a
// deterministic order: first every shard of a draining node, then moves
// from the most to the least loaded node until they are within one.
// Only served shards without a move record move.
func (v *view) planRebalance(budget int) []PlannedMove {
	if budget == 0 {
		return nil
	}
	load := v.targets()
	if len(load) == 0 {
		return nil
	}
	movable := make(map[string][]Shard) // served, no move record, by owner; highest shard first out
	for i := range NumShards {
		if o, a := v.owner[i], v.assign[i]; o != nil && v.moves[i] == nil && v.badMoves[i] == 0 && a != nil && a.Node == o.Node {
			movable[o.Node] = append(movable[o.Node], Shard(i))
		}
	}
	var plan []PlannedMove
	add := func(s Shard, from, to, reason string) bool {
		plan = append(plan, PlannedMove{Shard: s, From: from, To: to, Reason: reason})
		load[to]++
		if _, ok := load[from]; ok {
			load[from]--
		}
		return budget > 0 && len(plan) >= budget
	}
	drainers := make([]string, 0, len(v.draining))
	for id := range v.draining {
		drainers = append(drainers, id)
	}
	sort.Strings(drainers)
	for _, id := range drainers {
		for _, s := range movable[id] {
			to, _ := leastLoaded(load, "")
			if add(s, id, to, "drain "+id) {
				return plan
			}
		}
		delete(movable, id)
	}
	for {
		ids := make([]string, 0, len(load))
		for id := range load {
			ids = append(ids, id)
		}
		slices.SortFunc(ids, func(a, b string) int {
			return cmp.Or(cmp.Compare(load[b], load[a]), cmp.Compare(a, b))
		})
		hi, lo := ids[0], ids[len(ids)-1]
		if load[hi]-load[lo] <= 1 || len(movable[hi]) == 0 {
			return plan
		}
		s := movable[hi][len(movable[hi])-1]
		movable[hi] = movable[hi][:len(movable[hi])-1]
		if add(s, hi, lo, fmt.Sprintf("balance: %s has %d, %s has %d", hi, load[hi], lo, load[lo])) {
			return plan
		}
	}
}

// movesInFlight counts unfinished move records.
func (v *view) movesInFlight() int {
	n := 0
	for _, m := range v.moves {
		if m != nil && !m.finished() {
			n++
		}
	}
	return n
}

// RebalanceOptions tune a Rebalance or DrainNode run.
type RebalanceOptions struct {
	// DryRun only plans: the whole plan is returned, nothing moves.
	DryRun bool
	// MaxParallel bounds the moves in flight (MaxConcurrentMoves if 0).
	MaxParallel int
}

// RebalanceResult is what a Rebalance or DrainNode run did (or, dry, would
// do).
type RebalanceResult struct {
	Plan  []PlannedMove // every move planned, in order
	Moves []MoveResult  // the moves made, by shard
}

// Rebalance runs rebalance plans until the map is balanced (or, with
// DryRun, returns the plan). It runs on the node's context: a caller whose
// ctx ends gets ErrMoveRunning while the rebalance goes on.
func (n *Node) Rebalance(ctx context.Context, opt RebalanceOptions) (RebalanceResult, error) {
	if opt.DryRun {
		n.mu.Lock()
		defer n.mu.Unlock()
		return RebalanceResult{Plan: n.view.planRebalance(-1)}, nil
	}
	return n.inBackground(ctx, "rebalance", func(ctx context.Context) (RebalanceResult, error) {
		return n.runPlans(ctx, opt, func(PlannedMove) bool { return true })
	})
}

// DrainNode marks node draining (it takes no shards; the controller and
// every plan move its shards away) and moves every shard it serves to the
// other live nodes, at most MaxParallel at a time, until it serves none.
// Shards assigned to it that it does not serve (it is down) cannot be
// moved and are reported. It runs on the node's context: a caller whose
// ctx ends gets ErrMoveRunning while the drain goes on. The mark stays
// until Undrain.
func (n *Node) DrainNode(ctx context.Context, node string, opt RebalanceOptions) (RebalanceResult, error) {
	if !ValidNodeID(node) {
		return RebalanceResult{}, fmt.Errorf("cluster: drain %s: %w (invalid node id)", node, ErrNodeNotLive)
	}
	if opt.DryRun {
		n.mu.Lock()
		v := n.view.snapshot()
		n.mu.Unlock()
		v.draining[node] = true
		var plan []PlannedMove
		for _, pm := range v.planRebalance(-1) {
			if pm.From == node {
				plan = append(plan, pm)
			}
		}
		return RebalanceResult{Plan: plan}, nil
	}
	if err := n.setDraining(ctx, node, true); err != nil {
		return RebalanceResult{}, err
	}
	return n.inBackground(ctx, "drain "+node, func(ctx context.Context) (RebalanceResult, error) {
		res, err := n.runPlans(ctx, opt, func(pm PlannedMove) bool { return pm.From == node })
		n.mu.Lock()
		var unserved []string
		others := 0
		for i := range NumShards {
			a, o := n.view.assign[i], n.view.owner[i]
			switch {
			case a != nil && a.Node == node && o == nil:
				unserved = append(unserved, Shard(i).String())
			case o != nil && o.Node != node:
				others++
			}
		}
		n.mu.Unlock()
		if len(unserved) > 0 {
			err = errors.Join(err, fmt.Errorf("cluster: drain %s: shards %v are assigned to it but not served: %w", node, unserved, ErrShardUnavailable))
		}
		if len(res.Plan) == 0 && others == 0 && err == nil {
			err = fmt.Errorf("cluster: drain %s: %w", node, ErrNoOtherNode)
		}
		return res, err
	})
}

// Undrain clears node's drain mark: it takes shards again (by rebalancing).
func (n *Node) Undrain(ctx context.Context, node string) error {
	return n.setDraining(ctx, node, false)
}

func (n *Node) setDraining(ctx context.Context, node string, on bool) error {
	var err error
	if on {
		_, err = n.cli.Put(ctx, n.k.drain(node), mustJSON(drainRecord{Since: time.Now().UTC()}))
	} else {
		_, err = n.cli.Delete(ctx, n.k.drain(node))
	}
	if err != nil {
		return fmt.Errorf("cluster: mark %s draining=%v: %w", node, on, err)
	}
	n.log.Info().Str("node", node).Bool("draining", on).Msg("cluster: drain mark set")
	return nil
}

// runPlans plans and moves (only moves keep accepts) until a plan is empty
// or a pass made no progress; each pass waits for its moves.
func (n *Node) runPlans(ctx context.Context, opt RebalanceOptions, keep func(PlannedMove) bool) (RebalanceResult, error) {
	parallel := cmp.Or(opt.MaxParallel, n.cfg.MaxConcurrentMoves)
	var res RebalanceResult
	var failed error // the last pass's failures; a later pass may make them good
	failures := 0    // passes with failures
	deadline := time.Now().Add(n.cfg.MoveTimeout)
	for ctx.Err() == nil {
		if err := n.waitProcessed(ctx); err != nil {
			failed = err
			failures++
			if failures >= 3 {
				break
			}
			continue
		}
		n.mu.Lock()
		var plan []PlannedMove
		for _, pm := range n.view.planRebalance(-1) {
			if keep(pm) {
				plan = append(plan, pm)
			}
		}
		others := 0 // moves in flight that this run would otherwise make
		for _, m := range n.view.moves {
			if m != nil && !m.finished() && keep(PlannedMove{Shard: m.shard, From: m.From, To: m.To}) {
				others++
			}
		}
		n.mu.Unlock()
		if len(plan) == 0 {
			if others == 0 {
				failed = nil // done: what failed on the way was made good
				break
			}
			if time.Now().After(deadline) {
				failed = errors.Join(failed, fmt.Errorf("%d moves of other executors still in flight after %v", others, n.cfg.MoveTimeout))
				break
			}
			// Someone else's moves (the controller's) are carrying the
			// shards: wait for them to end, then plan again.
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		if failures >= 3 {
			break // moves keep failing: report rather than loop
		}
		res.Plan = append(res.Plan, plan...)
		moved, err := n.runMoves(ctx, plan, parallel)
		res.Moves = append(res.Moves, moved...)
		if err != nil {
			n.log.Warn().Err(err).Msg("cluster: some planned moves failed; planning again")
			failed = err
			failures++
		}
	}
	sort.Slice(res.Moves, func(i, j int) bool { return res.Moves[i].Shard < res.Moves[j].Shard })
	if err := ctx.Err(); err != nil {
		failed = errors.Join(failed, err)
	}
	return res, failed
}

// waitProcessed waits until the watch loop has acted on everything etcd
// had when it is called, so a plan starts from a current map.
func (n *Node) waitProcessed(ctx context.Context) error {
	var resp *clientv3.GetResponse
	err := retryTransient(ctx, func() error {
		rctx, cancel := context.WithTimeout(ctx, n.cfg.LeaseTTL)
		defer cancel()
		var err error
		resp, err = n.cli.Get(rctx, n.k.nodes(), clientv3.WithPrefix(), clientv3.WithCountOnly())
		return err
	})
	if err != nil {
		return fmt.Errorf("cluster: read the shard map's revision: %w", err)
	}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for n.processedRev.Load() < resp.Header.Revision {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
	return nil
}

// runMoves makes the planned moves, parallel at a time, each logged when
// planned and when finished.
func (n *Node) runMoves(ctx context.Context, plan []PlannedMove, parallel int) ([]MoveResult, error) {
	var (
		mu   sync.Mutex
		res  []MoveResult
		errs []error
		wg   sync.WaitGroup
		sem  = make(chan struct{}, max(parallel, 1))
	)
	for _, p := range plan {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
			wg.Wait()
			return res, errors.Join(append(errs, ctx.Err())...)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			n.log.Info().Str("shard", p.Shard.String()).Str("from", p.From).Str("to", p.To).Str("reason", p.Reason).Msg("cluster: move planned")
			r, err := n.Move(ctx, p.Shard, p.To)
			if errors.Is(err, ErrMoveInProgress) || errors.Is(err, ErrAlreadyOwner) {
				// Another executor (the controller's auto-rebalance, a
				// second drain) got there first: not a failure; the next
				// pass plans from what it did.
				n.log.Debug().Err(err).Str("shard", p.Shard.String()).Msg("cluster: planned move made by someone else")
				return
			}
			n.notePlanned(p, r, err)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			res = append(res, r)
		}()
	}
	wg.Wait()
	return res, errors.Join(errs...)
}

// notePlanned logs a planned move's end and tells OnPlannedMove.
func (n *Node) notePlanned(p PlannedMove, r MoveResult, err error) {
	if err != nil {
		n.log.Warn().Err(err).Str("shard", p.Shard.String()).Str("from", p.From).Str("to", p.To).Msg("cluster: planned move failed")
	} else {
		n.log.Info().Str("shard", p.Shard.String()).Str("from", p.From).Str("to", p.To).Dur("took", r.Took).Msg("cluster: planned move finished")
	}
	if n.cfg.OnPlannedMove != nil {
		n.cfg.OnPlannedMove(p, err)
	}
}

// inBackground runs fn on the node's context in a goroutine the node
// counts, and returns its result, or ErrMoveRunning once ctx ends first
// (fn goes on).
func (n *Node) inBackground(ctx context.Context, what string, fn func(context.Context) (RebalanceResult, error)) (RebalanceResult, error) {
	type out struct {
		res RebalanceResult
		err error
	}
	ch := make(chan out, 1)
	n.spawn(func() {
		res, err := fn(n.ctx)
		ch <- out{res, err}
	})
	select {
	case o := <-ch:
		return o.res, o.err
	case <-ctx.Done():
		return RebalanceResult{}, fmt.Errorf("cluster: %s: %w", what, ErrMoveRunning)
	}
}
