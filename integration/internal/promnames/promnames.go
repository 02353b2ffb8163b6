// Package promnames reads the metric names that the shipped Prometheus
// rules and Grafana dashboard (deploy/) use and the names a /metrics page
// exposes, so that tests can check one against the other on a running
// server: integration (a single node) and integration/cluster (cluster
// nodes, for the mediator_cluster_* names).
//
// It parses just enough PromQL to find metric names, without a full parser:
// strings, variables, label matchers, ranges and grouping clauses are
// removed; of the identifiers left, those followed by "(" are functions or
// aggregations, the rest are metric names.
package promnames

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// The deploy files, relative to the repository root.
var (
	RulesFile     = filepath.Join("deploy", "prometheus", "mediator-rules.yml")
	DashboardFile = filepath.Join("deploy", "grafana", "mediator-dashboard.json")
)

// External are the names the rules use that another exporter provides:
// Prometheus itself (up) and the node exporter (disk space).
var External = []string{"up", "node_filesystem_avail_bytes", "node_filesystem_size_bytes"}

// ClusterPrefix starts the names that only a node in cluster mode exposes
// in full (some only after a forward or a move).
const ClusterPrefix = "mediator_cluster_"

// Uses maps a metric name to where the deploy files use it ("file: expr").
type Uses map[string][]string

// Read returns every metric name the rules and the dashboard under root
// use. It fails when a file is missing or when the readers find so few
// expressions that they no longer understand the files.
func Read(root string) (Uses, error) {
	uses := Uses{}
	for _, f := range []struct {
		path string
		read func([]byte) ([]string, error)
	}{{filepath.Join(root, RulesFile), RuleExprs}, {filepath.Join(root, DashboardFile), DashboardExprs}} {
		b, err := os.ReadFile(f.path)
		if err != nil {
			return nil, err
		}
		list, err := f.read(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", f.path, err)
		}
		if len(list) < 5 {
			return nil, fmt.Errorf("%s: found only %d PromQL expressions: the reader no longer understands the file", f.path, len(list))
		}
		for _, e := range list {
			for _, name := range MetricNames(e) {
				uses[name] = append(uses[name], filepath.Base(f.path)+": "+e)
			}
		}
	}
	return uses, nil
}

// Missing lists, sorted and with their uses, the names of uses that keep
// selects and exposed lacks.
func (u Uses) Missing(exposed map[string]bool, keep func(name string) bool) []string {
	var missing []string
	for name, where := range u {
		if keep(name) && !exposed[name] {
			missing = append(missing, name+"\n    used in "+strings.Join(where, "\n    used in "))
		}
	}
	sort.Strings(missing)
	return missing
}

// Exposed reads the families of a text exposition: each TYPE line, plus
// the _bucket/_sum/_count series of histograms and summaries.
func Exposed(body []byte) map[string]bool {
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

// RuleExprs returns the expr: values of a rules file, single-line or
// block scalars (| and >).
func RuleExprs(b []byte) ([]string, error) {
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

// DashboardExprs returns every PromQL string of a Grafana dashboard: the
// panels' target expressions and the template variables' queries.
func DashboardExprs(b []byte) ([]string, error) {
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

// MetricNames picks the metric names out of a PromQL expression (or a
// Grafana label_values() query).
func MetricNames(expr string) []string {
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
