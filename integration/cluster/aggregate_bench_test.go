package cluster

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
)

// reflectThroughput runs groups × 3 devices for d, each device keeping up
// to 8 reflections unacknowledged and acking every Reflected; every device
// dials its shard's owner (as behind HAProxy with the map). It returns
// the ReflectAcks per second.
func reflectThroughput(b *testing.B, nodes []*mediatorNode, groups int, d time.Duration) float64 {
	urlFor := func(k d2d.Keys) string {
		if len(nodes) == 1 {
			return nodes[0].d.DeviceURL
		}
		owner, _, _, _ := nodes[0].d.Cluster.Owner(cluster.Shard(k.DeviceGroupID()[0]))
		for _, n := range nodes {
			if n.id == owner {
				return n.d.DeviceURL
			}
		}
		b.Fatalf("no owner for %02x", k.DeviceGroupID()[0])
		return ""
	}
	var clients []*d2mclient.Client
	for g := 0; g < groups; g++ {
		k := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		for id := uint64(1); id <= 3; id++ {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			c, err := d2mclient.Dial(ctx, d2mclient.Config{URL: urlFor(k), Keys: k, DeviceID: id,
				ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
			cancel()
			if err != nil {
				b.Fatal(err)
			}
			clients = append(clients, c)
		}
	}
	var acks atomic.Int64
	ctx, stop := context.WithTimeout(context.Background(), d)
	defer stop()
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.CloseNow()
			window := make(chan struct{}, 8)
			go func() {
				for {
					m, err := c.Recv(context.Background())
					if err != nil {
						return
					}
					switch m.Type {
					case d2m.TypeReflectAck:
						acks.Add(1)
						<-window
					case d2m.TypeReflected:
						r, _ := d2m.DecodeReflected(m.Payload)
						c.AckReflected(context.Background(), r.ID)
					}
				}
			}()
			env := make([]byte, 100)
			for ctx.Err() == nil {
				select {
				case window <- struct{}{}:
					c.Reflect(context.Background(), env, 0)
				case <-ctx.Done():
				}
			}
		}()
	}
	start := time.Now()
	wg.Wait()
	return float64(acks.Load()) / time.Since(start).Seconds()
}

// BenchmarkAggregateReflect: one node against three nodes on this box in
// the same run, 100 groups × 3 devices, 10 s each, devices dialling their
// shard's owner. In integration/cluster:
//
//	go test -run '^$' -bench AggregateReflect -benchtime 1x ./...
func BenchmarkAggregateReflect(b *testing.B) {
	for _, n := range []int{1, 3} {
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			prefix := fmt.Sprintf("/b/%s/%d/", b.Name(), time.Now().UnixNano())
			base := b.TempDir()
			var nodes []*mediatorNode
			for i := 0; i < n; i++ {
				id := fmt.Sprintf("a%d", i+1)
				nodes = append(nodes, startBenchMediator(b, id, prefix, filepath.Join(base, id)))
			}
			deadline := time.Now().Add(20 * time.Second)
			for s := 0; s < cluster.NumShards; s++ {
				for {
					if _, _, _, ok := nodes[0].d.Cluster.Owner(cluster.Shard(s)); ok {
						break
					}
					if time.Now().After(deadline) {
						b.Fatal("shards not served")
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
			var rate float64
			for i := 0; i < b.N; i++ {
				rate = reflectThroughput(b, nodes, 100, 10*time.Second)
			}
			b.ReportMetric(rate, "reflects/s")
		})
	}
}
