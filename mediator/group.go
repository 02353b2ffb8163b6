package mediator

import (
	"errors"
	"sync"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/proto/d2mpb"
	"d2m-mediator/reflection"
)

// group is the in-memory coordination state of one device group. The slot
// table mirrors what the store holds; every change to it is submitted to the
// store under mu, so the store applies changes in the same order.
type group struct {
	id  reflection.GroupID
	srv *Server
	// epoch is the shard's epoch on this node when this object was made
	// (cluster mode; 0 otherwise): its state belongs to that epoch, and
	// its writes are admitted only under it (Placement.Admit). A shard
	// served again at a later epoch gets new group objects.
	epoch int64

	refs int // connections holding the group in memory; guarded by Server.mu

	mu      sync.Mutex // guards everything below; no I/O while held
	evicted bool       // dropped from Server.groups; a new object replaces it
	loaded  bool
	loading chan struct{} // non-nil while one caller reads the stored state
	// storeWrites counts writes submitted for this group and not yet
	// completed. The group stays in memory while any is pending, so a
	// reload never reads state that a pending write is about to change.
	storeWrites int
	slots       map[reflection.DeviceID]*reflection.Slot
	tombstones  map[reflection.DeviceID]reflection.Tombstone
	sharedData  []byte
	conns       map[reflection.DeviceID]*deviceConn // the registered connection of each device
	leader      *deviceConn
	txn         *transaction
}

// transaction is the group's lock (§11). ending is set once the holder
// committed or went away: the lock is still held until its held
// reflections are in the other queues, then TransactionEnded goes out.
type transaction struct {
	holder  *deviceConn
	scope   []byte
	started time.Time
	timer   *time.Timer
	ending  bool
	ended   chan struct{} // closed once the lock is free again
}

func newGroup(s *Server, id reflection.GroupID) *group {
	return &group{
		id: id, srv: s, epoch: s.epochOf(id),
		slots:      make(map[reflection.DeviceID]*reflection.Slot),
		tombstones: make(map[reflection.DeviceID]reflection.Tombstone),
		conns:      make(map[reflection.DeviceID]*deviceConn),
	}
}

// load reads the group's persistent state once per group object, outside
// mu: the first caller reads, concurrent callers wait for it. Callers hold
// a reference (acquireGroup) or the group is not evicted under them.
func (g *group) load() error {
	g.mu.Lock()
	for !g.loaded && g.loading != nil {
		ch := g.loading
		g.mu.Unlock()
		<-ch
		g.mu.Lock()
	}
	if g.loaded {
		g.mu.Unlock()
		return nil
	}
	ch := make(chan struct{})
	g.loading = ch
	g.mu.Unlock()

	// Deferred so that a panic in the store still wakes the waiters (one
	// of them loads again) instead of leaving them blocked for good.
	var st reflection.GroupState
	err := errors.New("loading the group's state was interrupted")
	defer func() {
		g.mu.Lock()
		defer g.mu.Unlock()
		g.loading = nil
		close(ch)
		if err != nil {
			return
		}
		for i := range st.Slots {
			s := st.Slots[i]
			g.slots[s.DeviceID] = &s
		}
		for _, t := range st.Tombstones {
			g.tombstones[t.DeviceID] = t
		}
		g.sharedData = st.SharedDeviceData
		g.loaded = true
	}()
	st, err = g.srv.store.Group(g.id)
	return err
}

// tracked wraps the done callback of a store write submitted under mu: the
// write counts as pending until it completes, and the group may be evicted
// once the last one has.
func (g *group) tracked(done func(error)) func(error) {
	g.storeWrites++
	return func(err error) {
		if done != nil {
			done(err)
		}
		g.writeDone()
	}
}

func (g *group) trackedAppend(done func(reflection.AppendResult, error)) func(reflection.AppendResult, error) {
	g.storeWrites++
	return func(res reflection.AppendResult, err error) {
		done(res, err)
		g.writeDone()
	}
}

func (g *group) writeDone() {
	g.mu.Lock()
	g.storeWrites--
	idle := g.storeWrites == 0
	g.mu.Unlock()
	if idle {
		g.srv.maybeEvict(g)
	}
}

func nowMillis() int64 { return time.Now().UnixMilli() }

