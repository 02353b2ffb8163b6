// Package daemon assembles one mediator process: it opens the store,
// starts the stand-in chat server when no upstream is configured, builds
// the server and serves the device and admin listeners, and takes all of
// it down again in the right order. cmd/mediator and mediatortest both use
// it, so the tests run exactly the wiring production runs.
//
// Configuration is validated by mediator.Config, storage is package
// reflection's, the admin API is the server's, and what happens to a
// shard in cluster mode is decided by the node's shard lifecycle (package
// cluster). What remains here, tested in this package: the adapter that
// answers the server's Placement questions from the lifecycle (cluster.go),
// the store side of a move (moves.go: barrier, export, import, drops by
// generation, settling), the event log that closes a lost shard's devices
// with the reason (moves.go), and the signed node-to-node transfer
// (moveauth.go).
package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	clientv3 "go.etcd.io/etcd/client/v3"

	"d2m-mediator/chatproxy/chatstub"
	"d2m-mediator/cluster"
	"d2m-mediator/mediator"
	"d2m-mediator/mediator/adminapi"
	"d2m-mediator/reflection"
	"d2m-mediator/reflection/pgstore"
)

// Config describes one process. Zero values select the defaults noted.
type Config struct {
	Server mediator.Config

	// DataDir holds mediator.db (and, for the stand-in, chatstub.key).
	DataDir string
	// Store, if set, is used instead of opening DataDir/mediator.db; the
	// caller owns it (tests with fault-injecting stores).
	Store        reflection.Store
	StoreOptions reflection.Options // OnCommit and Logger are filled in
	// StoreDSN, if set (postgres://…), keeps the state in PostgreSQL
	// instead of DataDir/mediator.db (package pgstore): an ack then waits
	// for the primary's synchronous standby, and in cluster mode a lost
	// node's shards fail over at once.
	StoreDSN string
	// StoreAllowAsync accepts a PostgreSQL primary without a synchronous
	// standby (acks on one machine only).
	StoreAllowAsync bool

	DeviceListen string // default 127.0.0.1:8765
	AdminListen  string // "" = no admin listener
	AdminToken   string // required for a non-loopback AdminListen
	TLSCert      string // with TLSKey: serve wss://
	TLSKey       string

	// ChatStubKey is the stand-in chat server's secret key when
	// Server.ChatServer is empty; nil loads or creates DataDir/chatstub.key.
	ChatStubKey *[32]byte
	// NoChatStub leaves Server.ChatServer empty (Proxy is refused with
	// 4001) instead of starting the stand-in.
	NoChatStub bool

	ReadHeaderTimeout time.Duration // device and admin listeners; default 10s
	Logger            zerolog.Logger

	// Cluster, if set, runs the node in cluster mode (placement through
	// etcd); nil is a single node serving every shard.
	Cluster *ClusterConfig
}

// Daemon is a running mediator process.
type Daemon struct {
	Server   *mediator.Server
	Store    reflection.Store
	DB       *reflection.DB   // nil when Config.Store or StoreDSN was given
	PG       *pgstore.Store   // the PostgreSQL store (StoreDSN)
	ChatStub *chatstub.Server // nil when an upstream is configured
	// ChatServer is the upstream address template in use (the stand-in's
	// address when it runs).
	ChatServer string
	// DeviceURL is ws://ADDR or wss://ADDR (no trailing slash).
	DeviceURL  string
	DeviceAddr net.Addr
	AdminAddr  net.Addr // nil without an admin listener
	// AdminHandler is what the admin listener serves (nil without one);
	// adminapi.Routes lists its routes.
	AdminHandler http.Handler
	// Cluster is this node's cluster membership (cluster mode only).
	Cluster *cluster.Node
	etcd    *clientv3.Client

	log       zerolog.Logger
	shared    bool // the store is one database every node reaches (PostgreSQL)
	place     *placement
	device    *http.Server
	admin     *http.Server
	errc      chan error
	serving   sync.WaitGroup // the listeners' Serve goroutines
	bg        sync.WaitGroup // background work: shard exports
	closeOnce sync.Once
	closeErr  error

	// transferIdle bounds how long a shard transfer this node receives
	// may make no progress (ClusterConfig.TransferIdleTimeout).
	transferIdle time.Duration
}

// ErrLocked is returned by Start when another process holds the database.
var ErrLocked = reflection.ErrLocked

