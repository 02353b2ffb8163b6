package main

import (
	"context"
	"sync"
	"time"
)

// runHandshake: C workers, each with its own device group and device,
// connect, authenticate (up to ServerInfo) and disconnect in a loop.
func runHandshake(ctx context.Context, env *runEnv) (*result, error) {
	o := env.o
	res := newResult("handshake", map[string]any{
		"concurrency": o.concurrency, "duration": o.duration.String(), "close": o.closeMode, "url": o.url,
	})
	errs := &errCounter{}
	lat := newHist("handshake (dial → ServerInfo)")
	closeLat := newHist("close")
	var ok counter
	keys := newGroupKeys(o.concurrency)

	before, _ := env.probe.read(ctx, false)
	runCtx, stop := context.WithTimeout(ctx, o.duration)
	defer stop()
	prog := startProgress("handshake", errs, rateOf("handshakes", ok.get), rateOf("503", env.dialer.overload.Load))
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < o.concurrency; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cfg := env.dialer.deviceConfig(keys[w], 1)
			for runCtx.Err() == nil {
				t0 := time.Now()
				c, err := env.dialer.dial(runCtx, cfg)
				if err != nil {
					if runCtx.Err() == nil {
						errs.add(err)
						time.Sleep(10 * time.Millisecond)
					}
					continue
				}
				lat.Record(time.Since(t0))
				ok.Add(1)
				t1 := time.Now()
				if o.closeMode == "abort" {
					c.CloseNow()
				} else {
					c.Close()
				}
				closeLat.Record(time.Since(t1))
			}
		}()
	}
	<-runCtx.Done()
	elapsed := time.Since(start)
	n := ok.get()
	wg.Wait()
	prog.finish(res)
	after, _ := env.probe.read(context.Background(), false)

	res.ElapsedS = round3(elapsed.Seconds())
	res.add("authenticated handshakes", float64(n), "")
	res.add("handshakes/s (window mean)", round3(float64(n)/elapsed.Seconds()), "/s")
	res.add("handshakes/s (median second)", medianRate(res.timelineValues("handshakes")), "/s")
	res.add("503 retries", float64(env.dialer.overload.Load()), "")
	res.add("dial attempts", float64(env.dialer.attempts.Load()), "")
	res.addHist(lat)
	res.addHist(closeLat)
	if env.probe.enabled() {
		res.Server = diffSnapshots(before, after)
	}
	res.note("a handshake is: TCP connect, WebSocket upgrade, ServerHello, ClientHello with the NaCl challenge response, slot persisted, ServerInfo; each worker reuses one device id, so every handshake also persists the slot once on connect and once on disconnect")
	res.finish(errs)
	return res, nil
}
