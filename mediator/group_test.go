package mediator

import (
	"context"
	"errors"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"

	"d2m-mediator/d2m"
	"d2m-mediator/proto/d2mpb"
	"d2m-mediator/reflection"
)

// Socket-free tests of the group state machine (group.go): connections are
// deviceConns without a socket or writer, so every frame the group queues
// stays in their control queue for the test to read, and every close is
// the decided code. The store is fakeStore; time is synctest's.

type groupHarness struct {
	t   *testing.T
	s   *Server
	fs  *fakeStore
	gid reflection.GroupID
}

func newGroupHarness(t *testing.T, cfg Config) *groupHarness {
	fs := newFakeStore()
	s, err := New(cfg, fs, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	return &groupHarness{t: t, s: s, fs: fs, gid: reflection.GroupID{0x42, 1}}
}

func (h *groupHarness) close() {
	if err := h.s.Shutdown(context.Background()); err != nil {
		h.t.Errorf("shutdown: %v", err)
	}
	h.fs.Close()
}

type helloOpt func(*d2mpb.ClientHello)

func expect(st d2mpb.DeviceSlotState) helloOpt {
	return func(h *d2mpb.ClientHello) { h.ExpectedDeviceSlotState = &st }
}

func dropLeastRecent(h *d2mpb.ClientHello) {
	h.DeviceSlotsExhaustedPolicy = d2mpb.ClientHello_DROP_LEAST_RECENT
}

// connect registers device dev as the handshake does after a verified
// ClientHello; a rejected registration returns its close code.
func (h *groupHarness) connect(dev uint64, opts ...helloOpt) (*deviceConn, d2mpb.DeviceSlotState, d2m.CloseCode) {
	h.t.Helper()
	c := h.s.newConn(nil, d2m.ClientURLInfo{DeviceGroupID: d2m.DeviceGroupID(h.gid)}, "test")
	c.writerRunning.Store(true) // no writer: frames stay queued for the test
	c.deviceID = reflection.DeviceID(dev)
	c.group = h.s.acquireGroup(h.gid)
	if err := c.group.load(); err != nil {
		h.t.Fatal(err)
	}
	hello := &d2mpb.ClientHello{DeviceId: dev, DeviceSlotExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT}
	for _, o := range opts {
		o(hello)
	}
	st, persisted, err := c.group.register(c, hello)
	if err != nil {
		h.s.releaseGroup(c.group)
		var ce *d2m.CloseError
		if !errors.As(err, &ce) {
			h.t.Fatalf("register: %v", err)
		}
		return c, st, ce.Code
	}
	if err := <-persisted; err != nil {
		h.t.Fatal(err)
	}
	return c, st, 0
}

func (h *groupHarness) disconnect(c *deviceConn) {
	c.group.unregister(c)
	h.s.releaseGroup(c.group)
	synctest.Wait()
}

// frames pops every queued control frame and returns their types.
func frames(c *deviceConn) []d2m.PayloadType {
	var out []d2m.PayloadType
	for {
		f, ok := c.ctrl.pop()
		if !ok {
			return out
		}
		out = append(out, d2m.PayloadType(f.b[0]))
	}
}

func closed(c *deviceConn) d2m.CloseCode { return d2m.CloseCode(c.closeCode.Load()) }

func TestGroupSlotStates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newGroupHarness(t, Config{})
		defer h.close()
		if _, _, code := h.connect(1, expect(d2mpb.DeviceSlotState_EXISTING)); code != d2m.CloseSlotStateMismatch {
			t.Fatalf("unknown device expecting EXISTING: %v, want 4115", code)
		}
		a, st, _ := h.connect(1, expect(d2mpb.DeviceSlotState_NEW))
		if st != d2mpb.DeviceSlotState_NEW {
			t.Fatalf("first connect: %v", st)
		}
		h.disconnect(a)
		a, st, _ = h.connect(1)
		if st != d2mpb.DeviceSlotState_EXISTING {
			t.Fatalf("second connect: %v", st)
		}
		if _, _, code := h.connect(1, expect(d2mpb.DeviceSlotState_NEW)); code != d2m.CloseSlotStateMismatch {
			t.Fatalf("existing device expecting NEW: %v, want 4115", code)
		}
		// Dropped while offline: back expecting EXISTING, it learns why
		// (4113); without expecting EXISTING it starts anew.
		b, _, _ := h.connect(2)
		h.disconnect(b)
		if err := a.group.dropDevice(a, 2); err != nil {
			t.Fatal(err)
		}
		if _, _, code := h.connect(2, expect(d2mpb.DeviceSlotState_EXISTING)); code != d2m.CloseDropped {
			t.Fatalf("dropped device: %v, want 4113", code)
		}
		if _, st, code := h.connect(2); code != 0 || st != d2mpb.DeviceSlotState_NEW {
			t.Fatalf("dropped device without expectation: %v %v", st, code)
		}
	})
}

