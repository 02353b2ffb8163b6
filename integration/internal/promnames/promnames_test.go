package promnames

import (
	"slices"
	"testing"
)

func TestMetricNames(t *testing.T) {
	for expr, want := range map[string][]string{
		`histogram_quantile(0.99, sum by (instance, le) (rate(mediator_commit_seconds_bucket{code="4013", x=~"a b"}[5m]))) > 0.25`:        {"mediator_commit_seconds_bucket"},
		`sum by (outcome) (rate(a_total{outcome!="ok"}[10m])) / ignoring (outcome) group_left sum(rate(b_total[$__rate_interval])) > 1e3`: {"a_total", "b_total"},
		`up{job="mediator"} == 0 and on(instance) process_open_fds / process_max_fds offset 5m > 0.8`:                                     {"up", "process_open_fds", "process_max_fds"},
		`label_values(mediator_connections, instance)`:                                                                                    {"mediator_connections"},
		`rate(process_cpu_seconds_total{instance=~"$instance"}[$__rate_interval]) * 1000`:                                                 {"process_cpu_seconds_total"},
		`node_filesystem_avail_bytes{mountpoint=~"/var/lib(/private)?/mediator"} / node_filesystem_size_bytes < 0.15`:                     {"node_filesystem_avail_bytes", "node_filesystem_size_bytes"},
		`increase(a_total[5m]) > 0 unless on (instance) (increase(b_total[5m]) > 0)`:                                                      {"a_total", "b_total"},
		`x_seconds > on (instance) (0.25 * max by (instance) (y_seconds))`:                                                                {"x_seconds", "y_seconds"},
	} {
		if got := MetricNames(expr); !slices.Equal(got, want) {
			t.Errorf("MetricNames(%q) = %q, want %q", expr, got, want)
		}
	}
	rules, _ := RuleExprs([]byte("groups:\n  - rules:\n      - expr: up == 0\n      - expr: |\n          a\n            / b\n        for: 1m\n      - expr: 'c > 1'\n"))
	if want := []string{"up == 0", "a / b", "c > 1"}; !slices.Equal(rules, want) {
		t.Errorf("RuleExprs = %q, want %q", rules, want)
	}
}

func TestExposed(t *testing.T) {
	got := Exposed([]byte("# HELP a_seconds x\n# TYPE a_seconds histogram\na_seconds_bucket{le=\"1\"} 0\n# TYPE b_total counter\nb_total 1\n"))
	for _, name := range []string{"a_seconds", "a_seconds_bucket", "a_seconds_sum", "a_seconds_count", "b_total"} {
		if !got[name] {
			t.Errorf("Exposed lacks %s: %v", name, got)
		}
	}
	if len(got) != 5 {
		t.Errorf("Exposed = %v", got)
	}
}
