package daemon

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/rs/zerolog"

	"d2m-mediator/cluster"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/mediator"
	"d2m-mediator/proto/d2mpb"
)

// fakeNode answers placement's questions from fields.
type fakeNode struct {
	st       cluster.ShardStatus
	mayAck   bool
	incoming bool
	moving   bool
	owner    string
	tls      bool
}

func (f *fakeNode) ID() string                                        { return "me" }
func (f *fakeNode) Status(cluster.Shard) cluster.ShardStatus          { return f.st }
func (f *fakeNode) MayAck(cluster.Shard) bool                         { return f.mayAck }
func (f *fakeNode) Admit(context.Context, cluster.Shard, int64) error { return nil }
func (f *fakeNode) Release(cluster.Shard)                             {}
func (f *fakeNode) Incoming(cluster.Shard) bool                       { return f.incoming }
func (f *fakeNode) Moving(cluster.Shard) bool                         { return f.moving }
func (f *fakeNode) Owner(cluster.Shard) (string, string, int64, bool) {
	return f.owner, f.owner + ":8765", 7, f.owner != ""
}
func (f *fakeNode) Member(id string) (cluster.Member, bool) {
	return cluster.Member{ID: id, TLS: f.tls}, id != ""
}

// TestPlacementRoutes: where an upgrade for a shard goes, from the
// lifecycle's phase and the shard map. A shard in any state about to
// change waits (Settling) instead of being forwarded into a move or
// refused.
func TestPlacementRoutes(t *testing.T) {
	serving := cluster.ShardStatus{Phase: cluster.PhaseServing, Epoch: 5}
	for _, tc := range []struct {
		name string
		node fakeNode
		want mediator.Route
	}{
		{"served here", fakeNode{st: serving, mayAck: true, owner: "me"}, mediator.Route{Local: true, Node: "me"}},
		{"served, fence run out", fakeNode{st: serving, owner: "me"}, mediator.Route{Settling: true}},
		{"frozen by a move", fakeNode{st: cluster.ShardStatus{Phase: cluster.PhaseFrozen, Epoch: 5}, mayAck: true, owner: "me"}, mediator.Route{Settling: true}},
		{"receiving", fakeNode{st: cluster.ShardStatus{Phase: cluster.PhaseReceiving}, owner: "b"}, mediator.Route{Settling: true}},
		{"store refused the epoch", fakeNode{st: cluster.ShardStatus{Phase: cluster.PhaseFenced, Epoch: 5}, owner: "me"}, mediator.Route{Settling: true}},
		{"moving to this node", fakeNode{incoming: true, owner: "b"}, mediator.Route{Settling: true}},
		{"moving between two others", fakeNode{moving: true, owner: "b"}, mediator.Route{Settling: true}},
		{"map names this node first", fakeNode{owner: "me"}, mediator.Route{Settling: true}},
		{"another node", fakeNode{owner: "b"}, mediator.Route{Node: "b", Addr: "b:8765"}},
		{"another node with TLS", fakeNode{owner: "b", tls: true}, mediator.Route{Node: "b", Addr: "b:8765", TLS: true}},
		{"nobody", fakeNode{}, mediator.Route{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &placement{fake: &tc.node}
			if got := p.Route(0x2a); got != tc.want {
				t.Fatalf("route %+v, want %+v", got, tc.want)
			}
		})
	}
	p := &placement{}
	if rt := p.Route(1); rt != (mediator.Route{}) {
		t.Fatalf("before Join: %+v", rt)
	}
	if _, ok := p.Epoch(1); ok {
		t.Fatal("an epoch before Join")
	}
	var gone *cluster.ShardGoneError
	if err := p.Admit(context.Background(), 1, 0); !errors.As(err, &gone) {
		t.Fatalf("Admit before Join: %v", err)
	}
	for _, tc := range []struct {
		st cluster.ShardStatus
		ok bool
	}{
		{serving, true},
		{cluster.ShardStatus{Phase: cluster.PhaseFrozen, Epoch: 5}, true},
		{cluster.ShardStatus{Phase: cluster.PhaseFenced, Epoch: 5}, false},
		{cluster.ShardStatus{Phase: cluster.PhaseReceiving}, false},
	} {
		p := &placement{fake: &fakeNode{st: tc.st}}
		if e, ok := p.Epoch(1); ok != tc.ok || ok && e != 5 {
			t.Errorf("%v: epoch %d %v", tc.st.Phase, e, ok)
		}
	}
}

// TestEventLogClosesTheShard: a shard lost by a move closes its devices
// with 1001 and a reason naming the new owner, and counts the move; other
// losses name their cause; devices of other shards stay.
func TestEventLogClosesTheShard(t *testing.T) {
	d, err := Start(Config{DataDir: t.TempDir(), DeviceListen: "127.0.0.1:0", Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Shutdown(context.Background()) })
	dial := func(k d2d.Keys) *d2mclient.Client {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := d2mclient.Dial(ctx, d2mclient.Config{URL: d.DeviceURL, Keys: k, DeviceID: 1,
			ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.CloseNow() })
		return c
	}
	reason := func(c *d2mclient.Client) (int, string) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		code := c.CloseCode(ctx)
		var ce websocket.CloseError
		errors.As(c.Err(), &ce)
		return code, ce.Reason
	}
	var keys []d2d.Keys
	for len(keys) < 2 {
		k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		if len(keys) == 0 || k.DeviceGroupID()[0] != keys[0].DeviceGroupID()[0] {
			keys = append(keys, k)
		}
	}
	moved, other := dial(keys[0]), dial(keys[1])
	s := cluster.Shard(keys[0].DeviceGroupID()[0])
	l := newEventLog(d, d.Server, nil)
	l.handle([]cluster.Event{
		{Kind: cluster.ShardFrozen, Shard: s, Epoch: 5, Move: "m", To: "node-b"},
		{Kind: cluster.ShardLost, Shard: s, Epoch: 5, Cause: cluster.CauseMovedAway, Move: "m", To: "node-b"},
	})
	if code, why := reason(moved); code != int(d2m.CloseGoingAway) || why != "shard moved to node-b" {
		t.Fatalf("device of the moved shard: close %d %q, want 1001 \"shard moved to node-b\"", code, why)
	}
	if v := counterValue(l.moves.WithLabelValues("handed_over")); v != 1 {
		t.Fatalf("moves handed over: %v", v)
	}
	select {
	case <-other.Done():
		t.Fatal("a device of another shard was closed")
	default:
	}
	// A second group of the same shard, then a lease loss.
	again := dial(keys[0])
	l.handle([]cluster.Event{{Kind: cluster.ShardLost, Shard: s, Epoch: 6, Cause: cluster.CauseLeaseLost}})
	if code, why := reason(again); code != int(d2m.CloseGoingAway) || why != "shard lease lost" {
		t.Fatalf("after a lease loss: close %d %q", code, why)
	}
	if v := counterValue(l.moves.WithLabelValues("handed_over")); v != 1 {
		t.Fatalf("a lease loss counted as a move: %v", v)
	}
}

func counterValue(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		return -1
	}
	return m.GetCounter().GetValue()
}
