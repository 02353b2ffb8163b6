package cluster

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The shard lifecycle: one owner for what a node knows and does about each
// shard. Every other part of the node (the watch loop, claims, the donor
// and recipient sides of a move, the lease keeper) reports what it
// observed as a typed lifecycleEvent; shardState.apply decides the next
// state and the effects (events for the mediator, a donor to start or
// cancel, a copy to drop), and nothing else changes a shard's state. apply
// is a pure function, table-tested in lifecycle_test.go without etcd.
//
//	           claimed                       freeze (move draining, donor = this node)
//	 absent ─────────────► serving ─────────────────────────► frozen
//	   ▲  ▲                 │  ▲                                  │
//	   │  │  lost / lease   │  └──────── thaw (move aborted) ─────┤
//	   │  └─────────────────┘                                     │
//	   └────────────────── handed over (moved away: drop copy) ◄──┘
//	   │
//	   └─ receive ──► receiving ── flipped (claimed) ──► serving
//	                      └──── receive failed (discard copy) ──► absent
//
// and fenced, for an epoch the replicated store refused while etcd still
// names this node: left only when etcd's view changes.
//
// What the phases mean for the mediator (Admit and MayAck):
//   - serving: group writes of the shard are admitted; acks allowed while
//     the fence clock runs.
//   - frozen: a planned move drains the shard: every group write waits in
//     Admit (the move then either thaws the shard and the writes go on, or
//     hands it over and they fail with ShardGoneError: the device
//     reconnects to the new owner and redoes them). Writes admitted before
//     the freeze are durable before the export starts (Hooks.Drain), so
//     the recipient has them and their acks stay allowed.
//   - absent, receiving, fenced: nothing is admitted.

// Phase is where one shard stands on this node.
type Phase uint8

const (
	PhaseAbsent    Phase = iota // not served here
	PhaseServing                // owned at an epoch; writes admitted
	PhaseFrozen                 // owned; a planned move drains it: writes wait
	PhaseReceiving              // a planned move imports it here, before the flip
	PhaseFenced                 // owned per etcd, but the store refused the epoch
)

func (p Phase) String() string {
	switch p {
	case PhaseAbsent:
		return "absent"
	case PhaseServing:
		return "serving"
	case PhaseFrozen:
		return "frozen"
	case PhaseReceiving:
		return "receiving"
	case PhaseFenced:
		return "fenced"
	}
	return fmt.Sprintf("Phase(%d)", uint8(p))
}

// Cause says why a shard stopped being served on this node.
type Cause uint8

const (
	CauseNone         Cause = iota
	CauseMovedAway          // handed over to Event.To in planned move Event.Move
	CauseOwnerChanged       // the owner key names another node (Event.To)
	CauseOwnerDeleted       // the owner key is gone (deleted, or expired on etcd first)
	CauseLeaseLost          // this node's lease expired, or the node closed
	CauseStoreFenced        // the replicated store refused this node's epoch
)

func (c Cause) String() string {
	switch c {
	case CauseNone:
		return "none"
	case CauseMovedAway:
		return "moved away"
	case CauseOwnerChanged:
		return "owner changed"
	case CauseOwnerDeleted:
		return "owner key deleted"
	case CauseLeaseLost:
		return "lease lost"
	case CauseStoreFenced:
		return "store refused the epoch"
	}
	return fmt.Sprintf("Cause(%d)", uint8(c))
}

// shardState is one shard's lifecycle state on this node. Only
// lifecycle.apply replaces it.
type shardState struct {
	phase  Phase
	epoch  int64            // serving, frozen, fenced: the ownership epoch
	lease  clientv3.LeaseID // serving, frozen: the lease the owner key is on
	move   string           // frozen, receiving: the move id
	moveTo string           // frozen: the recipient
	// gen: frozen, the revision of the move's "exported" record (0 until
	// written), which is the generation of the copy the recipient
	// imports; receiving, the generation being imported.
	gen int64
}

