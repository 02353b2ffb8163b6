package main

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
)

// reflectDevice is one device of the reflect scenario: a sender goroutine
// keeps up to --pipeline Reflects outstanding, a receiver goroutine takes
// ReflectAcks (in order, per the protocol) and acks every Reflected.
type reflectDevice struct {
	idx   int
	c     *d2mclient.Client
	slots chan struct{} // pipeline slots; a ReflectAck frees one
	mu    sync.Mutex
	pend  []pendingReflect // FIFO: ReflectAcks come in order
	next  uint32
}

type pendingReflect struct {
	id uint32
	t  time.Duration // sinceBase at send
}

type reflectStats struct {
	sent, acked, delivered, late, outOfOrder counter
	ackLat, delivLat                         *hist
	errs                                     *errCounter
	closing                                  atomic.Bool
}

func runReflect(ctx context.Context, env *runEnv) (*result, error) {
	o := env.o
	n := o.groups * o.devices
	res := newResult("reflect", map[string]any{
		"groups": o.groups, "devices_per_group": o.devices, "size": o.size,
		"rate": o.rate, "pipeline": o.pipeline, "duration": o.duration.String(), "url": o.url,
	})
	st := &reflectStats{ackLat: newHist("ReflectAck"), delivLat: newHist("delivery sender→receiver"), errs: &errCounter{}}
	hs := newSetupHist("handshake (setup)")

	logf("reflect: deriving %d group keys", o.groups)
	keys := newGroupKeys(o.groups)
	devs := make([]*reflectDevice, n)
	conns := make([]*d2mclient.Client, n)
	// ioCtx bounds the frames the tool writes; a Write whose context ends
	// closes the connection, so it lives until teardown.
	ioCtx, ioCancel := context.WithCancel(context.Background())
	defer ioCancel()
	defer func() { closeAll(conns, o.dialWorkers, true) }()

	logf("reflect: connecting %d devices (%d groups × %d), %d at a time", n, o.groups, o.devices, o.dialWorkers)
	setupCtx, cancelSetup := context.WithTimeout(ctx, setupTimeout)
	var ready atomic.Int64
	setupProg := startProgress("connect", st.errs, gauge("connected", "devices", func() float64 { return float64(ready.Load()) }))
	err := forEach(setupCtx, n, o.dialWorkers, func(i int) error {
		c, err := env.dialer.dialReady(setupCtx, env.dialer.deviceConfig(keys[i/o.devices], uint64(i%o.devices+1)), hs)
		if err != nil {
			return fmt.Errorf("device %d: %w", i, err)
		}
		conns[i] = c
		devs[i] = &reflectDevice{idx: i, c: c, slots: make(chan struct{}, o.pipeline)}
		ready.Add(1)
		return nil
	})
	setupProg.stopOnly()
	cancelSetup()
	if err != nil {
		return nil, fmt.Errorf("setup: %w", err)
	}
	logf("reflect: %d devices ready (%d 503 retries)", n, env.dialer.overload.Load())

	recvCtx, stopRecv := context.WithCancel(context.Background())
	defer stopRecv()
	var recvWG sync.WaitGroup
	for _, d := range devs {
		recvWG.Add(1)
		go func() { defer recvWG.Done(); d.receive(recvCtx, ioCtx, st) }()
	}

	before, _ := env.probe.read(ctx, false)
	sendCtx, stopSend := context.WithTimeout(ctx, o.duration)
	defer stopSend()
	prog := startProgress("reflect", st.errs,
		rateOf("reflects", st.acked.get), rateOf("sent", st.sent.get), rateOf("delivered", st.delivered.get))
	start := time.Now()
	interval := deviceInterval(n, o.rate)
	var sendWG sync.WaitGroup
	for _, d := range devs {
		sendWG.Add(1)
		phase := randomPhase(interval)
		go func() { defer sendWG.Done(); d.send(sendCtx, ioCtx, o.size, interval, phase, st) }()
	}
	<-sendCtx.Done()
	elapsed := time.Since(start)
	ackedInWindow, deliveredInWindow, sentInWindow := st.acked.get(), st.delivered.get(), st.sent.get()
	sendWG.Wait()
	// Drain: wait for the outstanding ReflectAcks (and deliveries).
	drainUntil := time.Now().Add(10 * time.Second)
	for time.Now().Before(drainUntil) && (st.acked.get() < st.sent.get() || st.delivered.get() < st.acked.get()*int64(o.devices-1)) {
		time.Sleep(20 * time.Millisecond)
	}
	prog.finish(res)
	after, _ := env.probe.read(context.Background(), false)
	st.closing.Store(true)
	logf("reflect: closing %d connections", n)
	closeAll(conns, o.dialWorkers, false)
	stopRecv()
	recvWG.Wait()

	res.ElapsedS = round3(elapsed.Seconds())
	rate := float64(ackedInWindow) / elapsed.Seconds()
	res.add("reflects acked (durable) in window", float64(ackedInWindow), "")
	res.add("reflects/s (window mean)", round3(rate), "/s")
	res.add("reflects/s (median second)", medianRate(res.timelineValues("reflects")), "/s")
	res.add("stored copies/s (reflects × (devices−1))", round3(rate*float64(o.devices-1)), "/s")
	res.add("delivered Reflected/s", round3(float64(deliveredInWindow)/elapsed.Seconds()), "/s")
	res.add("reflects sent in window", float64(sentInWindow), "")
	res.add("unacked after drain", float64(st.sent.get()-st.acked.get()), "")
	res.add("deliveries missing after drain", float64(st.acked.get()*int64(o.devices-1)-st.delivered.get()), "")
	if o.rate > 0 {
		res.add("target rate", o.rate, "/s")
		res.add("schedule slips > 1 s (target not kept)", float64(st.late.get()), "")
	}
	res.add("503 retries during setup", float64(env.dialer.overload.Load()), "")
	if st.outOfOrder.get() > 0 {
		res.add("ReflectAck out of order", float64(st.outOfOrder.get()), "")
	}
	res.addHist(st.ackLat)
	res.addHist(st.delivLat)
	res.addHist(hs)
	if env.probe.enabled() {
		res.Server = diffSnapshots(before, after)
	}
	res.note("latencies are measured in this process, which shares the CPUs with the server; envelopes are %d random bytes with a send timestamp", o.size)
	res.finish(st.errs)
	return res, nil
}

