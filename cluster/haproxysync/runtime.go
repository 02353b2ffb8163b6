package haproxysync

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// Runtime is HAProxy's runtime API on a unix socket (`stats socket PATH
// level admin` in haproxy.cfg). Each command uses a connection of its own:
// without "prompt" HAProxy answers one command line and closes, so no
// state is shared between commands and a restarted HAProxy is simply the
// next connection.
type Runtime struct {
	Socket  string
	Timeout time.Duration // per command; 5 s if zero
}

// ErrUnreachable matches errors connecting to the socket (HAProxy not
// running, wrong path, no permission).
var ErrUnreachable = errors.New("haproxy runtime API unreachable")

// Command sends one command line and returns HAProxy's whole answer.
func (r Runtime) Command(ctx context.Context, cmd string) (string, error) {
	if strings.ContainsAny(cmd, "\n\r;") {
		return "", fmt.Errorf("haproxy command %q: a command is one line without ';'", cmd)
	}
	timeout := r.Timeout
	if timeout == 0 {
		timeout = 5 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", r.Socket)
	if err != nil {
		return "", fmt.Errorf("%w: %s: %v", ErrUnreachable, r.Socket, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	if _, err := io.WriteString(conn, cmd+"\n"); err != nil {
		return "", fmt.Errorf("haproxy %s: sending %q: %w", r.Socket, cmd, err)
	}
	b, err := io.ReadAll(conn)
	if err != nil {
		return "", fmt.Errorf("haproxy %s: answer to %q: %w", r.Socket, cmd, err)
	}
	return string(b), nil
}

// MapInfo is one map HAProxy has loaded.
type MapInfo struct {
	ID   int
	File string // the name it was loaded under: the path in haproxy.cfg
}

// Maps lists the loaded maps (`show map`).
func (r Runtime) Maps(ctx context.Context) ([]MapInfo, error) {
	out, err := r.Command(ctx, "show map")
	if err != nil {
		return nil, err
	}
	// # id (file) description
	// 2 (/etc/haproxy/mediator-shards.map) pattern loaded from file ...
	var maps []MapInfo
	for line := range strings.SplitSeq(out, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		id, rest, _ := strings.Cut(line, " ")
		n, err := strconv.Atoi(id)
		if err != nil || !strings.HasPrefix(rest, "(") || !strings.Contains(rest, ")") {
			return nil, fmt.Errorf("haproxy %s: unexpected line in the answer to show map: %q", r.Socket, line)
		}
		file := rest[1:strings.Index(rest, ")")]
		maps = append(maps, MapInfo{ID: n, File: file})
	}
	return maps, nil
}

// Entry is one entry of a map in HAProxy.
type Entry struct{ Key, Value string }

// ShowMap returns the entries of map name (its file name or #ID) in
// HAProxy's order.
func (r Runtime) ShowMap(ctx context.Context, name string) ([]Entry, error) {
	out, err := r.Command(ctx, "show map "+name)
	if err != nil {
		return nil, err
	}
	// 0x55d0d0c2a0e0 2a node-a
	var entries []Entry
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 3 || !strings.HasPrefix(f[0], "0x") {
			return nil, fmt.Errorf("haproxy %s: show map %s: %s", r.Socket, name, strings.TrimSpace(out))
		}
		entries = append(entries, Entry{Key: f[1], Value: f[2]})
	}
	return entries, nil
}

// Apply makes one change to map name. HAProxy answers a successful
// set/add/del with an empty line and anything else with a message.
func (r Runtime) Apply(ctx context.Context, name string, c Change) error {
	var cmd string
	switch c.Op {
	case OpAdd:
		cmd = fmt.Sprintf("add map %s %s %s", name, c.Key, c.To)
	case OpSet:
		cmd = fmt.Sprintf("set map %s %s %s", name, c.Key, c.To)
	case OpDel:
		cmd = fmt.Sprintf("del map %s %s", name, c.Key)
	default:
		return fmt.Errorf("haproxysync: unknown change %q", c.Op)
	}
	out, err := r.Command(ctx, cmd)
	if err != nil {
		return err
	}
	if msg := strings.TrimSpace(out); msg != "" {
		return fmt.Errorf("haproxy %s: %s: %s", r.Socket, cmd, msg)
	}
	return nil
}
