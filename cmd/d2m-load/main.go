// Command d2m-load drives many simulated devices against a mediator on this
// machine and reports throughput, latency and server resource use. See
// `d2m-load --help` and BENCHMARKS.md.
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
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"
)

// Hard caps: every scenario is bounded in size and time whatever the flags
// say, and the process exits by itself if a phase hangs.
const (
	maxDuration   = 10 * time.Minute
	maxDevices    = 100_000
	setupTimeout  = 3 * time.Minute // connecting/filling before the measured phase
	teardownGrace = time.Minute
)

type options struct {
	scenario       string
	url            string
	duration       time.Duration
	groups         int
	devices        int
	size           int
	rate           float64
	pipeline       int
	concurrency    int
	dialWorkers    int
	queued         int
	keepalive      time.Duration
	closeMode      string
	serverPID      int
	admin          string
	adminTokenFile string
	chatServerKey  string
	reflect        bool
	jsonOut        bool
	plotFile       string
	cpuProfile     string
	quiet          bool
	sourceAddrs    int
	mixed          mixedOptions
}

const usage = `usage: d2m-load --scenario NAME [flags]

Drives simulated devices (d2m/d2mclient) against a mediator on loopback and
reports throughput, latency and server resource use. Progress goes to stderr
once per second; the summary table follows (to stderr with --json, which
writes the results as JSON to stdout). Only 127.0.0.0/8, ::1 and localhost
targets are accepted.

Scenarios:
  reflect    --groups G × --devices D devices; each reflects --size-byte
             envelopes at --rate total reflects/s (0: as fast as
             --pipeline outstanding ReflectAcks per device allow) and acks
             every Reflected. Reports reflects/s, stored copies/s,
             ReflectAck and sender→receiver delivery latency.
  idle       --devices N authenticated idle devices in groups of 1–3; reads
             server RSS/heap/goroutines before and after (--server-pid
             and/or --admin) and reports them per connection.
  handshake  --concurrency C workers connect, authenticate and disconnect
             as fast as they can; handshakes/s and latency.
  storm      --devices N offline devices each get --queued K messages
             from their group's other device, then all reconnect at once;
             time until every device got ReflectionQueueDry.
  csp        --devices N identities (one device each, in pairs) log in to
             the stand-in chat server through the mediator
             (--chat-server-key) and send messages to each other;
             end-to-end messages/s and latency.
  mixed      production shape, open loop: --devices N devices in groups of
             1–3 (--group-mix), connected at --ramp devices/s, each with a
             CSP session through the mediator to a chat server that should
             run as its own process (cmd/chatstub, --chat-server-key); a CSP
             echo every --echo-interval + up to --echo-jitter, a reflect
             every --reflect-interval on average (--reflect-size), a
             ReflectedAck for every Reflected, a transaction per group every
             --tx-interval on average. Latency counts from the scheduled
             send time. Every --report-interval: server cores, RSS,
             goroutines and descriptors, echo and ReflectAck p50/p99/p99.9,
             errors by kind, this tool's CPU and RSS; at the end "devices
             per core at p99 ≤ --slo". --shard i/n runs a share of the
             groups; "d2m-load merge" combines the shards' --json results.

Subcommands:
  d2m-load merge SHARD.json ...   combine mixed --shard results (JSON to
                                  stdout, table to stderr)
  d2m-load curve ...              latency against rate of reflect runs

Flags:
`

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("d2m-load", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	fs.StringVar(&o.scenario, "scenario", "", "`name`: reflect, idle, handshake, storm, csp or mixed")
	fs.StringVar(&o.url, "url", "ws://127.0.0.1:8765", "mediator device `URL` (loopback only)")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "length of the measured phase (storm: deadline for the reconnect); capped at 10m")
	fs.IntVar(&o.groups, "groups", 1000, "reflect: device groups")
	fs.IntVar(&o.devices, "devices", 0, "devices per group (reflect, default 3); devices in total (idle 5000, storm 8000, csp 100, mixed 2000; mixed: all shards together)")
	fs.IntVar(&o.size, "size", 100, "envelope / message body `bytes` (reflect, storm, csp)")
	fs.Float64Var(&o.rate, "rate", 0, "reflect/csp: target total `per second`; 0 = as fast as the pipeline allows")
	fs.IntVar(&o.pipeline, "pipeline", 8, "reflect/csp: outstanding acks per device")
	fs.IntVar(&o.concurrency, "concurrency", 64, "handshake: concurrent workers")
	fs.IntVar(&o.dialWorkers, "dial-concurrency", 256, "concurrent dials while setting up (the server answers 503 beyond its handshake cap)")
	fs.IntVar(&o.queued, "queued", 10, "storm: messages queued per device")
	fs.DurationVar(&o.keepalive, "keepalive", 30*time.Second, "idle: each device sends GetDevicesInfo this often (the server's idle timeout is 90s); 0 = never")
	fs.StringVar(&o.closeMode, "close", "normal", "handshake: end each connection with a close handshake (normal) or drop it (abort)")
	fs.IntVar(&o.serverPID, "server-pid", 0, "mediator `PID`: read VmRSS and CPU time from /proc")
	fs.StringVar(&o.admin, "admin", "", "mediator admin `URL`, e.g. http://127.0.0.1:8766 (metrics; loopback only)")
	fs.StringVar(&o.adminTokenFile, "admin-token-file", "", "admin bearer token `file` (<data>/admin.token)")
	fs.StringVar(&o.chatServerKey, "chat-server-key", "", "csp, mixed: chat server public key, 64 `hex` digits (mediator startup log field public_key; chatstub prints it)")
	fs.IntVar(&o.sourceAddrs, "source-addrs", -1, "bind connections to this many loopback source addresses 127.1.A.B in turn (with IP_BIND_ADDRESS_NO_PORT), so no address runs out of ephemeral ports; 0 = the kernel's choice (127.0.0.1); -1 = 16 for mixed, 0 otherwise")
	o.mixed.register(fs)
	fs.BoolVar(&o.reflect, "csp-reflect", true, "csp: reflect each outgoing and incoming message as a multi-device client must (ReflectAck before send / incoming ack)")
	fs.BoolVar(&o.jsonOut, "json", false, "write the results as JSON to stdout")
	fs.StringVar(&o.plotFile, "plot", "", "draw throughput over time and latency CDFs to `FILE`.svg or .png")
	fs.StringVar(&o.cpuProfile, "cpuprofile", "", "write this tool's CPU profile to `FILE` (the server's: GET /debug/pprof/profile on --admin)")
	fs.BoolVar(&o.quiet, "quiet", false, "no per-second progress (mixed: no setup messages and report lines either)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if o.devices == 0 {
		o.devices = map[string]int{"reflect": 3, "idle": 5000, "storm": 8000, "csp": 100, "handshake": 1, "mixed": 2000}[o.scenario]
	}
	if o.sourceAddrs < 0 {
		o.sourceAddrs = 0
		if o.scenario == "mixed" {
			o.sourceAddrs = 16
		}
	}
	switch o.scenario {
	case "reflect", "idle", "handshake", "storm", "csp", "mixed":
	case "":
		return nil, errors.New("--scenario is required (reflect, idle, handshake, storm, csp, mixed)")
	default:
		return nil, fmt.Errorf("--scenario %q: want reflect, idle, handshake, storm, csp or mixed", o.scenario)
	}
	if err := checkLoopback(o.url); err != nil {
		return nil, fmt.Errorf("--url: %w", err)
	}
	if !strings.HasPrefix(o.url, "ws://") && !strings.HasPrefix(o.url, "wss://") {
		return nil, fmt.Errorf("--url %q: want ws:// or wss://", o.url)
	}
	switch {
	case o.duration <= 0 || o.duration > maxDuration:
		return nil, fmt.Errorf("--duration must be within (0, %v]", maxDuration)
	case o.devices < 1 || o.groups < 1:
		return nil, errors.New("--devices and --groups must be positive")
	case o.scenario == "reflect" && o.groups*o.devices > maxDevices:
		return nil, fmt.Errorf("--groups × --devices = %d is over the cap of %d", o.groups*o.devices, maxDevices)
	case o.scenario == "reflect" && o.devices < 2:
		return nil, errors.New("reflect: --devices must be at least 2 (someone has to receive)")
	case o.devices > maxDevices:
		return nil, fmt.Errorf("--devices %d is over the cap of %d", o.devices, maxDevices)
	case o.size < 0 || o.size > 64*1024:
		return nil, errors.New("--size must be within 0..65536")
	case o.rate < 0 || o.pipeline < 1 || o.concurrency < 1 || o.dialWorkers < 1 || o.queued < 0:
		return nil, errors.New("--rate, --pipeline, --concurrency, --dial-concurrency and --queued must not be negative (pipeline/concurrency ≥ 1)")
	case o.closeMode != "normal" && o.closeMode != "abort":
		return nil, errors.New("--close must be normal or abort")
	case (o.scenario == "csp" || o.scenario == "mixed") && o.chatServerKey == "":
		return nil, fmt.Errorf("%s: --chat-server-key is required (the mediator logs it as public_key at startup; cmd/chatstub prints it)", o.scenario)
	case o.sourceAddrs > maxSources:
		return nil, fmt.Errorf("--source-addrs %d is over the cap of %d", o.sourceAddrs, maxSources)
	case o.scenario == "csp" && o.devices%2 != 0:
		return nil, errors.New("csp: --devices must be even (identities talk in pairs)")
	}
	if o.sourceAddrs > 0 {
		if u, _ := url.Parse(o.url); u == nil || net.ParseIP(u.Hostname()).To4() == nil {
			return nil, fmt.Errorf("--source-addrs needs an IPv4 loopback --url (127.x.y.z), not %q; --source-addrs 0 dials from the kernel's choice", o.url)
		}
	}
	if o.scenario == "mixed" {
		if err := o.mixed.check(o); err != nil {
			return nil, fmt.Errorf("mixed: %w", err)
		}
	}
	return o, nil
}

