package main

// Operator commands that talk to a running server's admin API (see
// mediator/adminapi.go for the endpoints). Flags may stand before the
// command (`mediator --json slots list GROUP`), before or after its
// arguments (`mediator slots list GROUP --json`).

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/mediator/adminapi"
)

// stdout is where commands print their results (tests replace it).
var stdout io.Writer = os.Stdout

// adminOptions are the flags every admin API command takes.
type adminOptions struct {
	addr      string
	tokenFile string
	data      string
	json      bool
}

func addAdminFlags(fs *flag.FlagSet) *adminOptions {
	o := &adminOptions{}
	fs.StringVar(&o.addr, "admin", "127.0.0.1:8766", "admin API `address`: host:port or http://host:port")
	fs.StringVar(&o.tokenFile, "admin-token-file", "", "`file` holding the admin bearer token (default <--data>/admin.token, where the server writes it)")
	fs.StringVar(&o.data, "data", "./data", "the server's data `directory`, for the token when --admin-token-file is not given")
	fs.BoolVar(&o.json, "json", false, "print the API's JSON instead of a table")
	return o
}

// tokenPath is --admin-token-file, else <--data>/admin.token.
func (o *adminOptions) tokenPath() string {
	if o.tokenFile != "" {
		return o.tokenFile
	}
	return filepath.Join(o.data, "admin.token")
}

// newCommandFlags returns a flag set whose usage text names the command,
// its arguments and what it does.
func newCommandFlags(name, args, help string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: mediator %s [flags] %s\n\n%s\n\nFlags go before or after the arguments; each can also be set as MEDIATOR_<FLAG>\n(not --force and --accept-data-loss: those only on the command line):\n", name, args, help)
		fs.PrintDefaults()
	}
	return fs
}

// parseCommandFlags parses args with flags and positional arguments in any
// order, applies the environment and checks the number of positional
// arguments.
func parseCommandFlags(fs *flag.FlagSet, args []string, nargs int) ([]string, error) {
	pos, err := parseInterspersed(fs, args)
	if err != nil {
		return nil, err
	}
	if err := applyEnv(fs); err != nil {
		return nil, err
	}
	if len(pos) != nargs {
		fs.Usage()
		return nil, fmt.Errorf("%s: want %d argument(s), got %d", fs.Name(), nargs, len(pos))
	}
	return pos, nil
}

// parseInterspersed parses fs's flags wherever they stand among the
// positional arguments (`slots list GROUP --json` as well as `slots list
// --json GROUP`), the way kubectl, docker and gh read their command lines;
// the standard flag package stops at the first positional argument. "--"
// ends the flags. It returns the positional arguments in order; an unknown
// flag is the flag package's error ("flag provided but not defined").
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var flags, pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i+1:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' {
			pos = append(pos, a)
			continue
		}
		flags = append(flags, a)
		name := strings.TrimLeft(a, "-")
		if strings.Contains(name, "=") {
			continue
		}
		// A flag that takes a value takes the next argument with it.
		if f := fs.Lookup(name); f != nil && !isBoolFlag(f) && i+1 < len(args) {
			i++
			flags = append(flags, args[i])
		}
	}
	if err := parseFlags(fs, flags); err != nil {
		return nil, err
	}
	return pos, nil
}

