package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

const curveUsage = `usage: d2m-load curve OUT.svg|OUT.png LABEL=RUN.json[,RUN.json...] ...

Draws ReflectAck p50 and p99 against the achieved rate of reflect runs
(--json output of --scenario reflect): one pair of lines per LABEL, its
points in the order of their achieved rate.`

// runCurve is the curve subcommand: the latency-versus-rate figure of
// BENCHMARKS.md from the JSON results of several reflect runs.
func runCurve(args []string, stdout, stderr io.Writer) int {
	if len(args) < 2 || strings.HasPrefix(args[0], "-") {
		fmt.Fprintln(stderr, curveUsage)
		return 2
	}
	if err := writeCurve(args[0], args[1:]); err != nil {
		fmt.Fprintln(stderr, "d2m-load curve:", err)
		return 1
	}
	fmt.Fprintln(stdout, "curve written to", args[0])
	return 0
}

type curvePoint struct{ rate, p50, p99 float64 }

func readCurvePoint(path string) (curvePoint, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return curvePoint{}, err
	}
	var r result
	if err := json.Unmarshal(b, &r); err != nil {
		return curvePoint{}, fmt.Errorf("%s: %w", path, err)
	}
	lat, ok := r.Latency["ReflectAck"]
	if !ok {
		return curvePoint{}, fmt.Errorf("%s: no ReflectAck latency (not a reflect run?)", path)
	}
	for _, m := range r.Metrics {
		if m.Name == "reflects/s (window mean)" {
			return curvePoint{rate: m.Value, p50: lat.P50Ms, p99: lat.P99Ms}, nil
		}
	}
	return curvePoint{}, fmt.Errorf("%s: no achieved rate", path)
}

func writeCurve(out string, specs []string) error {
	if ext := strings.ToLower(filepath.Ext(out)); ext != ".svg" && ext != ".png" {
		return errors.New("the output must be an .svg or .png file")
	}
	p := plot.New()
	p.Title.Text = "reflect: ReflectAck latency against achieved rate"
	p.X.Label.Text = "durable reflects per second (achieved)"
	p.Y.Label.Text = "ReflectAck latency (ms, log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Add(plotter.NewGrid())
	p.Legend.Top = true
	p.Legend.Left = true
	var maxX, minY, maxY float64 = 0, math.Inf(1), 0
	for i, spec := range specs {
		label, files, ok := strings.Cut(spec, "=")
		if !ok {
			return fmt.Errorf("%q: want LABEL=RUN.json[,RUN.json...]", spec)
		}
		var pts []curvePoint
		for _, f := range strings.Split(files, ",") {
			pt, err := readCurvePoint(f)
			if err != nil {
				return err
			}
			pts = append(pts, pt)
		}
		sort.Slice(pts, func(a, b int) bool { return pts[a].rate < pts[b].rate })
		for j, q := range []struct {
			name string
			v    func(curvePoint) float64
		}{{"p50", func(c curvePoint) float64 { return c.p50 }}, {"p99", func(c curvePoint) float64 { return c.p99 }}} {
			xy := make(plotter.XYs, len(pts))
			for k, pt := range pts {
				xy[k] = plotter.XY{X: pt.rate, Y: math.Max(q.v(pt), 0.01)}
				maxX, minY, maxY = max(maxX, xy[k].X), min(minY, xy[k].Y), max(maxY, xy[k].Y)
			}
			l, s, err := plotter.NewLinePoints(xy)
			if err != nil {
				return err
			}
			l.Color = plotutil.Color(i)
			s.Color = plotutil.Color(i)
			l.Width = vg.Points(1.5)
			if j == 1 {
				l.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
				s.Shape = draw.TriangleGlyph{}
			}
			p.Add(l, s)
			p.Legend.Add(label+" "+q.name, l, s)
		}
	}
	// Room above the data for the legend (log axis), round x ticks.
	p.Y.Min, p.Y.Max = minY/2, maxY*math.Pow(10, 0.4*float64(len(specs)))
	p.X.Min = 0
	var ticks []plot.Tick
	step := 5000.0
	if maxX < 10000 {
		step = 1000
	}
	for x := 0.0; x <= maxX*1.05; x += step {
		ticks = append(ticks, plot.Tick{Value: x, Label: fmt.Sprintf("%.0f", x)})
	}
	p.X.Tick.Marker = plot.ConstantTicks(ticks)
	return p.Save(9*vg.Inch, 6*vg.Inch, out)
}
