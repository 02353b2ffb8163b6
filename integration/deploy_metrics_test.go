package integration

// The Prometheus rules and the Grafana dashboard in deploy/ name metrics by
// string; this test runs a real server and fails when one of those names is
// not in its /metrics, so renaming a metric cannot silently blind the
// alerts.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"
)

var (
	rulesFile     = filepath.Join("..", "deploy", "prometheus", "mediator-rules.yml")
	dashboardFile = filepath.Join("..", "deploy", "grafana", "mediator-dashboard.json")
)

// externalMetrics are the names the rules use that another exporter
// provides: Prometheus itself (up) and the node exporter (disk space).
var externalMetrics = []string{"up", "node_filesystem_avail_bytes", "node_filesystem_size_bytes"}

func TestDeployMetricsExist(t *testing.T) {
	exprs := map[string][]string{} // metric name → where it is used
	for _, f := range []struct {
		path string
		read func([]byte) ([]string, error)
	}{{rulesFile, ruleExprs}, {dashboardFile, dashboardExprs}} {
		b, err := os.ReadFile(f.path)
		if errors.Is(err, os.ErrNotExist) {
			t.Skipf("cannot check the metric names: %s is missing (run from the repository's integration/ directory)", f.path)
		}
		if err != nil {
			t.Fatal(err)
		}
		list, err := f.read(b)
		if err != nil {
			t.Fatalf("%s: %v", f.path, err)
		}
		if len(list) < 5 {
			t.Fatalf("%s: found only %d PromQL expressions: the reader no longer understands the file", f.path, len(list))
		}
		for _, e := range list {
			for _, name := range promqlMetricNames(e) {
				exprs[name] = append(exprs[name], filepath.Base(f.path)+": "+e)
			}
		}
	}
	if len(exprs) < 15 {
		t.Fatalf("only %d metric names in the rules and the dashboard: %v", len(exprs), exprs)
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
	exposed := exposedMetricNames(body)

	var missing []string
	for name, uses := range exprs {
		if !exposed[name] && !slices.Contains(externalMetrics, name) {
			missing = append(missing, name+"\n    used in "+strings.Join(uses, "\n    used in "))
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("%d metric name(s) in deploy/ that the server's /metrics does not have:\n  %s",
			len(missing), strings.Join(missing, "\n  "))
	}
	for _, name := range externalMetrics {
		if _, used := exprs[name]; !used {
			t.Errorf("externalMetrics lists %s, which neither the rules nor the dashboard use", name)
		}
	}
	t.Logf("%d metric names checked", len(exprs))
}

// exposedMetricNames reads the families of a text exposition: each TYPE
// line, plus the _bucket/_sum/_count series of histograms and summaries.
func exposedMetricNames(body []byte) map[string]bool {
	names := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 4 || f[0] != "#" || f[1] != "TYPE" {
			continue
		}
		names[f[2]] = true
		switch f[3] {
		case "histogram":
			names[f[2]+"_bucket"] = true
			fallthrough
		case "summary":
			names[f[2]+"_sum"] = true
			names[f[2]+"_count"] = true
		}
	}
	return names
}

// ruleExprs returns the expr: values of a rules file, single-line or
// block scalars (| and >).
func ruleExprs(b []byte) ([]string, error) {
	var out []string
	lines := strings.Split(string(b), "\n")
	for i := 0; i < len(lines); i++ {
		line := lines[i]
		k := strings.Index(line, "expr:")
		if k < 0 || strings.TrimSpace(line[:k]) != "" && strings.TrimSpace(line[:k]) != "-" {
			continue
		}
		v := strings.TrimSpace(line[k+len("expr:"):])
		if v == "" || v[0] != '|' && v[0] != '>' {
			out = append(out, strings.Trim(v, `'"`))
			continue
		}
		indent := k
		var block []string
		for i+1 < len(lines) {
			next := lines[i+1]
			if strings.TrimSpace(next) != "" && len(next)-len(strings.TrimLeft(next, " ")) <= indent {
				break
			}
			block = append(block, strings.TrimSpace(next))
			i++
		}
		out = append(out, strings.Join(block, " "))
	}
	return out, nil
}

// dashboardExprs returns every PromQL string of a Grafana dashboard: the
// panels' target expressions and the template variables' queries.
func dashboardExprs(b []byte) ([]string, error) {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, err
	}
	var out []string
	var walk func(key string, v any)
	walk = func(key string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, c := range v {
				walk(k, c)
			}
		case []any:
			for _, c := range v {
				walk(key, c)
			}
		case string:
			if key == "expr" || key == "definition" {
				out = append(out, v)
			}
		}
	}
	walk("", v)
	return out, nil
}

