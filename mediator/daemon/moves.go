package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"d2m-mediator/cluster"
	"d2m-mediator/mediator"
	"d2m-mediator/reflection"
)

// Planned shard moves (protocol of issue "cluster mode"): the donor's
// acks for the shard are already fenced when Drain runs; it waits for the
// writes in flight, exports the shard from its store and streams it to the
// recipient's device listener (receivePath), which imports it in one
// fsynced transaction before the cluster flips ownership. The donor then
// closes the shard's devices with 1001 (they reconnect to the new owner)
// and deletes its copy.

// receivePath is where a donor posts a shard to its recipient, on the
// recipient's device listener (the address the cluster advertises). It is
// not a ClientUrlInfo path, so no device URL collides with it. The move id
// in the request must be the one etcd holds for a move to this node
// (cluster.Node.Receive checks), which only nodes of the cluster know.
const receivePath = "/_cluster/v1/moves/"

// moveHooks implements cluster.Hooks over the server and its store.
type moveHooks struct {
	d *Daemon

	mu      sync.Mutex
	started map[cluster.Shard]time.Time // donor side: when Drain ran

	moves       *prometheus.CounterVec // donor side, by outcome: handed_over, aborted
	moveSeconds prometheus.Histogram   // donor side: Drain to the shard lost to its new owner
}

func newMoveHooks(d *Daemon) *moveHooks {
	return &moveHooks{
		d: d, started: make(map[cluster.Shard]time.Time),
		moves: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mediator_cluster_moves_total",
			Help: "Planned shard moves this node gave away, by outcome: handed_over, aborted.",
		}, []string{"outcome"}),
		moveSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "mediator_cluster_move_seconds",
			Help:    "Donor side of a planned move, from the drain (acks paused) to the shard served by its new owner.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14),
		}),
	}
}

// handedOver records a finished move of a shard this node drained.
func (h *moveHooks) handedOver(shard cluster.Shard) {
	h.mu.Lock()
	start, ok := h.started[shard]
	delete(h.started, shard)
	h.mu.Unlock()
	if ok {
		h.moves.WithLabelValues("handed_over").Inc()
		h.moveSeconds.Observe(time.Since(start).Seconds())
	}
}

func (h *moveHooks) shards() (reflection.ShardStore, error) {
	st, ok := h.d.Store.(reflection.ShardStore)
	if !ok {
		return nil, errors.New("this store cannot export or import shards")
	}
	return st, nil
}

