package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"d2m-mediator/cluster/haproxysync"
)

const haproxySyncHelp = `Keeps a running HAProxy's shard map in step with the cluster
(deploy/haproxy/haproxy-cluster.cfg, deploy/systemd/mediator-haproxy-sync.service).
Every --interval it fetches the map the nodes serve (GET /cluster/haproxy.map
on the admin listener at --admin), compares it with HAProxy's copy (show map
over the runtime API at --socket) and applies each difference with add map,
set map or del map, logging it. Every pass compares the whole map, so the
first pass after HAProxy restarted or the admin API was unreachable is a
full re-sync. --admin takes several addresses, comma-separated: the map comes
from the first that answers. With --map-file the map is also written to the
file HAProxy loads at start, so a reloaded HAProxy starts from it.
Runs until SIGTERM or SIGINT.`

// haproxySyncFlags are the flags of `mediator cluster haproxy-sync`.
type haproxySyncFlags struct {
	admin, tokenFile    string
	socket, mapName     string
	mapFile             string
	interval            time.Duration
	logFormat, logLevel string
}

func runHAProxySync(ctx context.Context, args, globals []string) error {
	f := &haproxySyncFlags{}
	fs := newCommandFlags("cluster haproxy-sync", "", haproxySyncHelp)
	fs.StringVar(&f.admin, "admin", "127.0.0.1:8766", "admin API `addresses` of cluster nodes, comma-separated: host:port or http://host:port")
	fs.StringVar(&f.tokenFile, "admin-token-file", "./data/admin.token", "`file` holding the nodes' admin bearer token")
	fs.StringVar(&f.socket, "socket", "/run/haproxy/admin.sock", "HAProxy's runtime API unix `socket` (stats socket … level admin)")
	fs.StringVar(&f.mapName, "map", "", "the shard map's `name` in HAProxy: its file name as haproxy.cfg loads it, or #ID (default: the only map HAProxy has)")
	fs.StringVar(&f.mapFile, "map-file", "", "also write the map to this `file` (atomically) when it changes, for HAProxy's next start")
	fs.DurationVar(&f.interval, "interval", time.Second, "how often to compare the maps")
	fs.StringVar(&f.logFormat, "log-format", "auto", "log format: json, console, or auto")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	if _, err := parseCommandFlags(fs, append(globals, args...), 0); err != nil {
		return err
	}
	if f.interval < 10*time.Millisecond {
		return fmt.Errorf("--interval %v: at least 10ms", f.interval)
	}
	if f.socket == "" {
		return errors.New("--socket: HAProxy's runtime API socket is needed")
	}
	if f.mapFile != "" {
		if st, err := os.Stat(filepath.Dir(f.mapFile)); err != nil || !st.IsDir() {
			return fmt.Errorf("--map-file %s: its directory does not exist", f.mapFile)
		}
	}
	src, err := newMapSource(f.admin, f.tokenFile)
	if err != nil {
		return err
	}
	log, err := newLogger(f.logFormat, f.logLevel)
	if err != nil {
		return err
	}
	src.log = log
	s := &haproxysync.Syncer{
		Runtime: haproxysync.Runtime{Socket: f.socket},
		Map:     f.mapName,
		Fetch:   src.fetch,
		File:    f.mapFile,
		Log:     log,
	}
	log.Info().Str("socket", f.socket).Str("map", cmp.Or(f.mapName, "(the only one)")).Str("map_file", f.mapFile).
		Str("admin", f.admin).Dur("interval", f.interval).Msg("haproxy-sync started")
	err = s.Run(ctx, f.interval)
	log.Info().Msg("haproxy-sync stopped")
	return err
}

// mapSource fetches the served map from the first node that answers,
// starting with the one that answered last.
type mapSource struct {
	clients []*adminClient
	cur     int
	log     zerolog.Logger
}

func newMapSource(admin, tokenFile string) (*mapSource, error) {
	s := &mapSource{}
	for _, a := range strings.Split(admin, ",") {
		if a = strings.TrimSpace(a); a == "" {
			continue
		}
		c, err := (&adminOptions{addr: a, tokenFile: tokenFile}).client()
		if err != nil {
			return nil, err
		}
		s.clients = append(s.clients, c)
	}
	if len(s.clients) == 0 {
		return nil, fmt.Errorf("--admin %q: no address", admin)
	}
	return s, nil
}

// fetch is only called from the Syncer's goroutine.
func (s *mapSource) fetch(ctx context.Context) (string, error) {
	var errs []string
	for i := range s.clients {
		n := (s.cur + i) % len(s.clients)
		text, err := s.clients[n].haproxyMap(ctx)
		if err == nil {
			if n != s.cur {
				s.log.Info().Str("admin", s.clients[n].addr).Str("was", s.clients[s.cur].addr).Msg("haproxy-sync: the map now comes from another node")
				s.cur = n
			}
			return text, nil
		}
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		errs = append(errs, err.Error())
	}
	return "", errors.New(strings.Join(errs, "; "))
}

// haproxyMap GETs /cluster/haproxy.map.
func (c *adminClient) haproxyMap(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := c.send(ctx, "GET", "/cluster/haproxy.map")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	switch {
	case err != nil:
		return "", fmt.Errorf("admin API %s: reading the map: %w", c.addr, err)
	case resp.StatusCode == http.StatusNotFound:
		return "", fmt.Errorf("%s answered 404 for /cluster/haproxy.map: is it the admin listener of a node in cluster mode (serve --cluster-etcd)?", c.addr)
	case resp.StatusCode != http.StatusOK:
		return "", c.statusError(resp.StatusCode, body)
	}
	return string(body), nil
}
