package adminapi

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"

	"d2m-mediator/cluster"
)

// Moves, drains and rebalances through the admin API. Each runs on the
// answering node's context (package cluster): the request starts it and,
// by default, waits for the outcome, but a client that goes away (a CLI
// killed, a load balancer's timeout) does not stop it. An abort is its
// own request.

// MoveResult answers a move: how it ended, or, without waiting (202), the
// move that was started.
type MoveResult struct {
	ID        string   `json:"id"`
	Shard     string   `json:"shard"`
	From      string   `json:"from"`
	To        string   `json:"to"`
	FromEpoch int64    `json:"from_epoch"`
	ToEpoch   int64    `json:"to_epoch,omitempty"`
	State     string   `json:"state"`            // handed-over, aborted, or the state in flight
	Reason    string   `json:"reason,omitempty"` // aborted: why
	States    []string `json:"states"`
	Seconds   float64  `json:"seconds"`
}

// PlannedMove is one move of a rebalance or drain plan.
type PlannedMove struct {
	Shard  string `json:"shard"`
	From   string `json:"from"`
	To     string `json:"to"`
	Reason string `json:"reason"`
}

// RebalanceResult answers a rebalance or a drain: the plan and, unless it
// was a dry run, the moves made.
type RebalanceResult struct {
	Node   string        `json:"node,omitempty"` // drain: the node drained
	DryRun bool          `json:"dry_run"`
	Plan   []PlannedMove `json:"plan"`
	Moves  []MoveResult  `json:"moves"`
}

func (a *API) registerClusterMoves(mux *routes, clustered func(http.HandlerFunc) http.HandlerFunc) {
	mux.handleFunc("POST /api/v1/cluster/shards/{shard}/move", clustered(a.apiClusterMove))
	mux.handleFunc("POST /api/v1/cluster/shards/{shard}/abort", clustered(a.apiClusterAbort))
	mux.handleFunc("POST /api/v1/cluster/nodes/{node}/drain", clustered(a.apiClusterDrain))
	mux.handleFunc("POST /api/v1/cluster/nodes/{node}/undrain", clustered(a.apiClusterUndrain))
	mux.handleFunc("POST /api/v1/cluster/rebalance", clustered(a.apiClusterRebalance))
}

func moveResult(m cluster.MoveResult) MoveResult {
	out := MoveResult{
		ID: m.ID, Shard: m.Shard.String(), From: m.From, To: m.To,
		FromEpoch: m.FromEpoch, ToEpoch: m.ToEpoch, State: string(m.State), Reason: m.Reason,
		Seconds: m.Took.Seconds(), States: []string{},
	}
	for _, s := range m.States {
		out.States = append(out.States, string(s.State))
	}
	return out
}

// queryBool reads an optional boolean query parameter.
func queryBool(r *http.Request, name string, def bool) (bool, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return def, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, errorf(http.StatusBadRequest, "?%s=%q: want true or false", name, v)
	}
	return b, nil
}

func rebalanceOptions(r *http.Request) (cluster.RebalanceOptions, error) {
	var opt cluster.RebalanceOptions
	var err error
	if opt.DryRun, err = queryBool(r, "dry-run", false); err != nil {
		return opt, err
	}
	if v := r.URL.Query().Get("max-parallel"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return opt, errorf(http.StatusBadRequest, "?max-parallel=%q: want a positive number", v)
		}
		opt.MaxParallel = n
	}
	return opt, nil
}

// apiClusterMove starts a planned move and, unless ?wait=false, waits for
// its outcome: 200 handed over, 409 aborted (with the reason), 202 if the
// move is still running when the request ends.
func (a *API) apiClusterMove(w http.ResponseWriter, r *http.Request) {
	s, to, err := shardTarget(r, "move")
	if err != nil {
		a.writeErr(w, err)
		return
	}
	wait, err := queryBool(r, "wait", true)
	if err != nil {
		a.writeErr(w, err)
		return
	}
	info, rev, err := a.cluster.StartMove(r.Context(), s, to)
	if err != nil {
		a.clusterErr(w, err)
		return
	}
	if !wait {
		writeJSON(w, http.StatusAccepted, moveResult(cluster.MoveResult{MoveInfo: info, State: cluster.StateDraining}))
		return
	}
	res, err := a.cluster.WaitMove(r.Context(), info, rev)
	switch {
	case errors.Is(err, cluster.ErrMoveRunning):
		writeJSON(w, http.StatusAccepted, moveResult(res))
	case err != nil:
		a.clusterErr(w, err)
	default:
		writeJSON(w, http.StatusOK, moveResult(res))
	}
}

func (a *API) apiClusterAbort(w http.ResponseWriter, r *http.Request) {
	s, err := parseShard(r.PathValue("shard"))
	if err != nil {
		a.writeErr(w, err)
		return
	}
	id := r.URL.Query().Get("move")
	if err := a.cluster.AbortMove(r.Context(), s, id, "aborted by an operator"); err != nil {
		a.clusterErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"shard": s.String(), "move": id, "state": string(cluster.StateAborted)})
}

func (a *API) rebalanceResult(node string, dry bool, res cluster.RebalanceResult) RebalanceResult {
	out := RebalanceResult{Node: node, DryRun: dry, Plan: []PlannedMove{}, Moves: []MoveResult{}}
	for _, p := range res.Plan {
		out.Plan = append(out.Plan, PlannedMove{Shard: p.Shard.String(), From: p.From, To: p.To, Reason: p.Reason})
	}
	for _, m := range res.Moves {
		out.Moves = append(out.Moves, moveResult(m))
	}
	return out
}

func (a *API) apiClusterDrain(w http.ResponseWriter, r *http.Request) {
	node := r.PathValue("node")
	opt, err := rebalanceOptions(r)
	if err != nil {
		a.writeErr(w, err)
		return
	}
	res, err := a.cluster.DrainNode(r.Context(), node, opt)
	if err != nil && !errors.Is(err, cluster.ErrMoveRunning) {
		a.clusterErr(w, err)
		return
	}
	status := http.StatusOK
	if err != nil {
		status = http.StatusAccepted
	}
	writeJSON(w, status, a.rebalanceResult(node, opt.DryRun, res))
}

func (a *API) apiClusterUndrain(w http.ResponseWriter, r *http.Request) {
	node := r.PathValue("node")
	if !cluster.ValidNodeID(node) {
		writeError(w, http.StatusBadRequest, "node id %q is not valid", node)
		return
	}
	if err := a.cluster.Undrain(r.Context(), node); err != nil {
		a.clusterErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"node": node, "draining": false})
}

func (a *API) apiClusterRebalance(w http.ResponseWriter, r *http.Request) {
	opt, err := rebalanceOptions(r)
	if err != nil {
		a.writeErr(w, err)
		return
	}
	res, err := a.cluster.Rebalance(r.Context(), opt)
	if err != nil && !errors.Is(err, cluster.ErrMoveRunning) {
		a.clusterErr(w, fmt.Errorf("rebalance: %w", err))
		return
	}
	status := http.StatusOK
	if err != nil {
		status = http.StatusAccepted
	}
	writeJSON(w, status, a.rebalanceResult("", opt.DryRun, res))
}
