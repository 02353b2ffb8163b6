package cluster

import (
	"context"
	"errors"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// fakeLease answers keepalives after delay; paused requests hang (as for
// a process stopped by SIGSTOP, or cut off from etcd); gone answers
// "lease not found".
type fakeLease struct {
	delay time.Duration

	mu     sync.Mutex
	paused bool
	gone   bool
	sends  []time.Time
}

func (f *fakeLease) set(paused, gone bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.paused, f.gone = paused, gone
}

func (f *fakeLease) Grant(ctx context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error) {
	return &clientv3.LeaseGrantResponse{ID: 1, TTL: ttl}, nil
}

func (f *fakeLease) KeepAliveOnce(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseKeepAliveResponse, error) {
	f.mu.Lock()
	f.sends = append(f.sends, time.Now())
	paused, gone := f.paused, f.gone
	f.mu.Unlock()
	if paused {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	select {
	case <-time.After(f.delay):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if gone {
		return nil, rpctypes.ErrLeaseNotFound
	}
	return &clientv3.LeaseKeepAliveResponse{ID: id, TTL: 2}, nil
}

// TestFenceStopsAtLastSendPlusTTLMinusMargin: keepalives answered after
// 100 ms advance the deadline from their send time; once they stop
// getting through, MayAck turns false exactly at last send + TTL − margin
// without any goroutine noticing, and comes back with the next success.
func TestFenceStopsAtLastSendPlusTTLMinusMargin(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const ttl, margin = 2 * time.Second, 400 * time.Millisecond
		start := time.Now()
		fl := &fakeLease{delay: 100 * time.Millisecond}
		f := newFence(margin)
		k := keeper{lease: fl, fence: f, ttl: ttl}
		id, err := k.grant(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		if f.mayAck(id + 1) {
			t.Fatal("MayAck true under a lease that is not the current one")
		}
		if f.mayAck(0) {
			t.Fatal("MayAck true for no lease (a shard not owned)")
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- k.run(ctx, id) }()

		time.Sleep(5 * time.Second)
		synctest.Wait()
		fl.set(true, false) // from now on nothing gets through
		st := f.status()
		interval := ttl / 3
		wantSent := start.Add(7 * interval) // sends at 0, 1/3 s, …; the 8th (at 5.33 s) hangs
		if !st.LastKeepAliveSent.Equal(wantSent) {
			t.Fatalf("last keepalive sent at %v, want %v", st.LastKeepAliveSent.Sub(start), wantSent.Sub(start))
		}
		if want := wantSent.Add(ttl - margin); !st.OwnedUntil.Equal(want) {
			t.Fatalf("owned until %v, want send + TTL − margin = %v (the reply came 100 ms after the send)", st.OwnedUntil.Sub(start), want.Sub(start))
		}
		time.Sleep(time.Until(st.OwnedUntil) - time.Nanosecond)
		if !f.mayAck(id) {
			t.Fatal("MayAck false before the fence time")
		}
		time.Sleep(time.Nanosecond)
		if f.mayAck(id) {
			t.Fatal("MayAck true at the fence time")
		}
		// A pause far past the TTL (SIGSTOP): still false, nothing ran.
		time.Sleep(time.Minute)
		if f.mayAck(id) {
			t.Fatal("MayAck true after a long pause")
		}
		// etcd still knew the lease (it was only unreachable): the next
		// successful keepalive restores acks: the hanging request times out
		// after TTL − interval, the retry follows a quarter interval later.
		fl.set(false, false)
		time.Sleep(ttl)
		synctest.Wait()
		if !f.mayAck(id) {
			t.Fatal("MayAck false after a keepalive succeeded again")
		}
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Fatalf("run returned %v, want context.Canceled", err)
		}
	})
}

// TestSlowKeepAliveKeepsTheFence: keepalives that take longer than the
// interval (TTL/3) on a busy machine are waited for, not abandoned, so
// the fence, renewed from each send time, never lapses (abandoned at the
// interval and retried, 700 ms replies let it lapse every few seconds).
// Replies slower than (TTL − margin)/2 would need overlapping requests.
func TestSlowKeepAliveKeepsTheFence(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const ttl, margin = 2 * time.Second, 400 * time.Millisecond
		fl := &fakeLease{delay: 700 * time.Millisecond} // > TTL/3
		f := newFence(margin)
		k := keeper{lease: fl, fence: f, ttl: ttl}
		id, err := k.grant(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- k.run(ctx, id) }()
		for range 200 { // 20 s in steps of 100 ms
			time.Sleep(100 * time.Millisecond)
			if !f.mayAck(id) {
				t.Fatalf("the fence lapsed with keepalives answered after 700 ms (last sent %v ago)", time.Since(f.status().LastKeepAliveSent))
			}
		}
		cancel()
		<-done
	})
}