func isBoolFlag(f *flag.Flag) bool {
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// adminClient calls the admin API with the bearer token.
type adminClient struct {
	addr      string // as the operator gave it, for messages
	base      string // scheme://host:port
	token     string
	tokenFile string
	hc        *http.Client
}

func (o *adminOptions) client() (*adminClient, error) {
	base := o.addr
	if !strings.Contains(base, "://") {
		base = "http://" + base
	}
	u, err := url.Parse(base)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return nil, fmt.Errorf("--admin %q: want host:port or http://host:port", o.addr)
	}
	tokenFile := o.tokenPath()
	b, err := os.ReadFile(tokenFile)
	if err != nil {
		return nil, fmt.Errorf("reading the admin token: %w (set --data DIR to the server's data directory or --admin-token-file FILE, or MEDIATOR_DATA, MEDIATOR_ADMIN_TOKEN_FILE; the server keeps it in <data>/admin.token)", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" || strings.IndexFunc(tok, func(r rune) bool { return r <= ' ' || r > '~' }) >= 0 {
		return nil, fmt.Errorf("admin token file %s does not hold a token (one line of printable characters)", tokenFile)
	}
	return &adminClient{
		addr: o.addr, base: strings.TrimSuffix(u.String(), "/"), token: tok, tokenFile: tokenFile,
		hc: &http.Client{Transport: &http.Transport{
			Proxy:                 nil, // the admin API is local or on a private network
			DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
			ResponseHeaderTimeout: time.Minute,
		}},
	}, nil
}

// send sends a request with the token and turns transport failures into
// errors an operator can act on; any HTTP status is returned as is. The
// caller closes the body.
func (c *adminClient) send(ctx context.Context, method, path string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil, fmt.Errorf("cannot reach the admin API at %s: is the server running?", c.addr)
		}
		return nil, fmt.Errorf("cannot reach the admin API at %s: %w", c.addr, err)
	}
	return resp, nil
}

// do is send that also turns error statuses into errors. The caller closes
// the body.
func (c *adminClient) do(ctx context.Context, method, path string) (*http.Response, error) {
	resp, err := c.send(ctx, method, path)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode >= 400 {
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, c.statusError(resp.StatusCode, body)
	}
	return resp, nil
}

func (c *adminClient) statusError(status int, body []byte) error {
	if status == http.StatusUnauthorized {
		return fmt.Errorf("admin token rejected by %s (token file %s): the server was started with another token. Check: "+
			"--admin-token-file or MEDIATOR_ADMIN_TOKEN_FILE names the file the server at %s was started with "+
			"(its --admin-token-file, default <data>/admin.token); in a cluster, every node was started with the same token file",
			c.addr, c.tokenFile, c.addr)
	}
	var e adminapi.APIError
	if json.Unmarshal(body, &e) != nil || e.Error == "" {
		// Not the mediator's JSON error: something else answers there.
		return fmt.Errorf("%s answered HTTP %d %s without an admin API error: is it the mediator's admin address?",
			c.addr, status, http.StatusText(status))
	}
	switch status {
	case http.StatusBadRequest, http.StatusNotFound, http.StatusConflict:
		return errors.New(e.Error)
	}
	return fmt.Errorf("admin API %s: %s (HTTP %d)", c.addr, e.Error, status)
}

// call runs one JSON request: with raw set it copies the answer to stdout,
// otherwise it decodes it into v.
func (c *adminClient) call(ctx context.Context, method, path string, raw bool, v any) error {
	_, err := c.callStatus(ctx, method, path, raw, v)
	return err
}

// callStatus is call that also returns the answer's status (a 2xx: errors
// are returned as errors).
func (c *adminClient) callStatus(ctx context.Context, method, path string, raw bool, v any) (int, error) {
	resp, err := c.do(ctx, method, path)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return 0, fmt.Errorf("admin API %s: reading the answer: %w", c.addr, err)
	}
	if raw {
		_, err := stdout.Write(body)
		return resp.StatusCode, err
	}
	if err := json.Unmarshal(body, v); err != nil {
		return 0, fmt.Errorf("admin API %s: unexpected answer: %w", c.addr, err)
	}
	return resp.StatusCode, nil
}

// operation is one admin API command: its client, output mode and
// positional arguments.
type operation struct {
	c              *adminClient
	json           bool
	args           []string
	acceptDataLoss bool   // cluster reassign
	noWait         bool   // cluster move
	dryRun         bool   // cluster rebalance, drain
	maxParallel    int    // cluster rebalance, drain
	moveID         string // cluster abort
	local          bool   // groups list, stats: the asked node alone (cluster mode)
}

func (op *operation) call(ctx context.Context, method, path string, v any) (printed bool, err error) {
	return op.json, op.c.call(ctx, method, path, op.json, v)
}

