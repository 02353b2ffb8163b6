package integration

// The Prometheus rules and the Grafana dashboard in deploy/ name metrics by
// string; this test runs a real server and fails when one of those names is
// not in its /metrics, so renaming a metric cannot silently blind the
// alerts. The mediator_cluster_* names need a node in cluster mode (and a
// forward and a move): integration/cluster's TestDeployClusterMetricsExist
// checks them.

import (
	"bytes"
	"errors"
	"math"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"d2m-mediator/integration/internal/promnames"
)

func TestDeployMetricsExist(t *testing.T) {
	uses, err := promnames.Read("..")
	if errors.Is(err, os.ErrNotExist) {
		t.Skipf("cannot check the metric names: %v (run from the repository's integration/ directory)", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(uses) < 15 {
		t.Fatalf("only %d metric names in the rules and the dashboard: %v", len(uses), uses)
	}

	// A server with a little traffic: vectors without any labelled child
	// (close codes) appear in /metrics only once used.
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	id, _ := a.Reflect(ctxT(t, time.Second), []byte("x"), 0)
	expectAck(t, a, id)
	expectReflected(t, b, []byte("x"))
	b.Close()
	var body []byte
	eventually(t, "a close code in /metrics", func() bool {
		_, body = s.adminGet("/metrics")
		return bytes.Contains(body, []byte("mediator_close_codes_total{"))
	})
	exposed := promnames.Exposed(body)

	// The ReflectAck stage histogram and the committer's busy time (issue
	// 21): the dashboard must use them, and after one acked Reflect every
	// stage has its sample and the committer has been busy.
	for _, name := range []string{"mediator_reflect_stage_seconds_bucket", "mediator_reflect_stage_seconds_sum",
		"mediator_reflect_stage_seconds_count", "mediator_committer_busy_seconds_total"} {
		if _, used := uses[name]; !used {
			t.Errorf("the dashboard does not use %s", name)
		}
	}
	eventually(t, "every ReflectAck stage observed", func() bool {
		_, body = s.adminGet("/metrics")
		for _, stage := range []string{"submit", "wait", "commit", "write", "total"} {
			if n, _ := metricValue(body, `mediator_reflect_stage_seconds_count{stage="`+stage+`"}`); n < 1 {
				return false
			}
		}
		return true
	})
	// The stages partition the total: read → submitted → commit started →
	// commit done → written.
	var parts float64
	for _, stage := range []string{"submit", "wait", "commit", "write"} {
		v, _ := metricValue(body, `mediator_reflect_stage_seconds_sum{stage="`+stage+`"}`)
		parts += v
	}
	if total, _ := metricValue(body, `mediator_reflect_stage_seconds_sum{stage="total"}`); total <= 0 || math.Abs(total-parts) > 1e-6 {
		t.Errorf("ReflectAck stages add up to %v s, total %v s", parts, total)
	}
	if busy, _ := metricValue(body, "mediator_committer_busy_seconds_total"); busy <= 0 {
		t.Errorf("mediator_committer_busy_seconds_total = %v after commits", busy)
	}

	cluster := 0
	missing := uses.Missing(exposed, func(name string) bool {
		if strings.HasPrefix(name, promnames.ClusterPrefix) {
			cluster++
			return false
		}
		return !slices.Contains(promnames.External, name)
	})
	if len(missing) > 0 {
		t.Errorf("%d metric name(s) in deploy/ that the server's /metrics does not have:\n  %s",
			len(missing), strings.Join(missing, "\n  "))
	}
	for _, name := range promnames.External {
		if _, used := uses[name]; !used {
			t.Errorf("promnames.External lists %s, which neither the rules nor the dashboard use", name)
		}
	}
	t.Logf("%d metric names checked here; %d mediator_cluster_* names are integration/cluster's (TestDeployClusterMetricsExist)",
		len(uses)-cluster, cluster)
}
