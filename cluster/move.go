package cluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Errors of the placement operations; wrapped with the shard and nodes.
var (
	ErrMoveInProgress   = errors.New("a move of this shard is already in progress")
	ErrNodeNotLive      = errors.New("node is not live (unknown, or its lease expired)")
	ErrShardUnavailable = errors.New("shard has no live owner")
	ErrAlreadyOwner     = errors.New("node already owns the shard")
	ErrMoveAborted      = errors.New("move aborted")
	ErrMoveRunning      = errors.New("the move goes on without the caller")
	ErrMoveFinished     = errors.New("the move has already finished")
	ErrNoSuchMove       = errors.New("no such move")
	ErrDataLoss         = errors.New("reassigning a shard whose owner is gone loses its data: acceptDataLoss is required")
	ErrOwnerLive        = errors.New("the shard's owner is live: use a move, which keeps its data")
	ErrNoOtherNode      = errors.New("no other live node to move shards to")
	ErrNoHooks          = errors.New("this node has no move hooks or transport")
)

// StateChange is one state a move record went through.
type StateChange struct {
	State MoveState
	Rev   int64 // etcd revision of the record's write
}

// MoveResult tells how a planned move went, or how far it got.
type MoveResult struct {
	MoveInfo
	State   MoveState     // the last state seen: handed-over, aborted, or the one in flight
	Reason  string        // aborted: why
	ToEpoch int64         // epoch of the recipient's ownership (handed over)
	States  []StateChange // in order: draining, exported, handed-over (or aborted)
	Took    time.Duration
}

func newMoveID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Move moves shard s to node to with its data and waits for the outcome:
// StartMove, then WaitMove. The move belongs to the cluster, not to the
// caller: if ctx ends first, Move returns ErrMoveRunning and the move goes
// on (the donor bounds it with MoveTimeout); AbortMove stops it.
func (n *Node) Move(ctx context.Context, s Shard, to string) (MoveResult, error) {
	info, rev, err := n.StartMove(ctx, s, to)
	if err != nil {
		return MoveResult{MoveInfo: info}, err
	}
	return n.WaitMove(ctx, info, rev)
}