// connections returns how many sockets the scenario holds at once.
func (o *options) connections() int {
	switch o.scenario {
	case "reflect":
		return o.groups * o.devices
	case "handshake":
		return o.concurrency
	case "mixed":
		return o.mixed.shareOf(o.devices)
	}
	return o.devices
}

// raiseNoFile lifts the soft RLIMIT_NOFILE to the hard limit and checks
// that need descriptors (plus some slack) fit.
func raiseNoFile(need int) (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return 0, fmt.Errorf("raising RLIMIT_NOFILE to %d: %w", lim.Max, err)
		}
	}
	const slack = 128
	if want := uint64(need + slack); want > lim.Cur {
		// Beyond the hard limit only with CAP_SYS_RESOURCE (root), up to
		// fs.nr_open.
		raised := syscall.Rlimit{Cur: want, Max: want}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &raised); err != nil {
			return lim.Cur, fmt.Errorf("%d connections need about %d file descriptors, but the hard limit (ulimit -Hn) is %d and raising it failed (%v; it needs root or CAP_SYS_RESOURCE): lower --devices/--groups or raise the limit (the server needs as many in its own process, twice as many with a chat-server upstream per device)",
				need, want, lim.Cur, err)
		}
		return want, nil
	}
	return lim.Cur, nil
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "curve" {
		return runCurve(args[1:], stdout, stderr)
	}
	if len(args) > 0 && args[0] == "merge" {
		return runMerge(args[1:], stdout, stderr)
	}
	o, err := parseFlags(args, stderr)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(stderr, "d2m-load:", err)
		return 2
	}
	nofile, err := raiseNoFile(o.connections())
	if err != nil {
		fmt.Fprintln(stderr, "d2m-load:", err)
		return 2
	}
	pr, err := newProbe(o.serverPID, o.admin, o.adminTokenFile)
	if err != nil {
		fmt.Fprintln(stderr, "d2m-load:", err)
		return 2
	}
	if o.quiet {
		stderrProgress = io.Discard
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// Watchdog: whatever happens, the process ends.
	limit := setupTimeout + o.duration + teardownGrace
	if o.scenario == "storm" {
		limit += setupTimeout // the fill phase
	}
	if o.scenario == "mixed" {
		limit = o.mixed.timeLimit(o)
	}
	watchdog := time.AfterFunc(limit, func() {
		fmt.Fprintf(stderr, "d2m-load: hard time limit %v reached, exiting\n", limit)
		os.Exit(3)
	})
	defer watchdog.Stop()

	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err != nil {
			fmt.Fprintln(stderr, "d2m-load:", err)
			return 2
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(stderr, "d2m-load:", err)
			return 2
		}
		defer pprof.StopCPUProfile()
	}

	env := &runEnv{o: o, probe: pr, dialer: newDialer(o.url, dialerOptions{sources: o.sourceAddrs, small: o.scenario == "mixed"})}
	var res *result
	switch o.scenario {
	case "reflect":
		res, err = runReflect(ctx, env)
	case "idle":
		res, err = runIdle(ctx, env)
	case "handshake":
		res, err = runHandshake(ctx, env)
	case "storm":
		res, err = runStorm(ctx, env)
	case "csp":
		res, err = runCSP(ctx, env)
	case "mixed":
		res, err = runMixed(ctx, env)
	}
	if res != nil {
		res.Machine.NoFileLimit = nofile
		table := stdout
		if o.jsonOut {
			table = stderr
		}
		res.printTable(table)
		res.printMixedVerdict(table)
		if o.jsonOut {
			if err := res.writeJSON(stdout); err != nil {
				fmt.Fprintln(stderr, "d2m-load: json:", err)
			}
		}
		if o.plotFile != "" {
			if err := writePlot(o.plotFile, res); err != nil {
				fmt.Fprintln(stderr, "d2m-load: plot:", err)
				return 1
			}
			fmt.Fprintln(stderr, "plot written to", o.plotFile)
		}
	}
	if err != nil {
		fmt.Fprintln(stderr, "d2m-load:", err)
		return 1
	}
	return 0
}

// stderrProgress is where setup messages and progress lines go.
var stderrProgress io.Writer = os.Stderr

func logf(format string, args ...any) {
	fmt.Fprintf(stderrProgress, format+"\n", args...)
}

// runEnv is what every scenario gets.
type runEnv struct {
	o      *options
	probe  *probe
	dialer *dialer
}
