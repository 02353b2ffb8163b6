package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"

	"d2m-mediator/mediator"
	"d2m-mediator/mediator/daemon"
	"d2m-mediator/reflection"
	"d2m-mediator/reflection/pgstore"
)

// redactDSN hides a password in a DSN before it is logged or printed.
func redactDSN(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil || u.User == nil {
		return dsn
	}
	if _, ok := u.User.Password(); ok {
		u.User = url.UserPassword(u.User.Username(), "xxxxx")
	}
	return u.String()
}

type serveFlags struct {
	listen, tlsCert, tlsKey, data, chatServer, adminListen string
	adminTokenFile, store                                  string
	adminTokenGiven                                        bool // --admin-token-file or MEDIATOR_ADMIN_TOKEN_FILE
	storeAllowAsync                                        bool
	logFormat, logLevel                                    string
	cfg                                                    mediator.Config
	maxQueueLength                                         int
	maxQueueBytes                                          int64
	memoryLimit                                            int64 // bytes; 0: not set
	cluster                                                clusterFlags
	clusterCfg                                             *daemon.ClusterConfig
}

func parseServeFlags(args []string) (*serveFlags, error) {
	f := &serveFlags{}
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "usage: mediator serve [flags]\n\nRuns the mediator. With no flags it keeps its database in ./data, accepts\ndevices on ws://127.0.0.1:8765/ and starts an in-process stand-in chat\nserver as the upstream. Every flag can be set as MEDIATOR_<FLAG>.\n\nFlags:")
		fs.PrintDefaults()
	}
	fs.StringVar(&f.listen, "listen", "127.0.0.1:8765", "device WebSocket `address`")
	fs.StringVar(&f.tlsCert, "tls-cert", "", "serve wss:// with this certificate `file` (with --tls-key); plain ws:// without")
	fs.StringVar(&f.tlsKey, "tls-key", "", "private key `file` for --tls-cert")
	fs.StringVar(&f.data, "data", "./data", "`directory` of the database (created 0700)")
	fs.StringVar(&f.store, "store", "", "where the state lives: empty for the embedded bbolt file in --data, or a PostgreSQL `DSN` (postgres://user@host:5432/db) whose primary has a synchronous standby")
	fs.BoolVar(&f.storeAllowAsync, "store-allow-async", false, "accept a PostgreSQL primary without a synchronous standby (an ack is then on one machine only)")
	fs.StringVar(&f.chatServer, "chat-server", "", "upstream chat server `host:port`; {group} is replaced by the device's server group. Empty: start the local stand-in chat server in-process")
	fs.StringVar(&f.adminListen, "admin-listen", "127.0.0.1:8766", "admin HTTP `address` (health, metrics, admin API)")
	fs.StringVar(&f.adminTokenFile, "admin-token-file", "", "bearer token `file` for the admin API: must exist, mode 0600 (cluster mode: required, the same file on every node). Default <data>/admin.token, generated if absent")
	fs.IntVar(&f.cfg.MaxDeviceSlots, "max-device-slots", mediator.DefaultMaxDeviceSlots, "device slots per group, the device itself included")
	fs.IntVar(&f.maxQueueLength, "max-queue-length", reflection.DefaultMaxQueueLength, "reflection queue entries per slot before the slot is dropped (4114)")
	fs.Int64Var(&f.maxQueueBytes, "max-queue-bytes", reflection.DefaultMaxQueueBytes, "reflection queue bytes per slot before the slot is dropped (4114)")
	fs.DurationVar(&f.cfg.MaxTransactionTTL, "max-transaction-ttl", mediator.DefaultMaxTransactionTTL, "longest transaction lock; also the TTL for clients that send 0")
	fs.DurationVar(&f.cfg.VolatileSlotGrace, "volatile-slot-grace", mediator.DefaultVolatileSlotGrace, "VOLATILE slots are removed this long after disconnecting")
	fs.DurationVar(&f.cfg.PersistentSlotExpiry, "persistent-slot-expiry", mediator.DefaultPersistentSlotExpiry, "PERSISTENT slots are removed after this long without a connection")
	fs.DurationVar(&f.cfg.HandshakeTimeout, "handshake-timeout", mediator.DefaultHandshakeTimeout, "time from upgrade to a verified ClientHello")
	fs.DurationVar(&f.cfg.IdleTimeout, "idle-timeout", mediator.DefaultIdleTimeout, "close a device (4013) after this long without an inbound frame")
	fs.Func("memory-limit", "soft limit for the Go runtime's memory, e.g. 1536MiB or 2GiB (GOMEMLIMIT's syntax): the garbage collector runs more often near it and returns freed memory sooner; unset: GOMEMLIMIT or none. OPERATIONS.md, Go runtime settings", func(v string) error {
		n, err := parseByteSize(v)
		if err != nil {
			return err
		}
		f.memoryLimit = n
		return nil
	})
	fs.StringVar(&f.logFormat, "log-format", "auto", "log format: json, console, or auto (console when stderr is a terminal, json otherwise)")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.cluster.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("serve: unexpected argument %q", fs.Arg(0))
	}
	if err := applyEnv(fs); err != nil {
		return nil, err
	}
	if (f.tlsCert == "") != (f.tlsKey == "") {
		return nil, errors.New("--tls-cert and --tls-key go together")
	}
	if f.logFormat != "json" && f.logFormat != "console" && f.logFormat != "auto" {
		return nil, fmt.Errorf("--log-format must be auto, json or console, not %q", f.logFormat)
	}
	// Zero means "default" inside mediator.Config; on the command line it
	// is a mistake.
	switch {
	case f.cfg.MaxDeviceSlots < 1:
		return nil, errors.New("--max-device-slots: max device slots must be at least 1")
	case f.cfg.HandshakeTimeout <= 0, f.cfg.IdleTimeout <= 0, f.cfg.MaxTransactionTTL <= 0,
		f.cfg.VolatileSlotGrace <= 0, f.cfg.PersistentSlotExpiry <= 0:
		return nil, errors.New("--handshake-timeout, --idle-timeout, --max-transaction-ttl, --volatile-slot-grace and --persistent-slot-expiry must be positive")
	}
	if f.store != "" && !pgstore.IsDSN(f.store) {
		return nil, fmt.Errorf("--store must be empty (bbolt in --data) or a postgres:// DSN, not %q", redactDSN(f.store))
	}
	if f.storeAllowAsync && f.store == "" {
		return nil, errors.New("--store-allow-async applies only to a PostgreSQL --store")
	}
	if f.maxQueueLength < 1 || f.maxQueueBytes < 1 {
		return nil, errors.New("--max-queue-length and --max-queue-bytes must be positive")
	}
	f.cfg.ChatServer = f.chatServer
	f.adminTokenGiven = f.adminTokenFile != ""
	if f.chatServer != "" {
		if _, _, err := net.SplitHostPort(strings.ReplaceAll(f.chatServer, "{group}", "x")); err != nil {
			return nil, fmt.Errorf("--chat-server must be host:port: %w", err)
		}
	}
	if err := f.cfg.Validate(); err != nil {
		return nil, err
	}
	var err error
	if f.clusterCfg, err = f.cluster.config(); err != nil {
		return nil, err
	}
	if f.clusterCfg != nil {
		if err := checkClusterShared(f); err != nil {
			return nil, err
		}
	}
	if f.adminTokenFile == "" {
		f.adminTokenFile = filepath.Join(f.data, "admin.token")
	}
	return f, nil
}

