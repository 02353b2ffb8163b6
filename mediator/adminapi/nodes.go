package adminapi

import (
	"cmp"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"d2m-mediator/cluster"
	"d2m-mediator/reflection"
)

// The admin API in cluster mode: any node answers.
//
// A request naming a group (/api/v1/groups/{group}…) is answered by the
// node that serves the group's shard: a node that does not forwards it to
// the owner's admin API (the address the owner publishes in its etcd node
// record, cluster.Member.Admin), once: the forwarded request carries
// ForwardedHeader, and a node that receives it for a shard it does not
// serve refuses it (503) instead of forwarding it again. The caller's
// Authorization header travels with it: the nodes of a cluster share one
// admin token. {group} may be a prefix, but of at least two hex digits:
// they are the shard.
//
// GET /api/v1/groups and GET /api/v1/stats ask every live node at once
// and merge the answers, each row naming its node; ?local=true answers
// for the asked node alone.

// ForwardedHeader marks an admin request one node sent to another (the
// owner of a group's shard, or a node asked for its part of a
// cluster-wide answer); its value is the sending node's id. Such a
// request is answered where it arrives, never forwarded again.
const ForwardedHeader = "D2m-Admin-Forwarded-By"

// NodeHeader, on every admin answer in cluster mode, names the node that
// answered (the owner, for a forwarded request).
const NodeHeader = "D2m-Admin-Node"

// nodeTimeout bounds one node's part of a cluster-wide answer.
const nodeTimeout = 30 * time.Second

func withNodeHeader(id string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(NodeHeader, id)
		next.ServeHTTP(w, r)
	})
}

// newNodeClient is the client for other nodes' admin APIs: no proxy (they
// are on the cluster's network), a bounded dial; the request's context
// bounds the rest (a lock release waits up to 10 s, a drop for its
// commit).
func newNodeClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		Proxy:                 nil,
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		ResponseHeaderTimeout: time.Minute,
		MaxIdleConnsPerHost:   4,
	}}
}

// serves reports whether this node serves the shard of g.
func (a *API) serves(g reflection.GroupID) bool {
	_, ok := a.cluster.Owns(cluster.Shard(g[0]))
	return ok
}

// onOwner runs h for a request naming a group on the node that serves
// the group's shard: here, or forwarded there. On a single node it is h.
func (a *API) onOwner(h http.HandlerFunc) http.HandlerFunc {
	if a.cluster == nil {
		return h
	}
	return func(w http.ResponseWriter, r *http.Request) {
		p := strings.ToLower(r.PathValue("group"))
		if strings.Trim(p, "0123456789abcdef") != "" || len(p) > 2*len(reflection.GroupID{}) {
			h(w, r) // resolveGroup explains what is wrong with it
			return
		}
		if len(p) < 2 {
			writeError(w, http.StatusBadRequest, "group prefix %q: in cluster mode give at least two hex digits (they name the group's shard)", p)
			return
		}
		b, _ := hex.DecodeString(p[:2])
		s := cluster.Shard(b[0])
		if _, ok := a.cluster.Owns(s); ok {
			h(w, r)
			return
		}
		owner, _, _, ok := a.cluster.Owner(s)
		switch {
		case r.Header.Get(ForwardedHeader) != "":
			// The forwarding node's shard map and ours disagree (a move
			// or a failover right now): one hop only, the caller retries.
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "shard %s: %s forwarded this request here, but node %s does not serve the shard (its shard map names %q); retry",
				s, r.Header.Get(ForwardedHeader), a.cluster.ID(), owner)
		case !ok:
			a.unserved(w, s)
		case owner == a.cluster.ID():
			// The shard map names this node; its lifecycle has not taken
			// the shard yet (a claim or a move's flip a moment ago).
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "shard %s is being taken over by node %s right now; retry", s, owner)
		default:
			a.forwardTo(w, r, s, owner)
		}
	}
}

// unserved answers a request for a shard nobody serves: 503, naming the
// shard and the node it waits for.
func (a *API) unserved(w http.ResponseWriter, s cluster.Shard) {
	assigned := a.cluster.Shards()[s].Assigned
	w.Header().Set("Retry-After", "5")
	if assigned == "" {
		writeError(w, http.StatusServiceUnavailable, "shard %s is not served right now: it is not assigned to any node yet", s)
		return
	}
	writeError(w, http.StatusServiceUnavailable, "shard %s is not served right now: it is assigned to node %s, which is not live", s, assigned)
}

// nodeAdmin returns where a live node's admin API is.
func (a *API) nodeAdmin(node string) (string, error) {
	for _, m := range a.cluster.Members() {
		if m.ID != node {
			continue
		}
		if m.Admin == "" {
			return "", fmt.Errorf("node %s publishes no admin address (it runs without an admin listener)", node)
		}
		return m.Admin, nil
	}
	return "", fmt.Errorf("node %s is not live", node)
}