// TestKeeperLeaseGone: etcd saying "lease not found" ends the loop with
// errLeaseLost, and leaseLost stops acks under that lease at once.
func TestKeeperLeaseGone(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		fl := &fakeLease{delay: 10 * time.Millisecond}
		f := newFence(200 * time.Millisecond)
		k := keeper{lease: fl, fence: f, ttl: time.Second}
		id, _ := k.grant(t.Context())
		done := make(chan error, 1)
		go func() { done <- k.run(t.Context(), id) }()
		time.Sleep(2 * time.Second)
		fl.set(false, true)
		if err := <-done; !errors.Is(err, errLeaseLost) {
			t.Fatalf("run returned %v, want errLeaseLost", err)
		}
		if !f.mayAck(id) {
			t.Fatal("MayAck false before the loss was reported")
		}
		f.leaseLost(id)
		if f.mayAck(id) {
			t.Fatal("MayAck true after the lease was lost")
		}
		if f.renewed(id, time.Now(), time.Second) {
			t.Fatal("renewal of a lost lease accepted")
		}
	})
}

func TestShardOfAndParse(t *testing.T) {
	if s := ShardOf([]byte{0x2a, 1, 2}); s != 0x2a || s.String() != "2a" {
		t.Fatalf("ShardOf = %v", s)
	}
	for _, in := range []string{"2A", "2a"} {
		if s, err := ParseShard(in); err != nil || s != 0x2a {
			t.Fatalf("ParseShard(%q) = %v, %v", in, s, err)
		}
	}
	for _, in := range []string{"", "2", "2aa", "zz", "-1"} {
		if _, err := ParseShard(in); err == nil {
			t.Fatalf("ParseShard(%q) accepted", in)
		}
	}
	k := newKeys("/x")
	if got := k.owner(0xff); got != "/x/shards/ff" {
		t.Fatalf("owner key %q", got)
	}
	if s, ok := k.shardSuffix("/x/shards/0f", k.owners()); !ok || s != 0x0f {
		t.Fatal("shardSuffix")
	}
	if _, ok := k.shardSuffix("/x/shards/0f0", k.owners()); ok {
		t.Fatal("shardSuffix accepted 3 digits")
	}
}

func TestConfigValidate(t *testing.T) {
	ok := Config{NodeID: "node-a", Advertise: "127.0.0.1:1"}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]Config{
		"no id":          {Advertise: "x:1"},
		"bad id":         {NodeID: "a/b", Advertise: "x:1"},
		"no advertise":   {NodeID: "a"},
		"fraction ttl":   {NodeID: "a", Advertise: "x:1", LeaseTTL: 1500 * time.Millisecond},
		"margin too big": {NodeID: "a", Advertise: "x:1", LeaseTTL: time.Second, FenceMargin: time.Second},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// BenchmarkMayAck is the reflect path's cost of asking.
func BenchmarkMayAck(b *testing.B) {
	n := &Node{fence: newFence(time.Second)}
	n.fence.granted(1, time.Now(), time.Hour)
	n.lc.apply(3, lifecycleEvent{kind: evClaimed, epoch: 10, lease: 1})
	b.ReportAllocs()
	for b.Loop() {
		if !n.MayAck(3) {
			b.Fatal("not acking")
		}
	}
}

// BenchmarkAdmitRelease is the cost every group write pays in cluster
// mode to pass the shard's lifecycle.
func BenchmarkAdmitRelease(b *testing.B) {
	n := &Node{fence: newFence(time.Second)}
	n.lc.apply(3, lifecycleEvent{kind: evClaimed, epoch: 10, lease: 1})
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if err := n.Admit(ctx, 3, 10); err != nil {
			b.Fatal(err)
		}
		n.Release(3)
	}
}