// StartMove creates the move record of a planned move of s to node to and
// returns at once with the move and the record's revision. The donor
// (s's owner) sees the record, freezes s and drives the move: it drains
// and exports (draining), records exported and sends the export, and the
// recipient imports it and flips ownership in one transaction that
// compares the donor's epoch (handed-over). Every state is a write of
// moves/<NN>, so both nodes and any watcher see it. A second move of a
// shard, a move to a node that is not live, and a move of a shard without
// a live owner are refused.
func (n *Node) StartMove(ctx context.Context, s Shard, to string) (MoveInfo, int64, error) {
	info := MoveInfo{Shard: s, To: to}
	fail := func(err error) (MoveInfo, int64, error) {
		return info, 0, fmt.Errorf("cluster: move shard %s to %s: %w", s, to, err)
	}
	if !ValidNodeID(to) {
		return fail(fmt.Errorf("%w (invalid node id)", ErrNodeNotLive))
	}
	get := []clientv3.Op{clientv3.OpGet(n.k.owner(s)), clientv3.OpGet(n.k.move(s)), clientv3.OpGet(n.k.node(to))}
	resp, err := n.cli.Txn(ctx).Then(get...).Commit()
	if err != nil {
		return fail(err)
	}
	// A finished move's record (handed-over, aborted) that the controller
	// has not deleted yet does not block a new move: the new record
	// replaces it, compared on its revision. So does a record nobody can
	// read (the controller clears those too).
	var oldMoveRev int64
	check := func(resp *clientv3.TxnResponse) (ownerRecord, int64, error) {
		var o ownerRecord
		ownerKV := resp.Responses[0].GetResponseRange().Kvs
		moveKV := resp.Responses[1].GetResponseRange().Kvs
		nodeKV := resp.Responses[2].GetResponseRange().Kvs
		oldMoveRev = 0
		if len(moveKV) > 0 {
			var m moveRecord
			if json.Unmarshal(moveKV[0].Value, &m) == nil && !m.finished() {
				return o, 0, fmt.Errorf("%w (move %s from %s to %s is %s)", ErrMoveInProgress, m.ID, m.From, m.To, m.State)
			}
			oldMoveRev = moveKV[0].ModRevision
		}
		if len(nodeKV) == 0 {
			return o, 0, ErrNodeNotLive
		}
		if len(ownerKV) == 0 || json.Unmarshal(ownerKV[0].Value, &o) != nil {
			return o, 0, ErrShardUnavailable
		}
		if o.Node == to {
			return o, 0, ErrAlreadyOwner
		}
		return o, ownerKV[0].ModRevision, nil
	}
	owner, epoch, err := check(resp)
	if err != nil {
		return fail(err)
	}
	rec := moveRecord{ID: newMoveID(), To: to, State: StateDraining, Started: time.Now().UTC()}
	var cresp *clientv3.TxnResponse
	// The compares fail when something changed between the read and the
	// write; most often the controller just deleted the finished record
	// of the previous move. The Else branch read everything again: check
	// it and try once more with what it says.
	for attempt := 1; ; attempt++ {
		rec.From, rec.FromEpoch = owner.Node, epoch
		cresp, err = n.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(n.k.move(s)), "=", oldMoveRev),
				clientv3.Compare(clientv3.ModRevision(n.k.owner(s)), "=", epoch),
				clientv3.Compare(clientv3.CreateRevision(n.k.node(to)), ">", 0)).
			Then(clientv3.OpPut(n.k.move(s), mustJSON(rec))).
			Else(get...).Commit()
		if err != nil {
			return fail(err)
		}
		if cresp.Succeeded {
			break
		}
		if owner, epoch, err = check(cresp); err != nil {
			return fail(err)
		}
		if attempt == 5 {
			return fail(fmt.Errorf("%w (the shard's owner or move record kept changing)", ErrMoveAborted))
		}
	}
	info = MoveInfo{ID: rec.ID, Shard: s, From: rec.From, To: to, FromEpoch: epoch}
	n.log.Info().Str("shard", s.String()).Str("move", rec.ID).Str("from", rec.From).Str("to", to).Msg("cluster: move started")
	return info, cresp.Header.Revision, nil
}

