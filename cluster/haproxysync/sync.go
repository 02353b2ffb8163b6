// Package haproxysync keeps a running HAProxy's shard map equal to the map
// the mediator cluster serves (GET /cluster/haproxy.map on a node's admin
// listener, rendered by cluster.RenderHAProxyMap). A Syncer fetches the
// served map, reads HAProxy's copy over the runtime API (`show map`),
// applies the difference entry by entry (`add map`, `set map`, `del map`)
// and optionally writes the file HAProxy loads at start, so that a
// reloaded HAProxy starts from the current map.
//
// Every pass compares the whole map on both sides, so there is no
// incremental state to lose: after HAProxy restarts, or the admin API was
// unreachable, the next pass that reaches both is a full re-sync. The map
// belongs to the Syncer: entries the cluster does not serve are deleted
// (their shards then take HAProxy's default backend).
//
// `mediator cluster haproxy-sync` runs it (cmd/mediator).
package haproxysync

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"d2m-mediator/cluster"
)

// Map is a shard map: shard (two lowercase hex digits, the first path
// segment of a device URL) → HAProxy backend (the owner's node id).
type Map map[string]string

// ParseMap reads a map in HAProxy's map-file format as the cluster serves
// it: "# …" comments, blank lines, and "<shard> <node-id>" lines. Anything
// else is an error: the values go into runtime API commands.
func ParseMap(text string) (Map, error) {
	m := Map{}
	for i, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 || !isShard(f[0]) || !cluster.ValidNodeID(f[1]) {
			return nil, fmt.Errorf("shard map line %d: %q is not \"<two lowercase hex digits> <node id>\"", i+1, line)
		}
		if _, dup := m[f[0]]; dup {
			return nil, fmt.Errorf("shard map line %d: shard %s appears twice", i+1, f[0])
		}
		m[f[0]] = f[1]
	}
	return m, nil
}