var (
	promStrings   = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'`)
	promVars      = regexp.MustCompile(`\$\{?\w+\}?`)
	promBrackets  = regexp.MustCompile(`\[[^\]]*\]|\{[^}]*\}`)
	promGrouping  = regexp.MustCompile(`\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promLabelVals = regexp.MustCompile(`label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,[^)]*\)`)
	promIdent     = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	promKeywords  = map[string]bool{"and": true, "or": true, "unless": true, "bool": true, "offset": true,
		"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
		"inf": true, "nan": true, "Inf": true, "NaN": true}
)

// promqlMetricNames picks the metric names out of a PromQL expression (or a
// Grafana label_values() query) without a full parser: strings, variables,
// label matchers, ranges and grouping clauses go first; of the identifiers
// left, those followed by "(" are functions or aggregations, the rest are
// metric names.
func promqlMetricNames(expr string) []string {
	var names []string
	e := promStrings.ReplaceAllString(expr, `""`)
	e = promVars.ReplaceAllString(e, "")
	for _, m := range promLabelVals.FindAllStringSubmatch(e, -1) {
		names = append(names, m[1])
	}
	e = promLabelVals.ReplaceAllString(e, "")
	e = promBrackets.ReplaceAllString(e, " ")
	e = promGrouping.ReplaceAllString(e, " ")
	for _, loc := range promIdent.FindAllStringIndex(e, -1) {
		id := e[loc[0]:loc[1]]
		if loc[0] > 0 && (e[loc[0]-1] >= '0' && e[loc[0]-1] <= '9' || e[loc[0]-1] == '.') {
			continue // the unit or exponent of a number: 5m, 1e3
		}
		if rest := strings.TrimLeft(e[loc[1]:], " \t\n"); strings.HasPrefix(rest, "(") || promKeywords[id] {
			continue
		}
		names = append(names, id)
	}
	return names
}

func TestPromQLMetricNames(t *testing.T) {
	for expr, want := range map[string][]string{
		`histogram_quantile(0.99, sum by (instance, le) (rate(mediator_commit_seconds_bucket{code="4013", x=~"a b"}[5m]))) > 0.25`:        {"mediator_commit_seconds_bucket"},
		`sum by (outcome) (rate(a_total{outcome!="ok"}[10m])) / ignoring (outcome) group_left sum(rate(b_total[$__rate_interval])) > 1e3`: {"a_total", "b_total"},
		`up{job="mediator"} == 0 and on(instance) process_open_fds / process_max_fds offset 5m > 0.8`:                                     {"up", "process_open_fds", "process_max_fds"},
		`label_values(mediator_connections, instance)`:                                                                                    {"mediator_connections"},
		`rate(process_cpu_seconds_total{instance=~"$instance"}[$__rate_interval]) * 1000`:                                                 {"process_cpu_seconds_total"},
		`node_filesystem_avail_bytes{mountpoint=~"/var/lib(/private)?/mediator"} / node_filesystem_size_bytes < 0.15`:                     {"node_filesystem_avail_bytes", "node_filesystem_size_bytes"},
	} {
		if got := promqlMetricNames(expr); !slices.Equal(got, want) {
			t.Errorf("promqlMetricNames(%q) = %q, want %q", expr, got, want)
		}
	}
	rules, _ := ruleExprs([]byte("groups:\n  - rules:\n      - expr: up == 0\n      - expr: |\n          a\n            / b\n        for: 1m\n      - expr: 'c > 1'\n"))
	if want := []string{"up == 0", "a / b", "c > 1"}; !slices.Equal(rules, want) {
		t.Errorf("ruleExprs = %q, want %q", rules, want)
	}
}