func (op *operation) callStatus(ctx context.Context, method, path string, v any) (status int, printed bool, err error) {
	status, err = op.c.callStatus(ctx, method, path, op.json, v)
	return status, op.json, err
}

// fetch is call for commands that look at the answer in either mode: it
// decodes the answer into v and, with --json, also prints it.
func (op *operation) fetch(ctx context.Context, path string, v any) error {
	var raw json.RawMessage
	if err := op.c.call(ctx, "GET", path, false, &raw); err != nil {
		return err
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("admin API %s: unexpected answer: %w", op.c.addr, err)
	}
	if op.json {
		_, err := stdout.Write(append(raw, '\n'))
		return err
	}
	return nil
}

// localPath adds ?local=true to path for --local.
func (op *operation) localPath(path string) string {
	if op.local {
		return path + "?local=true"
	}
	return path
}

type opCommand struct {
	args string // positional arguments, for the usage text
	help string
	run  func(ctx context.Context, op *operation) error
	// flags, if set, adds the command's own flags, bound to op.
	flags func(fs *flag.FlagSet, op *operation)
}

var opCommands = map[string]opCommand{
	"groups list":  {"", "Lists every device group: slots, connected devices, queued reflections, lock holder.\nIn cluster mode every live node answers for the shards it serves (NODE column);\n--local lists the asked node's store alone.", runGroupsList, localFlags},
	"slots list":   {"GROUP", "Lists a group's slots (state, queue, leader, lock) and tombstones.\nGROUP is the hex group id or a unique prefix of it (in cluster mode at least\ntwo hex digits: any node answers, the one serving the group's shard).", runSlotsList, nil},
	"slots show":   {"GROUP DEVICE", "Shows one slot. DEVICE is the device id as printed (0x and 16 hex digits),\n0x-hex (0xa3) or decimal with dec: (dec:163, as in --json output).", runSlotsShow, nil},
	"slots drop":   {"GROUP DEVICE", "Drops a slot as a device's DropDevice would: a connected device is closed\nwith 4113, slot and queue are deleted, a lock it holds ends.", runSlotsDrop, nil},
	"queue purge":  {"GROUP DEVICE", "Empties a slot's reflection queue (the slot stays). Reflections already\nin a connected device's delivery window may still reach it.", runQueuePurge, nil},
	"lock show":    {"GROUP", "Shows the group's transaction lock.", runLockShow, nil},
	"lock release": {"GROUP", "Force-releases the group's transaction lock as if its holder had\ndisconnected: held reflections are delivered and the other devices get\nTransactionEnded. The holder stays connected.", runLockRelease, nil},
	"stats":        {"", "Shows server statistics: connections, groups, goroutines, memory, database.\nIn cluster mode one row per live node; --local shows the asked node alone.", runStats, localFlags},

	"cluster nodes":     {"", "Lists the cluster's live nodes (cluster mode).", runClusterNodes, nil},
	"cluster shards":    {"", "Lists the 256 shards: assigned node, serving node, epoch, state (serving,\nunserved: nobody serves it, its devices get 503; or the move in progress);\ngroups, devices and queued reflections for the shards the answering node serves.", runClusterShards, nil},
	"cluster move":      {"SHARD NODE", "Moves a shard (two hex digits, the /{prefix8}/ URL segment) to NODE with its\ndata: its devices are closed with 1001 and reconnect to NODE. Waits for the\noutcome unless --no-wait; the move goes on if this command is stopped\n(cluster abort stops it).", runClusterMove, moveFlags},
	"cluster abort":     {"SHARD", "Aborts the planned move of SHARD in flight: the donor serves the shard\nagain, the recipient discards what it imported.", runClusterAbort, abortFlags},
	"cluster drain":     {"NODE", "Marks NODE draining (it takes no shards) and moves every shard it serves\nto the other nodes, then prints what moved. The drain goes on if this\ncommand is stopped; cluster undrain clears the mark.", runClusterDrain, rebalanceFlags},
	"cluster undrain":   {"NODE", "Clears NODE's drain mark: it takes shards again (cluster rebalance, or the\ncontroller with --cluster-auto-rebalance).", runClusterUndrain, nil},
	"cluster rebalance": {"", "Moves shards until every live node that is not draining serves within one\nshard of the others, and draining nodes serve none; --dry-run prints the\nplan (which shard moves where, and why) without moving anything.", runClusterRebalance, rebalanceFlags},
	"cluster reassign":  {"SHARD NODE", "Gives a shard whose node is down to NODE WITHOUT its data (the shard's\nqueued reflections and slots are lost); needs --accept-data-loss.", runClusterReassign, reassignFlags},
}

