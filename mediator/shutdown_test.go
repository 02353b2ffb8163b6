package mediator_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/mediator"
	"d2m-mediator/mediator/mediatortest"
	"d2m-mediator/proto/d2mpb"
)

// TestShutdownManyDevices: Shutdown with thousands of connected devices
// closes every one with 1001 and returns, with every server goroutine
// ended, well within its deadline (docs/protocol.md §18 row 15). 5,000 devices;
// 1,000 under the race detector, which slows every handshake tenfold.
func TestShutdownManyDevices(t *testing.T) {
	n := 5000
	if raceEnabled {
		n = 1000
	}
	srv := mediatortest.NewServer(t, mediator.Config{ShutdownSpread: time.Second})
	keys := make([]d2d.Keys, n/2)
	for i := range keys {
		keys[i] = d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	}
	devices := make([]*d2mclient.Client, n)
	var next atomic.Int64
	var failed atomic.Value
	var wg sync.WaitGroup
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n || failed.Load() != nil {
					return
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				c, err := d2mclient.Dial(ctx, d2mclient.Config{URL: srv.URL, Keys: keys[i/2], DeviceID: uint64(i%2 + 1),
					ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
				cancel()
				if err != nil {
					failed.CompareAndSwap(nil, err)
					return
				}
				devices[i] = c
			}
		}()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range devices {
			if c != nil {
				c.CloseNow()
			}
		}
	})
	if err := failed.Load(); err != nil {
		t.Fatalf("connecting %d devices: %v", n, err)
	}

	const deadline = 10 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	start := time.Now()
	if err := srv.Daemon.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown with %d devices: %v after %v", n, err, time.Since(start))
	}
	took := time.Since(start)
	t.Logf("Shutdown with %d devices took %v (spread 1s, deadline %v)", n, took, deadline)
	for i, c := range devices {
		if code := c.CloseCode(context.Background()); code != int(d2m.CloseGoingAway) {
			t.Fatalf("device %d: close code %d, want 1001", i, code)
		}
	}
}
