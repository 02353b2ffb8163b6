// Command mediator runs the d2m mediator server (`mediator serve`) and the
// operator commands that talk to a running server's admin API or, with the
// server stopped, to its database file.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

const usage = `usage: mediator [flags] <command> [flags] [arguments]

Server:
  serve                      run the mediator (see: mediator serve --help)

Operations (talk to the running server's admin API):
  groups list [--local]      list device groups (cluster mode: of every node)
  slots list GROUP           a group's slots, queues, leader, lock, tombstones
  slots show GROUP DEVICE    one slot in detail
  slots drop GROUP DEVICE    drop a slot (a connected device is closed with 4113)
  queue purge GROUP DEVICE   empty a slot's reflection queue
  lock show GROUP            the group's transaction lock
  lock release GROUP         force-release it (as if the holder disconnected)
  stats [--local]            connections, groups, goroutines, memory, database
                             (cluster mode: one row per node; --local: the asked node)
  db backup FILE             hot, consistent copy of the database into FILE

Cluster (cluster mode; any node answers):
  cluster nodes              live nodes
  cluster shards             the shard map: assigned, serving node, epoch, state
                             (serving, unserved, or the move in progress)
  cluster move SHARD NODE    move a shard with its data (SHARD: two hex digits)
  cluster drain NODE         move every shard of NODE to the other nodes
  cluster reassign SHARD NODE --accept-data-loss
                             give a down node's shard to NODE without its data
  cluster haproxy-sync       keep a running HAProxy's shard map current (runs until
                             SIGTERM; see: mediator cluster haproxy-sync --help)

  Flags (before the command, before or after the arguments): --admin ADDR
  (default 127.0.0.1:8766), --admin-token-file FILE (default
  <--data>/admin.token), --data DIR (default ./data), --json (raw API JSON).
  Example: mediator slots list 3fa2 --json
  GROUP is the hex group id or a unique prefix (cluster mode: at least two
  hex digits; any node answers, by asking the owner). DEVICE is the id as printed
  (0x and 16 hex digits, e.g. 0x1f00aa42c0ffee01), 0x-hex (0xa3), or decimal
  with dec: (dec:163, as --json prints ids).

Offline (server stopped, or on a backup file):
  db check [FILE | --data DIR]    consistency check of FILE or <DIR>/mediator.db
  db compact [--data DIR]         rewrite <DIR>/mediator.db without free pages

  version                    module version, VCS revision, Go version

Every flag of a command can also be set by an environment variable
MEDIATOR_<FLAG> (upper case, dashes as underscores); flags win. The safety
flags --force and --accept-data-loss are the exception: they are taken from
the command line only. Help (--help after any command) goes to stdout.
`

// stderr receives usage texts that accompany an error and warnings (tests
// replace it, as they replace stdout).
var stderr io.Writer = os.Stderr

func main() {
	os.Exit(exitStatus(run(os.Args[1:])))
}

// exitStatus is the process's exit status for run's result: 0 for success
// and for help (flag.ErrHelp: the help was printed to stdout), otherwise
// 1 with the error on stderr.
func exitStatus(err error) int {
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintln(stderr, "mediator:", err)
	return 1
}

func run(args []string) error {
	globals, args, err := splitGlobalFlags(args)
	if err != nil {
		fmt.Fprint(stderr, usage)
		return err
	}
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("missing command")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	switch args[0] {
	case "serve":
		return serve(ctx, append(globals, args[1:]...))
	case "groups", "slots", "queue", "lock", "stats", "cluster":
		return adminCommand(ctx, args, globals)
	case "db":
		return dbCommand(ctx, args[1:], globals)
	case "version":
		return versionCommand(append(globals, args[1:]...))
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", strings.Join(args, " "))
}

// globalValueFlags are the flags that may stand before the command
// (`mediator --admin-token-file F groups list`) and take a value; --json is
// the boolean one. They are handed to the command's own flag set, so a
// command that has no such flag rejects it there.
var globalValueFlags = map[string]bool{"admin": true, "admin-token-file": true, "data": true}

// splitGlobalFlags takes the flags before the command off args.
func splitGlobalFlags(args []string) (globals, rest []string, err error) {
	for len(args) > 0 && len(args[0]) > 1 && args[0][0] == '-' {
		a := args[0]
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		switch {
		case name == "h" || name == "help":
			return nil, []string{"help"}, nil
		case name == "json":
			globals, args = append(globals, a), args[1:]
		case globalValueFlags[name] && hasValue:
			globals, args = append(globals, a), args[1:]
		case globalValueFlags[name]:
			if len(args) < 2 {
				return nil, nil, fmt.Errorf("flag %s needs a value", a)
			}
			globals, args = append(globals, a, args[1]), args[2:]
		default:
			return nil, nil, fmt.Errorf("unknown flag %s before the command (there: --admin, --admin-token-file, --data, --json; other flags go after the command)", a)
		}
	}
	return globals, args, nil
}

// isHelp reports whether a is a request for help.
func isHelp(a string) bool {
	switch a {
	case "-h", "--h", "-help", "--help":
		return true
	}
	return false
}

// parseFlags parses args into fs with one rule for help everywhere: -h or
// --help prints the usage to stdout and returns flag.ErrHelp (exit status
// 0); any other parse error prints the usage to stderr and is returned.
func parseFlags(fs *flag.FlagSet, args []string) error {
	fs.SetOutput(io.Discard) // the flag package would print to stderr
	err := fs.Parse(args)
	fs.SetOutput(stderr)
	if errors.Is(err, flag.ErrHelp) {
		fs.SetOutput(stdout)
		fs.Usage()
		fs.SetOutput(stderr)
	} else if err != nil {
		fs.Usage()
	}
	return err
}

// safetyFlags confirm a step that destroys data. They are never read from
// the environment: a variable exported once, for one command, would
// silently confirm every later command of that shell.
var safetyFlags = map[string]bool{"force": true, "accept-data-loss": true}

// applyEnv sets every flag not given on the command line from
// MEDIATOR_<FLAG> when that variable is set, except the safety flags.
func applyEnv(fs *flag.FlagSet) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
			return
		}
		name := "MEDIATOR_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if safetyFlags[f.Name] {
			if _, ok := os.LookupEnv(name); ok {
				fmt.Fprintf(stderr, "mediator: %s is ignored: --%s is taken from the command line only\n", name, f.Name)
			}
			return
		}
		if v, ok := os.LookupEnv(name); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %w", name, v, e)
			}
		}
	})
	return err
}