func TestGroupDuplicateConnection(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newGroupHarness(t, Config{})
		defer h.close()
		old, _, _ := h.connect(1)
		newer, _, _ := h.connect(1)
		if closed(old) != d2m.CloseDuplicate || closed(newer) != 0 {
			t.Fatalf("old %v, new %v; want 4112 for the old one only", closed(old), closed(newer))
		}
		// The old connection's end does not unregister the new one.
		h.disconnect(old)
		if newer.group.conns[1] != newer {
			t.Fatal("new connection unregistered by the old one's end")
		}
	})
}

func TestGroupSlotLimit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newGroupHarness(t, Config{MaxDeviceSlots: 3})
		defer h.close()
		c1, _, _ := h.connect(1)
		time.Sleep(time.Millisecond)
		c2, _, _ := h.connect(2)
		time.Sleep(time.Millisecond)
		c3, _, _ := h.connect(3)
		if _, _, code := h.connect(4); code != d2m.CloseDeviceLimit {
			t.Fatalf("REJECT with a full group: %v, want 4111", code)
		}
		// Offline slots go first, the oldest disconnect first, even with
		// a higher id.
		h.disconnect(c2)
		time.Sleep(time.Millisecond)
		h.disconnect(c1)
		if _, _, code := h.connect(4, dropLeastRecent); code != 0 {
			t.Fatalf("DROP_LEAST_RECENT: %v", code)
		}
		synctest.Wait()
		st, _ := h.fs.Group(h.gid)
		if ids := slotIDs(st); !is(ids, 1, 3, 4) {
			t.Fatalf("slots %v, want 1 3 4 (2 evicted)", ids)
		}
		// All connected: the oldest connected_since goes, closed with 4113.
		c1, _, _ = h.connect(1)
		if _, _, code := h.connect(5, dropLeastRecent); code != 0 {
			t.Fatal(code)
		}
		if closed(c3) != d2m.CloseDropped || closed(c1) != 0 {
			t.Fatalf("victim: c3 %v, c1 %v; want c3 closed with 4113", closed(c3), closed(c1))
		}
	})
}

func slotIDs(st reflection.GroupState) []reflection.DeviceID {
	var out []reflection.DeviceID
	for _, s := range st.Slots {
		out = append(out, s.DeviceID)
	}
	return out
}

func TestGroupLeaderElection(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newGroupHarness(t, Config{})
		defer h.close()
		a, _, _ := h.connect(1)
		b, _, _ := h.connect(2)
		c, _, _ := h.connect(3)
		g := a.group
		// Nobody is promoted before its ReflectionQueueDry.
		if f := frames(a); len(f) != 0 {
			t.Fatalf("a before dry: %v", f)
		}
		g.queueDry(b)
		g.queueDry(c)
		if f := frames(b); len(f) != 1 || f[0] != d2m.TypeRolePromotedToLeader {
			t.Fatalf("b: %v, want a promotion", f)
		}
		g.queueDry(a)
		if f := append(frames(a), frames(c)...); len(f) != 0 {
			t.Fatalf("second promotion: %v", f)
		}
		// Handover: among dry devices, one that proxies comes first, then
		// the earliest connected.
		c.proxied.Store(true)
		h.disconnect(b)
		if f := frames(c); len(f) != 1 || f[0] != d2m.TypeRolePromotedToLeader {
			t.Fatalf("c (proxying) after the leader left: %v", f)
		}
		if f := frames(a); len(f) != 0 {
			t.Fatalf("a: %v", f)
		}
		h.disconnect(c)
		if f := frames(a); len(f) != 1 || f[0] != d2m.TypeRolePromotedToLeader {
			t.Fatalf("a after both left: %v", f)
		}
	})
}

