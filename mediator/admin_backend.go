package mediator

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/rs/zerolog"

	"d2m-mediator/d2m"
	"d2m-mediator/reflection"
)

// What the admin API (package mediator/adminapi) may ask of the server:
// snapshots of in-memory group state and the few operator actions. The
// API reads stored state from Store directly.

// LiveGroup is a snapshot of a group's in-memory state.
type LiveGroup struct {
	Loaded bool
	// Conns maps each registered connection's device to its connected
	// since (unix ms).
	Conns  map[reflection.DeviceID]int64
	Leader *reflection.DeviceID
	Lock   *LockState // nil: no transaction lock
}

// LockState is a group's transaction lock.
type LockState struct {
	Holder     reflection.DeviceID
	Since      time.Time
	Ending     bool // committed or holder gone; held reflections being released
	ScopeBytes int
}

var (
	// ErrNoSlot: the group has no slot for the device.
	ErrNoSlot = errors.New("no such slot")
	// ErrNoLock: the group holds no transaction lock.
	ErrNoLock = errors.New("no transaction lock is held")
	// ErrLockEnding: the lock is already being released.
	ErrLockEnding = errors.New("the transaction lock is already being released")
)

// Store is the store the server runs on.
func (s *Server) Store() reflection.Store { return s.store }

// Config is the server's configuration with defaults applied.
func (s *Server) Config() Config { return s.cfg }

// Logger is the server's logger.
func (s *Server) Logger() zerolog.Logger { return s.log }

// LiveGroup snapshots the in-memory state of group id; a group that is not
// in memory has no connections, leader or lock.
func (s *Server) LiveGroup(id reflection.GroupID) LiveGroup {
	s.mu.Lock()
	g := s.groups[id]
	s.mu.Unlock()
	if g == nil {
		return LiveGroup{}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	l := LiveGroup{Loaded: g.loaded, Conns: make(map[reflection.DeviceID]int64, len(g.conns))}
	for dev, c := range g.conns {
		l.Conns[dev] = c.connectedSince
	}
	if g.leader != nil {
		d := g.leader.deviceID
		l.Leader = &d
	}
	if t := g.txn; t != nil {
		l.Lock = &LockState{Holder: t.holder.deviceID, Since: t.started, Ending: t.ending, ScopeBytes: len(t.scope)}
	}
	return l
}

// LiveGroupIDs lists the in-memory groups that have a connection.
func (s *Server) LiveGroupIDs() []reflection.GroupID {
	s.mu.Lock()
	groups := make([]*group, 0, len(s.groups))
	for _, g := range s.groups {
		groups = append(groups, g)
	}
	s.mu.Unlock()
	var ids []reflection.GroupID
	for _, g := range groups {
		g.mu.Lock()
		n := len(g.conns)
		g.mu.Unlock()
		if n > 0 {
			ids = append(ids, g.id)
		}
	}
	return ids
}

// ConnectionCounts reports open connections, by whether they have passed
// the handshake.
func (s *Server) ConnectionCounts() (handshake, authenticated int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		if c.authed.Load() {
			authenticated++
		} else {
			handshake++
		}
	}
	return handshake, authenticated
}

// GroupsLoaded is the number of groups with in-memory state.
func (s *Server) GroupsLoaded() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.groups)
}

// DropSlot drops a slot exactly as a device's DropDevice of another device
// does (docs/protocol.md §12): the connected device gets 4113, a lock it holds
// ends (TransactionEnded to the others), slot and queue are deleted and a
// tombstone written. It returns once the deletion is durable.
func (s *Server) DropSlot(ctx context.Context, id reflection.GroupID, dev reflection.DeviceID) (wasConnected bool, queueLength int, err error) {
	g, err := s.acquireLoadedGroup(id)
	if err != nil {
		return false, 0, err
	}
	// Loaded for this drop alone if no device holds it: let it go again.
	defer s.releaseGroup(g)
	if err := g.admit(ctx); err != nil {
		return false, 0, err
	}
	done := make(chan error, 1)
	g.mu.Lock()
	_, exists := g.slots[dev]
	if exists {
		wasConnected = g.conns[dev] != nil
		if qs, ok := s.store.QueueStats(id, dev); ok {
			queueLength = qs.Length
		}
		g.dropSlotLocked(dev, reflection.Dropped, func(err error) { done <- err })
	}
	g.mu.Unlock()
	g.released()
	if !exists {
		return false, 0, ErrNoSlot
	}
	if err := <-done; err != nil {
		return wasConnected, queueLength, fmt.Errorf("deleting the slot: %w", err)
	}
	s.log.Info().Str("group", shortID(id)).Str("device", deviceStr(dev)).Bool("was_connected", wasConnected).
		Msg("admin dropped slot")
	return wasConnected, queueLength, nil
}

// ReleaseLock ends the group's transaction as if its holder had
// disconnected: its held reflections go into the other queues and the
// other devices get TransactionEnded. The holder stays connected and is
// not told; a CommitTransaction it sends later is a protocol error (4010),
// after which it reconnects. released reports whether the lock was free
// again before ctx ended (it still becomes free afterwards).
func (s *Server) ReleaseLock(ctx context.Context, id reflection.GroupID) (holder reflection.DeviceID, heldFor time.Duration, released bool, err error) {
	s.mu.Lock()
	g := s.groups[id]
	s.mu.Unlock()
	if g == nil {
		return 0, 0, false, ErrNoLock
	}
	g.mu.Lock()
	t := g.txn
	switch {
	case t == nil:
		g.mu.Unlock()
		return 0, 0, false, ErrNoLock
	case t.ending:
		g.mu.Unlock()
		return 0, 0, false, ErrLockEnding
	}
	g.mu.Unlock()
	if err := g.admit(ctx); err != nil {
		return 0, 0, false, err
	}
	g.mu.Lock()
	if g.txn != t || t.ending {
		// Ended while this waited for a planned move.
		g.mu.Unlock()
		g.released()
		return 0, 0, false, ErrLockEnding
	}
	holder, heldFor = t.holder.deviceID, time.Since(t.started)
	g.endTransactionLocked(false)
	g.mu.Unlock()
	g.released()
	s.log.Info().Str("group", shortID(id)).Str("holder", deviceStr(holder)).Msg("admin released transaction lock")
	// The lock is free once the held reflections are durable in the other
	// queues (endTransactionLocked's callback closes t.ended).
	select {
	case <-t.ended:
		released = true
	case <-ctx.Done():
	}
	return holder, heldFor, released, nil
}

// PurgeQueue empties a slot's reflection queue, keeping the slot and its
// counter, and returns once that is durable.
func (s *Server) PurgeQueue(ctx context.Context, id reflection.GroupID, dev reflection.DeviceID) error {
	g, err := s.acquireLoadedGroup(id)
	if err != nil {
		return err
	}
	defer s.releaseGroup(g)
	if err := g.admit(ctx); err != nil {
		return err
	}
	done := make(chan error, 1)
	s.store.PurgeQueue(id, dev, func(err error) { done <- err })
	g.released()
	err = <-done
	if err == nil {
		s.log.Info().Str("group", shortID(id)).Str("device", deviceStr(dev)).Msg("admin purged reflection queue")
	}
	return err
}

// deviceStr is a device id in its one printed form (d2m.FormatDeviceID),
// as logs, the CLI and the device tools show it.
func deviceStr(d reflection.DeviceID) string { return d2m.FormatDeviceID(uint64(d)) }
