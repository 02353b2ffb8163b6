package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
)

const mergeUsage = `usage: d2m-load merge [--plot FILE.svg|FILE.png] SHARD.json ...

Combines the --json results of the shards of one mixed run (d2m-load
--scenario mixed --shard i/n --run-id ID --start-at T, one process per
shard) into one result: counts, errors, devices and this tool's CPU and
memory add up; histograms add bucket by bucket, so percentiles are those
of all samples; report intervals are combined by position (start the shards
with one --start-at so they line up). Server and chat-server readings are
shard 0's (every shard reads the same processes). Writes the JSON to
stdout and the table to stderr; --plot draws the merged result (one file
redraws a single run's plot).`

func runMerge(args []string, stdout, stderr io.Writer) int {
	plotFile := ""
	if len(args) > 1 && args[0] == "--plot" {
		plotFile, args = args[1], args[2:]
	}
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		fmt.Fprintln(stderr, mergeUsage)
		return 2
	}
	var parts []*result
	for _, path := range args {
		b, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintln(stderr, "d2m-load merge:", err)
			return 1
		}
		var r result
		if err := json.Unmarshal(b, &r); err != nil {
			fmt.Fprintf(stderr, "d2m-load merge: %s: %v\n", path, err)
			return 1
		}
		if r.Scenario != "mixed" || r.Mixed == nil {
			fmt.Fprintf(stderr, "d2m-load merge: %s is not a mixed result\n", path)
			return 1
		}
		parts = append(parts, &r)
	}
	res, err := mergeResults(parts)
	if err != nil {
		fmt.Fprintln(stderr, "d2m-load merge:", err)
		return 1
	}
	res.printTable(stderr)
	res.printMixedVerdict(stderr)
	if err := res.writeJSON(stdout); err != nil {
		fmt.Fprintln(stderr, "d2m-load merge:", err)
		return 1
	}
	if plotFile != "" {
		if err := writePlot(plotFile, res); err != nil {
			fmt.Fprintln(stderr, "d2m-load merge: plot:", err)
			return 1
		}
		fmt.Fprintln(stderr, "plot written to", plotFile)
	}
	return 0
}

// mergeResults combines shards of one mixed run.
func mergeResults(parts []*result) (*result, error) {
	// Shard 0 (or the first) supplies the server's readings.
	first := parts[0]
	for _, p := range parts {
		if strings.HasPrefix(p.Mixed.Shards[0], "0/") {
			first = p
		}
	}
	seen := map[string]bool{}
	for _, p := range parts {
		if p.Mixed.RunID != first.Mixed.RunID {
			return nil, fmt.Errorf("run ids differ (%s, %s): not shards of one run", p.Mixed.RunID, first.Mixed.RunID)
		}
		for _, s := range p.Mixed.Shards {
			if seen[s] {
				return nil, fmt.Errorf("shard %s given twice", s)
			}
			seen[s] = true
		}
	}
	f := first.Mixed
	out := &mixedSummary{RunID: f.RunID, GroupsBySize: map[string]int64{}, SLOMs: f.SLOMs,
		Server: f.Server, Chat: f.Chat, ServerRampCPU: f.ServerRampCPU, ServerRSSBeforeMiB: f.ServerRSSBeforeMiB,
		Counts: map[string]int64{}, CountsTotal: map[string]int64{},
		Errors: map[string]int64{}, Tool: readings{Goroutines: -1, OpenFDs: -1}}
	hists := map[string]*hist{}
	setup := newSetupHist("setup")
	res := &result{Scenario: "mixed", Params: map[string]any{}, Machine: first.Machine, Started: first.Started,
		Latency: map[string]latencySummary{}, Errors: map[string]int64{}, Server: first.Server, Timeline: first.Timeline}
	for k, v := range first.Params {
		res.Params[k] = v
	}
	res.Params["shard"] = fmt.Sprintf("%d merged", len(parts))
	for _, p := range parts {
		s := p.Mixed
		out.Shards = append(out.Shards, s.Shards...)
		out.DevicesPlanned += s.DevicesPlanned
		out.Devices += s.Devices
		out.SetupFailed += s.SetupFailed
		out.Disconnected += s.Disconnected
		out.Overload503 += s.Overload503
		out.ToolRampCPU += s.ToolRampCPU
		out.ToolCPUTotal += s.ToolCPUTotal
		out.ToolMaxRSSMiB += s.ToolMaxRSSMiB
		out.Tool.Cores = round3(out.Tool.Cores + s.Tool.Cores)
		out.Tool.RSSMiB = round3(out.Tool.RSSMiB + s.Tool.RSSMiB)
		out.RampS = max(out.RampS, s.RampS)
		out.MeasuredS = max(out.MeasuredS, s.MeasuredS)
		addCounts(out.GroupsBySize, s.GroupsBySize)
		addCounts(out.Counts, s.Counts)
		addCounts(out.CountsTotal, s.CountsTotal)
		out.ToolRSSBeforeMiB = round3(out.ToolRSSBeforeMiB + s.ToolRSSBeforeMiB)
		addCounts(out.Errors, s.Errors)
		for name, j := range s.Hists {
			if hists[name] == nil {
				hists[name] = newHist(name)
			}
			hists[name].absorb(j)
		}
		setup.absorb(s.SetupHist)
		res.ElapsedS = max(res.ElapsedS, p.ElapsedS)
		res.Client.CPUSeconds = round3(res.Client.CPUSeconds + p.Client.CPUSeconds)
		res.Client.MaxRSSMiB = round3(res.Client.MaxRSSMiB + p.Client.MaxRSSMiB)
		if p.Started.Before(res.Started) {
			res.Started = p.Started
		}
	}
	out.Hists = map[string]histJSON{}
	for name, h := range hists {
		out.Hists[name] = h.export()
	}
	out.SetupHist = setup.export()
	out.Intervals = mergeIntervals(first, parts)
	addCounts(res.Errors, out.Errors)
	res.Mixed = out
	res.deriveMixed()
	res.note("merged from %d shard results; server readings and the timeline are shard %s's; this tool's CPU and RSS are the sum over the shards", len(parts), f.Shards[0])
	return res, nil
}

// mergeIntervals combines the i-th report interval of every shard.
func mergeIntervals(first *result, parts []*result) []intervalReport {
	var out []intervalReport
	for i, base := range first.Mixed.Intervals {
		ir := intervalReport{Phase: base.Phase, StartS: base.StartS, EndS: base.EndS, Server: base.Server, Chat: base.Chat,
			Tool: readings{Goroutines: -1, OpenFDs: -1}, Latency: map[string]latencySummary{}, Counts: map[string]int64{},
			Errors: map[string]int64{}, Hists: map[string]histJSON{}}
		hists := map[string]*hist{}
		for _, p := range parts {
			if i >= len(p.Mixed.Intervals) {
				continue
			}
			x := p.Mixed.Intervals[i]
			ir.Devices += x.Devices
			ir.Tool.Cores = round3(ir.Tool.Cores + x.Tool.Cores)
			ir.Tool.RSSMiB = round3(ir.Tool.RSSMiB + x.Tool.RSSMiB)
			addCounts(ir.Counts, x.Counts)
			addCounts(ir.Errors, x.Errors)
			for name, j := range x.Hists {
				if hists[name] == nil {
					hists[name] = newHist(name)
				}
				hists[name].absorb(j)
			}
		}
		for name, h := range hists {
			ir.Hists[name] = h.export()
			ir.Latency[name] = h.Summary()
		}
		out = append(out, ir)
	}
	return out
}

func addCounts(dst, src map[string]int64) {
	for k, v := range src {
		dst[k] += v
	}
}
