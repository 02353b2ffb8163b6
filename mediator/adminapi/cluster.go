package adminapi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/reflection"
)

// Cluster endpoints (cluster mode; on a single node they answer 404 "not
// in cluster mode"):
//
//	GET  /cluster/haproxy.map                        the shard map as an HAProxy map file
//	GET  /api/v1/cluster/nodes                       ClusterNodes
//	GET  /api/v1/cluster/shards                      ClusterShards
//	POST /api/v1/cluster/shards/{shard}/move?to=N[&wait=false]   planned move → MoveResult (202 without waiting)
//	POST /api/v1/cluster/shards/{shard}/abort[?move=ID]          abort the shard's move in flight
//	POST /api/v1/cluster/nodes/{node}/drain[?dry-run=true&max-parallel=N]   → RebalanceResult
//	POST /api/v1/cluster/nodes/{node}/undrain        clear the drain mark
//	POST /api/v1/cluster/rebalance[?dry-run=true&max-parallel=N]            → RebalanceResult
//	POST /api/v1/cluster/shards/{shard}/reassign?to=N&accept-data-loss=true
//
// {shard} is two hex digits (the /{prefix8}/ URL segment). Moves, drains
// and rebalances belong to the cluster, not to the request: a client that
// goes away does not stop them (cluster_moves.go).

// ClusterBackend is what the cluster endpoints need; *cluster.Node
// implements it.
type ClusterBackend interface {
	ID() string
	Members() []cluster.Member
	Shards() []cluster.ShardInfo
	Owner(s cluster.Shard) (node, addr string, epoch int64, ok bool)
	Owns(s cluster.Shard) (epoch int64, ok bool)
	StartMove(ctx context.Context, s cluster.Shard, to string) (cluster.MoveInfo, int64, error)
	WaitMove(ctx context.Context, mi cluster.MoveInfo, rev int64) (cluster.MoveResult, error)
	AbortMove(ctx context.Context, s cluster.Shard, id, reason string) error
	DrainNode(ctx context.Context, node string, opt cluster.RebalanceOptions) (cluster.RebalanceResult, error)
	Undrain(ctx context.Context, node string) error
	Rebalance(ctx context.Context, opt cluster.RebalanceOptions) (cluster.RebalanceResult, error)
	Reassign(ctx context.Context, s cluster.Shard, to string, acceptDataLoss bool) error
	HAProxyMap() string
}

var _ ClusterBackend = (*cluster.Node)(nil)

// ClusterNode is one live node.
type ClusterNode struct {
	ID        string `json:"id"`
	Advertise string `json:"advertise"`
	Admin     string `json:"admin,omitempty"` // its admin API (host:port), where other nodes forward admin requests
	TLS       bool   `json:"tls,omitempty"`   // its device listener serves TLS
	Started   string `json:"started"`
	Shards    int    `json:"shards"`   // shards it serves now
	Draining  bool   `json:"draining"` // marked draining: takes no shards
	This      bool   `json:"this"`     // the node that answered
}

// ClusterNodes is GET /api/v1/cluster/nodes.
type ClusterNodes struct {
	Nodes []ClusterNode `json:"nodes"`
}

// ClusterShard is one shard. Groups, devices and queued entries are
// counted only for shards the answering node serves (nil elsewhere).
type ClusterShard struct {
	Shard    string `json:"shard"` // two hex digits
	Assigned string `json:"assigned"`
	Owner    string `json:"owner"` // "" while nobody serves it (503)
	Addr     string `json:"addr"`
	Epoch    int64  `json:"epoch"`
	// Move is the state of a move in progress (draining, exported, …),
	// else "serving", or "unserved" while nobody serves the shard.
	Move    string `json:"move"`
	MoveTo  string `json:"move_to,omitempty"`
	Groups  *int   `json:"groups"`
	Devices *int   `json:"devices"`
	Queued  *int   `json:"queued"`
}

// ClusterShards is GET /api/v1/cluster/shards.
type ClusterShards struct {
	Node   string         `json:"node"`
	Shards []ClusterShard `json:"shards"`
}

// registerCluster adds the cluster endpoints; on a single node each
// answers 404 saying so (the routes exist either way: they need the
// token on every node).
func (a *API) registerCluster(mux *routes) {
	clustered := func(h http.HandlerFunc) http.HandlerFunc {
		if a.cluster != nil {
			return h
		}
		return func(w http.ResponseWriter, r *http.Request) {
			writeError(w, http.StatusNotFound, "not in cluster mode: this mediator runs as a single node (cluster mode needs --cluster-etcd)")
		}
	}
	mux.handleFunc("GET /cluster/haproxy.map", clustered(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte(a.cluster.HAProxyMap()))
	}))
	mux.handleFunc("GET /api/v1/cluster/nodes", clustered(a.apiClusterNodes))
	mux.handleFunc("GET /api/v1/cluster/shards", clustered(a.apiClusterShards))
	a.registerClusterMoves(mux, clustered)
	mux.handleFunc("POST /api/v1/cluster/shards/{shard}/reassign", clustered(a.apiClusterReassign))
}