// checkClusterShared refuses a cluster node whose configuration would
// differ from the other nodes' without anyone noticing: the chat server
// and the admin token must be the same on every node, so both must be
// given rather than made up by each node.
func checkClusterShared(f *serveFlags) error {
	if f.chatServer == "" {
		return errors.New("cluster mode needs --chat-server: every node must proxy to the same chat server " +
			"(a device forwarded to another node logs in through that node, and a stand-in started by each node " +
			"has a key of its own, so the login fails with \"wrong server key\"). Give the real chat server's host:port, " +
			"or start one stand-in for all nodes (chatstub --listen ADDR --key-file FILE) and give its address")
	}
	if !f.adminTokenGiven {
		return errors.New("cluster mode needs --admin-token-file (or MEDIATOR_ADMIN_TOKEN_FILE): every node must " +
			"accept the same admin token, so that the CLI and Prometheus work against any node. Create the file once with " +
			newTokenHint + " and give every node the same file")
	}
	return nil
}

// newLogger writes to stderr. "auto" is console for a person at a terminal
// and json for everything else (journald, docker, a file, a pipe); the
// console format has ANSI colours only on a terminal and never with NO_COLOR
// set (non-empty). Durations are Go duration strings ("220.5µs", "1.5s") so a value
// carries its unit.
func newLogger(format, level string) (zerolog.Logger, error) {
	return newLoggerTo(os.Stderr, isatty.IsTerminal(os.Stderr.Fd()), format, level)
}

