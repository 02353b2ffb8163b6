package main

import (
	"context"
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
	fmt.Fprintf(stdout, "moved shard %s from %s (epoch %d) to %s (epoch %d) in %s: %s\n",
		m.Shard, m.From, m.FromEpoch, m.To, m.ToEpoch, fmtDuration(secs(m.Seconds)), strings.Join(m.States, " → "))
}

func runClusterMove(ctx context.Context, op *operation) error {
	var r adminapi.MoveResult
	path := "/api/v1/cluster/shards/" + url.PathEscape(op.args[0]) + "/move?to=" + url.QueryEscape(op.args[1])
	if printed, err := op.call(ctx, "POST", path, &r); printed || err != nil {
		return err
	}
	printMove(r)
	return nil
}

func runClusterDrain(ctx context.Context, op *operation) error {
	var r adminapi.DrainResult
	path := "/api/v1/cluster/nodes/" + url.PathEscape(op.args[0]) + "/drain"
	if printed, err := op.call(ctx, "POST", path, &r); printed || err != nil {
		return err
	}
	for _, m := range r.Moves {
		printMove(m)
	}
	fmt.Fprintf(stdout, "drained %s: %d shards moved\n", r.Node, len(r.Moves))
	return nil
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
