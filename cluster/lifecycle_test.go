package cluster

import (
	"context"
	"errors"
	"reflect"
	"testing"
	"testing/synctest"
	"time"
)

// TestLifecycleTransitions is the lifecycle's transition table: every
// phase against every event that can reach it, with the state and the
// effects that must follow. No etcd, no sockets.
func TestLifecycleTransitions(t *testing.T) {
	const s = Shard(0x2a)
	var (
		absent    = shardState{}
		serving   = shardState{phase: PhaseServing, epoch: 10, lease: 7}
		frozen    = shardState{phase: PhaseFrozen, epoch: 10, lease: 7, move: "m1", moveTo: "b"}
		exported  = shardState{phase: PhaseFrozen, epoch: 10, lease: 7, move: "m1", moveTo: "b", gen: 15}
		receiving = shardState{phase: PhaseReceiving, move: "m2", gen: 20}
		fenced    = shardState{phase: PhaseFenced, epoch: 10}
	)
	gained := func(epoch int64) effect {
		return effect{kind: effNotify, ev: Event{Kind: ShardGained, Shard: s, Epoch: epoch}}
	}
	lost := func(cause Cause, to, move string) effect {
		return effect{kind: effNotify, ev: Event{Kind: ShardLost, Shard: s, Epoch: 10, Cause: cause, To: to, Move: move}}
	}
	cancelDonor := effect{kind: effCancelDonor}
	for _, tc := range []struct {
		name string
		from shardState
		ev   lifecycleEvent
		to   shardState
		effs []effect
	}{
		// absent
		{"absent claimed", absent, lifecycleEvent{kind: evClaimed, epoch: 10, lease: 7}, serving, []effect{gained(10)}},
		{"absent lost (not ours)", absent, lifecycleEvent{kind: evLost, epoch: 0, cause: CauseOwnerChanged, to: "b"}, absent, nil},
		{"absent lease lost", absent, lifecycleEvent{kind: evLeaseLost, lease: 7}, absent, nil},
		{"absent freeze", absent, lifecycleEvent{kind: evFreeze, epoch: 10, move: "m1", to: "b"}, absent, nil},
		{"absent thaw", absent, lifecycleEvent{kind: evThaw, move: "m1"}, absent, nil},
		{"absent receive", absent, lifecycleEvent{kind: evReceive, move: "m2", gen: 20}, receiving, nil},
		{"absent store fenced", absent, lifecycleEvent{kind: evStoreFenced, epoch: 10}, absent, nil},

		// serving
		{"serving claimed again", serving, lifecycleEvent{kind: evClaimed, epoch: 10, lease: 7}, serving, nil},
		{"serving claimed at a new epoch", serving, lifecycleEvent{kind: evClaimed, epoch: 12, lease: 7},
			shardState{phase: PhaseServing, epoch: 12, lease: 7}, []effect{lost(CauseOwnerChanged, "", ""), gained(12)}},
		{"serving owner changed", serving, lifecycleEvent{kind: evLost, epoch: 10, cause: CauseOwnerChanged, to: "c"}, absent,
			[]effect{lost(CauseOwnerChanged, "c", "")}},
		{"serving owner deleted", serving, lifecycleEvent{kind: evLost, epoch: 10, cause: CauseOwnerDeleted}, absent,
			[]effect{lost(CauseOwnerDeleted, "", "")}},
		{"serving lost at another epoch", serving, lifecycleEvent{kind: evLost, epoch: 9, cause: CauseOwnerDeleted}, serving, nil},
		{"serving lease lost", serving, lifecycleEvent{kind: evLeaseLost, lease: 7}, absent, []effect{lost(CauseLeaseLost, "", "")}},
		{"serving other lease lost", serving, lifecycleEvent{kind: evLeaseLost, lease: 6}, serving, nil},
		{"serving freeze", serving, lifecycleEvent{kind: evFreeze, epoch: 10, move: "m1", to: "b"}, frozen,
			[]effect{{kind: effNotify, ev: Event{Kind: ShardFrozen, Shard: s, Epoch: 10, Move: "m1", To: "b"}}, {kind: effStartDonor}}},
		{"serving freeze at another epoch", serving, lifecycleEvent{kind: evFreeze, epoch: 9, move: "m1", to: "b"}, serving, nil},
		{"serving thaw", serving, lifecycleEvent{kind: evThaw, move: "m1"}, serving, nil},
		{"serving receive (refused)", serving, lifecycleEvent{kind: evReceive, move: "m2", gen: 20}, serving, nil},
		{"serving store fenced", serving, lifecycleEvent{kind: evStoreFenced, epoch: 10}, fenced, []effect{lost(CauseStoreFenced, "", "")}},
		{"serving store fenced at another epoch", serving, lifecycleEvent{kind: evStoreFenced, epoch: 9}, serving, nil},

		// frozen
		{"frozen exported", frozen, lifecycleEvent{kind: evExported, move: "m1", gen: 15}, exported, nil},
		{"frozen exported for another move", frozen, lifecycleEvent{kind: evExported, move: "mX", gen: 15}, frozen, nil},
		{"frozen thaw", exported, lifecycleEvent{kind: evThaw, move: "m1"}, serving,
			[]effect{{kind: effNotify, ev: Event{Kind: ShardThawed, Shard: s, Epoch: 10, Move: "m1", To: "b"}}, cancelDonor}},
		{"frozen thaw of another move", frozen, lifecycleEvent{kind: evThaw, move: "mX"}, frozen, nil},
		{"frozen handed over", exported, lifecycleEvent{kind: evLost, epoch: 10, cause: CauseMovedAway, to: "b", move: "m1"}, absent,
			[]effect{lost(CauseMovedAway, "b", "m1"), {kind: effDrop, gen: 15}}},
		{"frozen owner now the recipient (record already gone)", exported, lifecycleEvent{kind: evLost, epoch: 10, cause: CauseOwnerChanged, to: "b"}, absent,
			[]effect{lost(CauseMovedAway, "b", "m1"), {kind: effDrop, gen: 15}}},
		{"frozen owner changed to a third node", exported, lifecycleEvent{kind: evLost, epoch: 10, cause: CauseOwnerChanged, to: "c"}, absent,
			[]effect{lost(CauseOwnerChanged, "c", ""), cancelDonor}},
		{"frozen lease lost", frozen, lifecycleEvent{kind: evLeaseLost, lease: 7}, absent, []effect{lost(CauseLeaseLost, "", ""), cancelDonor}},
		{"frozen freeze again", frozen, lifecycleEvent{kind: evFreeze, epoch: 10, move: "m1", to: "b"}, frozen, nil},
		{"frozen claimed again", frozen, lifecycleEvent{kind: evClaimed, epoch: 10, lease: 7}, frozen, nil},
		{"frozen store fenced", frozen, lifecycleEvent{kind: evStoreFenced, epoch: 10}, fenced, []effect{lost(CauseStoreFenced, "", ""), cancelDonor}},

		// receiving
		{"receiving claimed (the flip)", receiving, lifecycleEvent{kind: evClaimed, epoch: 25, lease: 7},
			shardState{phase: PhaseServing, epoch: 25, lease: 7}, []effect{gained(25)}},
		{"receiving ended, discard", receiving, lifecycleEvent{kind: evReceiveEnd, move: "m2", discard: true}, absent,
			[]effect{{kind: effDrop, gen: 20}}},
		{"receiving ended, outcome unknown", receiving, lifecycleEvent{kind: evReceiveEnd, move: "m2"}, absent, nil},
		{"receiving end of another move", receiving, lifecycleEvent{kind: evReceiveEnd, move: "mX", discard: true}, receiving, nil},
		{"receiving second receive", receiving, lifecycleEvent{kind: evReceive, move: "m3", gen: 30}, receiving, nil},
		{"receiving lost (about the donor)", receiving, lifecycleEvent{kind: evLost, epoch: 0, cause: CauseOwnerChanged}, receiving, nil},

		// fenced
		{"fenced lost", fenced, lifecycleEvent{kind: evLost, epoch: 10, cause: CauseOwnerChanged, to: "b"}, absent, nil},
		{"fenced lease lost", fenced, lifecycleEvent{kind: evLeaseLost, lease: 7}, absent, nil},
		{"fenced claimed again at its epoch", fenced, lifecycleEvent{kind: evClaimed, epoch: 10, lease: 7}, fenced, nil},
		{"fenced claimed at a new epoch", fenced, lifecycleEvent{kind: evClaimed, epoch: 30, lease: 8},
			shardState{phase: PhaseServing, epoch: 30, lease: 8}, []effect{gained(30)}},
		{"fenced freeze", fenced, lifecycleEvent{kind: evFreeze, epoch: 10, move: "m1"}, fenced, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, effs := tc.from.apply(s, tc.ev)
			if got != tc.to {
				t.Errorf("state %+v, want %+v", got, tc.to)
			}
			if !reflect.DeepEqual(effs, tc.effs) {
				t.Errorf("effects %+v, want %+v", effs, tc.effs)
			}
		})
	}
}