func TestGroupTransactionLock(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newGroupHarness(t, Config{MaxTransactionTTL: 30 * time.Second})
		defer h.close()
		a, _, _ := h.connect(1)
		b, _, _ := h.connect(2)
		g := a.group
		if err := g.beginTransaction(a, []byte("scope-a"), 0); err != nil {
			t.Fatal(err)
		}
		if err := g.beginTransaction(b, []byte("scope-b"), 0); err != nil {
			t.Fatal(err)
		}
		if err := g.beginTransaction(a, []byte("again"), 0); err == nil {
			t.Fatal("BeginTransaction while holding the lock accepted")
		}
		// The holder's reflections are held; others' are not.
		g.submitReflect(a, d2m.Reflect{ID: 7, Envelope: []byte("held")}, time.Now())
		g.submitReflect(b, d2m.Reflect{ID: 8, Envelope: []byte("free")}, time.Now())
		synctest.Wait()
		if n := h.fs.heldCount(h.gid); n != 1 {
			t.Fatalf("held reflections: %d", n)
		}
		if err := g.commitTransaction(b); err == nil {
			t.Fatal("commit without the lock accepted")
		}
		if err := g.commitTransaction(a); err != nil {
			t.Fatal(err)
		}
		synctest.Wait()
		if f := frames(a); !is(f, d2m.TypeBeginTransactionAck, d2m.TypeReflectAck, d2m.TypeCommitTransactionAck) {
			t.Fatalf("holder: %v", f)
		}
		if f := frames(b); !is(f, d2m.TypeTransactionRejected, d2m.TypeReflectAck, d2m.TypeTransactionEnded) {
			t.Fatalf("other: %v", f)
		}
		if n := h.fs.heldCount(h.gid); n != 0 {
			t.Fatalf("held after commit: %d", n)
		}

		// TTL: the holder is closed with 4011 and the others learn the
		// lock ended once the close is handled as a disconnect.
		if err := g.beginTransaction(b, []byte("scope-b"), 5); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5*time.Second - time.Millisecond)
		if closed(b) != 0 {
			t.Fatal("closed before its TTL")
		}
		time.Sleep(time.Millisecond)
		synctest.Wait()
		if closed(b) != d2m.CloseTransactionTTL {
			t.Fatalf("holder after TTL: %v, want 4011", closed(b))
		}
		frames(a)
		h.disconnect(b)
		if f := frames(a); !is(f, d2m.TypeTransactionEnded) {
			t.Fatalf("after the holder's disconnect: %v", f)
		}
		// The lock is free again.
		if err := g.beginTransaction(a, nil, 0); err != nil {
			t.Fatal(err)
		}
		if f := frames(a); !is(f, d2m.TypeBeginTransactionAck) {
			t.Fatalf("begin after TTL: %v", f)
		}
	})
}

// is reports whether got holds exactly want, in order.
func is[T comparable](got []T, want ...T) bool { return slices.Equal(got, want) }

func TestGroupQueueLimitDrop(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newGroupHarness(t, Config{})
		defer h.close()
		h.fs.maxQueue = 2
		a, _, _ := h.connect(1)
		b, _, _ := h.connect(2)
		for i := 0; i < 3; i++ {
			a.group.submitReflect(a, d2m.Reflect{ID: uint32(i), Envelope: []byte{byte(i)}}, time.Now())
		}
		synctest.Wait()
		if closed(b) != d2m.CloseQueueLimit || closed(a) != 0 {
			t.Fatalf("b %v, a %v; want b closed with 4114", closed(b), closed(a))
		}
		if f := frames(a); !is(f, d2m.TypeReflectAck, d2m.TypeReflectAck, d2m.TypeReflectAck) {
			t.Fatalf("sender: %v (every reflection acked)", f)
		}
		h.disconnect(b)
		if _, _, code := h.connect(2, expect(d2mpb.DeviceSlotState_EXISTING)); code != d2m.CloseQueueLimit {
			t.Fatalf("dropped device back: %v, want 4114", code)
		}
	})
}

// TestGroupEvictionWaitsForStoreWrites: a group leaves memory only when no
// write submitted for it is pending, so a reload never reads state a
// pending write is about to change.
func TestGroupEvictionWaitsForStoreWrites(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newGroupHarness(t, Config{})
		defer h.close()
		a, _, _ := h.connect(1)
		g := a.group
		release := h.fs.hold() // the store cannot apply the disconnect yet
		g.unregister(a)
		h.s.releaseGroup(g)
		synctest.Wait()
		h.s.mu.Lock()
		resident := h.s.groups[h.gid] == g
		h.s.mu.Unlock()
		if !resident {
			t.Fatal("group evicted with a store write pending")
		}
		release()
		synctest.Wait()
		h.s.mu.Lock()
		resident = h.s.groups[h.gid] != nil
		h.s.mu.Unlock()
		if resident {
			t.Fatal("group still in memory after its writes completed")
		}
	})
}
