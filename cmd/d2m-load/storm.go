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

// runStorm: N groups of two devices. Fill: the target device registers its
// slot and leaves, the other device reflects K messages into the target's
// queue and leaves. Storm: all N targets reconnect at the same instant
// and each drains its backlog (acking every Reflected) up to
// ReflectionQueueDry.
func runStorm(ctx context.Context, env *runEnv) (*result, error) {
	o := env.o
	n, k := o.devices, o.queued
	res := newResult("storm", map[string]any{
		"devices": n, "queued_per_device": k, "size": o.size, "deadline": o.duration.String(), "url": o.url,
	})
	errs := &errCounter{}
	keys := newGroupKeys(n)

	// --- fill ---
	logf("storm: fill: %d groups, %d messages each, %d groups at a time", n, k, o.dialWorkers)
	fillCtx, cancelFill := context.WithTimeout(ctx, setupTimeout)
	var filled atomic.Int64
	fillProg := startProgress("fill", errs, gauge("groups filled", "groups", func() float64 { return float64(filled.Load()) }))
	fillStart := time.Now()
	err := forEach(fillCtx, n, o.dialWorkers, func(i int) error {
		t, err := env.dialer.dial(fillCtx, env.dialer.deviceConfig(keys[i], 1))
		if err != nil {
			return fmt.Errorf("group %d target: %w", i, err)
		}
		_, err = readyDevice(fillCtx, t, nil)
		t.Close()
		if err != nil {
			return fmt.Errorf("group %d target: %w", i, err)
		}
		f, err := env.dialer.dial(fillCtx, env.dialer.deviceConfig(keys[i], 2))
		if err != nil {
			return fmt.Errorf("group %d filler: %w", i, err)
		}
		defer f.Close()
		if _, err := readyDevice(fillCtx, f, nil); err != nil {
			return fmt.Errorf("group %d filler: %w", i, err)
		}
		if err := reflectAndWait(fillCtx, f, k, o.size, 32); err != nil {
			return fmt.Errorf("group %d filler: %w", i, err)
		}
		filled.Add(1)
		return nil
	})
	fillProg.stopOnly()
	cancelFill()
	if err != nil {
		return nil, fmt.Errorf("fill: %w", err)
	}
	fillTime := time.Since(fillStart)
	logf("storm: filled %d queues with %d messages in %v", n, n*k, fillTime.Round(time.Millisecond))
	time.Sleep(time.Second) // let the server finish the disconnects

	// --- storm ---
	before, _ := env.probe.read(ctx, true)
	overloadBefore := env.dialer.overload.Load()
	var peak atomic.Int64
	peak.Store(int64(before.RSSBytes))
	sampleCtx, stopSample := context.WithCancel(context.Background())
	defer stopSample()
	sampleEvery := 100 * time.Millisecond
	if env.probe.pid == 0 {
		sampleEvery = 250 * time.Millisecond // via /metrics: keep it cheap
	}
	if env.probe.enabled() {
		go every(sampleCtx, sampleEvery, func() {
			if v := int64(env.probe.rss(sampleCtx)); v > peak.Load() {
				peak.Store(v)
			}
		})
	}

	var connected, dry, received, failed counter
	dryLat := newHist("time to ReflectionQueueDry")
	hsLat := newHist("handshake (dial → ServerInfo, incl. 503 retries)")
	prog := startProgress("storm", errs,
		gauge("connected", "devices", func() float64 { return float64(connected.get()) }),
		gauge("dry", "devices", func() float64 { return float64(dry.get()) }),
		rateOf("reflected", received.get),
		rateOf("503", env.dialer.overload.Load))
	conns := make([]*d2mclient.Client, n)
	defer func() { closeAll(conns, o.dialWorkers, true) }()
	stormCtx, stopStorm := context.WithTimeout(ctx, o.duration)
	defer stopStorm()
	var wrong counter
	var lastDry atomic.Int64
	gate := make(chan struct{})
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-gate
			t0 := time.Now()
			c, err := env.dialer.dial(stormCtx, env.dialer.deviceConfig(keys[i], 1))
			if err != nil {
				failed.Add(1)
				errs.add(err)
				return
			}
			conns[i] = c
			connected.Add(1)
			hsLat.Record(time.Since(t0))
			got, err := readyDevice(stormCtx, c, func(d2m.Reflected) { received.Add(1) })
			if err != nil {
				failed.Add(1)
				errs.add(err)
				return
			}
			d := time.Since(t0)
			dryLat.Record(d)
			for {
				l := lastDry.Load()
				if int64(d) <= l || lastDry.CompareAndSwap(l, int64(d)) {
					break
				}
			}
			if got != k || c.ServerInfo.GetReflectionQueueLength() != uint32(k) {
				wrong.Add(1)
				errs.addKey(fmt.Sprintf("backlog: got %d Reflected, ServerInfo said %d, want %d", got, c.ServerInfo.GetReflectionQueueLength(), k))
			}
			dry.Add(1)
		}()
	}
	start := time.Now()
	close(gate)
	wg.Wait()
	elapsed := time.Since(start)
	stopStorm()
	after, _ := env.probe.read(context.Background(), false)
	stopSample()
	if after.RSSBytes > float64(peak.Load()) {
		peak.Store(int64(after.RSSBytes))
	}
	prog.finish(res)

	res.ElapsedS = round3(elapsed.Seconds())
	res.add("devices", float64(n), "")
	res.add("devices dry (backlog fully served)", float64(dry.get()), "")
	res.add("failures (not dry by the deadline, errors)", float64(failed.get()), "")
	res.add("wrong backlog size", float64(wrong.get()), "")
	res.add("time until the last device was dry", round3(time.Duration(lastDry.Load()).Seconds()), "s")
	res.add("Reflected delivered and acked", float64(received.get()), "")
	res.add("Reflected/s over the storm", round3(float64(received.get())/time.Duration(max(lastDry.Load(), 1)).Seconds()), "/s")
	res.add("503 retries", float64(env.dialer.overload.Load()-overloadBefore), "")
	if env.probe.enabled() {
		res.add("server RSS before storm", round3(before.RSSBytes/(1<<20)), "MiB")
		res.add("server RSS peak (sampled)", round3(float64(peak.Load())/(1<<20)), "MiB")
		res.Server = diffSnapshots(before, after)
	}
	res.add("fill time", round3(fillTime.Seconds()), "s")
	res.addHist(dryLat)
	res.addHist(hsLat)
	res.note("every device dials at the same instant; 503 answers are retried with exponential backoff (from 50 ms) and full jitter, capped at Retry-After")
	res.finish(errs)
	if dry.get() < int64(n) {
		return res, fmt.Errorf("storm: only %d of %d devices got ReflectionQueueDry", dry.get(), n)
	}
	return res, nil
}

// reflectAndWait reflects k envelopes of size bytes with up to pipeline
// outstanding and waits for every ReflectAck.
func reflectAndWait(ctx context.Context, c *d2mclient.Client, k, size, pipeline int) error {
	env := randomBytes(size)
	sent, acked := 0, 0
	for acked < k {
		for sent < k && sent-acked < pipeline {
			stampEnvelope(env, 0)
			if _, err := c.Reflect(ctx, env, 0); err != nil {
				return err
			}
			sent++
		}
		m, err := c.Recv(ctx)
		if err != nil {
			return err
		}
		if m.Type == d2m.TypeReflectAck {
			acked++
		}
	}
	return nil
}