// TestAdmitWaitsWhileFrozen: a frozen shard holds new writes; a thaw lets
// them through, a hand-over refuses them with the new owner named;
// quiesce waits for the writes admitted before the freeze.
func TestAdmitWaitsWhileFrozen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var lc lifecycle
		const s = Shard(5)
		ctx := t.Context()
		lc.apply(s, lifecycleEvent{kind: evClaimed, epoch: 10, lease: 7})
		if lc.ackLease[s].Load() != 7 {
			t.Fatal("a served shard is not ackable under its lease")
		}
		if err := lc.admit(ctx, s, 10); err != nil {
			t.Fatal(err)
		}
		var ge *ShardGoneError
		if err := lc.admit(ctx, s, 9); !errors.As(err, &ge) {
			t.Fatalf("admit at an old epoch: %v", err)
		}

		// Freeze with one write in flight: quiesce waits for it.
		lc.apply(s, lifecycleEvent{kind: evFreeze, epoch: 10, move: "m1", to: "node-b"})
		if lc.ackLease[s].Load() != 7 {
			t.Fatal("a frozen shard's admitted writes may no longer be acked")
		}
		quiesced := make(chan error, 1)
		go func() { quiesced <- lc.quiesce(ctx, s, "m1") }()
		admitted := make(chan error, 2)
		go func() { admitted <- lc.admit(ctx, s, 10) }()
		synctest.Wait()
		select {
		case err := <-quiesced:
			t.Fatalf("quiesce returned with a write in flight: %v", err)
		case err := <-admitted:
			t.Fatalf("a write was admitted into a frozen shard: %v", err)
		default:
		}
		lc.release(s)
		synctest.Wait()
		if err := <-quiesced; err != nil {
			t.Fatal(err)
		}

		// Thaw: the waiting write goes on.
		lc.apply(s, lifecycleEvent{kind: evThaw, move: "m1"})
		if err := <-admitted; err != nil {
			t.Fatalf("write after the thaw: %v", err)
		}
		lc.release(s)

		// Freeze again and hand over: the waiting write is refused,
		// naming the new owner.
		lc.apply(s, lifecycleEvent{kind: evFreeze, epoch: 10, move: "m2", to: "node-b"})
		go func() { admitted <- lc.admit(ctx, s, 10) }()
		synctest.Wait()
		lc.apply(s, lifecycleEvent{kind: evExported, move: "m2", gen: 15})
		effs := lc.apply(s, lifecycleEvent{kind: evLost, epoch: 10, cause: CauseMovedAway, to: "node-b", move: "m2"})
		err := <-admitted
		if !errors.As(err, &ge) || ge.To != "node-b" || ge.Cause != CauseMovedAway || err.Error() != "shard 05 moved to node-b" {
			t.Fatalf("write after the hand-over: %v", err)
		}
		if lc.ackLease[s].Load() != 0 {
			t.Fatal("ackable after the hand-over")
		}
		if len(effs) != 2 || effs[1].kind != effDrop || effs[1].gen != 15 {
			t.Fatalf("hand-over effects %+v", effs)
		}

		// A waiting write also ends with its context.
		lc.apply(s, lifecycleEvent{kind: evClaimed, epoch: 20, lease: 8})
		lc.apply(s, lifecycleEvent{kind: evFreeze, epoch: 20, move: "m3", to: "node-c"})
		wctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		if err := lc.admit(wctx, s, 20); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("admit past its context: %v", err)
		}
	})
}