// eventKind names what a part of the node observed about a shard.
type eventKind uint8

const (
	evClaimed     eventKind = iota + 1 // an owner key of this node under lease at epoch (claim, flip, or seen by the watch)
	evLost                             // the owner key no longer names this node at epoch (cause, to, move)
	evLeaseLost                        // lease expired or was revoked
	evFreeze                           // a move's draining record names this node as donor at epoch
	evExported                         // the donor recorded "exported" at revision gen
	evThaw                             // the move ended without handing the shard over
	evReceive                          // Receive starts importing move's copy of generation gen
	evReceiveEnd                       // Receive ended without the flip; discard drops the copy
	evStoreFenced                      // the store refused epoch
)

// lifecycleEvent is one observation; only the fields of its kind are set.
type lifecycleEvent struct {
	kind    eventKind
	epoch   int64
	lease   clientv3.LeaseID
	move    string
	to      string
	gen     int64
	cause   Cause
	discard bool
}

// effectKind names what the node must do after a transition.
type effectKind uint8

const (
	effNotify      effectKind = iota + 1 // deliver ev to the mediator (OnEvent)
	effStartDonor                        // run the donor side of the move
	effCancelDonor                       // stop the donor side (aborted, lease lost)
	effDrop                              // drop this node's copy of generation ≤ gen
)

type effect struct {
	kind effectKind
	ev   Event
	gen  int64
}

// apply returns the state after ev and what the node must do. Events that
// do not fit the state (a report about another epoch or move, a second
// report of the same thing) change nothing.
func (st shardState) apply(s Shard, ev lifecycleEvent) (shardState, []effect) {
	notify := func(e Event) effect { e.Shard = s; return effect{kind: effNotify, ev: e} }
	lost := func(cause Cause, to, move string) effect {
		return notify(Event{Kind: ShardLost, Epoch: st.epoch, Cause: cause, To: to, Move: move})
	}
	gained := func(epoch int64) effect { return notify(Event{Kind: ShardGained, Epoch: epoch}) }
	owned := st.phase == PhaseServing || st.phase == PhaseFrozen

	switch ev.kind {
	case evClaimed:
		switch {
		case owned && st.epoch == ev.epoch, st.phase == PhaseFenced && st.epoch == ev.epoch:
			return st, nil // reported again (the writer and the watch both see it)
		case owned:
			// A new epoch under our own name while serving: etcd's
			// compares make this impossible; end the old one cleanly all
			// the same, so no write of it reaches the new one.
			effs := []effect{lost(CauseOwnerChanged, "", "")}
			if st.phase == PhaseFrozen {
				effs = append(effs, effect{kind: effCancelDonor})
			}
			return shardState{phase: PhaseServing, epoch: ev.epoch, lease: ev.lease}, append(effs, gained(ev.epoch))
		}
		// absent, fenced at another epoch, or receiving (the watch saw
		// this node's flip before Receive recorded it).
		return shardState{phase: PhaseServing, epoch: ev.epoch, lease: ev.lease}, []effect{gained(ev.epoch)}

	case evLost:
		if ev.epoch != st.epoch {
			return st, nil
		}
		switch st.phase {
		case PhaseFenced:
			return shardState{}, nil // already reported lost when fenced
		case PhaseServing:
			return shardState{}, []effect{lost(ev.cause, ev.to, "")}
		case PhaseFrozen:
			if ev.cause == CauseMovedAway && ev.move == st.move || ev.to != "" && ev.to == st.moveTo {
				// Handed over: the recipient imported the copy exported
				// at st.gen and flipped. The donor's work is done (not
				// cancelled: its request may still be finishing on the
				// recipient), and its copy goes.
				effs := []effect{lost(CauseMovedAway, st.moveTo, st.move)}
				if st.gen != 0 {
					effs = append(effs, effect{kind: effDrop, gen: st.gen})
				}
				return shardState{}, effs
			}
			return shardState{}, []effect{lost(ev.cause, ev.to, ""), {kind: effCancelDonor}}
		}
		return st, nil

	case evLeaseLost:
		switch {
		case owned && st.lease == ev.lease:
			effs := []effect{lost(CauseLeaseLost, "", "")}
			if st.phase == PhaseFrozen {
				effs = append(effs, effect{kind: effCancelDonor})
			}
			return shardState{}, effs
		case st.phase == PhaseFenced:
			return shardState{}, nil
		}
		return st, nil

	case evFreeze:
		if st.phase != PhaseServing || st.epoch != ev.epoch {
			return st, nil
		}
		next := st
		next.phase, next.move, next.moveTo, next.gen = PhaseFrozen, ev.move, ev.to, 0
		return next, []effect{
			notify(Event{Kind: ShardFrozen, Epoch: st.epoch, Move: ev.move, To: ev.to}),
			{kind: effStartDonor},
		}

	case evExported:
		if st.phase != PhaseFrozen || st.move != ev.move {
			return st, nil
		}
		next := st
		next.gen = ev.gen
		return next, nil

	case evThaw:
		if st.phase != PhaseFrozen || st.move != ev.move {
			return st, nil
		}
		return shardState{phase: PhaseServing, epoch: st.epoch, lease: st.lease}, []effect{
			notify(Event{Kind: ShardThawed, Epoch: st.epoch, Move: st.move, To: st.moveTo}),
			{kind: effCancelDonor},
		}

	case evReceive:
		if st.phase != PhaseAbsent {
			return st, nil
		}
		return shardState{phase: PhaseReceiving, move: ev.move, gen: ev.gen}, nil

	case evReceiveEnd:
		if st.phase != PhaseReceiving || st.move != ev.move {
			return st, nil
		}
		if ev.discard {
			return shardState{}, []effect{{kind: effDrop, gen: st.gen}}
		}
		return shardState{}, nil

	case evStoreFenced:
		if !owned || st.epoch != ev.epoch {
			return st, nil
		}
		effs := []effect{lost(CauseStoreFenced, "", "")}
		if st.phase == PhaseFrozen {
			effs = append(effs, effect{kind: effCancelDonor})
		}
		return shardState{phase: PhaseFenced, epoch: st.epoch}, effs
	}
	return st, nil
}

