package adminapi

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"

	"d2m-mediator/d2m"
	"d2m-mediator/mediator"
	"d2m-mediator/reflection"
)

// LoadOrCreateToken reads the admin bearer token from path, generating a
// random one (file mode 0600) on first start.
func LoadOrCreateToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		tok := strings.TrimSpace(string(b))
		if tok == "" {
			return "", fmt.Errorf("admin token file %s is empty", path)
		}
		return tok, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("admin token: %w", err)
	}
	var raw [32]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", err
	}
	tok := hex.EncodeToString(raw[:])
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return "", fmt.Errorf("admin token: %w", err)
	}
	if err := writeFileDurably(path, []byte(tok+"\n")); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return LoadOrCreateToken(path) // another process won the race
		}
		return "", fmt.Errorf("admin token: %w", err)
	}
	return tok, nil
}

// writeFileDurably creates path (mode 0600) holding data, or fails with
// fs.ErrExist. The data is synced before the name appears, and the
// directory after: a power cut leaves either no file or the whole file,
// never the empty one os.WriteFile can leave (the server would refuse to
// start on it).
func writeFileDurably(path string, data []byte) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// CheckAdminExposure refuses a non-loopback admin listener without a token.
func CheckAdminExposure(addr, token string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("admin listen address %q: %w", addr, err)
	}
	ip := net.ParseIP(host)
	loopback := host == "localhost" || (ip != nil && ip.IsLoopback())
	if !loopback && token == "" {
		return fmt.Errorf("refusing to serve the admin API on non-loopback %s without a token", addr)
	}
	return nil
}

// Backend is what the admin API needs from the server; *mediator.Server
// implements it. Stored state is read from Store; in-memory state comes as
// snapshots; the operator actions go through the server so that they
// follow the protocol exactly as a device's request would.
type Backend interface {
	Ready() bool
	Registry() *prometheus.Registry
	Store() reflection.Store
	Config() mediator.Config
	LiveGroup(id reflection.GroupID) mediator.LiveGroup
	LiveGroupIDs() []reflection.GroupID
	ConnectionCounts() (handshake, authenticated int)
	GroupsLoaded() int
	DropSlot(ctx context.Context, id reflection.GroupID, dev reflection.DeviceID) (wasConnected bool, queueLength int, err error)
	PurgeQueue(ctx context.Context, id reflection.GroupID, dev reflection.DeviceID) error
	ReleaseLock(ctx context.Context, id reflection.GroupID) (holder reflection.DeviceID, heldFor time.Duration, released bool, err error)
}

var _ Backend = (*mediator.Server)(nil)

// API serves the admin endpoints over a Backend.
type API struct {
	b       Backend
	cluster ClusterBackend // nil on a single node
	log     zerolog.Logger
	// nodes carries requests to other nodes' admin APIs (cluster mode):
	// a group's request to its shard's owner, and the parts of a
	// cluster-wide answer.
	nodes *http.Client
}

// Option adds to what Handler serves.
type Option func(*API)

// WithCluster serves the cluster endpoints (cluster mode), and answers
// every request naming a group on the node that serves its shard.
func WithCluster(c ClusterBackend) Option { return func(a *API) { a.cluster = c } }

func (a *API) store() reflection.Store { return a.b.Store() }

// routes is a ServeMux that remembers the patterns registered on it:
// Routes lists them, so that a test walks every route the handler serves
// and a route added later cannot be left out of it.
type routes struct {
	mux      *http.ServeMux
	patterns []string
}

func newRoutes() *routes { return &routes{mux: http.NewServeMux()} }

func (m *routes) handle(pattern string, h http.Handler) {
	m.patterns = append(m.patterns, pattern)
	m.mux.Handle(pattern, h)
}

func (m *routes) handleFunc(pattern string, h http.HandlerFunc) { m.handle(pattern, h) }

// handler is what Handler returns.
type handler struct {
	http.Handler
	public, private []string
}

// Routes returns the patterns of a handler that Handler returned: those
// served without authentication (health, readiness) and those behind the
// token. Nil for any other handler.
func Routes(h http.Handler) (public, private []string) {
	if hh, ok := h.(*handler); ok {
		return slices.Clone(hh.public), slices.Clone(hh.private)
	}
	return nil, nil
}

// Handler serves health and readiness without authentication and
// everything else (admin API, /metrics, /debug/pprof/) behind the bearer
// token.
func Handler(b Backend, token string, log zerolog.Logger, opts ...Option) http.Handler {
	a := &API{b: b, log: log}
	for _, o := range opts {
		o(a)
	}
	if a.cluster != nil {
		a.nodes = newNodeClient()
	}
	public := newRoutes()
	public.handleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok\n"))
	})
	public.handleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !b.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	private := newRoutes()
	private.handle("GET /metrics", promhttp.HandlerFor(b.Registry(), promhttp.HandlerOpts{}))
	private.handleFunc("/debug/pprof/", pprof.Index)
	private.handleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	private.handleFunc("/debug/pprof/profile", pprof.Profile)
	private.handleFunc("/debug/pprof/symbol", pprof.Symbol)
	private.handleFunc("/debug/pprof/trace", pprof.Trace)
	a.register(private)
	a.registerCluster(private)
	var inner http.Handler = private.mux
	if a.cluster != nil {
		inner = withNodeHeader(a.cluster.ID(), inner)
	}
	public.mux.Handle("/", requireToken(token, inner))
	return &handler{Handler: public.mux, public: public.patterns, private: private.patterns}
}

func shortID(g reflection.GroupID) string { return d2m.DeviceGroupID(g).Short() }

func requireToken(token string, next http.Handler) http.Handler {
	want := []byte("Bearer " + token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := []byte(r.Header.Get("Authorization"))
		if token == "" || subtle.ConstantTimeCompare(got, want) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="mediator"`)
			if strings.HasPrefix(r.URL.Path, "/api/") {
				writeError(w, http.StatusUnauthorized, "missing or wrong admin token")
				return
			}
			http.Error(w, "missing or wrong admin token", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}
