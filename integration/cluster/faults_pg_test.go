package cluster

import (
	"os/exec"
	"strings"
	"testing"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/internal/pgtest"
)

// pgCommitBound is how soon a writer must hear that its write failed
// while the database does not answer: a commit batch, the standby's
// confirmation included, gives up after the statement timeout, and the
// writes queued behind it fail with it; 1 s of slack for a busy machine.
const pgCommitBound = faultStatementMillis*time.Millisecond + time.Second

// TestFaultPostgresPrimaryBlackhole: the PostgreSQL primary blackholed
// from the owner of four loaded shards for 3 s while its devices reflect
// every 50 ms. Writers get 1011 within pgCommitBound; nothing is acked
// for a reflection sent during the blackhole (nothing commits); the node
// keeps its shards (etcd is fine) and acks again soon after the heal; the
// commit that was in flight when the link went silent is settled, and
// `mediator db check` finds the database consistent.
func TestFaultPostgresPrimaryBlackhole(t *testing.T) {
	dsn := pgtest.Shared(t).NewDatabase(t)
	nodes := startFaultCluster(t, faultOpts{dsn: dsn}, "f1", "f2")
	v, other := nodes[0], nodes[1]
	groups := groupsOwnedBy(t, v, 4)
	before := mediatorGoroutines()
	l := startFaultLoad(t, groups, v.d.DeviceURL, 50*time.Millisecond, func(d *fdev, attempt int) string {
		return nodes[attempt%2].d.DeviceURL
	})
	waitUntil(t, 10*time.Second, "every device acked", func() bool { return l.ackedSince(time.Time{}) })

	cut := time.Now()
	v.pg.Blackhole(true)
	waitUntil(t, 3*pgCommitBound, "every device's session open at the cut to end", func() bool {
		return len(l.closedAfter(cut)) == len(l.devices)
	})
	var worst time.Duration
	for d, s := range l.closedAfter(cut) {
		if s.code != 1011 {
			t.Errorf("(d) device %d: closed with %d while the primary was blackholed, want 1011", d.id, s.code)
		}
		worst = max(worst, s.end.Sub(cut))
	}
	t.Logf("(d) every writer closed with 1011 within %v of the blackhole (bound %v)", worst.Round(time.Millisecond), pgCommitBound)
	if worst > pgCommitBound {
		t.Errorf("(d) writers closed up to %v after the primary went silent, want within %v", worst, pgCommitBound)
	}
	time.Sleep(time.Until(cut.Add(3 * time.Second))) // the blackhole's length, not an order
	healed := time.Now()
	v.pg.Blackhole(false)
	// Nothing commits through a silent link: no ack for a reflection
	// sent after the cut (one already on its way may still commit).
	for _, u := range urlsOf(nodes) {
		for _, a := range l.acksOn(u, cut, healed) {
			if a.sent.After(cut.Add(20 * time.Millisecond)) {
				t.Errorf("(a) %q sent %v after the primary went silent was acked %v after it", a.env, a.sent.Sub(cut), a.recv.Sub(cut))
			}
		}
	}
	for _, s := range shardsOf(groups) {
		if owner, _, _, _ := other.d.Cluster.Owner(cluster.Shard(s)); owner != v.id {
			t.Errorf("shard %02x moved to %q while only the database was cut off", s, owner)
		}
	}
	waitUntil(t, 20*time.Second, "every device acked again after the heal", func() bool { return l.ackedSince(healed) })
	t.Logf("(d) after the heal every device was acked again within %v", time.Since(healed).Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond) // load after the heal
	l.stopAndCheck(t, other.d.DeviceURL, 1011, 1001)
	out, err := exec.Command(mediatorBinary(t), "db", "check", dsn).CombinedOutput()
	if err != nil {
		t.Fatalf("mediator db check after the heal: %v\n%s", err, out)
	}
	t.Logf("mediator db check: %s", strings.TrimSpace(string(out)))
	if n := strings.Count(v.logs.String(), "ended a commit of unknown outcome"); n > 0 {
		t.Logf("%s settled %d commits of unknown outcome", v.id, n)
	}
	checkNothingLeft(t, before, nodes, v.peer, other.peer)
}

