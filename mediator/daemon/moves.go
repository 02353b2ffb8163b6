package daemon

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"d2m-mediator/cluster"
	"d2m-mediator/mediator"
	"d2m-mediator/reflection"
)

// Planned shard moves, the mediator's side. The node's shard lifecycle
// (package cluster) decides what happens to a shard and when; this file
// does it to the store and the connections: the donor waits for the
// writes admitted before the freeze (Drain: the store's Barrier), exports
// the shard from its store and streams it to the recipient's device
// listener (receivePath), which imports it in one fsynced transaction
// before the cluster flips ownership. The donor then closes the shard's
// devices with 1001 ("shard moved to NODE": they reconnect to the new
// owner) and drops its copy, by generation, so a drop that comes late
// never deletes a copy imported since.

// receivePath is where a donor posts a shard to its recipient, on the
// recipient's device listener (the address the cluster advertises). It is
// not a ClientUrlInfo path, so no device URL collides with it. The move id
// in the request must be the one etcd holds for a move to this node
// (cluster.Node.Receive checks), which only nodes of the cluster know.
const receivePath = "/_cluster/v1/moves/"

// moveHooks implements cluster.Hooks over the server's store.
type moveHooks struct {
	d *Daemon
}

func newMoveHooks(d *Daemon) *moveHooks { return &moveHooks{d: d} }

func (h *moveHooks) shards() (reflection.ShardStore, error) {
	st, ok := h.d.Store.(reflection.ShardStore)
	if !ok {
		return nil, errors.New("this store cannot export or import shards")
	}
	return st, nil
}

// Drain waits until every write submitted before it is durable: the node
// has frozen the shard and every write admitted before the freeze has
// been submitted; the store completes writes in submission order.
func (h *moveHooks) Drain(ctx context.Context, shard cluster.Shard) error {
	done := make(chan error, 1)
	h.d.Store.Barrier(func(err error) { done <- err })
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Export streams the shard from the store. With a shared store
// (PostgreSQL) no data moves: the donor has written everything, and the
// recipient takes the shard over by claiming it with its own epoch at
// first use (which also marks its slots disconnected and releases held
// reflections). The stream is empty. The export runs on a goroutine the
// daemon counts (it holds a read transaction: Shutdown closes the store
// only after it); it ends when the reader is closed.
func (h *moveHooks) Export(ctx context.Context, shard cluster.Shard) (io.ReadCloser, error) {
	if h.d.shared {
		return io.NopCloser(strings.NewReader("")), nil
	}
	st, err := h.shards()
	if err != nil {
		return nil, err
	}
	pr, pw := io.Pipe()
	h.d.bg.Add(1)
	go func() {
		defer h.d.bg.Done()
		stats, err := st.ExportShard(ctx, byte(shard), pw)
		if err == nil {
			h.d.log.Info().Str("shard", shard.String()).Int("groups", stats.Groups).
				Int("entries", stats.Entries).Int64("bytes", stats.Bytes).Msg("cluster: shard exported")
		}
		pw.CloseWithError(err)
	}()
	return pr, nil
}

func (h *moveHooks) Import(ctx context.Context, shard cluster.Shard, gen int64, data io.Reader) error {
	if h.d.shared {
		_, err := io.Copy(io.Discard, data)
		return err
	}
	st, err := h.shards()
	if err != nil {
		return err
	}
	stats, err := st.ImportShard(ctx, byte(shard), gen, data)
	if err != nil {
		return err
	}
	h.d.log.Info().Str("shard", shard.String()).Int64("generation", gen).Int("groups", stats.Groups).
		Int("entries", stats.Entries).Msg("cluster: shard imported")
	return nil
}

func (h *moveHooks) Drop(ctx context.Context, shard cluster.Shard, gen int64) error {
	st, err := h.shards()
	if err != nil {
		return err
	}
	stats, dropped, err := st.DropShard(ctx, byte(shard), gen)
	if err != nil {
		return err
	}
	if !dropped {
		h.d.log.Info().Str("shard", shard.String()).Int64("generation", gen).
			Msg("cluster: kept this node's copy of the shard: it was imported again since")
		return nil
	}
	h.d.log.Info().Str("shard", shard.String()).Int64("generation", gen).Int("groups", stats.Groups).
		Int("entries", stats.Entries).Msg("cluster: shard's data deleted")
	return nil
}

func (h *moveHooks) Reset(ctx context.Context, shard cluster.Shard, gen int64) error {
	st, err := h.shards()
	if err != nil {
		return err
	}
	_, err = st.ResetShard(ctx, byte(shard), gen)
	return err
}

func (h *moveHooks) Settle(ctx context.Context, shards ...cluster.Shard) error {
	st, err := h.shards()
	if err != nil {
		return err
	}
	bs := make([]byte, len(shards))
	for i, s := range shards {
		bs[i] = byte(s)
	}
	return st.SettleShard(ctx, bs...)
}

func (h *moveHooks) Generation(shard cluster.Shard) (int64, bool) {
	st, err := h.shards()
	if err != nil {
		return 0, false
	}
	return st.ShardGeneration(byte(shard))
}

// eventLog carries out the shard lifecycle's events on the server (closes
// a lost shard's devices, with the reason) and records them in the log
// and the move metrics.
type eventLog struct {
	d   *Daemon
	srv *mediator.Server

	frozen      [cluster.NumShards]time.Time // donor side: when the move froze the shard (event goroutine only)
	moves       *prometheus.CounterVec       // donor side, by outcome: handed_over, aborted
	moveSeconds prometheus.Histogram         // donor side: freeze to the shard handed over or thawed
}

func newEventLog(d *Daemon, srv *mediator.Server, _ *moveHooks) *eventLog {
	return &eventLog{
		d: d, srv: srv,
		moves: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "mediator_cluster_moves_total",
			Help: "Planned shard moves this node gave away, by outcome: handed_over, aborted.",
		}, []string{"outcome"}),
		moveSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "mediator_cluster_move_seconds",
			Help:    "Donor side of a planned move, from the freeze (the shard's writes wait) to the shard handed over or thawed.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 14),
		}),
	}
}