// TestLifecycleCancelsTheDonor: an abort or a lost lease cancels the
// donor's work; a hand-over does not (the recipient may still be
// finishing the request).
func TestLifecycleCancelsTheDonor(t *testing.T) {
	var lc lifecycle
	const s = Shard(1)
	for _, tc := range []struct {
		end    lifecycleEvent
		cancel bool
	}{
		{lifecycleEvent{kind: evThaw, move: "m"}, true},
		{lifecycleEvent{kind: evLeaseLost, lease: 7}, true},
		{lifecycleEvent{kind: evLost, epoch: 10, cause: CauseMovedAway, to: "b", move: "m"}, false},
	} {
		lc.apply(s, lifecycleEvent{kind: evClaimed, epoch: 10, lease: 7})
		lc.apply(s, lifecycleEvent{kind: evFreeze, epoch: 10, move: "m", to: "b"})
		ctx, cancel := context.WithCancel(context.Background())
		lc.setDonor(s, "m", cancel)
		lc.apply(s, tc.end)
		if got := ctx.Err() != nil; got != tc.cancel {
			t.Errorf("after %+v: donor cancelled %v, want %v", tc.end, got, tc.cancel)
		}
		cancel()
		lc.apply(s, lifecycleEvent{kind: evLeaseLost, lease: 7})
	}
	// A donor started after its move ended is cancelled at once.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	lc.setDonor(s, "gone", cancel)
	if ctx.Err() == nil {
		t.Fatal("a donor for a move that is not freezing the shard was kept")
	}
}
