package mediator

import (
	"context"
	"time"

	"d2m-mediator/reflection"
)

// janitor removes expired slots (VOLATILE after the grace period,
// PERSISTENT after long inactivity), prunes old tombstones and samples
// queue depths for the metrics. Its period follows the shortest expiry so
// that a short grace in tests is honoured.
func (s *Server) janitor() {
	period := min(s.cfg.VolatileSlotGrace, s.cfg.PersistentSlotExpiry, time.Minute) / 4
	period = max(period, 50*time.Millisecond)
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-s.janitorStop:
			return
		case <-t.C:
			s.sweep(time.Now())
		}
	}
}

func (s *Server) sweep(now time.Time) {
	type expired struct {
		g reflection.GroupID
		d reflection.DeviceID
	}
	var victims []expired
	nowMs := now.UnixMilli()
	ageSamples := 0
	err := s.store.ForEachGroup(func(g reflection.GroupID, st reflection.GroupState) error {
		for _, slot := range st.Slots {
			if st, ok := s.store.QueueStats(g, slot.DeviceID); ok {
				s.metrics.queueDepth.Observe(float64(st.Length))
				// The age needs a queue read: sample a bounded number
				// of slots per sweep, enough for the distribution.
				if st.Length > 0 && ageSamples < maxQueueAgeSamples {
					ageSamples++
					s.observeQueueAge(g, slot.DeviceID, nowMs)
				}
			}
			if slot.ConnectedSince != 0 {
				continue
			}
			limit := s.cfg.PersistentSlotExpiry
			if slot.Policy == reflection.Volatile {
				limit = s.cfg.VolatileSlotGrace
			}
			if nowMs-slot.LastDisconnectAt >= limit.Milliseconds() {
				victims = append(victims, expired{g, slot.DeviceID})
			}
		}
		return nil
	})
	if err != nil {
		s.log.Error().Err(err).Msg("janitor: scanning groups failed")
		return
	}
	for _, v := range victims {
		g, err := s.acquireLoadedGroup(v.g)
		if err != nil {
			s.log.Error().Err(err).Str("group", shortID(v.g)).Msg("janitor: loading group failed")
			continue
		}
		// A frozen shard's slots expire at a later sweep: no waiting here.
		if g.admit(noWait) == nil {
			g.mu.Lock()
			g.expireSlotLocked(v.d, now)
			g.mu.Unlock()
			g.released()
		}
		s.releaseGroup(g)
	}
	s.store.PruneTombstones(now.Add(-s.cfg.TombstoneTTL).UnixMilli(), s.logStoreErr("pruning tombstones"))
}

// noWait is a context that has ended: an Admit with it does not wait.
var noWait = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// maxQueueAgeSamples bounds the queue reads one sweep makes for
// mediator_queue_oldest_age_seconds.
const maxQueueAgeSamples = 256

// observeQueueAge samples the age of the slot's oldest queued reflection.
func (s *Server) observeQueueAge(g reflection.GroupID, d reflection.DeviceID, nowMs int64) {
	oldest, err := s.store.ReadQueue(g, d, 0, 1)
	if err != nil || len(oldest) == 0 {
		return
	}
	s.metrics.queueAge.Observe(max(float64(nowMs-int64(oldest[0].Timestamp))/1000, 0))
}

// expireSlot removes an offline slot whose time ran out; it rechecks under
// the group lock because the device may have reconnected since the scan.
func (g *group) expireSlotLocked(dev reflection.DeviceID, now time.Time) {
	s, ok := g.slots[dev]
	if !ok || g.conns[dev] != nil {
		return
	}
	limit := g.srv.cfg.PersistentSlotExpiry
	if s.Policy == reflection.Volatile {
		limit = g.srv.cfg.VolatileSlotGrace
	}
	if now.UnixMilli()-s.LastDisconnectAt < limit.Milliseconds() {
		return
	}
	delete(g.slots, dev)
	g.srv.log.Info().Str("group", shortID(g.id)).Str("device", deviceStr(dev)).Msg("slot expired")
	g.srv.store.DeleteSlot(g.id, dev, nil, g.tracked(g.srv.logStoreErr("expiring slot")))
}