// adminCommand runs `mediator groups|slots|queue|lock|stats …`; globals
// are the flags given before the command.
func adminCommand(ctx context.Context, args, globals []string) error {
	name, rest := args[0], args[1:]
	if name != "stats" {
		if len(rest) > 0 && isHelp(rest[0]) {
			printGroupUsage(name)
			return nil
		}
		if len(rest) == 0 || strings.HasPrefix(rest[0], "-") {
			return fmt.Errorf("usage: %s", strings.Join(subcommands(name), " | "))
		}
		name, rest = name+" "+rest[0], rest[1:]
	}
	if name == "cluster haproxy-sync" { // a daemon, not one API call
		return runHAProxySync(ctx, rest, globals)
	}
	cmd, ok := opCommands[name]
	if !ok {
		return fmt.Errorf("unknown command %q; usage: %s", name, strings.Join(subcommands(args[0]), " | "))
	}
	fs := newCommandFlags(name, cmd.args, cmd.help)
	o := addAdminFlags(fs)
	op := &operation{}
	if cmd.flags != nil {
		cmd.flags(fs, op)
	}
	nargs := len(strings.Fields(cmd.args))
	pos, err := parseCommandFlags(fs, append(globals, rest...), nargs)
	if err != nil {
		return err
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	op.c, op.json, op.args = c, o.json, pos
	return cmd.run(ctx, op)
}

// printGroupUsage answers `mediator slots --help` and the like on stdout:
// the group's commands, each with the first line of its help.
func printGroupUsage(group string) {
	var names []string
	for name := range opCommands {
		if strings.HasPrefix(name, group+" ") {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	fmt.Fprintln(stdout, "usage:")
	tw := newTable(stdout)
	for _, name := range names {
		cmd := opCommands[name]
		first, _, _ := strings.Cut(strings.ReplaceAll(cmd.help, "\n", " "), ". ")
		fmt.Fprintf(tw, "  mediator %s [flags] %s\t%s\n", name, cmd.args, strings.TrimSuffix(first, ".")+".")
	}
	tw.Flush()
	fmt.Fprintf(stdout, "\nEach command's flags: mediator %s COMMAND --help\n", group)
}

func subcommands(prefix string) []string {
	var out []string
	for name, cmd := range opCommands {
		if strings.HasPrefix(name, prefix+" ") || name == prefix {
			out = append(out, strings.TrimSpace("mediator "+name+" [flags] "+cmd.args))
		}
	}
	if prefix == "cluster" {
		out = append(out, "mediator cluster haproxy-sync [flags]")
	}
	sort.Strings(out)
	return out
}

func groupPath(group string) string { return "/api/v1/groups/" + url.PathEscape(group) }

// slotPath checks DEVICE locally (d2m.ParseDeviceID: as printed, 0x-hex or
// dec:N), so a typo does not need a round trip. The API takes the id in
// decimal.
func slotPath(group, device string) (string, error) {
	d, err := d2m.ParseDeviceID(device)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s/slots/%d", groupPath(group), d), nil
}

func runGroupsList(ctx context.Context, op *operation) error {
	var list adminapi.GroupList
	if err := op.fetch(ctx, op.localPath("/api/v1/groups"), &list); err != nil {
		return err
	}
	if !op.json {
		printGroups(stdout, list)
	}
	return nodeErrors(list.Errors)
}

// nodeErrors is the error of a cluster-wide answer that some live nodes
// did not give their part of (what the others said is printed).
func nodeErrors(errs []adminapi.NodeError) error {
	if len(errs) == 0 {
		return nil
	}
	var parts []string
	for _, e := range errs {
		parts = append(parts, e.Node+": "+e.Error)
	}
	return fmt.Errorf("incomplete: %d node(s) did not answer (%s)", len(errs), strings.Join(parts, "; "))
}

func runSlotsList(ctx context.Context, op *operation) error {
	var g adminapi.GroupDetail
	if printed, err := op.call(ctx, "GET", groupPath(op.args[0]), &g); printed || err != nil {
		return err
	}
	printGroup(stdout, g, time.Now())
	return nil
}

func runSlotsShow(ctx context.Context, op *operation) error {
	p, err := slotPath(op.args[0], op.args[1])
	if err != nil {
		return err
	}
	var s adminapi.SlotDetail
	if printed, err := op.call(ctx, "GET", p, &s); printed || err != nil {
		return err
	}
	printSlot(stdout, s, time.Now())
	return nil
}

func runSlotsDrop(ctx context.Context, op *operation) error {
	p, err := slotPath(op.args[0], op.args[1])
	if err != nil {
		return err
	}
	var r adminapi.DropResult
	if printed, err := op.call(ctx, "DELETE", p, &r); printed || err != nil {
		return err
	}
	how := "it was offline"
	if r.WasConnected {
		how = "its connection was closed with 4113"
	}
	fmt.Fprintf(stdout, "dropped device %s from group %s: %s, %d queued reflection(s) deleted\n",
		fmtID(r.DeviceID), r.Group, how, r.QueueLength)
	return nil
}

func runQueuePurge(ctx context.Context, op *operation) error {
	p, err := slotPath(op.args[0], op.args[1])
	if err != nil {
		return err
	}
	var r adminapi.PurgeResult
	if printed, err := op.call(ctx, "DELETE", p+"/queue", &r); printed || err != nil {
		return err
	}
	fmt.Fprintf(stdout, "purged %d reflection(s) (%s) from the queue of device %s in group %s\n",
		r.PurgedCount, fmtBytes(r.PurgedBytes), fmtID(r.DeviceID), r.Group)
	return nil
}

func runLockShow(ctx context.Context, op *operation) error {
	var l adminapi.LockInfo
	if printed, err := op.call(ctx, "GET", groupPath(op.args[0])+"/lock", &l); printed || err != nil {
		return err
	}
	fmt.Fprintln(stdout, describeLock(l))
	return nil
}

func runLockRelease(ctx context.Context, op *operation) error {
	var r adminapi.LockReleaseResult
	if printed, err := op.call(ctx, "DELETE", groupPath(op.args[0])+"/lock", &r); printed || err != nil {
		return err
	}
	state := "the other devices got TransactionEnded"
	if !r.Released {
		state = "TransactionEnded goes out once the held reflections are stored"
	}
	fmt.Fprintf(stdout, "released the transaction lock of group %s held by device %s for %s; %s\n",
		r.Group, fmtID(r.Holder), fmtDuration(secs(r.HeldSeconds)), state)
	return nil
}

// statsAnswer is either form of GET /api/v1/stats: one process
// (ServerStats), or every node of a cluster (Nodes set).
type statsAnswer struct {
	adminapi.ServerStats
	Nodes []adminapi.NodeStats `json:"nodes"`
}

func runStats(ctx context.Context, op *operation) error {
	var st statsAnswer
	if err := op.fetch(ctx, op.localPath("/api/v1/stats"), &st); err != nil {
		return err
	}
	if st.Nodes == nil {
		if !op.json {
			printStats(stdout, st.ServerStats)
		}
		return nil
	}
	var errs []adminapi.NodeError
	for _, n := range st.Nodes {
		if n.Error != "" {
			errs = append(errs, adminapi.NodeError{Node: n.Node, Error: n.Error})
		}
	}
	if !op.json {
		printClusterStats(stdout, st.Nodes)
	}
	return nodeErrors(errs)
}
