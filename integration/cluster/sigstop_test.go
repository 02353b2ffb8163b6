package cluster

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"d2m-mediator/cluster"
)

// helperEnv makes the test binary run one cluster node as a child
// process (runHelperNode), so that a test can stop it with SIGSTOP.
const helperEnv = "D2M_CLUSTER_HELPER"

// runHelperNode joins node D2M_NODE at D2M_ETCD under D2M_PREFIX and
// reports on stdout, one line each:
//
//	joined
//	event <gained|lost> <shard> <epoch>
//	ack <true|false> <now> <last time seen true> <lease> <owned until>   (on every change)
//
// Times are Unix ns; lease and owned until are the fence as it was when
// MayAck was last seen true. The ack watcher checks MayAck on every shard
// every millisecond, as a reflect path would.
func runHelperNode() int {
	var mu sync.Mutex
	say := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Printf(format+"\n", args...)
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(os.Getenv("D2M_ETCD"), ","),
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	n, err := cluster.New(cli, cluster.Config{
		NodeID:       os.Getenv("D2M_NODE"),
		Advertise:    "127.0.0.1:9",
		Prefix:       os.Getenv("D2M_PREFIX"),
		LeaseTTL:     ttl,
		FenceMargin:  margin,
		NoController: true,
		OnEvents: func(evs []cluster.Event) {
			for _, ev := range evs {
				say("event %s %s %d", ev.Kind, ev.Shard, ev.Epoch)
			}
		},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := n.Join(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	say("joined")
	acking := false
	var lastTrue time.Time
	var fenceAtLastTrue cluster.FenceStatus
	for range time.Tick(time.Millisecond) {
		now := time.Now()
		anyAck := false
		for i := range cluster.NumShards {
			anyAck = anyAck || n.MayAck(cluster.Shard(i))
		}
		if anyAck {
			lastTrue = now
			fenceAtLastTrue = n.Fence()
		}
		if anyAck != acking {
			acking = anyAck
			say("ack %v %d %d %d %d", anyAck, now.UnixNano(), lastTrue.UnixNano(), fenceAtLastTrue.Lease, fenceAtLastTrue.OwnedUntil.UnixNano())
		}
	}
	return 0
}

// TestSIGSTOPNode stops a node process with SIGSTOP past its lease TTL
// and continues it: it never saw MayAck true at or after its fence time,
// it reports every shard lost at its old epoch, and (AutoFailover off)
// serves its shards again at higher epochs, while the other nodes never
// took them.
func TestSIGSTOPNode(t *testing.T) {
	e := newEnv(t, nil, nodeOpts{})
	a, b := e.start("node-a"), e.start("node-b")

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=1", "D2M_ETCD="+strings.Join(e.ec.clients, ","), "D2M_PREFIX="+e.prefix, "D2M_NODE=node-c")
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGCONT)
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	// Ack lines and event lines are read as two ordered streams.
	acks, events := make(chan []string, 4096), make(chan []string, 4096)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) > 0 && f[0] == "event" {
				events <- f
			} else {
				acks <- f
			}
		}
		close(acks)
		close(events)
	}()
	next := func(lines chan []string, what string, match func(f []string) bool) []string {
		t.Helper()
		timeout := time.After(5 * ttl)
		for {
			select {
			case f, ok := <-lines:
				if !ok {
					t.Fatalf("helper ended while waiting for %s", what)
				}
				if match(f) {
					return f
				}
			case <-timeout:
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}
	next(acks, "joined", func(f []string) bool { return f[0] == "joined" })
	waitUntil(t, 10*time.Second, "all shards served", func() bool {
		for i := range cluster.NumShards {
			if _, _, _, ok := a.Owner(cluster.Shard(i)); !ok {
				return false
			}
		}
		return true
	})
	cShards := owned(a)["node-c"]
	if len(cShards) < 85 {
		t.Fatalf("node-c owns %d shards", len(cShards))
	}
	oldEpoch := make(map[cluster.Shard]int64)
	for _, s := range cShards {
		_, _, oldEpoch[s], _ = a.Owner(s)
	}
	next(acks, "ack true", func(f []string) bool { return f[0] == "ack" && f[1] == "true" })

	if err := cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	waitUntil(t, 3*ttl, "node-c's lease expires", func() bool { return len(a.Members()) == 2 })
	// AutoFailover is off: nobody else serves node-c's shards.
	rev := a.Revision()
	waitUntil(t, 3*ttl, "controller pass", func() bool { return a.ControllerRevision() >= rev || b.ControllerRevision() >= rev })
	for _, s := range cShards {
		if owner, _, _, ok := a.Owner(s); ok {
			t.Fatalf("shard %s served by %s while node-c is stopped", s, owner)
		}
	}
	resumed := time.Now()
	if err := cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	t.Logf("node-c stopped for %v", resumed.Sub(stopped).Round(time.Millisecond))

	// The first thing the watcher reports after SIGCONT: acks stopped,
	// and the last time it saw MayAck true was before the SIGSTOP (and
	// before the fence of that lease).
	f := next(acks, "ack false", func(f []string) bool { return f[0] == "ack" })
	if f[1] != "false" {
		t.Fatalf("after SIGCONT node-c reports %v", f)
	}
	num := func(i int) int64 { v, _ := strconv.ParseInt(f[i], 10, 64); return v }
	lastTrue, oldLease, until := time.Unix(0, num(3)), num(4), time.Unix(0, num(5))
	if !lastTrue.Before(resumed) || !lastTrue.Before(until) {
		t.Fatalf("node-c saw MayAck true at %v: SIGCONT at %v, fence at %v", lastTrue, resumed, until)
	}
	t.Logf("node-c: MayAck last seen true at %+v relative to sending SIGSTOP, %v before its fence time",
		lastTrue.Sub(stopped).Round(time.Microsecond), until.Sub(lastTrue).Round(time.Millisecond))
	f = next(acks, "ack true again", func(f []string) bool { return f[0] == "ack" })
	if f[1] != "true" || num(4) == oldLease {
		t.Fatalf("node-c acks again with %v (old lease %x)", f, oldLease)
	}

	lost := make(map[cluster.Shard]bool)
	regained := make(map[cluster.Shard]int64)
	next(events, "every shard lost and gained again", func(f []string) bool {
		s, _ := cluster.ParseShard(f[2])
		ep, _ := strconv.ParseInt(f[3], 10, 64)
		switch f[1] {
		case "lost":
			if ep != oldEpoch[s] {
				t.Fatalf("lost %s at epoch %d, it was owned at %d", s, ep, oldEpoch[s])
			}
			lost[s] = true
		case "gained":
			if !lost[s] && ep == oldEpoch[s] {
				return false // the first claim, before the SIGSTOP
			}
			if !lost[s] || ep <= oldEpoch[s] {
				t.Fatalf("gained %s at %d (lost: %v, old epoch %d)", s, ep, lost[s], oldEpoch[s])
			}
			regained[s] = ep
		}
		return len(regained) == len(cShards)
	})
	for _, s := range cShards {
		waitUntil(t, 5*time.Second, "node-a routes "+s.String()+" to node-c", func() bool {
			owner, _, ep, ok := a.Owner(s)
			return ok && owner == "node-c" && ep == regained[s]
		})
	}
}