func newLoggerTo(w io.Writer, terminal bool, format, level string) (zerolog.Logger, error) {
	lvl, err := zerolog.ParseLevel(level)
	if err != nil || level == "" {
		return zerolog.Logger{}, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	zerolog.DurationFieldFormat = zerolog.DurationFormatString
	if format == "auto" {
		format = "json"
		if terminal {
			format = "console"
		}
	}
	var log zerolog.Logger
	if format == "json" {
		log = zerolog.New(w)
	} else {
		noColor := os.Getenv("NO_COLOR") != "" // https://no-color.org
		log = zerolog.New(zerolog.ConsoleWriter{Out: w, TimeFormat: time.RFC3339, NoColor: noColor || !terminal})
	}
	return log.Level(lvl).With().Timestamp().Logger(), nil
}

func serve(ctx context.Context, args []string) error {
	f, err := parseServeFlags(args)
	if err != nil {
		return err
	}
	reexecWithSysmonSetting() // runtime.go
	if f.memoryLimit > 0 {
		debug.SetMemoryLimit(f.memoryLimit)
	}
	log, err := newLogger(f.logFormat, f.logLevel)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(f.data, 0o700); err != nil {
		return fmt.Errorf("data directory: %w", err)
	}
	token, err := serveToken(f.adminTokenFile, f.adminTokenGiven)
	if err != nil {
		return err
	}
	d, err := daemon.Start(daemon.Config{
		Server:          f.cfg,
		DataDir:         f.data,
		StoreOptions:    reflection.Options{MaxQueueLength: f.maxQueueLength, MaxQueueBytes: f.maxQueueBytes},
		StoreDSN:        f.store,
		StoreAllowAsync: f.storeAllowAsync,
		DeviceListen:    f.listen,
		AdminListen:     f.adminListen,
		AdminToken:      token,
		TLSCert:         f.tlsCert,
		TLSKey:          f.tlsKey,
		Logger:          log,
		Cluster:         f.clusterCfg,
	})
	if err != nil {
		return err
	}
	store := "bbolt " + filepath.Join(f.data, "mediator.db")
	if d.PG != nil {
		store = "postgres " + redactDSN(f.store) + " (" + d.PG.Replication + ")"
	}
	log.Info().
		Str("devices", d.DeviceURL+"/").
		Str("admin", fmt.Sprintf("http://%s/", d.AdminAddr)).
		Str("data", f.data).
		Str("store", store).
		Str("chat_server", d.ChatServer).
		Str("memory_limit", memoryLimitString()).
		Msg("mediator listening")

	var serveErr error
	select {
	case <-ctx.Done():
		log.Info().Msg("shutting down: closing devices with 1001")
	case serveErr = <-d.Err():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := d.Shutdown(shutdownCtx); err != nil {
		log.Error().Err(err).Msg("shutdown")
	}
	log.Info().Msg("stopped")
	return serveErr
}