// lifecycle holds every shard's state and the writes admitted under it.
type lifecycle struct {
	cells [NumShards]shardCell
	// ackLease is, per shard, the lease under which it may be acked
	// (serving or frozen), 0 otherwise: MayAck reads it without a lock.
	ackLease [NumShards]atomic.Int64
}

// shardCell is one shard's state, its admitted writes and its waiters.
type shardCell struct {
	mu       sync.Mutex
	st       shardState
	inflight int                // writes admitted and not yet released
	changed  chan struct{}      // closed (and replaced) when st changes or inflight drops to 0
	donor    context.CancelFunc // frozen: cancels the donor's work
	last     Event              // the last ShardLost, for the error of a refused write
}

// apply runs one transition of shard s under its cell's lock and returns
// the effects for the caller to carry out (outside every lock). A
// cancelled donor is cancelled here already.
func (lc *lifecycle) apply(s Shard, ev lifecycleEvent) []effect {
	c := &lc.cells[s]
	c.mu.Lock()
	next, effs := c.st.apply(s, ev)
	var cancel context.CancelFunc
	if next != c.st {
		c.st = next
		if next.phase == PhaseServing || next.phase == PhaseFrozen {
			lc.ackLease[s].Store(int64(next.lease))
		} else {
			lc.ackLease[s].Store(0)
		}
		c.broadcast()
	}
	for _, e := range effs {
		switch {
		case e.kind == effCancelDonor:
			cancel, c.donor = c.donor, nil
		case e.kind == effNotify && e.ev.Kind == ShardLost:
			c.last = e.ev
		}
	}
	if next.phase != PhaseFrozen {
		c.donor = nil // handed over: the donor finishes on its own
	}
	c.mu.Unlock()
	if cancel != nil {
		cancel()
	}
	return effs
}