// WaitMove follows move mi of shard s, whose record was written at rev,
// until it ends: handed over (nil error) or aborted (ErrMoveAborted with
// the reason). If ctx ends first it returns how far the move got and
// ErrMoveRunning: the move goes on.
func (n *Node) WaitMove(ctx context.Context, mi MoveInfo, rev int64) (MoveResult, error) {
	start := time.Now()
	s := mi.Shard
	res := MoveResult{MoveInfo: mi, State: StateDraining}
	lastRev := rev - 1
	// seen takes one state of the record; done reports the move's end.
	seen := func(kv *mvccpb.KeyValue, deleted bool) (done bool, err error) {
		if kv.ModRevision <= lastRev {
			return false, nil // seen before the watch was reopened
		}
		lastRev = kv.ModRevision
		if deleted {
			// The controller deletes a record only once it has ended; a
			// handed-over one was returned when it was seen.
			return true, fmt.Errorf("cluster: move %s of shard %s: %w (record deleted in state %s)", mi.ID, s, ErrMoveAborted, res.State)
		}
		var m moveRecord
		if json.Unmarshal(kv.Value, &m) != nil || m.ID != mi.ID {
			return true, fmt.Errorf("cluster: move %s of shard %s: %w (record replaced)", mi.ID, s, ErrMoveAborted)
		}
		res.State, res.Reason = m.State, m.Reason
		res.States = append(res.States, StateChange{State: m.State, Rev: kv.ModRevision})
		switch m.State {
		case StateHandedOver:
			res.ToEpoch = kv.ModRevision
			res.Took = time.Since(start)
			return true, nil
		case StateAborted:
			return true, fmt.Errorf("cluster: move %s of shard %s to %s: %w: %s", mi.ID, s, mi.To, ErrMoveAborted, m.Reason)
		}
		return false, nil
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// A broken watch (member lost) is reopened from the last revision
	// seen; after a compaction the record is read once instead.
	for ctx.Err() == nil {
		for wresp := range n.cli.Watch(clientv3.WithRequireLeader(wctx), n.k.move(s), clientv3.WithRev(lastRev+1)) {
			if wresp.CompactRevision != 0 {
				if r, err := n.cli.Get(ctx, n.k.move(s)); err == nil {
					if len(r.Kvs) == 0 {
						return res, fmt.Errorf("cluster: move %s of shard %s: %w (record gone after a compaction; look at the shard map)", mi.ID, s, ErrMoveAborted)
					}
					if done, err := seen(r.Kvs[0], false); done {
						return res, err
					}
					lastRev = max(lastRev, r.Header.Revision)
				}
				break
			}
			if err := wresp.Err(); err != nil {
				break
			}
			for _, ev := range wresp.Events {
				if done, err := seen(ev.Kv, ev.Type == clientv3.EventTypeDelete); done {
					return res, err
				}
			}
		}
		if ctx.Err() == nil {
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return res, fmt.Errorf("cluster: move %s of shard %s to %s is %s: %w", mi.ID, s, mi.To, res.State, ErrMoveRunning)
}

// AbortMove aborts move id of shard s if it has not ended: the donor thaws
// the shard and serves it again, the recipient discards what it imported.
// A move that has already handed the shard over cannot be aborted
// (ErrMoveFinished).
func (n *Node) AbortMove(ctx context.Context, s Shard, id, reason string) error {
	fail := func(err error) error { return fmt.Errorf("cluster: abort move %s of shard %s: %w", id, s, err) }
	for {
		resp, err := n.cli.Get(ctx, n.k.move(s))
		if err != nil {
			return fail(err)
		}
		var m moveRecord
		if len(resp.Kvs) == 0 || json.Unmarshal(resp.Kvs[0].Value, &m) != nil || (id != "" && m.ID != id) {
			return fail(ErrNoSuchMove)
		}
		if m.finished() {
			return fail(fmt.Errorf("%w (%s)", ErrMoveFinished, m.State))
		}
		e := moveEntry{moveRecord: m, shard: s, rev: resp.Kvs[0].ModRevision}
		ok, err := n.casAbort(ctx, e, reason)
		if err != nil {
			return fail(err)
		}
		if ok {
			return nil
		}
		// The record changed meanwhile (the move went on): look again.
	}
}

// abortMove marks a move aborted if its record is still at m.rev. Bounded
// (the watch loop calls it) and retried while etcd is between leaders.
func (n *Node) abortMove(m moveEntry, reason string) bool {
	ctx, cancel := context.WithTimeout(n.ctx, n.cfg.LeaseTTL)
	defer cancel()
	ok, err := n.casAbort(ctx, m, reason)
	if err != nil {
		n.log.Warn().Err(err).Str("shard", m.shard.String()).Str("move", m.ID).Msg("cluster: abort move")
	}
	return ok
}

func (n *Node) casAbort(ctx context.Context, m moveEntry, reason string) (bool, error) {
	rec := m.moveRecord
	rec.State, rec.Reason = StateAborted, reason
	var resp *clientv3.TxnResponse
	err := retryTransient(ctx, func() error {
		var err error
		resp, err = n.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(n.k.move(m.shard)), "=", m.rev)).
			Then(clientv3.OpPut(n.k.move(m.shard), mustJSON(rec))).Commit()
		return err
	})
	if err != nil {
		return false, err
	}
	if resp.Succeeded {
		n.log.Warn().Str("shard", m.shard.String()).Str("move", m.ID).Str("from", m.From).Str("to", m.To).Str("reason", reason).Msg("cluster: move aborted")
	}
	return resp.Succeeded, nil
}

// donate is the donor's side of a move; the shard is frozen (the
// lifecycle started it). It waits for the writes admitted before the
// freeze, drains and exports, records "exported", and sends the export to
// the recipient, whose Receive flips ownership. On failure it aborts the
// move; the watch then thaws the shard. ctx ends with MoveTimeout, or
// when the lifecycle cancels the move (aborted elsewhere, lease lost);
// never at the flip, so the recipient's request is not cut short.
func (n *Node) donate(ctx context.Context, cancel context.CancelFunc, m moveEntry) {
	defer cancel()
	rev, err := n.runDonor(ctx, m)
	if err == nil || n.ctx.Err() != nil {
		return
	}
	m.rev = rev
	n.abortMove(m, err.Error())
}

func (n *Node) runDonor(ctx context.Context, m moveEntry) (rev int64, err error) {
	s := m.shard
	rev = m.rev
	h, t := n.cfg.Hooks, n.cfg.Transport
	if h == nil || t == nil {
		return rev, fmt.Errorf("donor %s: %w", n.cfg.NodeID, ErrNoHooks)
	}
	if err := n.lc.quiesce(ctx, s, m.ID); err != nil {
		return rev, fmt.Errorf("freeze: %w", err)
	}
	if err := h.Drain(ctx, s); err != nil {
		return rev, fmt.Errorf("drain: %w", err)
	}
	data, err := h.Export(ctx, s)
	if err != nil {
		return rev, fmt.Errorf("export: %w", err)
	}
	defer data.Close()
	rec := m.moveRecord
	rec.State = StateExported
	var resp *clientv3.TxnResponse
	err = retryTransient(ctx, func() error {
		var err error
		resp, err = n.cli.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(n.k.move(s)), "=", m.rev),
				clientv3.Compare(clientv3.ModRevision(n.k.owner(s)), "=", m.FromEpoch)).
			Then(clientv3.OpPut(n.k.move(s), mustJSON(rec))).Commit()
		return err
	})
	if err != nil {
		return rev, fmt.Errorf("record exported: %w", err)
	}
	if !resp.Succeeded {
		return rev, errors.New("the move record or the shard's owner changed while draining")
	}
	rev = resp.Header.Revision
	// The copy the recipient imports has this generation.
	n.carryOut([]shardEffects{{shard: s, effs: n.lc.apply(s, lifecycleEvent{kind: evExported, move: m.ID, gen: rev})}})
	n.mu.Lock()
	to, live := n.view.nodes[m.To]
	n.mu.Unlock()
	if !live {
		return rev, fmt.Errorf("recipient %s: %w", m.To, ErrNodeNotLive)
	}
	info := MoveInfo{ID: m.ID, Shard: s, From: m.From, To: m.To, FromEpoch: m.FromEpoch}
	if err := t.Send(ctx, to.Member, info, data); err != nil {
		return rev, fmt.Errorf("send to %s: %w", m.To, err)
	}
	return rev, nil
}

