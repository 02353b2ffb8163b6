package main

import (
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"d2m-mediator/chatproxy/chatstub"

	"github.com/rs/zerolog"
)

func main() {
	if err := run(); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "chatstub:", err)
		os.Exit(1)
	}
}

// run turns SIGINT and SIGTERM into a cancelled context, so either signal
// closes the listener and every connection before the process exits.
func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return serve(ctx, os.Args[1:], os.Stdout, os.Stderr)
}

const usage = `Usage: chatstub [flags]

chatstub is a STAND-IN chat server for development and tests. It is not a
real chat server and must not be used as one: messages live in memory only
and are lost on exit, vouches are not verified (there is no identity
directory), and no push notifications are sent. It speaks enough of the
Threema chat-server protocol (CSP) for device logins, echo, message delivery
between identities, acks and queue-send-complete.

On start it prints its public key in hex; pin that key in the device
software (or test client) that connects to it.

Flags:
`

// serve parses flags and runs the server until ctx is cancelled.
func serve(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("chatstub", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:5222", "TCP `address` to accept CSP connections on (5222 is the chat server's usual port); several, comma-separated, serve the same identities and queues, e.g. for a mediator --chat-server template 127.0.2.{group}:5222 that spreads its upstream connections over several addresses")
	keyFile := fs.String("key-file", "./data/chatstub.key", "file holding the server's long-term secret key; created (mode 0600) if missing")
	logFormat := fs.String("log-format", "console", "log format: json or console")
	logLevel := fs.String("log-level", "info", "log level: debug, info (one line per login and per closed connection), warn, error")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}

	var logger zerolog.Logger
	switch *logFormat {
	case "json":
		logger = zerolog.New(stderr).With().Timestamp().Logger()
	case "console":
		logger = zerolog.New(zerolog.ConsoleWriter{Out: stderr, TimeFormat: time.RFC3339}).With().Timestamp().Logger()
	default:
		return fmt.Errorf("--log-format must be json or console, not %q", *logFormat)
	}
	level, err := zerolog.ParseLevel(*logLevel)
	if err != nil || *logLevel == "" {
		return fmt.Errorf("--log-level must be debug, info, warn or error, not %q", *logLevel)
	}
	logger = logger.Level(level)
	var addrs []string
	for _, a := range strings.Split(*listen, ",") {
		if a = strings.TrimSpace(a); a != "" {
			addrs = append(addrs, a)
		}
	}
	if len(addrs) == 0 {
		return errors.New("--listen: no address")
	}

	key, err := chatstub.LoadOrCreateKey(*keyFile)
	if err != nil {
		return err
	}
	srv, err := chatstub.New(chatstub.Config{SecretKey: key, Logger: logger})
	if err != nil {
		return err
	}
	// Every address is bound before anything is served, so a taken port
	// fails the start instead of leaving a partial server.
	lns := make([]net.Listener, 0, len(addrs))
	for _, a := range addrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return fmt.Errorf("listen: %w", err)
		}
		lns = append(lns, ln)
	}
	pub := srv.PublicKey()
	for _, ln := range lns {
		fmt.Fprintf(stdout, "chatstub (stand-in chat server, not for production) listening on %s\n", ln.Addr())
	}
	fmt.Fprintf(stdout, "public key: %s\n", hex.EncodeToString(pub[:]))

	errc := make(chan error, len(lns))
	for _, ln := range lns {
		go func() { errc <- srv.Serve(ln) }()
	}
	var first error
	select {
	case <-ctx.Done():
		logger.Info().Msg("chatstub: shutting down")
	case first = <-errc:
	}
	// Close ends every Serve; collect them all before returning.
	srv.Close()
	for range len(lns) - 1 {
		<-errc
	}
	if first == nil {
		<-errc
	}
	if errors.Is(first, chatstub.ErrServerClosed) {
		first = nil
	}
	return first
}
