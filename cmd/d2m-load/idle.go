package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
)

// runIdle connects N devices in groups of 1, 2, 3, 1, 2, 3, … and measures
// what the server holds per authenticated idle connection.
func runIdle(ctx context.Context, env *runEnv) (*result, error) {
	o := env.o
	n := o.devices
	res := newResult("idle", map[string]any{
		"devices": n, "hold": o.duration.String(), "keepalive": o.keepalive.String(), "url": o.url,
	})
	if !env.probe.enabled() {
		return nil, errors.New("idle: needs --server-pid and/or --admin to read the server's memory")
	}
	errs := &errCounter{}
	hs := newHist("handshake (to ReflectionQueueDry)")

	// Group layout: sizes cycle 1, 2, 3.
	type slot struct{ group, dev int }
	slots := make([]slot, 0, n)
	for g := 0; len(slots) < n; g++ {
		for d := 0; d < g%3+1 && len(slots) < n; d++ {
			slots = append(slots, slot{g, d + 1})
		}
	}
	groups := slots[n-1].group + 1
	logf("idle: deriving %d group keys", groups)
	keys := newGroupKeys(groups)

	// Baseline after a GC, before anything connects.
	before, err := env.probe.read(ctx, true)
	if err != nil {
		logf("idle: warning: %v", err)
	}
	conns := make([]*d2mclient.Client, n)
	defer func() { closeAll(conns, o.dialWorkers, true) }()
	ioCtx, ioCancel := context.WithCancel(context.Background())
	defer ioCancel()
	var closing atomic.Bool

	var ready atomic.Int64
	var rss atomic.Int64
	rss.Store(int64(before.RSSBytes))
	sampleCtx, stopSample := context.WithCancel(context.Background())
	defer stopSample()
	go every(sampleCtx, time.Second, func() { rss.Store(int64(env.probe.rss(sampleCtx))) })
	prog := startProgress("idle", errs,
		gauge("connected", "devices", func() float64 { return float64(ready.Load()) }),
		gauge("server RSS", "MiB", func() float64 { return float64(rss.Load()) / (1 << 20) }))
	setupCtx, cancelSetup := context.WithTimeout(ctx, setupTimeout)
	start := time.Now()
	var recvWG sync.WaitGroup
	recvCtx, stopRecv := context.WithCancel(context.Background())
	defer stopRecv()
	err = forEach(setupCtx, n, o.dialWorkers, func(i int) error {
		c, err := env.dialer.dialReady(setupCtx, env.dialer.deviceConfig(keys[slots[i].group], uint64(slots[i].dev)), hs)
		if err != nil {
			return fmt.Errorf("device %d: %w", i, err)
		}
		conns[i] = c
		ready.Add(1)
		// Drain whatever else arrives (RolePromotedToLeader, DevicesInfo)
		// and notice closes.
		recvWG.Add(1)
		go func() {
			defer recvWG.Done()
			for {
				if _, ok := recvSession(recvCtx, c.Conn, &closing, errs); !ok {
					return
				}
			}
		}()
		return nil
	})
	cancelSetup()
	connectTime := time.Since(start)
	if err != nil {
		prog.finish(res)
		return nil, fmt.Errorf("setup: %w", err)
	}
	logf("idle: %d devices connected in %v; holding for %v", n, connectTime.Round(time.Millisecond), o.duration)

	// Hold, with cheap keepalive traffic spread over the interval.
	holdCtx, stopHold := context.WithTimeout(ctx, o.duration)
	defer stopHold()
	if o.keepalive > 0 {
		go func() {
			ping := d2m.MustEncodeMessage(d2m.TypeGetDevicesInfo, &d2mpb.GetDevicesInfo{})
			const step = 100 * time.Millisecond
			per := max(1, int(int64(n)*int64(step)/int64(o.keepalive)))
			i := 0
			every(holdCtx, step, func() {
				for k := 0; k < per; k++ {
					if c := conns[i%n]; c != nil {
						c.Send(ioCtx, ping)
					}
					i++
				}
			})
		}()
	}
	<-holdCtx.Done()
	after, err := env.probe.read(context.Background(), true)
	if err != nil {
		logf("idle: warning: %v", err)
	}
	prog.finish(res)
	res.ElapsedS = round3(time.Since(start).Seconds())

	closing.Store(true)
	closeAll(conns, o.dialWorkers, false)
	stopRecv()
	recvWG.Wait()

	perConn := func(a, b float64) float64 {
		if a < 0 || b < 0 {
			return -1
		}
		return round3((b - a) / float64(n) / 1024)
	}
	res.add("devices connected", float64(n), "")
	res.add("groups", float64(groups), "")
	res.add("connect time", round3(connectTime.Seconds()), "s")
	res.add("server RSS per connection", perConn(before.RSSBytes, after.RSSBytes), "KiB")
	res.add("server heap in use per connection", perConn(before.HeapInuse, after.HeapInuse), "KiB")
	res.add("server stack in use per connection", perConn(before.StackInuse, after.StackInuse), "KiB")
	if before.Goroutines >= 0 && after.Goroutines >= 0 {
		res.add("server goroutines per connection", round3((after.Goroutines-before.Goroutines)/float64(n)), "")
	}
	res.add("server RSS before", round3(before.RSSBytes/(1<<20)), "MiB")
	res.add("server RSS after", round3(after.RSSBytes/(1<<20)), "MiB")
	res.add("503 retries", float64(env.dialer.overload.Load()), "")
	res.addHist(hs)
	res.Server = diffSnapshots(before, after)
	res.note("server readings after GET /debug/pprof/heap?gc=1 (forced GC) when --admin is given; RSS from /proc/PID/status when --server-pid is given")
	res.finish(errs)
	return res, nil
}