// Start builds and starts everything; on error, whatever was started is
// closed again.
func Start(cfg Config) (d *Daemon, err error) {
	log := cfg.Logger
	if cfg.DeviceListen == "" {
		cfg.DeviceListen = "127.0.0.1:8765"
	}
	if cfg.ReadHeaderTimeout == 0 {
		cfg.ReadHeaderTimeout = 10 * time.Second
	}
	if err := cfg.Server.Validate(); err != nil {
		return nil, err
	}
	if cfg.AdminListen != "" {
		if err := adminapi.CheckAdminExposure(cfg.AdminListen, cfg.AdminToken); err != nil {
			return nil, err
		}
	}
	d = &Daemon{log: log, errc: make(chan error, 2)}
	var undo []func()
	defer func() {
		if err != nil {
			for i := len(undo) - 1; i >= 0; i-- {
				undo[i]()
			}
			d = nil
		}
	}()

	// The committer may report a commit (trash collection at open) before
	// the server exists: the hook reads the server through an atomic.
	var srv atomic.Pointer[mediator.Server]
	if cfg.Cluster != nil {
		d.place = &placement{}
	}
	if cfg.Store != nil {
		d.Store = cfg.Store
	} else if cfg.StoreDSN != "" {
		pg, err := d.openPG(cfg, &srv)
		if err != nil {
			return nil, err
		}
		d.Store, d.PG, d.shared = pg, pg, true
		undo = append(undo, func() { pg.Close() })
	} else {
		if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
			return nil, fmt.Errorf("data directory: %w", err)
		}
		so := cfg.StoreOptions
		so.Logger = log
		if so.OnCommit == nil {
			so.OnCommit = func(n int, took time.Duration, err error) {
				if s := srv.Load(); s != nil {
					s.ObserveCommit(n, took, err)
				}
			}
		}
		path := filepath.Join(cfg.DataDir, "mediator.db")
		db, err := reflection.Open(path, so)
		if err != nil {
			if errors.Is(err, reflection.ErrLocked) {
				return nil, fmt.Errorf("open database in %s: %w: is another mediator running with --data %s? Stop it first", cfg.DataDir, err, cfg.DataDir)
			}
			return nil, fmt.Errorf("open database in %s: %w", cfg.DataDir, err)
		}
		d.Store, d.DB = db, db
		undo = append(undo, func() { db.Close() })
	}

	if cfg.Server.ChatServer == "" && !cfg.NoChatStub {
		stub, addr, err := startChatStub(cfg, log)
		if err != nil {
			return nil, err
		}
		d.ChatStub = stub
		undo = append(undo, func() { stub.Close() })
		cfg.Server.ChatServer = addr
		pub := stub.PublicKey()
		log.Info().Str("address", addr).Hex("public_key", pub[:]).
			Msg("no --chat-server given: started the local stand-in chat server (development and tests only)")
	}

	d.ChatServer = cfg.Server.ChatServer
	place := d.place
	if place != nil {
		cfg.Server.Placement = place
		cfg.Server.NodeID = cfg.Cluster.NodeID
		cfg.Server.NodeTLS = nodeTLS(cfg.Cluster.RootCAs)
	}
	s, err := mediator.New(cfg.Server, d.Store, log)
	if err != nil {
		return nil, err
	}
	srv.Store(s)
	d.Server = s
	undo = append(undo, func() { s.Shutdown(context.Background()) })

	deviceLn, err := net.Listen("tcp", cfg.DeviceListen)
	if err != nil {
		return nil, fmt.Errorf("device listener: %w", err)
	}
	undo = append(undo, func() { deviceLn.Close() })
	d.DeviceAddr = deviceLn.Addr()
	scheme := "ws"
	if cfg.TLSCert != "" || cfg.TLSKey != "" {
		cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
		if err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		deviceLn = tls.NewListener(deviceLn, &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
		scheme = "wss"
	}
	d.DeviceURL = scheme + "://" + d.DeviceAddr.String()
	var adminLn net.Listener
	if cfg.AdminListen != "" {
		adminLn, err = net.Listen("tcp", cfg.AdminListen)
		if err != nil {
			return nil, fmt.Errorf("admin listener: %w", err)
		}
		undo = append(undo, func() { adminLn.Close() })
		d.AdminAddr = adminLn.Addr()
	}

	if place != nil {
		// After the listener exists (other nodes forward to it as soon as
		// this node claims shards), before it serves.
		if err := d.joinCluster(*cfg.Cluster, s, place, scheme == "wss"); err != nil {
			return nil, err
		}
		undo = append(undo, func() { d.leaveCluster(context.Background()) })
	}

	// Without ReadHeaderTimeout, stuck TLS handshakes and slow request
	// headers pile up goroutines; the WebSocket has its own deadlines.
	d.device = &http.Server{Handler: d.receiveHandler(s.Handler()), ReadHeaderTimeout: cfg.ReadHeaderTimeout}
	d.serve(d.device, deviceLn)
	if adminLn != nil {
		var opts []adminapi.Option
		if d.Cluster != nil {
			opts = append(opts, adminapi.WithCluster(d.Cluster))
		}
		d.AdminHandler = adminapi.Handler(s, cfg.AdminToken, log, opts...)
		d.admin = &http.Server{Handler: d.AdminHandler, ReadHeaderTimeout: cfg.ReadHeaderTimeout}
		d.serve(d.admin, adminLn)
	}
	s.SetReady(true)
	return d, nil
}

