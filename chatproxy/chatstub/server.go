package chatstub

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"

	"d2m-mediator/chatproxy/csp"

	"github.com/rs/zerolog"
	"golang.org/x/crypto/curve25519"
)

// Defaults for Config fields left at zero.
const (
	// DefaultHandshakeTimeout bounds client-hello to login; the mediator's
	// own handshake limit is 20 s (docs/protocol.md §18 row 9).
	DefaultHandshakeTimeout = 20 * time.Second
	// DefaultWriteTimeout bounds each write; a device that stops reading is
	// dropped after it, and its messages stay queued.
	DefaultWriteTimeout = 10 * time.Second
	// DefaultMaxQueuedPerIdentity caps the messages kept for one identity
	// until acked; more are refused with an alert and no ack, so the sender
	// retries later.
	DefaultMaxQueuedPerIdentity = 10000
)

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("chatstub: server closed")

// Config configures a Server. Zero values mean the defaults.
type Config struct {
	// SecretKey is the server's long-term key SK (required). Clients pin
	// its public half; see LoadOrCreateKey and Server.PublicKey.
	SecretKey *[32]byte
	// Logger receives connection events (open, login, close, errors),
	// never payload bytes. The zero Logger discards everything.
	Logger zerolog.Logger
	// HandshakeTimeout bounds the time from accept to login-ack.
	HandshakeTimeout time.Duration
	// WriteTimeout bounds each write to a client.
	WriteTimeout time.Duration
	// MaxQueuedPerIdentity caps the unacknowledged messages per identity.
	// The outbox of one connection is bounded by the same number (plus
	// room for replies), which bounds per-connection memory at roughly
	// MaxQueuedPerIdentity × 8 KiB.
	MaxQueuedPerIdentity int
}

// Server is a stand-in chat server. Create it with New, run it with Serve
// (or Start), stop it with Close.
type Server struct {
	cfg       Config
	secretKey [32]byte
	publicKey [32]byte
	log       zerolog.Logger

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	mailboxes map[csp.Identity]*mailbox
	wg        sync.WaitGroup // connection goroutines and Start's Serve
}

// New checks cfg and returns a Server that is not yet listening.
func New(cfg Config) (*Server, error) {
	if cfg.SecretKey == nil {
		return nil, errors.New("chatstub: Config.SecretKey is required")
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = DefaultWriteTimeout
	}
	if cfg.MaxQueuedPerIdentity <= 0 {
		cfg.MaxQueuedPerIdentity = DefaultMaxQueuedPerIdentity
	}
	s := &Server{
		cfg:       cfg,
		secretKey: *cfg.SecretKey,
		log:       cfg.Logger,
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
		mailboxes: make(map[csp.Identity]*mailbox),
	}
	pub, err := curve25519.X25519(s.secretKey[:], curve25519.Basepoint)
	if err != nil {
		return nil, fmt.Errorf("chatstub: public key: %w", err)
	}
	copy(s.publicKey[:], pub)
	return s, nil
}

// PublicKey returns SK.public, the key clients pin (docs/protocol.md §9.3).
func (s *Server) PublicKey() [32]byte { return s.publicKey }

// Start listens on addr (e.g. "127.0.0.1:0") and serves in a goroutine that
// Close waits for. It returns the address actually bound.
func (s *Server) Start(addr string) (net.Addr, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("chatstub: listen: %w", err)
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return nil, ErrServerClosed
	}
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		if err := s.Serve(ln); err != nil && !errors.Is(err, ErrServerClosed) {
			s.log.Error().Err(err).Msg("chatstub: serve ended")
		}
	}()
	return ln.Addr(), nil
}

// Serve accepts connections on ln until Close (then it returns
// ErrServerClosed) or a permanent accept error. It closes ln on return.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()

	// Debug: whoever starts the stub announces it (mediator serve's
	// stand-in line with the key, cmd/chatstub on stdout); at info this
	// line, logged from the serving goroutine, would only add a third
	// startup line in no fixed order.
	s.log.Debug().Str("addr", ln.Addr().String()).Msg("chatstub listening")
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			if !temporaryAcceptError(err) {
				return fmt.Errorf("chatstub: accept: %w", err)
			}
			// Like net/http: back off on EMFILE and friends instead of
			// spinning or giving up.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn().Err(err).Dur("retry_in", backoff).Msg("chatstub: accept failed")
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		c := newConn(s, nc)
		if !s.track(c) {
			nc.Close()
			return ErrServerClosed
		}
		go func() {
			defer s.wg.Done()
			defer s.untrack(c)
			c.serve()
		}()
	}
}

func temporaryAcceptError(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.ENOBUFS)
}

// Close stops every listener, closes every connection and waits for their
// goroutines. Queued messages are lost: the stub keeps nothing on disk.
// Close is idempotent.
func (s *Server) Close() error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		for ln := range s.listeners {
			ln.Close()
		}
		for c := range s.conns {
			c.nc.Close()
		}
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// track registers a new connection, or reports false after Close.
func (s *Server) track(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *Server) untrack(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
}