// flipTimeout bounds the recipient's flip once the copy is imported.
const flipTimeout = 10 * time.Second

// Receive is the recipient's side of a move; the mediator calls it with
// what its Transport carried. It checks that the move is exported and
// addressed to this node, imports the data (Hooks.Import) as a copy of
// the generation of the move's exported record, and flips ownership in
// one transaction that compares the move record and the donor's epoch:
// assign/<NN> names this node and that generation, shards/<NN> names this
// node (attached to its lease), moves/<NN> says handed-over. The
// transaction's revision is the new epoch, higher than the donor's.
//
// Once the copy is imported, the flip runs under the node's context, not
// ctx: whether it happens is decided by etcd's compares alone, and a
// donor that went away after sending everything has no say in it. A move
// that ends without the flip discards the imported copy; if the flip's
// outcome is unknown (etcd unreachable), the copy stays until the shard
// map shows it (served here, or dropped as a stray).
func (n *Node) Receive(ctx context.Context, mi MoveInfo, data io.Reader) error {
	s := mi.Shard
	fail := func(format string, args ...any) error {
		return fmt.Errorf("cluster: receive move %s of shard %s: %s", mi.ID, s, fmt.Sprintf(format, args...))
	}
	if n.cfg.Hooks == nil {
		return fail("%v", ErrNoHooks)
	}
	var resp *clientv3.TxnResponse
	err := retryTransient(ctx, func() error {
		var err error
		resp, err = n.cli.Txn(ctx).Then(clientv3.OpGet(n.k.move(s)), clientv3.OpGet(n.k.owner(s))).Commit()
		return err
	})
	if err != nil {
		return fail("%v", err)
	}
	moveKV := resp.Responses[0].GetResponseRange().Kvs
	ownerKV := resp.Responses[1].GetResponseRange().Kvs
	var m moveRecord
	if len(moveKV) == 0 || json.Unmarshal(moveKV[0].Value, &m) != nil || m.ID != mi.ID {
		return fail("no such move")
	}
	if m.State != StateExported || m.To != n.cfg.NodeID {
		return fail("move is %s, to %s", m.State, m.To)
	}
	if len(ownerKV) == 0 || ownerKV[0].ModRevision != m.FromEpoch {
		return fail("the donor no longer owns the shard at epoch %d", m.FromEpoch)
	}
	moveRev := moveKV[0].ModRevision
	gen := moveRev
	n.lc.apply(s, lifecycleEvent{kind: evReceive, move: mi.ID, gen: gen})
	if st := n.lc.state(s); st.phase != PhaseReceiving || st.move != mi.ID {
		return fail("the shard is %s on this node", st.phase)
	}
	flipped, discard := false, true
	defer func() {
		if !flipped {
			n.carryOut([]shardEffects{{shard: s, effs: n.lc.apply(s, lifecycleEvent{kind: evReceiveEnd, move: mi.ID, discard: discard})}})
		}
	}()
	if n.ownCopies() {
		n.mu.Lock()
		n.copies[s] = shardCopy{has: true, gen: gen} // whatever Import leaves, it may have written
		n.mu.Unlock()
	}
	if err := n.cfg.Hooks.Import(ctx, s, gen, data); err != nil {
		return fail("import: %v", err)
	}
	lease := n.fence.currentLease()
	if lease == 0 {
		return fail("this node has no lease")
	}
	fctx, cancel := context.WithTimeout(n.ctx, flipTimeout)
	defer cancel()
	m.State = StateHandedOver
	var flip *clientv3.TxnResponse
	err = retryTransient(fctx, func() error {
		var err error
		flip, err = n.cli.Txn(fctx).
			If(clientv3.Compare(clientv3.ModRevision(n.k.move(s)), "=", moveRev),
				clientv3.Compare(clientv3.ModRevision(n.k.owner(s)), "=", m.FromEpoch)).
			Then(clientv3.OpPut(n.k.assign(s), mustJSON(assignRecord{Node: n.cfg.NodeID, By: "move", Gen: gen})),
				clientv3.OpPut(n.k.owner(s), mustJSON(ownerRecord{Node: n.cfg.NodeID, Advertise: n.cfg.Advertise}), clientv3.WithLease(lease)),
				clientv3.OpPut(n.k.move(s), mustJSON(m))).Commit()
		return err
	})
	if err != nil {
		// Applied or not: an answer lost on the way cannot tell. Keep
		// the copy; the watch shows the outcome.
		if epoch, ok := n.flippedHere(fctx, s, mi.ID, lease); ok {
			flipped = true
			n.carryOut([]shardEffects{{shard: s, effs: n.lc.apply(s, lifecycleEvent{kind: evClaimed, epoch: epoch, lease: lease})}})
			return nil
		}
		discard = false
		return fail("flip ownership: %v", err)
	}
	epoch := flip.Header.Revision
	if !flip.Succeeded {
		// An earlier attempt may have been applied before its answer
		// was lost (a leader change): then the move record says handed
		// over by this move and the owner key is ours.
		var ok bool
		if epoch, ok = n.flippedHere(fctx, s, mi.ID, lease); !ok {
			return fail("the move or the donor's ownership changed before the flip")
		}
	}
	flipped = true
	n.carryOut([]shardEffects{{shard: s, effs: n.lc.apply(s, lifecycleEvent{kind: evClaimed, epoch: epoch, lease: lease})}})
	n.log.Info().Str("shard", s.String()).Str("move", mi.ID).Str("from", mi.From).Int64("epoch", epoch).Msg("cluster: shard received")
	return nil
}