// broadcast wakes every waiter of the cell. Called with c.mu held.
func (c *shardCell) broadcast() {
	if c.changed != nil {
		close(c.changed)
		c.changed = nil
	}
}

// wait returns a channel closed at the cell's next change. Called with
// c.mu held.
func (c *shardCell) wait() <-chan struct{} {
	if c.changed == nil {
		c.changed = make(chan struct{})
	}
	return c.changed
}

// state returns a copy of s's state.
func (lc *lifecycle) state(s Shard) shardState {
	c := &lc.cells[s]
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.st
}

// setDonor records the cancel function of a freshly started donor; if the
// shard is no longer frozen for move, it is cancelled at once.
func (lc *lifecycle) setDonor(s Shard, move string, cancel context.CancelFunc) {
	c := &lc.cells[s]
	c.mu.Lock()
	if c.st.phase == PhaseFrozen && c.st.move == move {
		c.donor = cancel
		cancel = nil
	}
	c.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// ShardGoneError is the error of a write that Admit refused because the
// shard is not served here at the epoch the write was made under. The
// device's connection ends with 1001 and the device redoes the write
// wherever the shard is served now.
type ShardGoneError struct {
	Shard Shard
	Cause Cause  // why it stopped being served here (CauseNone: it never was at that epoch)
	To    string // the node it moved to, if known
}

func (e *ShardGoneError) Error() string {
	switch {
	case e.To != "":
		return fmt.Sprintf("shard %s moved to %s", e.Shard, e.To)
	case e.Cause != CauseNone:
		return fmt.Sprintf("shard %s no longer served here: %s", e.Shard, e.Cause)
	}
	return fmt.Sprintf("shard %s not served here at that epoch", e.Shard)
}

// admit admits one group write of s made under epoch: at once while s is
// served at epoch, after the thaw while a move has frozen it, never once
// it is gone (ShardGoneError) or ctx ends. Every admitted write must be
// released.
func (lc *lifecycle) admit(ctx context.Context, s Shard, epoch int64) error {
	c := &lc.cells[s]
	for {
		c.mu.Lock()
		st := c.st
		if st.epoch == epoch && st.phase == PhaseServing {
			c.inflight++
			c.mu.Unlock()
			return nil
		}
		if st.epoch != epoch || st.phase != PhaseFrozen {
			err := &ShardGoneError{Shard: s}
			if c.last.Epoch == epoch {
				err.Cause, err.To = c.last.Cause, c.last.To
			}
			c.mu.Unlock()
			return err
		}
		ch := c.wait()
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("shard %s: waiting for a planned move: %w", s, context.Cause(ctx))
		}
	}
}

// release ends one admitted write.
func (lc *lifecycle) release(s Shard) {
	c := &lc.cells[s]
	c.mu.Lock()
	c.inflight--
	if c.inflight < 0 {
		c.mu.Unlock()
		panic("cluster: Release without Admit")
	}
	if c.inflight == 0 && c.st.phase == PhaseFrozen {
		c.broadcast()
	}
	c.mu.Unlock()
}

// quiesce waits until no write admitted before the freeze of move is
// still being submitted. It fails if s is no longer frozen for move.
func (lc *lifecycle) quiesce(ctx context.Context, s Shard, move string) error {
	c := &lc.cells[s]
	for {
		c.mu.Lock()
		if c.st.phase != PhaseFrozen || c.st.move != move {
			c.mu.Unlock()
			return fmt.Errorf("shard %s is no longer frozen for move %s", s, move)
		}
		if c.inflight == 0 {
			c.mu.Unlock()
			return nil
		}
		ch := c.wait()
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
}