// register runs the slot checks of a verified ClientHello in the order of
// §18 row 11 (tombstone / expected state, slots full, duplicate) and
// registers c. It returns the slot state for ServerInfo and a channel that
// yields the result of persisting the slot.
func (g *group) register(c *deviceConn, hello *d2mpb.ClientHello) (d2mpb.DeviceSlotState, <-chan error, error) {
	if err := g.admit(c.closingCtx); err != nil {
		return 0, nil, err
	}
	defer g.released()
	g.mu.Lock()
	defer g.mu.Unlock()
	dev := c.deviceID
	now := nowMillis()
	old, exists := g.slots[dev]
	actual := d2mpb.DeviceSlotState_NEW
	if exists {
		actual = d2mpb.DeviceSlotState_EXISTING
	}
	expected := hello.ExpectedDeviceSlotState
	if !exists && expected != nil && *expected == d2mpb.DeviceSlotState_EXISTING {
		// A device that was dropped while offline learns why (§18 row 7).
		if t, ok := g.tombstones[dev]; ok && now-t.At < g.srv.cfg.TombstoneTTL.Milliseconds() {
			return 0, nil, d2m.Close(tombstoneCode(t.Reason), nil)
		}
	}
	if expected != nil && *expected != actual {
		return 0, nil, d2m.Close(d2m.CloseSlotStateMismatch, nil)
	}
	if !exists && len(g.slots) >= g.srv.cfg.MaxDeviceSlots {
		if hello.DeviceSlotsExhaustedPolicy != d2mpb.ClientHello_DROP_LEAST_RECENT {
			return 0, nil, d2m.Close(d2m.CloseDeviceLimit, nil)
		}
		g.dropSlotLocked(g.leastRecentLocked(dev), reflection.Dropped, nil)
	}
	if dup := g.conns[dev]; dup != nil {
		dup.closeWith(d2m.CloseDuplicate, nil)
	}
	slot := reflection.Slot{
		DeviceID:       dev,
		DeviceInfo:     hello.EncryptedDeviceInfo,
		Policy:         reflection.ExpirationPolicy(hello.DeviceSlotExpirationPolicy),
		CreatedAt:      now,
		ConnectedSince: now,
	}
	if exists {
		slot.CreatedAt = old.CreatedAt
		slot.LastDisconnectAt = old.LastDisconnectAt
	}
	delete(g.tombstones, dev)
	g.slots[dev] = &slot
	g.conns[dev] = c
	c.connectedSince = now
	done := make(chan error, 1)
	g.srv.store.PutSlot(g.id, slot, g.tracked(func(err error) { done <- err }))
	return actual, done, nil
}

// abandonRegistration undoes register's memory changes after the slot
// could not be stored: a slot that register created is forgotten, so the
// next connection of the device sees what the store holds (no slot: NEW).
func (g *group) abandonRegistration(c *deviceConn, created bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.conns[c.deviceID] != c {
		return
	}
	delete(g.conns, c.deviceID)
	if created {
		delete(g.slots, c.deviceID)
	}
	if g.leader == c {
		g.leader = nil
		g.electLeaderLocked()
	}
}

func tombstoneCode(r reflection.TombstoneReason) d2m.CloseCode {
	if r == reflection.QueueLimit {
		return d2m.CloseQueueLimit
	}
	return d2m.CloseDropped
}

// leastRecentLocked picks the DROP_LEAST_RECENT victim (§18 row 8): the
// offline slot with the oldest last_disconnect_at, else the connected slot
// with the oldest connected_since; never the requesting device.
func (g *group) leastRecentLocked(requester reflection.DeviceID) reflection.DeviceID {
	var victim reflection.DeviceID
	found, victimOnline := false, true
	var victimAt int64
	for id, s := range g.slots {
		if id == requester {
			continue
		}
		online := g.conns[id] != nil
		at := s.LastDisconnectAt
		if online {
			at = s.ConnectedSince
		}
		better := !found ||
			(victimOnline && !online) ||
			(victimOnline == online && (at < victimAt || at == victimAt && id < victim))
		if better {
			victim, victimAt, victimOnline, found = id, at, online, true
		}
	}
	return victim
}

// dropSlotLocked removes a slot: its connection is closed with 4113 (or
// 4114), a lock it holds ends, and the store deletes slot and queue, writing
// a tombstone. done, if not nil, runs once the deletion is durable.
func (g *group) dropSlotLocked(dev reflection.DeviceID, reason reflection.TombstoneReason, done func(error)) {
	if _, ok := g.slots[dev]; !ok {
		if done != nil {
			done(nil)
		}
		return
	}
	delete(g.slots, dev)
	t := reflection.Tombstone{DeviceID: dev, Reason: reason, At: nowMillis()}
	g.tombstones[dev] = t
	if c := g.conns[dev]; c != nil {
		if g.txn != nil && g.txn.holder == c && !g.txn.ending {
			g.endTransactionLocked(false)
		}
		c.closeWith(tombstoneCode(reason), nil)
	}
	g.srv.store.DeleteSlot(g.id, dev, &t, g.tracked(func(err error) {
		if err != nil {
			g.srv.log.Error().Err(err).Str("group", shortID(g.id)).Str("device", deviceStr(dev)).Msg("deleting slot failed")
		}
		if done != nil {
			done(err)
		}
	}))
}