func isShard(s string) bool {
	if len(s) != 2 {
		return false
	}
	for _, c := range []byte(s) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// Change operations, as the runtime API names them.
const (
	OpAdd = "add" // key absent in HAProxy
	OpSet = "set" // key present with another value
	OpDel = "del" // key present, not served (or present twice)
)

// Change is one runtime API change of one key.
type Change struct {
	Op       string
	Key      string
	From, To string // From "" for add, To "" for del
}

func (c Change) String() string {
	switch c.Op {
	case OpAdd:
		return fmt.Sprintf("add %s → %s", c.Key, c.To)
	case OpDel:
		return fmt.Sprintf("del %s (was %s)", c.Key, c.From)
	}
	return fmt.Sprintf("set %s %s → %s", c.Key, c.From, c.To)
}

// Diff returns the changes that turn HAProxy's entries into want, ordered
// by key. A key HAProxy holds more than once (two syncers raced on an
// add) is deleted and added again.
func Diff(have []Entry, want Map) []Change {
	byKey := map[string][]string{}
	for _, e := range have {
		byKey[e.Key] = append(byKey[e.Key], e.Value)
	}
	var out []Change
	for k, vs := range byKey {
		w, wanted := want[k]
		switch {
		case len(vs) == 1 && wanted && vs[0] == w:
		case len(vs) == 1 && wanted:
			out = append(out, Change{Op: OpSet, Key: k, From: vs[0], To: w})
		default:
			out = append(out, Change{Op: OpDel, Key: k, From: strings.Join(vs, ",")})
			if wanted {
				out = append(out, Change{Op: OpAdd, Key: k, To: w})
			}
		}
	}
	for k, w := range want {
		if _, ok := byKey[k]; !ok {
			out = append(out, Change{Op: OpAdd, Key: k, To: w})
		}
	}
	// By key; a del before the add of the same key.
	slices.SortStableFunc(out, func(a, b Change) int {
		if c := cmp.Compare(a.Key, b.Key); c != 0 {
			return c
		}
		return cmp.Compare(opOrder(a.Op), opOrder(b.Op))
	})
	return out
}

func opOrder(op string) int {
	if op == OpDel {
		return 0
	}
	return 1
}

// Syncer keeps one HAProxy map equal to the served shard map.
type Syncer struct {
	Runtime Runtime
	// Map names the map in HAProxy: the file name as haproxy.cfg loads
	// it, or #ID. Empty: the only map HAProxy has loaded.
	Map string
	// Fetch returns the served map (GET /cluster/haproxy.map).
	Fetch func(ctx context.Context) (string, error)
	// File, if set, receives the served map (written atomically) whenever
	// it differs from what the Syncer last wrote there.
	File string
	Log  zerolog.Logger

	written Map // what File holds since the last write; nil before
}

// Once runs one pass: fetch the served map, compare it with HAProxy's and
// apply the changes, logging each; then write File. It returns the changes
// it applied and the number of entries served.
func (s *Syncer) Once(ctx context.Context) ([]Change, int, error) {
	text, err := s.Fetch(ctx)
	if err != nil {
		return nil, 0, err
	}
	want, err := ParseMap(text)
	if err != nil {
		return nil, 0, fmt.Errorf("the served map: %w", err)
	}
	name, err := s.resolveMap(ctx)
	if err != nil {
		return nil, 0, err
	}
	have, err := s.Runtime.ShowMap(ctx, name)
	if err != nil {
		return nil, 0, err
	}
	var done []Change
	for _, c := range Diff(have, want) {
		if err := s.Runtime.Apply(ctx, name, c); err != nil {
			return done, len(want), err
		}
		done = append(done, c)
		s.Log.Info().Str("map", name).Str("op", c.Op).Str("shard", c.Key).Str("from", c.From).Str("to", c.To).
			Msgf("haproxy map: %s", c)
	}
	if s.File != "" && !mapsEqual(s.written, want) {
		if err := writeFileAtomic(s.File, text); err != nil {
			return done, len(want), fmt.Errorf("writing the map file: %w", err)
		}
		s.written = want
		s.Log.Debug().Str("file", s.File).Int("entries", len(want)).Msg("map file written")
	}
	return done, len(want), nil
}

func mapsEqual(a, b Map) bool {
	if a == nil || len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// resolveMap checks that HAProxy has the configured map, or finds the
// only one it has.
func (s *Syncer) resolveMap(ctx context.Context) (string, error) {
	maps, err := s.Runtime.Maps(ctx)
	if err != nil {
		return "", err
	}
	var names []string
	for _, m := range maps {
		if s.Map != "" && (m.File == s.Map || s.Map == fmt.Sprintf("#%d", m.ID)) {
			return s.Map, nil
		}
		names = append(names, m.File)
	}
	switch {
	case s.Map != "":
		return "", fmt.Errorf("HAProxy at %s has no map %q (its maps: %s): --map must name the file as haproxy.cfg loads it",
			s.Runtime.Socket, s.Map, listOrNone(names))
	case len(maps) == 1:
		return maps[0].File, nil
	}
	return "", fmt.Errorf("HAProxy at %s has %d maps (%s): name the shard map with --map", s.Runtime.Socket, len(maps), listOrNone(names))
}

func listOrNone(names []string) string {
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}

// Run syncs every interval until ctx ends, then returns nil. A failing
// pass is logged when the failure starts or changes, and once more when a
// pass succeeds again (that pass compared everything: a full re-sync).
func (s *Syncer) Run(ctx context.Context, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	var failing string
	synced := false
	for {
		changes, entries, err := s.Once(ctx)
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil:
			if err.Error() != failing {
				s.Log.Warn().Err(err).Msgf("haproxy-sync: pass failed; retrying every %s", interval)
				failing = err.Error()
			}
		case failing != "" || !synced:
			what := "in sync"
			if failing != "" {
				what = "re-synced in full after the failure"
			}
			s.Log.Info().Str("socket", s.Runtime.Socket).Int("entries", entries).Int("changes", len(changes)).
				Msgf("haproxy map %s", what)
			failing, synced = "", true
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// writeFileAtomic replaces path with text: a temporary file in the same
// directory, synced, renamed over path, then the directory synced, so a
// crash leaves the old or the new map, never a torn one.
func writeFileAtomic(path, text string) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after a successful rename there is nothing to remove
	if _, err := f.WriteString(text); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
