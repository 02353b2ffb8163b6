package pgstore

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"d2m-mediator/internal/pgtest"
	"d2m-mediator/reflection/storetest"
)

// A running node whose DSN names both hosts finds the promoted standby by
// itself after a failover. The promoted standby waits for no standby of
// its own, so a commit there would be on one machine only: the store
// refuses every new connection to it (the writers get errors, 1011 on the
// wire) instead of acking, and says why.
func TestFailoverToAsyncPrimaryIsRefused(t *testing.T) {
	t.Parallel()
	c := pgtest.Start(t, pgtest.Options{Standby: true})
	dsn := c.NewDatabase(t)
	primary := fmt.Sprintf("127.0.0.1:%d", c.Primary.Port())
	if !strings.Contains(dsn, primary) {
		t.Fatalf("DSN %q does not name the primary %s", dsn, primary)
	}
	both := strings.Replace(dsn, primary, fmt.Sprintf("%s,127.0.0.1:%d", primary, c.Standby.Port()), 1)
	if strings.Contains(both, "?") {
		both += "&target_session_attrs=read-write"
	} else {
		both += "?target_session_attrs=read-write"
	}
	ctx := context.Background()
	s, err := Open(ctx, both, Options{StatementTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	g := storetest.GID(9)
	putSlots(t, s, g, 1, 2)
	appendOne := func(env string) error { return appendEnvelope(s, g, env) }
	if err := appendOne("before"); err != nil {
		t.Fatal(err)
	}

	c.Primary.Kill(t)
	c.Promote(t)
	// The first attempts may still meet the dead primary's connections;
	// every later one reaches the promoted standby and must be refused.
	deadline := time.Now().Add(15 * time.Second)
	for i := 0; ; i++ {
		err := appendOne(fmt.Sprintf("after-%d", i))
		if err == nil {
			t.Fatalf("append %d after the failover acked on a primary without a synchronous standby", i)
		}
		if strings.Contains(err.Error(), "no synchronous standby") {
			t.Logf("append %d after the failover: %v", i, err)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("appends after the failover still fail with %v, want the replication refusal", err)
		}
	}
	if err := appendOne("once-more"); err == nil || !strings.Contains(err.Error(), "no synchronous standby") {
		t.Fatalf("the next append: %v, want the replication refusal", err)
	}

	// Nothing of the refused appends reached the new primary.
	ns, err := Open(ctx, both, Options{AllowAsync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	es, err := ns.ReadQueue(g, 2, 0, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 1 || string(es[0].Envelope) != "before" {
		var got []string
		for _, e := range es {
			got = append(got, string(e.Envelope))
		}
		t.Fatalf("queue on the promoted standby: %q, want only the acked %q", got, "before")
	}
}