// Drain waits until every write submitted before it is committed: the
// store completes writes in submission order, so a no-op write's
// completion is the barrier.
func (h *moveHooks) Drain(ctx context.Context, shard cluster.Shard) error {
	h.mu.Lock()
	h.started[shard] = time.Now()
	h.mu.Unlock()
	done := make(chan error, 1)
	h.d.Store.PruneTombstones(math.MinInt64, func(err error) { done <- err })
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// With a shared store (PostgreSQL) no data moves: the donor has drained
// and written everything, and the recipient takes the shard over by
// claiming it with its own epoch at first use (which also marks its slots
// disconnected and releases held reflections). The stream is empty.
func (h *moveHooks) Export(ctx context.Context, shard cluster.Shard) (io.ReadCloser, error) {
	if h.d.shared {
		return io.NopCloser(strings.NewReader("")), nil
	}
	st, err := h.shards()
	if err != nil {
		return nil, err
	}
	pr, pw := io.Pipe()
	go func() {
		stats, err := st.ExportShard(ctx, byte(shard), pw)
		if err == nil {
			h.d.log.Info().Str("shard", fmt.Sprintf("%02x", byte(shard))).Int("groups", stats.Groups).
				Int("entries", stats.Entries).Msg("cluster: shard exported")
		}
		pw.CloseWithError(err)
	}()
	return pr, nil
}

func (h *moveHooks) Import(ctx context.Context, shard cluster.Shard, data io.Reader) error {
	if h.d.shared {
		_, err := io.Copy(io.Discard, data)
		return err
	}
	st, err := h.shards()
	if err != nil {
		return err
	}
	stats, err := st.ImportShard(ctx, byte(shard), 0, data)
	if err != nil {
		return err
	}
	if err := h.settleImported(ctx, shard); err != nil {
		return err
	}
	h.d.log.Info().Str("shard", fmt.Sprintf("%02x", byte(shard))).Int("groups", stats.Groups).
		Int("entries", stats.Entries).Msg("cluster: shard imported")
	return nil
}

// settleImported ends on this node what the move ended on the donor: no
// device of the shard is connected here yet, so slots the donor had marked
// connected are marked disconnected now (their expiry counts again), and
// reflections held for a transaction are released into the other queues
// (the holder's connection, and so its transaction, ends with the move;
// an acked reflection is never lost, protocol.md §18 row 3). Releasing a
// device that holds nothing changes nothing.
func (h *moveHooks) settleImported(ctx context.Context, shard cluster.Shard) error {
	st := h.d.Store
	now := time.Now().UnixMilli()
	var waits []chan error
	err := st.ForEachGroup(func(g reflection.GroupID, gs reflection.GroupState) error {
		if g[0] != byte(shard) {
			return nil
		}
		for _, sl := range gs.Slots {
			if sl.ConnectedSince != 0 {
				sl.ConnectedSince, sl.LastDisconnectAt = 0, now
				ch := make(chan error, 1)
				st.PutSlot(g, sl, func(err error) { ch <- err })
				waits = append(waits, ch)
			}
			ch := make(chan error, 1)
			st.ReleaseHeld(g, sl.DeviceID, func(_ reflection.AppendResult, err error) { ch <- err })
			waits = append(waits, ch)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, ch := range waits {
		select {
		case err := <-ch:
			if err != nil {
				return fmt.Errorf("settling the imported shard: %w", err)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Resume: the move was aborted. Reflections that arrived while it drained
// were not acknowledged; the devices are closed with 1001 so that they
// send them again, to this node, which serves the shard again.
func (h *moveHooks) Resume(shard cluster.Shard) {
	h.mu.Lock()
	delete(h.started, shard)
	h.mu.Unlock()
	h.moves.WithLabelValues("aborted").Inc()
	n := h.d.Server.CloseShard(byte(shard))
	h.d.log.Info().Str("shard", fmt.Sprintf("%02x", byte(shard))).Int("devices_closed", n).Msg("cluster: move aborted, serving the shard again")
}

// dropMovedShard deletes this node's copy of a shard that now belongs to
// another node, once its connections are gone (a disconnect written after
// the drop would bring a slot back).
func (d *Daemon) dropMovedShard(s *mediator.Server, shard cluster.Shard) {
	st, ok := d.Store.(reflection.ShardStore)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := s.WaitShardClosed(ctx, byte(shard)); err != nil {
		d.log.Error().Err(err).Str("shard", fmt.Sprintf("%02x", byte(shard))).Msg("cluster: moved shard still has connections; its data is kept")
		return
	}
	stats, _, err := st.DropShard(ctx, byte(shard), math.MaxInt64)
	if err != nil {
		d.log.Error().Err(err).Str("shard", fmt.Sprintf("%02x", byte(shard))).Msg("cluster: deleting a moved shard's data failed")
		return
	}
	d.log.Info().Str("shard", fmt.Sprintf("%02x", byte(shard))).Int("groups", stats.Groups).Msg("cluster: moved shard's data deleted")
}

// httpTransport posts a shard to the recipient's device listener.
type httpTransport struct {
	scheme string // http, or https when devices connect with TLS
	client *http.Client
}

func (t *httpTransport) Send(ctx context.Context, to cluster.Member, mi cluster.MoveInfo, data io.Reader) error {
	q := url.Values{}
	q.Set("shard", strconv.Itoa(int(mi.Shard)))
	q.Set("from", mi.From)
	q.Set("to", mi.To)
	q.Set("from_epoch", strconv.FormatInt(mi.FromEpoch, 10))
	u := t.scheme + "://" + to.Advertise + receivePath + url.PathEscape(mi.ID) + "?" + q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, data)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := t.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("%s: %s", resp.Status, msg)
	}
	return nil
}

// receiveHandler serves receivePath on the device listener and hands
// everything else to next (the device endpoint).
func (d *Daemon) receiveHandler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, ok := cutPrefix(r.URL.Path, receivePath)
		if !ok {
			next.ServeHTTP(w, r)
			return
		}
		if r.Method != http.MethodPost || d.Cluster == nil {
			http.Error(w, "not a cluster move", http.StatusNotFound)
			return
		}
		q := r.URL.Query()
		shard, err1 := strconv.Atoi(q.Get("shard"))
		epoch, err2 := strconv.ParseInt(q.Get("from_epoch"), 10, 64)
		if err1 != nil || err2 != nil || shard < 0 || shard >= cluster.NumShards {
			http.Error(w, "bad move parameters", http.StatusBadRequest)
			return
		}
		mi := cluster.MoveInfo{ID: id, Shard: cluster.Shard(shard), From: q.Get("from"), To: q.Get("to"), FromEpoch: epoch}
		if err := d.Cluster.Receive(r.Context(), mi, r.Body); err != nil {
			d.log.Error().Err(err).Msg("cluster: receiving a shard failed")
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
}

func cutPrefix(s, prefix string) (string, bool) {
	if len(s) > len(prefix) && s[:len(prefix)] == prefix {
		return s[len(prefix):], true
	}
	return "", false
}
