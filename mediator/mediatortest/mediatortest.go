// Package mediatortest starts an in-process mediator for tests, as
// net/http/httptest does for HTTP handlers: a mediator.Server served on
// 127.0.0.1:0 over a real bbolt file in t.TempDir() (or a Store the caller
// supplies), with its log captured, torn down by t.Cleanup. Tests that need
// runtime numbers (goroutines, heap), fault-injecting stores or fuzzing use
// it; tests of the real binary live in integration/.
//
// It is test support only: cmd/mediator must never import it.
package mediatortest

import (
	"bytes"
	"context"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"d2m-mediator/chatproxy/chatstub"
	"d2m-mediator/mediator"
	"d2m-mediator/mediator/daemon"
	"d2m-mediator/reflection"
)

// Server is one running in-process mediator.
type Server struct {
	*mediator.Server

	// URL is the device endpoint's base URL, ws://127.0.0.1:port (no
	// trailing slash); d2mclient.Config.URL takes it as is.
	URL string
	// Addr is the listener's host:port.
	Addr string
	// Store is the store the server runs on.
	Store reflection.Store
	// DBPath is the bbolt file, or "" for a caller-supplied store.
	DBPath string
	// ChatStub is the in-process stand-in chat server (WithChatStub), or nil.
	ChatStub *chatstub.Server
	// Daemon is the process wiring cmd/mediator uses, running here.
	Daemon *daemon.Daemon

	t         testing.TB
	logs      *LogBuffer
	closeOnce sync.Once
}

type settings struct {
	store         reflection.Store
	storeOpts     reflection.Options
	logLevel      zerolog.Level
	logWriters    []io.Writer
	chatStub      bool
	readHeaderTTL time.Duration
	dataDir       string
	storeDSN      string
}

// Option changes how NewServer builds the server.
type Option func(*settings)

// WithStore runs the server over st instead of a fresh bbolt file. The
// caller owns st: it is not closed by the cleanup.
func WithStore(st reflection.Store) Option { return func(s *settings) { s.store = st } }

// WithStoreOptions sets the options of the bbolt store NewServer opens
// (queue limits, ...). Logger is always the server's; OnCommit is filled in
// when nil.
func WithStoreOptions(o reflection.Options) Option { return func(s *settings) { s.storeOpts = o } }

// WithStoreDSN keeps the state in the PostgreSQL database dsn (package
// pgstore) instead of a bbolt file.
func WithStoreDSN(dsn string) Option { return func(s *settings) { s.storeDSN = dsn } }

// WithDataDir puts the bbolt file (mediator.db) into dir instead of a new
// t.TempDir().
func WithDataDir(dir string) Option { return func(s *settings) { s.dataDir = dir } }

// WithLogLevel sets the server's log level (default zerolog.DebugLevel, so
// tests see everything the server could ever write).
func WithLogLevel(l zerolog.Level) Option { return func(s *settings) { s.logLevel = l } }

// WithLogWriter copies the server's log lines to w as well.
func WithLogWriter(w io.Writer) Option {
	return func(s *settings) { s.logWriters = append(s.logWriters, w) }
}

// WithChatStub starts an in-process stand-in chat server and, unless
// cfg.ChatServer is set, points the mediator's upstream at it.
func WithChatStub() Option { return func(s *settings) { s.chatStub = true } }

// WithReadHeaderTimeout sets the device listener's http.Server
// ReadHeaderTimeout (default 10s, as cmd/mediator).
func WithReadHeaderTimeout(d time.Duration) Option {
	return func(s *settings) { s.readHeaderTTL = d }
}

// NewServer starts a mediator with cfg on 127.0.0.1:0 through
// daemon.Start, the wiring cmd/mediator uses, and registers its teardown
// (daemon Shutdown: devices, goroutines, store) with t.Cleanup; the
// teardown fails the test if the server's goroutines do not end within its
// deadline. A zero cfg.ShutdownSpread becomes 1ms so that teardown does not
// wait the production default of 2s. It fails the test if anything cannot
// start.
func NewServer(t testing.TB, cfg mediator.Config, opts ...Option) *Server {
	t.Helper()
	set := settings{logLevel: zerolog.DebugLevel, readHeaderTTL: 10 * time.Second}
	for _, o := range opts {
		o(&set)
	}
	logs := NewLogBuffer(8 << 20)
	var out io.Writer = logs
	if len(set.logWriters) > 0 {
		out = io.MultiWriter(append([]io.Writer{logs}, set.logWriters...)...)
	}
	log := zerolog.New(out).Level(set.logLevel).With().Timestamp().Logger()

	if cfg.ShutdownSpread == 0 {
		cfg.ShutdownSpread = time.Millisecond
	}
	dc := daemon.Config{
		Server:            cfg,
		Store:             set.store,
		StoreOptions:      set.storeOpts,
		StoreDSN:          set.storeDSN,
		DeviceListen:      "127.0.0.1:0",
		NoChatStub:        !set.chatStub,
		ReadHeaderTimeout: set.readHeaderTTL,
		Logger:            log,
	}
	if set.chatStub {
		var key [32]byte
		for i := range key {
			key[i] = byte(i + 1)
		}
		dc.ChatStubKey = &key
	}
	if set.store == nil {
		dc.DataDir = set.dataDir
		if dc.DataDir == "" {
			dc.DataDir = t.TempDir()
		}
	}
	d, err := daemon.Start(dc)
	if err != nil {
		t.Fatalf("mediatortest: %v", err)
	}
	s := &Server{
		Server: d.Server, URL: d.DeviceURL, Addr: d.DeviceAddr.String(),
		Store: d.Store, ChatStub: d.ChatStub, Daemon: d, t: t, logs: logs,
	}
	if d.DB != nil {
		s.DBPath = d.DB.Path()
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("mediatortest: server log (tail):\n%s", tail(s.Logs(), 16<<10))
		}
		s.Close()
	})
	return s
}

// Close shuts the server down as cmd/mediator does on SIGTERM (stop
// accepting, close devices with 1001, close the store). The cleanup calls
// it; calling it earlier is allowed, and later calls do nothing.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		if err := s.Daemon.Shutdown(ctx); err != nil {
			s.t.Errorf("mediatortest: shutdown: %v", err)
		}
	})
}

// Logs returns what the server logged so far (JSON lines; the oldest part
// is dropped once the capture exceeds 8 MiB).
func (s *Server) Logs() string { return s.logs.String() }

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// LogBuffer is a goroutine-safe, size-capped log sink: past max bytes it
// drops the older half, so long fuzz runs do not grow without bound.
type LogBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
	max int
}

// NewLogBuffer returns a LogBuffer keeping at most about max bytes.
func NewLogBuffer(max int) *LogBuffer { return &LogBuffer{max: max} }

// Write implements io.Writer; zerolog writes one line per call.
func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.buf.Len()+len(p) > b.max {
		keep := b.buf.Bytes()[b.buf.Len()/2:]
		if i := bytes.IndexByte(keep, '\n'); i >= 0 {
			keep = keep[i+1:]
		}
		rest := append([]byte(nil), keep...)
		b.buf.Reset()
		b.buf.Write(rest)
	}
	return b.buf.Write(p)
}

// String returns the captured text.
func (b *LogBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