// handle runs on the node's event goroutine, in order.
func (l *eventLog) handle(evs []cluster.Event) {
	var gained []string
	var firstEpoch int64
	for _, ev := range evs {
		shard := ev.Shard.String()
		switch ev.Kind {
		case cluster.ShardGained:
			gained = append(gained, shard)
			if firstEpoch == 0 {
				firstEpoch = ev.Epoch
			}
		case cluster.ShardFrozen:
			l.frozen[ev.Shard] = time.Now()
			l.d.log.Info().Str("shard", shard).Int64("epoch", ev.Epoch).Str("move", ev.Move).Str("to", ev.To).
				Msg("cluster: shard frozen for a planned move; its writes wait")
		case cluster.ShardThawed:
			l.finished(ev.Shard, "aborted")
			l.d.log.Warn().Str("shard", shard).Int64("epoch", ev.Epoch).Str("move", ev.Move).Str("to", ev.To).
				Msg("cluster: planned move aborted; serving the shard again")
		case cluster.ShardLost:
			reason := "shard " + ev.Describe()
			if ev.Cause == cluster.CauseMovedAway {
				l.finished(ev.Shard, "handed_over")
				reason = "shard moved to " + ev.To
			}
			n := l.srv.CloseShard(byte(ev.Shard), reason)
			e := l.d.log.Info()
			if ev.Cause != cluster.CauseMovedAway {
				e = l.d.log.Warn()
			}
			e.Str("shard", shard).Int64("epoch", ev.Epoch).Str("cause", ev.Cause.String()).Str("to", ev.To).
				Int("devices_closed", n).Msg("cluster: shard lost")
		}
	}
	if len(gained) > 0 {
		l.d.log.Info().Int("count", len(gained)).Strs("shards", gained).Int64("epoch", firstEpoch).Msg("cluster: shards gained")
	}
}

func (l *eventLog) finished(s cluster.Shard, outcome string) {
	if start := l.frozen[s]; !start.IsZero() {
		l.moves.WithLabelValues(outcome).Inc()
		l.moveSeconds.Observe(time.Since(start).Seconds())
		l.frozen[s] = time.Time{}
	}
}

// httpTransport posts a shard to the recipient's device listener: over
// https when the recipient's listener serves TLS (cluster.Member.TLS),
// verifying its certificate against the cluster's roots.
// Every transfer is signed with the cluster's secret (moveauth.go), and a
// connection that makes no progress for idle ends the transfer.
type httpTransport struct {
	client *http.Client
	secret func() []byte
}

// DefaultTransferIdleTimeout bounds how long a shard transfer may make no
// progress (no byte sent or received) before it fails and the move aborts.
const DefaultTransferIdleTimeout = 30 * time.Second

