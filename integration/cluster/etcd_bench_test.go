package cluster

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// BenchmarkEtcdFencedWrite measures the kind of write the control plane
// makes (package cluster: every write is a compare transaction, no blind
// puts) against the test's three embedded etcd members: a transaction
// that compares a key's ModRevision with the one its writer last saw and
// puts a new value. One writer waits for each write (as one move does);
// 64 writers on 64 keys write at once (a drain or a cluster-wide
// placement). SCALING.md quotes the writes/s it reports:
//
//	cd integration/cluster && go test -run '^$' -bench EtcdFencedWrite -benchtime 2s -count 3 .
func BenchmarkEtcdFencedWrite(b *testing.B) {
	for _, writers := range []int{1, 64} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			cli, err := clientv3.New(clientv3.Config{Endpoints: shared.clients, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
			if err != nil {
				b.Fatal(err)
			}
			defer cli.Close()
			ctx := context.Background()
			prefix := fmt.Sprintf("/bench/%s/%d/", b.Name(), time.Now().UnixNano())
			revs := make([]int64, writers)
			for w := range writers {
				resp, err := cli.Put(ctx, fmt.Sprintf("%s%02x", prefix, w), "0")
				if err != nil {
					b.Fatal(err)
				}
				revs[w] = resp.Header.Revision
			}
			b.ResetTimer()
			start := time.Now()
			var wg sync.WaitGroup
			errs := make(chan error, writers)
			for w := range writers {
				n := b.N / writers
				if w < b.N%writers {
					n++
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					key := fmt.Sprintf("%s%02x", prefix, w)
					for i := range n {
						resp, err := cli.Txn(ctx).
							If(clientv3.Compare(clientv3.ModRevision(key), "=", revs[w])).
							Then(clientv3.OpPut(key, fmt.Sprint(i))).
							Commit()
						if err != nil || !resp.Succeeded {
							errs <- fmt.Errorf("writer %d: %v (succeeded %v)", w, err, resp != nil && resp.Succeeded)
							return
						}
						revs[w] = resp.Header.Revision
					}
				}()
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "writes/s")
			close(errs)
			for err := range errs {
				b.Fatal(err)
			}
		})
	}
}