func (a *API) apiClusterNodes(w http.ResponseWriter, r *http.Request) {
	serving := map[string]int{}
	for _, s := range a.cluster.Shards() {
		if s.Owner != "" {
			serving[s.Owner]++
		}
	}
	out := ClusterNodes{Nodes: []ClusterNode{}}
	for _, m := range a.cluster.Members() {
		out.Nodes = append(out.Nodes, ClusterNode{
			ID: m.ID, Advertise: m.Advertise, Admin: m.Admin, TLS: m.TLS, Started: m.Started.UTC().Format(time.RFC3339),
			Shards: serving[m.ID], Draining: m.Draining, This: m.ID == a.cluster.ID(),
		})
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *API) apiClusterShards(w http.ResponseWriter, r *http.Request) {
	type counts struct{ groups, devices, queued int }
	local := map[byte]*counts{}
	self := a.cluster.ID()
	for _, s := range a.cluster.Shards() {
		if s.Owner == self {
			local[byte(s.Shard)] = &counts{}
		}
	}
	err := a.store().ForEachGroup(func(g reflection.GroupID, st reflection.GroupState) error {
		c := local[g[0]]
		if c == nil || len(st.Slots) == 0 {
			return nil
		}
		c.groups++
		c.devices += len(a.b.LiveGroup(g).Conns)
		for _, sl := range st.Slots {
			if qs, ok := a.store().QueueStats(g, sl.DeviceID); ok {
				c.queued += qs.Length
			}
		}
		return nil
	})
	if err != nil {
		a.writeErr(w, err)
		return
	}
	out := ClusterShards{Node: self, Shards: []ClusterShard{}}
	for _, s := range a.cluster.Shards() {
		cs := ClusterShard{
			Shard: fmt.Sprintf("%02x", byte(s.Shard)), Assigned: s.Assigned, Owner: s.Owner, Addr: s.Addr,
			Epoch: s.Epoch, Move: string(s.Move), MoveTo: s.MoveTo,
		}
		if s.Move == cluster.StateServing && s.Owner == "" {
			cs.Move = "unserved"
		}
		if c := local[byte(s.Shard)]; c != nil {
			cs.Groups, cs.Devices, cs.Queued = &c.groups, &c.devices, &c.queued
		}
		out.Shards = append(out.Shards, cs)
	}
	writeJSON(w, http.StatusOK, out)
}

func parseShard(s string) (cluster.Shard, error) {
	v, err := strconv.ParseUint(strings.TrimPrefix(strings.ToLower(s), "0x"), 16, 8)
	if err != nil || len(strings.TrimPrefix(strings.ToLower(s), "0x")) > 2 {
		return 0, errorf(http.StatusBadRequest, "shard %q: want two hex digits (00..ff), the /{prefix8}/ URL segment", s)
	}
	return cluster.Shard(v), nil
}

// clusterErr answers the cluster's refusals with 409 (a state that does
// not allow it) or 404 (unknown node) and a clear message.
func (a *API) clusterErr(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, cluster.ErrNodeNotLive):
		writeError(w, http.StatusNotFound, "%v", err)
	case errors.Is(err, cluster.ErrMoveInProgress), errors.Is(err, cluster.ErrShardUnavailable),
		errors.Is(err, cluster.ErrAlreadyOwner), errors.Is(err, cluster.ErrMoveAborted),
		errors.Is(err, cluster.ErrDataLoss), errors.Is(err, cluster.ErrOwnerLive),
		errors.Is(err, cluster.ErrNoOtherNode), errors.Is(err, cluster.ErrNoHooks),
		errors.Is(err, cluster.ErrMoveFinished):
		writeError(w, http.StatusConflict, "%v", err)
	case errors.Is(err, cluster.ErrNoSuchMove):
		writeError(w, http.StatusNotFound, "%v", err)
	default:
		a.writeErr(w, err)
	}
}

// shardTarget reads {shard} and ?to=NODE of a move or reassign request.
func shardTarget(r *http.Request, verb string) (cluster.Shard, string, error) {
	s, err := parseShard(r.PathValue("shard"))
	if err != nil {
		return 0, "", err
	}
	to := r.URL.Query().Get("to")
	if to == "" {
		return 0, "", errorf(http.StatusBadRequest, "%s needs ?to=NODE", verb)
	}
	return s, to, nil
}

func (a *API) apiClusterReassign(w http.ResponseWriter, r *http.Request) {
	s, to, err := shardTarget(r, "reassign")
	if err != nil {
		a.writeErr(w, err)
		return
	}
	accept := r.URL.Query().Get("accept-data-loss") == "true"
	if err := a.cluster.Reassign(r.Context(), s, to, accept); err != nil {
		a.clusterErr(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"shard": fmt.Sprintf("%02x", byte(s)), "assigned": to})
}