// forwardTo sends the request to owner's admin API and copies its answer
// back, with the caller's Authorization header and ForwardedHeader.
func (a *API) forwardTo(w http.ResponseWriter, r *http.Request, s cluster.Shard, owner string) {
	addr, err := a.nodeAdmin(owner)
	if err != nil {
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, "shard %s is served by node %s, but %v", s, owner, err)
		return
	}
	req, err := http.NewRequestWithContext(r.Context(), r.Method, "http://"+addr+r.URL.RequestURI(), r.Body)
	if err != nil {
		a.writeErr(w, err)
		return
	}
	req.Header.Set("Authorization", r.Header.Get("Authorization"))
	req.Header.Set(ForwardedHeader, a.cluster.ID())
	resp, err := a.nodes.Do(req)
	if err != nil {
		writeError(w, http.StatusBadGateway, "shard %s is served by node %s, whose admin API at %s cannot be reached: %v", s, owner, addr, err)
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusUnauthorized {
		writeError(w, http.StatusBadGateway, "%s", tokenMismatch(owner))
		return
	}
	for _, h := range []string{"Content-Type", "Cache-Control", "Retry-After", "Content-Disposition", NodeHeader} {
		if v := resp.Header.Get(h); v != "" {
			w.Header().Set(h, v)
		}
	}
	w.WriteHeader(resp.StatusCode)
	io.Copy(w, resp.Body)
}

func tokenMismatch(node string) string {
	return fmt.Sprintf("node %s refused the admin token this node accepted: every node of a cluster needs the same admin token", node)
}

// askNode GETs path (an answer of this API) from node's admin API into v,
// on behalf of r's caller.
func (a *API) askNode(ctx context.Context, r *http.Request, m cluster.Member, path string, v any) error {
	if m.Admin == "" {
		return fmt.Errorf("node %s publishes no admin address (it runs without an admin listener)", m.ID)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+m.Admin+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", r.Header.Get("Authorization"))
	req.Header.Set(ForwardedHeader, a.cluster.ID())
	resp, err := a.nodes.Do(req)
	if err != nil {
		return fmt.Errorf("its admin API at %s cannot be reached: %w", m.Admin, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return fmt.Errorf("reading the answer of %s: %w", m.Admin, err)
	}
	if resp.StatusCode == http.StatusUnauthorized {
		return errors.New("it refused the admin token this node accepted: every node of a cluster needs the same admin token")
	}
	if resp.StatusCode != http.StatusOK {
		var e APIError
		if json.Unmarshal(body, &e) != nil || e.Error == "" {
			e.Error = http.StatusText(resp.StatusCode)
		}
		return fmt.Errorf("HTTP %d from %s: %s", resp.StatusCode, m.Admin, e.Error)
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("unexpected answer from %s: %w", m.Admin, err)
	}
	return nil
}

// everyNode runs this node's part (local) and asks every other live node
// for path at once, each decoded into a new T; the answers come back in
// node id order, each with the error that kept it out.
func everyNode[T any](a *API, r *http.Request, path string, local func() (T, error)) []nodeAnswer[T] {
	members := a.cluster.Members()
	out := make([]nodeAnswer[T], len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		out[i].node = m.ID
		if m.ID == a.cluster.ID() {
			out[i].v, out[i].err = local()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(r.Context(), nodeTimeout)
			defer cancel()
			out[i].err = a.askNode(ctx, r, m, path, &out[i].v)
		}()
	}
	wg.Wait()
	return out
}

type nodeAnswer[T any] struct {
	node string
	v    T
	err  error
}

// clusterGroups answers GET /api/v1/groups in cluster mode: every live
// node lists the groups of the shards it serves, merged in group id
// order. The groups of a shard that moves meanwhile may be missed or
// listed twice; those of shards nobody serves are missing, and the
// answer names the shards.
func (a *API) clusterGroups(w http.ResponseWriter, r *http.Request) {
	answers := everyNode(a, r, "/api/v1/groups?local=true&owned=true", func() (GroupList, error) { return a.groupList(true) })
	list := GroupList{Groups: []GroupSummary{}}
	for _, ans := range answers {
		if ans.err != nil {
			list.Errors = append(list.Errors, NodeError{Node: ans.node, Error: ans.err.Error()})
			continue
		}
		list.Groups = append(list.Groups, ans.v.Groups...)
	}
	slices.SortFunc(list.Groups, func(a, b GroupSummary) int {
		return cmp.Or(strings.Compare(a.ID, b.ID), strings.Compare(a.Node, b.Node))
	})
	for _, si := range a.cluster.Shards() {
		if si.Owner == "" {
			list.UnservedShards = append(list.UnservedShards, si.Shard.String())
		}
	}
	writeJSON(w, http.StatusOK, list)
}

// clusterStats answers GET /api/v1/stats in cluster mode: every live
// node's stats, in node id order.
func (a *API) clusterStats(w http.ResponseWriter, r *http.Request) {
	answers := everyNode(a, r, "/api/v1/stats?local=true", func() (ServerStats, error) { return a.serverStats(), nil })
	out := ClusterStats{Nodes: []NodeStats{}}
	for _, ans := range answers {
		ns := NodeStats{Node: ans.node}
		if ans.err != nil {
			ns.Error = ans.err.Error()
		} else {
			st := ans.v
			ns.Stats = &st
		}
		out.Nodes = append(out.Nodes, ns)
	}
	writeJSON(w, http.StatusOK, out)
}

// boolQuery reads an optional boolean query parameter.
func boolQuery(r *http.Request, name string) (bool, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return false, nil
	}
	b, err := strconv.ParseBool(v)
	if err != nil {
		return false, errorf(http.StatusBadRequest, "?%s=%s: want true or false", name, v)
	}
	return b, nil
}