// histogramAbove is how many observations of a histogram exceeded le
// (one of its bucket bounds), from a node's registry.
func histogramAbove(n *mediatorNode, name string, le float64) uint64 {
	mfs, _ := n.d.Server.Registry().Gather()
	for _, mf := range mfs {
		if mf.GetName() != name || len(mf.GetMetric()) == 0 {
			continue
		}
		h := mf.GetMetric()[0].GetHistogram()
		for _, b := range h.GetBucket() {
			if b.GetUpperBound() >= le {
				return h.GetSampleCount() - b.GetCumulativeCount()
			}
		}
	}
	return 0
}

// TestFaultPostgresStandbyBlackhole: the link between the primary and its
// synchronous standby blackholed for 3 s under load. Every commit waits
// for the standby, so nothing is acked for a reflection sent during the
// blackhole; writers get 1011 when the commit batch gives up
// (pgCommitBound), which the metrics show (commit errors, commits as
// long as the statement timeout); after the heal the standby catches up and
// acks resume, and `mediator db check` finds the database consistent.
func TestFaultPostgresStandbyBlackhole(t *testing.T) {
	pg := pgtest.Start(t, pgtest.Options{Standby: true, ReplicationProxy: true})
	dsn := pg.NewDatabase(t)
	nodes := startFaultCluster(t, faultOpts{dsn: dsn}, "f1", "f2")
	groups := keysForShards(4)
	before := mediatorGoroutines()
	l := startFaultLoad(t, groups, nodes[0].d.DeviceURL, 50*time.Millisecond, func(d *fdev, attempt int) string {
		return nodes[(int(d.id)+attempt)%2].d.DeviceURL
	})
	waitUntil(t, 10*time.Second, "every device acked", func() bool { return l.ackedSince(time.Time{}) })
	var errsBefore float64
	for _, n := range nodes {
		errsBefore += counter(n.mediatorNode, "mediator_commit_errors_total")
	}

	cut := time.Now()
	pg.Replication.Blackhole(true)
	waitUntil(t, 3*pgCommitBound, "every device's session open at the cut to end", func() bool {
		return len(l.closedAfter(cut)) == len(l.devices)
	})
	var worst time.Duration
	for d, s := range l.closedAfter(cut) {
		if s.code != 1011 {
			t.Errorf("(d) device %d: closed with %d while the standby was cut off, want 1011", d.id, s.code)
		}
		worst = max(worst, s.end.Sub(cut))
	}
	t.Logf("(d) every writer closed with 1011 within %v of the standby going silent (bound %v)", worst.Round(time.Millisecond), pgCommitBound)
	if worst > pgCommitBound {
		t.Errorf("(d) writers closed up to %v after the standby went silent, want within %v", worst, pgCommitBound)
	}
	time.Sleep(time.Until(cut.Add(3 * time.Second))) // the blackhole's length, not an order
	var errs float64
	var slow uint64
	for _, n := range nodes {
		errs += counter(n.mediatorNode, "mediator_commit_errors_total")
		// The batch gives up at the statement timeout; a healthy commit
		// takes milliseconds, so "above half of it" is the wait.
		slow += histogramAbove(n.mediatorNode, "mediator_commit_seconds", float64(faultStatementMillis)/2000)
	}
	t.Logf("metrics during the wait: mediator_commit_errors_total +%v, %d commits longer than half the statement timeout (mediator_commit_seconds)", errs-errsBefore, slow)
	if errs <= errsBefore || slow == 0 {
		t.Errorf("the wait for the standby is not visible in the metrics: commit errors +%v, slow commits %d", errs-errsBefore, slow)
	}
	healed := time.Now()
	pg.Replication.Blackhole(false)
	for _, u := range urlsOf(nodes) {
		for _, a := range l.acksOn(u, cut, healed) {
			if a.sent.After(cut.Add(20 * time.Millisecond)) {
				t.Errorf("(a) %q sent %v after the standby went silent was acked %v after it, before the standby had it", a.env, a.sent.Sub(cut), a.recv.Sub(cut))
			}
		}
	}
	waitUntil(t, 20*time.Second, "every device acked again after the heal", func() bool { return l.ackedSince(healed) })
	t.Logf("(d) after the heal every device was acked again within %v", time.Since(healed).Round(time.Millisecond))
	time.Sleep(500 * time.Millisecond) // load after the heal
	l.stopAndCheck(t, nodes[1].d.DeviceURL, 1011, 1001)
	out, err := exec.Command(mediatorBinary(t), "db", "check", dsn).CombinedOutput()
	if err != nil {
		t.Fatalf("mediator db check after the heal: %v\n%s", err, out)
	}
	checkNothingLeft(t, before, nodes, nodes[0].peer, nodes[1].peer)
}