// flippedHere reports whether move id already handed shard s to this node
// under lease, and the owner key's revision (the epoch) if so.
func (n *Node) flippedHere(ctx context.Context, s Shard, id string, lease clientv3.LeaseID) (int64, bool) {
	var resp *clientv3.TxnResponse
	if err := retryTransient(ctx, func() error {
		var err error
		resp, err = n.cli.Txn(ctx).Then(clientv3.OpGet(n.k.move(s)), clientv3.OpGet(n.k.owner(s))).Commit()
		return err
	}); err != nil {
		return 0, false
	}
	moveKV := resp.Responses[0].GetResponseRange().Kvs
	ownerKV := resp.Responses[1].GetResponseRange().Kvs
	var m moveRecord
	var o ownerRecord
	if len(moveKV) == 0 || json.Unmarshal(moveKV[0].Value, &m) != nil || m.ID != id || m.State != StateHandedOver ||
		len(ownerKV) == 0 || json.Unmarshal(ownerKV[0].Value, &o) != nil || o.Node != n.cfg.NodeID ||
		clientv3.LeaseID(ownerKV[0].Lease) != lease {
		return 0, false
	}
	return ownerKV[0].ModRevision, true
}

// retryTransient runs an etcd request again (up to 5 times, 50 ms
// doubling) when it failed because etcd was between leaders: under CPU
// starvation a 3-member etcd elects now and then, and a move should not
// be aborted for that. Only for requests that are safe to repeat (reads,
// and transactions guarded by compares).
func retryTransient(ctx context.Context, req func() error) error {
	wait := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		err := req()
		if err == nil || attempt == 5 || !transientEtcd(err) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(wait):
		}
		wait *= 2
	}
}

