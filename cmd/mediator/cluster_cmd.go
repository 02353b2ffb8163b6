package main

import (
	"context"
	"flag"
	"fmt"
	"net/url"
	"strings"
	"text/tabwriter"

	"d2m-mediator/mediator/adminapi"
)

func runClusterNodes(ctx context.Context, op *operation) error {
	var r adminapi.ClusterNodes
	if printed, err := op.call(ctx, "GET", "/api/v1/cluster/nodes", &r); printed || err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tADVERTISE\tADMIN\tSHARDS\tSTARTED\t")
	for _, n := range r.Nodes {
		id := n.ID
		if n.This {
			id += " (answering)"
		}
		if n.Draining {
			id += " (draining)"
		}
		adv := n.Advertise
		if n.TLS {
			adv += " (tls)"
		}
		admin := n.Admin
		if admin == "" {
			admin = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t\n", id, adv, admin, n.Shards, n.Started)
	}
	return tw.Flush()
}

func optInt(v *int) string {
	if v == nil {
		return "-"
	}
	return fmt.Sprint(*v)
}

func runClusterShards(ctx context.Context, op *operation) error {
	var r adminapi.ClusterShards
	if printed, err := op.call(ctx, "GET", "/api/v1/cluster/shards", &r); printed || err != nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SHARD\tASSIGNED\tSERVING\tEPOCH\tSTATE\tGROUPS\tDEVICES\tQUEUED\t")
	unserved := 0
	for _, s := range r.Shards {
		serving, epoch := s.Owner, fmt.Sprint(s.Epoch)
		if serving == "" {
			serving, epoch = "-", "-"
			unserved++
		}
		assigned := s.Assigned
		if assigned == "" {
			assigned = "-"
		}
		// STATE: serving, unserved (devices get 503), or the state of
		// the move in progress and where to.
		state := s.Move
		if s.MoveTo != "" {
			state += " → " + s.MoveTo
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", s.Shard, assigned, serving, epoch, state,
			optInt(s.Groups), optInt(s.Devices), optInt(s.Queued))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if unserved > 0 {
		fmt.Fprintf(stdout, "%d shard(s) unserved: their devices get 503 until a node serves them again (ASSIGNED names the node they wait for)\n", unserved)
	}
	fmt.Fprintf(stdout, "(groups, devices and queued are counted for the shards %s serves)\n", r.Node)
	return nil
}

func printMove(m adminapi.MoveResult) {
	switch m.State {
	case "handed-over":
		fmt.Fprintf(stdout, "moved shard %s from %s (epoch %d) to %s (epoch %d) in %s: %s\n",
			m.Shard, m.From, m.FromEpoch, m.To, m.ToEpoch, fmtDuration(secs(m.Seconds)), strings.Join(m.States, " → "))
	default:
		fmt.Fprintf(stdout, "move %s of shard %s from %s to %s is %s; it goes on (cluster shards shows it, cluster abort %s stops it)\n",
			m.ID, m.Shard, m.From, m.To, m.State, m.Shard)
	}
}

func localFlags(fs *flag.FlagSet, op *operation) {
	fs.BoolVar(&op.local, "local", false, "cluster mode: the asked node alone (its whole store), not every live node")
}

func moveFlags(fs *flag.FlagSet, op *operation) {
	fs.BoolVar(&op.noWait, "no-wait", false, "return once the move has started instead of waiting for its outcome")
}

func abortFlags(fs *flag.FlagSet, op *operation) {
	fs.StringVar(&op.moveID, "move", "", "abort only this move id (as printed by cluster move --no-wait)")
}

func rebalanceFlags(fs *flag.FlagSet, op *operation) {
	fs.BoolVar(&op.dryRun, "dry-run", false, "print the plan, move nothing")
	fs.IntVar(&op.maxParallel, "max-parallel", 0, "moves in flight at once (0: the node's default, 4)")
}

func reassignFlags(fs *flag.FlagSet, op *operation) {
	fs.BoolVar(&op.acceptDataLoss, "accept-data-loss", false, "confirm that the shard's data on the lost node is given up (command line only, never from the environment)")
}

func runClusterMove(ctx context.Context, op *operation) error {
	var r adminapi.MoveResult
	path := "/api/v1/cluster/shards/" + url.PathEscape(op.args[0]) + "/move?to=" + url.QueryEscape(op.args[1])
	if op.noWait {
		path += "&wait=false"
	}
	if printed, err := op.call(ctx, "POST", path, &r); printed || err != nil {
		return err
	}
	printMove(r)
	return nil
}

func runClusterAbort(ctx context.Context, op *operation) error {
	var r map[string]string
	path := "/api/v1/cluster/shards/" + url.PathEscape(op.args[0]) + "/abort"
	if op.moveID != "" {
		path += "?move=" + url.QueryEscape(op.moveID)
	}
	if printed, err := op.call(ctx, "POST", path, &r); printed || err != nil {
		return err
	}
	fmt.Fprintf(stdout, "move of shard %s aborted: the donor serves it again\n", r["shard"])
	return nil
}

// rebalanceQuery is the query of a rebalance or drain request.
func rebalanceQuery(op *operation) string {
	q := url.Values{}
	if op.dryRun {
		q.Set("dry-run", "true")
	}
	if op.maxParallel > 0 {
		q.Set("max-parallel", fmt.Sprint(op.maxParallel))
	}
	if len(q) == 0 {
		return ""
	}
	return "?" + q.Encode()
}

// printPlan prints a rebalance or drain plan as a table.
func printPlan(r adminapi.RebalanceResult) error {
	if len(r.Plan) == 0 {
		fmt.Fprintln(stdout, "nothing to move: the shard map is balanced")
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SHARD\tFROM\tTO\tWHY\t")
	for _, p := range r.Plan {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t\n", p.Shard, p.From, p.To, p.Reason)
	}
	return tw.Flush()
}

// printRebalance prints what a rebalance or drain did (or would do).
func printRebalance(what string, r adminapi.RebalanceResult, status int) error {
	if err := printPlan(r); err != nil {
		return err
	}
	switch {
	case r.DryRun:
		fmt.Fprintf(stdout, "dry run: %d moves planned, none made\n", len(r.Plan))
	case status == 202:
		fmt.Fprintf(stdout, "%s goes on in the cluster (cluster shards shows the moves)\n", what)
	default:
		fmt.Fprintf(stdout, "%s: %d of %d planned moves made\n", what, len(r.Moves), len(r.Plan))
	}
	return nil
}

func runClusterDrain(ctx context.Context, op *operation) error {
	var r adminapi.RebalanceResult
	path := "/api/v1/cluster/nodes/" + url.PathEscape(op.args[0]) + "/drain" + rebalanceQuery(op)
	status, printed, err := op.callStatus(ctx, "POST", path, &r)
	if printed || err != nil {
		return err
	}
	return printRebalance("drain of "+op.args[0], r, status)
}

func runClusterUndrain(ctx context.Context, op *operation) error {
	var r map[string]any
	if printed, err := op.call(ctx, "POST", "/api/v1/cluster/nodes/"+url.PathEscape(op.args[0])+"/undrain", &r); printed || err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s takes shards again (cluster rebalance moves them to it)\n", op.args[0])
	return nil
}

func runClusterRebalance(ctx context.Context, op *operation) error {
	var r adminapi.RebalanceResult
	status, printed, err := op.callStatus(ctx, "POST", "/api/v1/cluster/rebalance"+rebalanceQuery(op), &r)
	if printed || err != nil {
		return err
	}
	return printRebalance("rebalance", r, status)
}

func runClusterReassign(ctx context.Context, op *operation) error {
	if !op.acceptDataLoss {
		return fmt.Errorf("reassigning shard %s gives up its data on the lost node (queued reflections, slots): add --accept-data-loss to confirm", op.args[0])
	}
	var r map[string]string
	path := "/api/v1/cluster/shards/" + url.PathEscape(op.args[0]) + "/reassign?accept-data-loss=true&to=" + url.QueryEscape(op.args[1])
	if printed, err := op.call(ctx, "POST", path, &r); printed || err != nil {
		return err
	}
	fmt.Fprintf(stdout, "shard %s assigned to %s (its earlier data is not there)\n", r["shard"], r["assigned"])
	return nil
}