func newHTTPTransport(tc *tls.Config, idle time.Duration, secret func() []byte) *httpTransport {
	if idle <= 0 {
		idle = DefaultTransferIdleTimeout
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.Proxy = nil // node to node, never through an HTTP proxy
	tr.TLSClientConfig = tc
	dialer := &net.Dialer{Timeout: 5 * time.Second, KeepAlive: 15 * time.Second}
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dialer.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return idleConn{Conn: c, timeout: idle}, nil
	}
	return &httpTransport{client: &http.Client{Transport: tr, Timeout: cluster.DefaultMoveTimeout}, secret: secret}
}

func (t *httpTransport) Send(ctx context.Context, to cluster.Member, mi cluster.MoveInfo, data io.Reader) error {
	scheme := "http"
	if to.TLS {
		scheme = "https"
	}
	q := url.Values{}
	q.Set("shard", mi.Shard.String())
	q.Set("from", mi.From)
	q.Set("to", mi.To)
	q.Set("from_epoch", strconv.FormatInt(mi.FromEpoch, 10))
	u := scheme + "://" + to.Advertise + receivePath + url.PathEscape(mi.ID) + "?" + q.Encode()
	secret := t.secret()
	trailer := http.Header{moveMACTrailer: nil}
	body := &signingReader{r: data, h: sha256.New(), secret: secret, mi: mi, trailer: trailer}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, body)
	if err != nil {
		return err
	}
	req.ContentLength = -1 // chunked: the trailer follows the body
	req.Trailer = trailer
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set(moveAuthHeader, signMove(secret, mi))
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
		shard, err1 := cluster.ParseShard(q.Get("shard"))
		epoch, err2 := strconv.ParseInt(q.Get("from_epoch"), 10, 64)
		if err1 != nil || err2 != nil {
			http.Error(w, "bad move parameters", http.StatusBadRequest)
			return
		}
		mi := cluster.MoveInfo{ID: id, Shard: shard, From: q.Get("from"), To: q.Get("to"), FromEpoch: epoch}
		secret := d.Cluster.Secret()
		if err := checkMoveHeader(secret, mi, r.Header.Get(moveAuthHeader)); err != nil {
			d.log.Warn().Str("remote", r.RemoteAddr).Str("move", id).Str("shard", mi.Shard.String()).
				Msg("cluster: refused a shard transfer without this cluster's signature")
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		// The whole stream is read before anything is imported (the
		// import holds it in memory anyway), so its signature, in the
		// trailer, is checked first.
		h := sha256.New()
		var buf bytes.Buffer
		body := idleBody{r: r.Body, rc: http.NewResponseController(w), timeout: d.transferIdle}
		if _, err := buf.ReadFrom(io.TeeReader(body, h)); err != nil {
			http.Error(w, "reading the shard: "+err.Error(), http.StatusBadRequest)
			return
		}
		mac, err := hex.DecodeString(r.Trailer.Get(moveMACTrailer))
		if err != nil || !hmac.Equal(mac, bodyMAC(secret, mi, h.Sum(nil))) {
			d.log.Warn().Str("remote", r.RemoteAddr).Str("move", id).Str("shard", mi.Shard.String()).
				Msg("cluster: refused a shard transfer whose stream does not match its signature")
			http.Error(w, errMoveAuth.Error()+" (stream)", http.StatusForbidden)
			return
		}
		if err := d.Cluster.Receive(r.Context(), mi, &buf); err != nil {
			// A refusal (the move was aborted, the donor gave up), not a
			// fault of this node: the donor records the outcome.
			d.log.Warn().Err(err).Msg("cluster: receiving a shard failed")
			http.Error(w, err.Error(), http.StatusConflict)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
}

// idleBody fails a read of a transfer's body that makes no progress for
// timeout, as idleConn does on the donor's side: a donor gone silent (a
// network blackhole, where no FIN or RST ever arrives) frees the handler
// in a bounded time instead of when the link comes back, if ever. (Found
// by TestFaultTransferBlackhole in integration/cluster.)
type idleBody struct {
	r       io.Reader
	rc      *http.ResponseController
	timeout time.Duration
}

func (b idleBody) Read(p []byte) (int, error) {
	b.rc.SetReadDeadline(time.Now().Add(b.timeout))
	return b.r.Read(p)
}

func cutPrefix(s, prefix string) (string, bool) {
	if len(s) > len(prefix) && s[:len(prefix)] == prefix {
		return s[len(prefix):], true
	}
	return "", false
}
