package main

import (
	"context"
	"encoding/binary"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync/atomic"
	"time"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m/d2mclient"
)

// base is the process's monotonic epoch: envelopes carry the send time as
// nanoseconds since base, so delivery latency needs no wall clock.
var base = time.Now()

func sinceBase() time.Duration { return time.Since(base) }

// stampEnvelope writes the send time and sender index into the first 12
// bytes of env (if it is that long).
func stampEnvelope(env []byte, sender int) {
	if len(env) >= 12 {
		binary.LittleEndian.PutUint64(env, uint64(sinceBase()))
		binary.LittleEndian.PutUint32(env[8:], uint32(sender))
	}
}

// envelopeAge returns how long ago env was stamped.
func envelopeAge(env []byte) (time.Duration, bool) {
	if len(env) < 12 {
		return 0, false
	}
	return sinceBase() - time.Duration(binary.LittleEndian.Uint64(env)), true
}

// randomBytes returns n random bytes: envelopes are ciphertext to the
// server, so random filler is what it would see.
func randomBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rand.Uint32())
	}
	return b
}

// newGroupKeys derives n fresh device groups on all cores.
func newGroupKeys(n int) []d2d.Keys {
	keys := make([]d2d.Keys, n)
	forEach(context.Background(), n, runtime.NumCPU(), func(i int) error {
		keys[i] = d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		return nil
	})
	return keys
}

// closeAll closes connections with a close handshake (or drops them),
// many at a time.
func closeAll(conns []*d2mclient.Client, workers int, abort bool) {
	forEach(context.Background(), len(conns), workers, func(i int) error {
		if c := conns[i]; c != nil {
			if abort {
				c.CloseNow()
			} else {
				c.Close()
			}
		}
		return nil
	})
}

// ticker calls fn every interval until ctx ends.
func every(ctx context.Context, interval time.Duration, fn func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			fn()
		}
	}
}

// medianRate is the median of a per-second rate series, skipping the first
// and last second (ramp-up and the partial last tick).
func medianRate(vals []float64) float64 {
	if len(vals) > 3 {
		vals = vals[1 : len(vals)-1]
	}
	if len(vals) == 0 {
		return 0
	}
	s := slices.Clone(vals)
	slices.Sort(s)
	return s[len(s)/2]
}

// counter is a named cumulative count.
type counter struct{ atomic.Int64 }

func (c *counter) get() int64 { return c.Load() }

// sleepCtx sleeps d or until ctx ends; it reports whether ctx is still
// alive.
func sleepCtx(ctx context.Context, t *time.Timer, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t.Reset(d)
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		if !t.Stop() {
			select {
			case <-t.C:
			default:
			}
		}
		return false
	}
}

// timelineValues returns the recorded values of the named series.
func (r *result) timelineValues(name string) []float64 {
	for _, s := range r.Timeline.Series {
		if s.Name == name {
			return s.Values
		}
	}
	return nil
}

// pacer spaces one device's sends interval apart (0: as fast as its
// pipeline allows) and hands out its pipeline slots.
type pacer struct {
	interval time.Duration
	next     time.Time
	timer    *time.Timer
	late     *counter // sends more than a second behind schedule
}

func newPacer(interval, phase time.Duration, late *counter) *pacer {
	return &pacer{interval: interval, next: time.Now().Add(phase), timer: time.NewTimer(time.Hour), late: late}
}

func (p *pacer) stop() { p.timer.Stop() }

// acquire waits for the next send time and a free slot in slots; it
// reports false once ctx has ended (holding no slot).
func (p *pacer) acquire(ctx context.Context, slots chan struct{}) bool {
	if p.interval > 0 {
		if !sleepCtx(ctx, p.timer, time.Until(p.next)) {
			return false
		}
		p.next = p.next.Add(p.interval)
		if time.Since(p.next) > time.Second {
			p.late.Add(1)
			p.next = time.Now()
		}
	}
	select {
	case slots <- struct{}{}:
	case <-ctx.Done():
		return false
	}
	if ctx.Err() != nil {
		<-slots
		return false
	}
	return true
}

// deviceInterval spaces each of n devices' sends so that together they
// make rate sends per second; 0 (rate 0) means as fast as acks allow.
func deviceInterval(n int, rate float64) time.Duration {
	if rate <= 0 {
		return 0
	}
	return time.Duration(float64(n) / rate * float64(time.Second))
}

// randomPhase spreads the devices' first sends over one interval.
func randomPhase(interval time.Duration) time.Duration {
	if interval <= 0 {
		return 0
	}
	return time.Duration(rand.Int64N(int64(interval)))
}