func (d *reflectDevice) send(ctx, ioCtx context.Context, size int, interval, phase time.Duration, st *reflectStats) {
	env := randomBytes(size)
	pace := newPacer(interval, phase, &st.late)
	defer pace.stop()
	for pace.acquire(ctx, d.slots) {
		d.next++
		id := d.next
		stampEnvelope(env, d.idx)
		d.mu.Lock()
		d.pend = append(d.pend, pendingReflect{id: id, t: sinceBase()})
		d.mu.Unlock()
		if err := d.c.ReflectWithID(ioCtx, id, env, 0); err != nil {
			if !st.closing.Load() {
				st.errs.add(fmt.Errorf("reflect: %w", err))
			}
			return
		}
		st.sent.Add(1)
	}
}

func (d *reflectDevice) receive(ctx, ioCtx context.Context, st *reflectStats) {
	for {
		m, ok := recvSession(ctx, d.c.Conn, &st.closing, st.errs)
		if !ok {
			return
		}
		switch m.Type {
		case d2m.TypeReflectAck:
			ra, err := d2m.DecodeReflectAck(m.Payload)
			if err != nil {
				st.errs.add(err)
				continue
			}
			d.mu.Lock()
			var p pendingReflect
			ok := len(d.pend) > 0 && d.pend[0].id == ra.ID
			if ok {
				p = d.pend[0]
				d.pend = d.pend[1:]
			} else {
				// Find it anyway; the order violation is counted.
				for i := range d.pend {
					if d.pend[i].id == ra.ID {
						p, ok = d.pend[i], true
						d.pend = append(d.pend[:i], d.pend[i+1:]...)
						break
					}
				}
				st.outOfOrder.Add(1)
			}
			d.mu.Unlock()
			if ok {
				st.ackLat.Record(sinceBase() - p.t)
				st.acked.Add(1)
				<-d.slots
			}
		case d2m.TypeReflected:
			r, err := d2m.DecodeReflected(m.Payload)
			if err != nil {
				st.errs.add(err)
				continue
			}
			if age, ok := envelopeAge(r.Envelope); ok {
				st.delivLat.Record(age)
			}
			st.delivered.Add(1)
			if err := d.c.AckReflected(ioCtx, r.ID); err != nil && !st.closing.Load() {
				st.errs.add(fmt.Errorf("ack: %w", err))
			}
		}
	}
}