func (d *Daemon) serve(hs *http.Server, ln net.Listener) {
	d.serving.Add(1)
	go func() {
		defer d.serving.Done()
		if err := hs.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.errc <- err
		}
	}()
}

// Err yields an error if a listener stops serving on its own.
func (d *Daemon) Err() <-chan error { return d.errc }

// Shutdown stops the process as SIGTERM does (docs/protocol.md §18 row 15):
// stop accepting, close every device with 1001 (spread), wait for the
// server's goroutines, stop the admin listener and the stand-in, and close
// the store it opened. It returns the server's Shutdown error (ctx.Err()
// when the deadline passed) or the store's Close error. Later calls return
// the first result.
func (d *Daemon) Shutdown(ctx context.Context) error {
	d.closeOnce.Do(func() {
		d.Server.SetReady(false)
		d.device.Shutdown(ctx)
		// Stop acking for the shards first: devices still connected during
		// the spread close get no ReflectAck the node could not honour.
		if cerr := d.leaveCluster(ctx); cerr != nil {
			d.log.Error().Err(cerr).Msg("leaving the cluster")
		}
		err := d.Server.Shutdown(ctx)
		if d.admin != nil {
			d.admin.Shutdown(ctx)
		}
		d.serving.Wait()
		d.bg.Wait()
		if d.ChatStub != nil {
			d.ChatStub.Close()
		}
		if d.DB != nil {
			if cerr := d.DB.Close(); cerr != nil && err == nil {
				err = fmt.Errorf("closing the database: %w", cerr)
			}
		}
		if d.PG != nil {
			if cerr := d.PG.Close(); cerr != nil && err == nil {
				err = fmt.Errorf("closing the PostgreSQL store: %w", cerr)
			}
		}
		d.closeErr = err
	})
	return d.closeErr
}

// openPG opens the PostgreSQL store. In cluster mode its epochs are the
// node's (etcd owner key revisions); a commit the database fences closes
// the shard's devices (1001) and stops serving the shard at that epoch.
func (d *Daemon) openPG(cfg Config, srv *atomic.Pointer[mediator.Server]) (*pgstore.Store, error) {
	so := cfg.StoreOptions
	so.Logger = d.log
	if so.OnCommit == nil {
		so.OnCommit = func(n int, took time.Duration, err error) {
			if s := srv.Load(); s != nil {
				s.ObserveCommit(n, took, err)
			}
		}
	}
	po := pgstore.Options{Store: so, AllowAsync: cfg.StoreAllowAsync}
	if cfg.Cluster != nil {
		place := d.place
		po.NodeID = cfg.Cluster.NodeID
		po.Epoch = place.Epoch
		po.OnFenced = func(shard byte, epoch int64) {
			// Another node claimed the shard in the database: its
			// lifecycle ends here at that epoch (the node's event
			// closes the devices).
			if n := place.node.Load(); n != nil {
				n.StoreFenced(cluster.Shard(shard), epoch)
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pg, err := pgstore.Open(ctx, cfg.StoreDSN, po)
	if err != nil {
		return nil, err
	}
	d.log.Info().Str("store", "postgres").Str("replication", pg.Replication).Int("schema", pgstore.SchemaVersion).
		Msg("state in PostgreSQL")
	return pg, nil
}

func startChatStub(cfg Config, log zerolog.Logger) (*chatstub.Server, string, error) {
	key := cfg.ChatStubKey
	if key == nil {
		var err error
		key, err = chatstub.LoadOrCreateKey(filepath.Join(cfg.DataDir, "chatstub.key"))
		if err != nil {
			return nil, "", fmt.Errorf("stand-in chat server key: %w", err)
		}
	}
	stub, err := chatstub.New(chatstub.Config{SecretKey: key, Logger: log.With().Str("component", "chatstub").Logger()})
	if err != nil {
		return nil, "", err
	}
	addr, err := stub.Start("127.0.0.1:0")
	if err != nil {
		return nil, "", err
	}
	return stub, addr.String(), nil
}
