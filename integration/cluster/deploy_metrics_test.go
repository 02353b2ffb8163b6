package cluster

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/integration/internal/promnames"
)

// TestDeployClusterMetricsExist is the cluster half of integration's
// TestDeployMetricsExist: every mediator_cluster_* name that the shipped
// rules and dashboard (deploy/) use must be in a cluster node's /metrics,
// read over its admin listener as Prometheus does. Some appear only once
// used, so the nodes forward a device and move a shard first. Then one
// node stops and the other's mediator_cluster_shards_unserved (the input of
// MediatorClusterShardsUnserved) counts exactly the stopped node's shards.
func TestDeployClusterMetricsExist(t *testing.T) {
	uses, err := promnames.Read("../..")
	if errors.Is(err, os.ErrNotExist) {
		t.Skipf("cannot check the metric names: %v (run from the repository's integration/cluster directory)", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	nodes := startCluster(t, "m1", "m2")
	m1, m2 := nodes[0], nodes[1]

	// A device of a shard m2 owns, dialled at m1: forwarded.
	var k d2d.Keys
	for {
		k = d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		if owner, _, _, _ := m1.d.Cluster.Owner(cluster.Shard(k.DeviceGroupID()[0])); owner == "m2" {
			break
		}
	}
	c, err := dialDevice(t, m1.d.DeviceURL, k, 1)
	if err != nil {
		t.Fatal(err)
	}
	recvType(t, c, d2m.TypeReflectionQueueDry)
	if forwarded(m1) != 1 {
		t.Fatalf("m1 forwarded %v devices, want 1", forwarded(m1))
	}
	// A planned move away from m2 (the donor counts it).
	if to := moveToOther(t, m1, k.DeviceGroupID()[0]); to != "m1" {
		t.Fatalf("moved to %s", to)
	}

	exposed := map[string]bool{}
	bodies := map[string]string{}
	for _, n := range nodes {
		var body string
		if code := n.admin(t, "GET", "/metrics", &body); code != 200 {
			t.Fatalf("%s /metrics: HTTP %d", n.id, code)
		}
		bodies[n.id] = body
		for name := range promnames.Exposed([]byte(body)) {
			exposed[name] = true
		}
	}
	checked := 0
	missing := uses.Missing(exposed, func(name string) bool {
		if strings.HasPrefix(name, promnames.ClusterPrefix) {
			checked++
			return true
		}
		return false
	})
	if len(missing) > 0 {
		t.Errorf("%d mediator_cluster_* name(s) in deploy/ that no cluster node's /metrics has:\n  %s",
			len(missing), strings.Join(missing, "\n  "))
	}
	if checked < 8 {
		t.Errorf("only %d mediator_cluster_* names in the rules and the dashboard", checked)
	}
	// At rest: no move in flight, the fence window is TTL − TTL/5.
	for _, n := range nodes {
		for series, want := range map[string]float64{
			"mediator_cluster_moves_in_flight":      0,
			"mediator_cluster_move_oldest_seconds":  0,
			"mediator_cluster_shards_unserved":      0,
			"mediator_cluster_fence_window_seconds": (ttl - ttl/5).Seconds(),
		} {
			if v, ok := metricValue(bodies[n.id], series); !ok || v != want {
				t.Errorf("%s: %s = %v (%v), want %v", n.id, series, v, ok, want)
			}
		}
	}

	// m2 stops: its lease is revoked, its shards stay assigned to it and
	// nobody serves them (bbolt: the data is on m2).
	assigned := 0
	for _, s := range m1.d.Cluster.Shards() {
		if s.Assigned == "m2" {
			assigned++
		}
	}
	m2.stop(t)
	waitUntil(t, 10*time.Second, "m1 sees m2's shards unserved", func() bool {
		var body string
		m1.admin(t, "GET", "/metrics", &body)
		v, _ := metricValue(body, "mediator_cluster_shards_unserved")
		return v == float64(assigned)
	})
	t.Logf("%d mediator_cluster_* names checked; %d shards unserved after m2 stopped", checked, assigned)
}

// metricValue reads an unlabelled sample of a text exposition.
func metricValue(body, series string) (float64, bool) {
	for _, l := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(l, series+" "); ok {
			var f float64
			_, err := fmt.Sscan(v, &f)
			return f, err == nil
		}
	}
	return 0, false
}