// unregister is the counterpart of register: it runs on every exit path of
// a registered connection.
//
// Its store writes (the disconnect, the end of a transaction) pass the
// shard's lifecycle like any other: while a planned move has frozen the
// shard they wait for its outcome; once the shard is no longer served
// here they are skipped, and only memory is cleaned up. Whoever serves
// the shard next settles those (the import on a move's recipient, the
// claim on this node) by marking every slot disconnected and releasing
// held reflections.
func (g *group) unregister(c *deviceConn) {
	admitted := g.admit(g.srv.baseCtx) == nil
	if admitted {
		defer g.released()
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.conns[c.deviceID] == c {
		delete(g.conns, c.deviceID)
		if s, ok := g.slots[c.deviceID]; ok {
			s.ConnectedSince = 0
			s.LastDisconnectAt = nowMillis()
			if admitted {
				g.srv.store.PutSlot(g.id, *s, g.tracked(g.srv.logStoreErr("persisting disconnect")))
			}
		}
	}
	if g.txn != nil && g.txn.holder == c && !g.txn.ending {
		if admitted {
			g.endTransactionLocked(false)
		} else {
			g.abandonTransactionLocked()
		}
	}
	if g.leader == c {
		g.leader = nil
		g.electLeaderLocked()
	}
}

// electLeaderLocked promotes a connection if the group has no leader (§18
// row 1): among connections that have received their ReflectionQueueDry,
// those that proxy chat-server traffic first, then the earliest connected.
func (g *group) electLeaderLocked() {
	if g.leader != nil {
		return
	}
	var best *deviceConn
	for _, c := range g.conns {
		if !c.dry.Load() || c.isClosing() {
			continue
		}
		if best == nil || betterLeader(c, best) {
			best = c
		}
	}
	if best == nil {
		return
	}
	g.leader = best
	best.enqueue(encodedRolePromoted)
	g.srv.metrics.leaderPromotions.Inc()
}

func betterLeader(a, b *deviceConn) bool {
	ap, bp := a.proxied.Load(), b.proxied.Load()
	if ap != bp {
		return ap
	}
	if a.connectedSince != b.connectedSince {
		return a.connectedSince < b.connectedSince
	}
	return a.seq < b.seq
}

// queueDry is called by c's send loop once ReflectionQueueDry is written.
func (g *group) queueDry(c *deviceConn) {
	g.mu.Lock()
	defer g.mu.Unlock()
	c.dry.Store(true)
	if g.conns[c.deviceID] == c {
		g.electLeaderLocked()
	}
}

// devicesInfo lists every slot, the requester included (§18 row 12).
func (g *group) devicesInfo() *d2mpb.DevicesInfo {
	g.mu.Lock()
	defer g.mu.Unlock()
	info := &d2mpb.DevicesInfo{AugmentedDeviceInfo: make(map[uint64]*d2mpb.DevicesInfo_AugmentedDeviceInfo, len(g.slots))}
	for id, s := range g.slots {
		a := &d2mpb.DevicesInfo_AugmentedDeviceInfo{
			EncryptedDeviceInfo:        s.DeviceInfo,
			DeviceSlotExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy(s.Policy),
		}
		if c := g.conns[id]; c != nil {
			a.ConnectionState = &d2mpb.DevicesInfo_AugmentedDeviceInfo_ConnectedSince{ConnectedSince: uint64(c.connectedSince)}
		} else {
			a.ConnectionState = &d2mpb.DevicesInfo_AugmentedDeviceInfo_LastDisconnectAt{LastDisconnectAt: uint64(s.LastDisconnectAt)}
		}
		info.AugmentedDeviceInfo[uint64(id)] = a
	}
	return info
}

// beginTransaction takes the lock for c or answers TransactionRejected.
func (g *group) beginTransaction(c *deviceConn, scope []byte, ttlSeconds uint32) error {
	if err := g.admit(c.closingCtx); err != nil {
		return err
	}
	defer g.released()
	g.mu.Lock()
	defer g.mu.Unlock()
	if t := g.txn; t != nil {
		if t.holder == c && !t.ending {
			return d2m.Close(d2m.CloseProtocolError, errBeginWhileHolding)
		}
		c.enqueue(d2m.MustEncodeMessage(d2m.TypeTransactionRejected, &d2mpb.TransactionRejected{
			DeviceId: uint64(t.holder.deviceID), EncryptedScope: t.scope,
		}))
		return nil
	}
	ttl := g.srv.cfg.MaxTransactionTTL
	if ttlSeconds != 0 && time.Duration(ttlSeconds)*time.Second < ttl {
		ttl = time.Duration(ttlSeconds) * time.Second
	}
	g.txn = &transaction{
		holder: c, scope: scope, started: time.Now(), ended: make(chan struct{}),
		timer: time.AfterFunc(ttl, func() { c.closeWith(d2m.CloseTransactionTTL, errTransactionTTL) }),
	}
	c.enqueue(encodedBeginTransactionAck)
	return nil
}

// commitTransaction ends c's transaction with a commit.
func (g *group) commitTransaction(c *deviceConn) error {
	if err := g.admit(c.closingCtx); err != nil {
		return err
	}
	defer g.released()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.txn == nil || g.txn.holder != c || g.txn.ending {
		return d2m.Close(d2m.CloseProtocolError, errCommitWithoutLock)
	}
	g.endTransactionLocked(true)
	return nil
}

// endTransactionLocked releases the holder's held reflections into the
// other queues and, once that is durable, frees the lock, acks a commit
// and sends TransactionEnded to every other connection (§18 row 3).
func (g *group) endTransactionLocked(committed bool) {
	t := g.txn
	t.ending = true
	t.timer.Stop()
	g.srv.metrics.lockHold.Observe(time.Since(t.started).Seconds())
	g.srv.store.ReleaseHeld(g.id, t.holder.deviceID, g.trackedAppend(func(res reflection.AppendResult, err error) {
		if err != nil {
			// The held entries stay on disk and are released at the next
			// start; the lock must not stay taken meanwhile.
			g.srv.log.Error().Err(err).Str("group", shortID(g.id)).Msg("releasing held reflections failed")
			t.holder.closeWith(storeCloseCode(err), err)
		}
		g.mu.Lock()
		defer g.mu.Unlock()
		if g.txn == t {
			g.txn = nil
		}
		close(t.ended)
		g.deliveredLocked(res)
		if committed && err == nil {
			t.holder.enqueue(encodedCommitTransactionAck)
		}
		ended := d2m.MustEncodeMessage(d2m.TypeTransactionEnded, &d2mpb.TransactionEnded{
			DeviceId: uint64(t.holder.deviceID), EncryptedScope: t.scope,
		})
		barrier := make(map[reflection.DeviceID]uint64, len(res.Delivered))
		for _, d := range res.Delivered {
			barrier[d.DeviceID] = max(barrier[d.DeviceID], d.Seq)
		}
		for id, c := range g.conns {
			if c != t.holder {
				c.enqueueAfter(ended, barrier[id])
			}
		}
	}))
}

// abandonTransactionLocked frees the lock in memory only: the shard is no
// longer served here, its held reflections stay in the store for whoever
// serves it next, and the group's other devices are being closed too.
func (g *group) abandonTransactionLocked() {
	t := g.txn
	t.ending = true
	t.timer.Stop()
	g.txn = nil
	close(t.ended)
}

// holdsLock reports whether c's reflections are held for a transaction.
func (g *group) holdsLockLocked(c *deviceConn) bool {
	return g.txn != nil && g.txn.holder == c && !g.txn.ending
}

// deliveredLocked wakes the connected recipients of stored copies and drops
// slots whose queue overflowed (4114).
func (g *group) deliveredLocked(res reflection.AppendResult) {
	for _, d := range res.Delivered {
		if c := g.conns[d.DeviceID]; c != nil {
			c.noteReady(d.Seq)
			c.wake()
		}
	}
	for _, dev := range res.Dropped {
		g.queueLimitDropLocked(dev)
	}
}

// queueLimitDropLocked mirrors a drop the store already made durably.
func (g *group) queueLimitDropLocked(dev reflection.DeviceID) {
	delete(g.slots, dev)
	g.tombstones[dev] = reflection.Tombstone{DeviceID: dev, Reason: reflection.QueueLimit, At: nowMillis()}
	if c := g.conns[dev]; c != nil {
		if g.holdsLockLocked(c) {
			g.endTransactionLocked(false)
		}
		c.closeWith(d2m.CloseQueueLimit, nil)
	}
	g.srv.metrics.queueLimitDrops.Inc()
}

// submitReflect hands a Reflect to the store. It is submitted under mu so
// that "held for a transaction" is decided in the same order in which the
// transaction's end is submitted. readAt is when its frame was read (for
// the stage metrics).
func (g *group) submitReflect(c *deviceConn, r d2m.Reflect, readAt time.Time) error {
	if err := g.admit(c.closingCtx); err != nil {
		return err
	}
	defer g.released()
	g.mu.Lock()
	req := reflection.AppendRequest{
		Group: g.id, Sender: c.deviceID, Envelope: r.Envelope,
		Ephemeral: r.Ephemeral(),
	}
	req.Hold = !req.Ephemeral && g.holdsLockLocked(c)
	id := r.ID
	if req.Ephemeral {
		env, flags := r.Envelope, r.Flags
		g.srv.store.Append(req, g.trackedAppend(func(res reflection.AppendResult, err error) {
			c.releaseReflect()
			if err != nil {
				c.closeWith(storeCloseCode(err), err)
				return
			}
			g.mu.Lock()
			defer g.mu.Unlock()
			for _, d := range res.Delivered {
				if rc := g.conns[d.DeviceID]; rc != nil {
					// Placed before readyThrough passes its seq, so no
					// later entry is read ahead of it.
					rc.pushEphemeral(ephemeralItem{seq: d.Seq, flags: flags, timestamp: res.Timestamp, envelope: env})
					rc.noteReady(d.Seq)
				} else {
					g.srv.metrics.ephemeralDrops.WithLabelValues("offline").Inc()
				}
			}
		}))
	} else {
		submitted := time.Now()
		g.srv.store.Append(req, g.trackedAppend(func(res reflection.AppendResult, err error) {
			if err != nil {
				c.releaseReflect()
				g.srv.log.Error().Err(err).Str("group", shortID(g.id)).Msg("storing reflection failed")
				c.closeWith(storeCloseCode(err), err)
				return
			}
			if !g.srv.mayAck(g.id) {
				// The node can no longer be sure it owns the shard: no ack
				// (the device sends the reflection again after it
				// reconnects to the owner, docs/protocol.md §10). A planned
				// move does not get here: it freezes the shard, which
				// keeps acks for what it admitted before the freeze.
				c.releaseReflect()
				g.srv.metrics.fenceRefusals.Inc()
				c.closeWith(d2m.CloseGoingAway, errFenced)
				return
			}
			c.enqueueReflectAck(d2m.EncodeReflectAck(id, res.Timestamp), reflectTimes{
				read: readAt, submitted: submitted, commitStart: res.CommitStart, commitDone: res.CommitDone,
			})
			if len(res.Delivered) > 0 || len(res.Dropped) > 0 {
				g.mu.Lock()
				g.deliveredLocked(res)
				g.mu.Unlock()
			}
		}))
	}
	g.mu.Unlock()
	return nil
}

// dropDevice handles DropDevice from c (§12): the target's connection gets
// 4113, slot and queue are deleted, then DropDeviceAck (for an unknown id
// too). For the requester itself the ack goes out before the 4113 close.
func (g *group) dropDevice(c *deviceConn, target reflection.DeviceID) error {
	if err := g.admit(c.closingCtx); err != nil {
		return err
	}
	done := make(chan error, 1)
	g.mu.Lock()
	self := target == c.deviceID
	if self {
		// Take the device out of the group before its close so that
		// nothing more is queued for it besides the ack.
		if g.holdsLockLocked(c) {
			g.endTransactionLocked(false)
		}
		if _, ok := g.slots[target]; ok {
			delete(g.slots, target)
			t := reflection.Tombstone{DeviceID: target, Reason: reflection.Dropped, At: nowMillis()}
			g.tombstones[target] = t
			g.srv.store.DeleteSlot(g.id, target, &t, g.tracked(func(err error) { done <- err }))
		} else {
			done <- nil
		}
	} else {
		g.dropSlotLocked(target, reflection.Dropped, func(err error) { done <- err })
	}
	g.mu.Unlock()
	g.released()
	if err := <-done; err != nil {
		return d2m.Close(storeCloseCode(err), err)
	}
	c.enqueue(d2m.MustEncodeMessage(d2m.TypeDropDeviceAck, &d2mpb.DropDeviceAck{DeviceId: uint64(target)}))
	if self {
		c.closeWith(d2m.CloseDropped, nil)
	}
	return nil
}

// setSharedDeviceData stores the opaque bytes for every later ServerInfo.
func (g *group) setSharedDeviceData(c *deviceConn, data []byte) error {
	if err := g.admit(c.closingCtx); err != nil {
		return err
	}
	defer g.released()
	g.mu.Lock()
	defer g.mu.Unlock()
	g.sharedData = data
	g.srv.store.SetSharedDeviceData(g.id, data, g.tracked(g.srv.logStoreErr("storing shared device data")))
	return nil
}

func (g *group) sharedDeviceData() []byte {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.sharedData
}
