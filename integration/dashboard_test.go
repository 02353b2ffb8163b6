package integration

import (
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"d2m-mediator/integration/internal/promnames"
)

// TestDashboardQueriesRun uses the Grafana dashboard as shipped the way
// Grafana would, without Grafana (not packaged for Debian): a real
// Prometheus (Debian's) scrapes a real server with the shipped dashboard's
// token setup while two devices reflect through it, and every query of the
// dashboard is run against it with Grafana's variables filled in
// ($__rate_interval, $instance = all). Every query must be accepted, and a
// query whose metrics the server exposes must return series: a panel that
// parses but shows nothing would pass a name check and still be blind.
func TestDashboardQueriesRun(t *testing.T) {
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		t.Skip("prometheus not installed (Debian package prometheus; CI installs it)")
	}
	b, err := os.ReadFile("../deploy/grafana/mediator-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	exprs, err := promnames.DashboardExprs(b)
	if err != nil {
		t.Fatal(err)
	}

	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	dev2, _ := connectReady(t, s, g.config(s, 2))
	reflect := func(env string) {
		id, err := a.Reflect(ctxT(t, time.Second), []byte(env), 0)
		if err != nil {
			t.Fatal(err)
		}
		expectAck(t, a, id)
		expectReflected(t, dev2, []byte(env))
	}
	reflect("before the first scrape")

	dir := t.TempDir()
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(s.adminToken()), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mediator\n" +
		"    authorization:\n      credentials_file: " + tokenFile + "\n" +
		"    static_configs:\n      - targets: ['" + strings.TrimPrefix(s.admin, "http://") + "']\n"
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	web := freePorts(t, 1)[0]
	p := exec.Command(prom, "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+web, "--log.level=warn")
	out, _ := os.Create(filepath.Join(dir, "prometheus.log"))
	p.Stdout, p.Stderr = out, out
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Process.Kill()
		p.Wait()
		if t.Failed() {
			l, _ := os.ReadFile(filepath.Join(dir, "prometheus.log"))
			t.Logf("prometheus:\n%s", tailString(string(l), 3000))
		}
	})
	type result struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []json.RawMessage `json:"result"`
		} `json:"data"`
	}
	query := func(q string) (result, error) {
		var r result
		resp, err := http.Get("http://" + web + "/api/v1/query?query=" + url.QueryEscape(q))
		if err != nil {
			return r, err
		}
		defer resp.Body.Close()
		return r, json.NewDecoder(resp.Body).Decode(&r)
	}
	// Enough samples for rate() over the interval below, with traffic
	// between them; a close code appears once a device leaves.
	deadline := time.Now().Add(60 * time.Second)
	for n := 0; ; n++ {
		reflect("between scrapes " + strings.Repeat("x", n%7))
		r, err := query(`count_over_time(up{job="mediator"}[1m]) >= 6 and up{job="mediator"} == 1`)
		if err == nil && r.Status == "success" && len(r.Data.Result) == 1 {
			break
		}
		if time.Now().After(deadline) {
			u, _ := query(`up`)
			t.Fatalf("no six successful scrapes of the server within 60 s (up: %+v, last error %v)", u, err)
		}
		time.Sleep(200 * time.Millisecond) // the scrape interval's business, not an order
	}
	dev2.Close()
	_, body := s.adminGet("/metrics")
	exposed := promnames.Exposed(body)
	eventually(t, "two scrapes with the close code", func() bool {
		r, err := query("count_over_time(mediator_close_codes_total[1m]) >= 2")
		return err == nil && len(r.Data.Result) > 0
	})

	vars := strings.NewReplacer("$__rate_interval", "1m", "${instance}", ".+", "$instance", ".+")
	checked, withData := 0, 0
	for _, e := range exprs {
		if strings.HasPrefix(e, "label_values(") {
			continue // a variable's definition, not a query
		}
		q := vars.Replace(e)
		r, err := query(q)
		if err != nil || r.Status != "success" {
			t.Errorf("dashboard query %q: %v %s", e, err, r.Error)
			continue
		}
		checked++
		served := true
		for _, name := range promnames.MetricNames(e) {
			if !exposed[name] {
				served = false // a cluster-only metric, or one not used yet
			}
		}
		for _, m := range labelEquals.FindAllString(e, -1) {
			if !strings.Contains(string(body), m) {
				served = false // a label value nothing has used yet (outcome="overload")
			}
		}
		if served {
			withData++
			if len(r.Data.Result) == 0 {
				t.Errorf("dashboard query %q returns nothing although the server exposes its metrics", e)
			}
		}
	}
	t.Logf("%d dashboard queries run by Prometheus, %d of them on metrics this single node exposes, each with series", checked, withData)
}

// labelEquals matches an exact label matcher, key="value".
var labelEquals = regexp.MustCompile(`\b\w+="[^"]*"`)