func transientEtcd(err error) bool {
	for _, e := range []error{rpctypes.ErrLeaderChanged, rpctypes.ErrNoLeader, rpctypes.ErrTimeout,
		rpctypes.ErrTimeoutDueToLeaderFail, rpctypes.ErrTimeoutDueToConnectionLost} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// Reassign gives shard s, whose owner is gone, to node to without its data:
// the operator's explicit decision when the old node will not come back.
// acceptDataLoss must be true. Refused while the shard is served (use
// Move) or moving, and for a node that is not live.
func (n *Node) Reassign(ctx context.Context, s Shard, to string, acceptDataLoss bool) error {
	fail := func(err error) error { return fmt.Errorf("cluster: reassign shard %s to %s: %w", s, to, err) }
	if !acceptDataLoss {
		return fail(ErrDataLoss)
	}
	if !ValidNodeID(to) {
		return fail(ErrNodeNotLive)
	}
	get := []clientv3.Op{clientv3.OpGet(n.k.assign(s)), clientv3.OpGet(n.k.owner(s)), clientv3.OpGet(n.k.move(s)), clientv3.OpGet(n.k.node(to))}
	resp, err := n.cli.Txn(ctx).Then(get...).Commit()
	if err != nil {
		return fail(err)
	}
	kvs := func(i int) int { return len(resp.Responses[i].GetResponseRange().Kvs) }
	switch {
	case kvs(1) > 0:
		return fail(ErrOwnerLive)
	case kvs(2) > 0:
		return fail(ErrMoveInProgress)
	case kvs(3) == 0:
		return fail(ErrNodeNotLive)
	}
	var assignRev int64
	if kvs(0) > 0 {
		assignRev = resp.Responses[0].GetResponseRange().Kvs[0].ModRevision
	}
	put, err := n.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(n.k.assign(s)), "=", assignRev),
			clientv3.Compare(clientv3.CreateRevision(n.k.owner(s)), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(n.k.move(s)), "=", 0),
			clientv3.Compare(clientv3.CreateRevision(n.k.node(to)), ">", 0)).
		Then(clientv3.OpPut(n.k.assign(s), mustJSON(assignRecord{Node: to, By: "reassign", Fresh: true}))).Commit()
	if err != nil {
		return fail(err)
	}
	if !put.Succeeded {
		return fail(errors.New("the shard's placement changed meanwhile; look again"))
	}
	n.log.Warn().Str("shard", s.String()).Str("node", to).Msg("cluster: shard reassigned, its data on the old node is given up")
	return nil
}
