package main

import (
	"fmt"
	"image/color"
	"os"
	"path/filepath"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
	"gonum.org/v1/plot/vg/vgsvg"
)

// writePlot draws the run with gonum/plot: one panel per timeline unit
// (rates per second, MiB, connections, …) over time, then the latency
// distributions as CDFs on a log axis. The format follows the extension:
// .svg or .png.
func writePlot(path string, r *result) error {
	ext := strings.ToLower(filepath.Ext(path))
	if ext != ".svg" && ext != ".png" {
		return fmt.Errorf("--plot %s: want a .svg or .png file", path)
	}
	var panels []*plot.Plot
	// Timeline panels, grouped by unit in first-seen order.
	var units []string
	byUnit := map[string][]timelineSerie{}
	for _, s := range r.Timeline.Series {
		if _, ok := byUnit[s.Unit]; !ok {
			units = append(units, s.Unit)
		}
		byUnit[s.Unit] = append(byUnit[s.Unit], s)
	}
	for _, u := range units {
		p := plot.New()
		p.Title.Text = fmt.Sprintf("%s: %s over time", r.Scenario, unitTitle(u))
		p.X.Label.Text = "time since start of the measured phase (s)"
		if r.Scenario == "mixed" {
			p.X.Label.Text = "time since the ramp began (s)"
		}
		p.Y.Label.Text = unitTitle(u)
		p.Y.Min = 0
		p.Add(plotter.NewGrid())
		top := 0.0
		for i, s := range byUnit[u] {
			for _, v := range s.Values {
				top = max(top, v)
			}
			pts := make(plotter.XYs, 0, len(s.Values))
			for j, v := range s.Values {
				if j < len(r.Timeline.T) {
					pts = append(pts, plotter.XY{X: r.Timeline.T[j], Y: v})
				}
			}
			if err := addLine(p, pts, i, s.Name); err != nil {
				return err
			}
		}
		p.Y.Max = top * 1.3 // room for the legend
		p.Legend.Top = true
		p.Legend.Left = true
		panels = append(panels, p)
	}
	var hists []*hist
	for _, h := range r.hists {
		if !h.setup {
			hists = append(hists, h)
		}
	}
	if len(hists) > 0 {
		p := plot.New()
		p.Title.Text = fmt.Sprintf("%s: latency distribution (CDF)", r.Scenario)
		p.X.Label.Text = "latency (ms, log scale)"
		p.Y.Label.Text = "fraction of samples ≤ x"
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.LogTicks{Prec: -1}
		p.Y.Min, p.Y.Max = 0, 1
		p.Add(plotter.NewGrid())
		for i, h := range hists {
			xs, ys := h.cdf()
			pts := make(plotter.XYs, 0, len(xs)+1)
			for j := range xs {
				if xs[j] > 0 {
					pts = append(pts, plotter.XY{X: xs[j], Y: ys[j]})
				}
			}
			s := r.Latency[h.name]
			if err := addLine(p, pts, i, fmt.Sprintf("%s (p50 %.2f, p99 %.2f ms)", h.name, s.P50Ms, s.P99Ms)); err != nil {
				return err
			}
		}
		p.Legend.Top = false
		p.Legend.Left = false
		p.Legend.XOffs = -vg.Millimeter
		p.Legend.YOffs = vg.Centimeter
		panels = append(panels, p)
	}
	if len(panels) == 0 {
		return fmt.Errorf("--plot: nothing to draw")
	}
	w, h := 8*vg.Inch, vg.Length(len(panels))*3.2*vg.Inch
	rows := make([][]*plot.Plot, len(panels))
	for i, p := range panels {
		rows[i] = []*plot.Plot{p}
	}
	tiles := draw.Tiles{Rows: len(panels), Cols: 1, PadY: vg.Centimeter / 2, PadTop: vg.Millimeter * 2,
		PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 4}

	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var dc draw.Canvas
	var write func() error
	if ext == ".svg" {
		c := vgsvg.New(w, h)
		dc = draw.New(c)
		write = func() error { _, err := c.WriteTo(f); return err }
	} else {
		c := vgimg.New(w, h)
		dc = draw.New(c)
		write = func() error { _, err := vgimg.PngCanvas{Canvas: c}.WriteTo(f); return err }
	}
	dc.SetColor(color.White)
	dc.Fill(dc.Rectangle.Path())
	canvases := plot.Align(rows, tiles, dc)
	for i, p := range panels {
		p.Draw(canvases[i][0])
	}
	if err := write(); err != nil {
		return err
	}
	return f.Close()
}

func unitTitle(u string) string {
	switch u {
	case "/s":
		return "events per second"
	case "":
		return "count"
	}
	return u
}

// addLine draws pts as the i-th series of p with a legend entry; an empty
// series is left out.
func addLine(p *plot.Plot, pts plotter.XYs, i int, legend string) error {
	if len(pts) == 0 {
		return nil
	}
	l, err := plotter.NewLine(pts)
	if err != nil {
		return err
	}
	l.Color = plotutil.Color(i)
	l.Width = vg.Points(1.5)
	p.Add(l)
	p.Legend.Add(legend, l)
	return nil
}
