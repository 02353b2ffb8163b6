package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
)

// benchHandshakes measures dial → ServerInfo → close through a node for
// groups whose shard is owned by owner (direct) or by the other node
// (forwarded), workers devices at a time.
func benchHandshakes(b *testing.B, forwarded bool, workers int) {
	prefix := fmt.Sprintf("/b/%s/%d/", b.Name(), time.Now().UnixNano())
	base := b.TempDir()
	var nodes []*mediatorNode
	for _, id := range []string{"b1", "b2"} {
		nodes = append(nodes, startBenchMediator(b, id, prefix, filepath.Join(base, id)))
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		all := true
		for s := 0; s < cluster.NumShards; s++ {
			if _, _, _, ok := nodes[0].d.Cluster.Owner(cluster.Shard(s)); !ok {
				all = false
			}
		}
		if all {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("shards not served")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// 64 groups owned by b1; dial b1 (direct) or b2 (forwarded).
	var keys []d2d.Keys
	for len(keys) < 64 {
		k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		if node, _, _, _ := nodes[0].d.Cluster.Owner(cluster.Shard(k.DeviceGroupID()[0])); node == "b1" {
			keys = append(keys, k)
		}
	}
	url := nodes[0].d.DeviceURL
	if forwarded {
		url = nodes[1].d.DeviceURL
	}
	b.ResetTimer()
	var wg sync.WaitGroup
	work := make(chan int)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				c, err := d2mclient.Dial(ctx, d2mclient.Config{URL: url, Keys: keys[i%len(keys)], DeviceID: uint64(1 + i%4),
					ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
				cancel()
				if err != nil {
					b.Error(err)
					continue
				}
				c.Close()
			}
		}()
	}
	for i := 0; i < b.N; i++ {
		work <- i
	}
	close(work)
	wg.Wait()
}

// In integration/cluster: go test -run '^$' -bench Handshake -benchtime 2000x ./...
// One device at a time: ns/op is the handshake latency; 16 at a time:
// the rate (1/ns/op). Devices, forwarding node and owner share the cores.
func BenchmarkHandshakeDirect(b *testing.B)      { benchHandshakes(b, false, 1) }
func BenchmarkHandshakeForwarded(b *testing.B)   { benchHandshakes(b, true, 1) }
func BenchmarkHandshakeDirect16(b *testing.B)    { benchHandshakes(b, false, 16) }
func BenchmarkHandshakeForwarded16(b *testing.B) { benchHandshakes(b, true, 16) }
