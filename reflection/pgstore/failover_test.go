package pgstore

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"d2m-mediator/internal/pgtest"
	"d2m-mediator/reflection"
	"d2m-mediator/reflection/storetest"
)

// Primary loss, as far as it can be played here: reflections are appended
// (and so acked) while the primary is killed; the standby is promoted by
// hand and the store opened on it. Every append whose done reported nil
// is there, in order, for every recipient. (Who promotes and how the
// nodes find the new primary is Patroni's part: SCALING.md.)
func TestPromotedStandbyHasEveryAck(t *testing.T) {
	t.Parallel()
	c := pgtest.Start(t, pgtest.Options{Standby: true})
	dsn := c.NewDatabase(t)
	ctx := context.Background()
	s, err := Open(ctx, dsn, Options{StatementTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	groups := []reflection.GroupID{storetest.GID(1), storetest.GID(2), storetest.GID(3)}
	for _, g := range groups {
		for _, d := range []reflection.DeviceID{1, 2} {
			if err := reflection.Sync(func(done func(error)) { s.PutSlot(g, reflection.Slot{DeviceID: d, CreatedAt: 1}, done) }); err != nil {
				t.Fatal(err)
			}
		}
	}
	// One writer per group appends until its appends fail (the primary is
	// gone); acked[g] is what the store reported durable.
	var mu sync.Mutex
	acked := make(map[reflection.GroupID][]string)
	var wg sync.WaitGroup
	started := make(chan struct{}, len(groups))
	for _, g := range groups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				env := fmt.Sprintf("%x-%d", g[0], i)
				_, err := reflection.SyncAppend(func(done func(reflection.AppendResult, error)) {
					s.Append(reflection.AppendRequest{Group: g, Sender: 1, Envelope: []byte(env)}, done)
				})
				if err != nil {
					return
				}
				mu.Lock()
				acked[g] = append(acked[g], env)
				n := len(acked[g])
				mu.Unlock()
				if n == 50 {
					started <- struct{}{}
				}
			}
		}()
	}
	for range groups {
		<-started
	}
	c.Primary.Kill(t)
	wg.Wait()
	s.Close()

	c.Promote(t)
	// The promoted standby has no standby of its own yet: opening it
	// needs --store-allow-async (the runbook's step 3).
	if _, err := Open(ctx, strings.Replace(dsn, fmt.Sprint(c.Primary.Port()), fmt.Sprint(c.Standby.Port()), 1), Options{}); err == nil ||
		!strings.Contains(err.Error(), "synchronous standby") {
		t.Fatalf("opening the promoted standby without --store-allow-async: %v", err)
	}
	ns, err := Open(ctx, strings.Replace(dsn, fmt.Sprint(c.Primary.Port()), fmt.Sprint(c.Standby.Port()), 1), Options{AllowAsync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	total := 0
	for _, g := range groups {
		es, err := ns.ReadQueue(g, 2, 0, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		want := acked[g]
		if len(es) < len(want) {
			t.Fatalf("group %x: %d entries on the promoted standby, %d were acked", g[0], len(es), len(want))
		}
		for i, w := range want {
			if string(es[i].Envelope) != w || es[i].Seq != uint64(i+1) {
				t.Fatalf("group %x entry %d: seq %d %q, acked %q", g[0], i, es[i].Seq, es[i].Envelope, w)
			}
		}
		total += len(want)
	}
	t.Logf("%d acked reflections, all on the promoted standby", total)
}
