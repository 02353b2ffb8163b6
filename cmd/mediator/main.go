// Command mediator runs the d2m mediator server (`mediator serve`) and the
// operator commands that talk to a running server's admin API or, with the
// server stopped, to its database file.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

const usage = `usage: mediator <command> [flags]

Server:
  serve                      run the mediator (see: mediator serve --help)

Operations (talk to the running server's admin API):
  groups list                list device groups
  slots list GROUP           a group's slots, queues, leader, lock, tombstones
  slots show GROUP DEVICE    one slot in detail
  slots drop GROUP DEVICE    drop a slot (a connected device is closed with 4113)
  queue purge GROUP DEVICE   empty a slot's reflection queue
  lock show GROUP            the group's transaction lock
  lock release GROUP         force-release it (as if the holder disconnected)
  stats                      connections, groups, goroutines, memory, database
  db backup FILE             hot, consistent copy of the database into FILE

  Flags (before the arguments): --admin ADDR (default 127.0.0.1:8766),
  --admin-token-file FILE (default ./data/admin.token), --json (raw API JSON).
  Example: mediator slots list --json 3fa2
  GROUP is the hex group id or a unique prefix; DEVICE is decimal or 0x-hex.

Offline (server stopped; they open <DIR>/mediator.db directly):
  db check [--data DIR]      consistency check
  db compact [--data DIR]    rewrite the file without free pages

Every flag of a command can also be set by an environment variable
MEDIATOR_<FLAG> (upper case, dashes as underscores); flags win.
`

func main() {
	if err := run(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "mediator:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return errors.New("missing command")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	switch args[0] {
	case "serve":
		return serve(ctx, args[1:])
	case "groups", "slots", "queue", "lock", "stats":
		return adminCommand(ctx, args)
	case "db":
		return dbCommand(ctx, args[1:])
	case "help", "-h", "--help":
		fmt.Fprint(os.Stdout, usage)
		return nil
	}
	fmt.Fprint(os.Stderr, usage)
	return fmt.Errorf("unknown command %q", strings.Join(args, " "))
}

// applyEnv sets every flag not given on the command line from
// MEDIATOR_<FLAG> when that variable is set.
func applyEnv(fs *flag.FlagSet) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || err != nil {
			return
		}
		name := "MEDIATOR_" + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := os.LookupEnv(name); ok {
			if e := fs.Set(f.Name, v); e != nil {
				err = fmt.Errorf("%s=%q: %w", name, v, e)
			}
		}
	})
	return err
}
