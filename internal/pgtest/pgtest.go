// Package pgtest starts real PostgreSQL servers for tests: a primary on a
// free loopback port and, on request, a streaming standby that the primary
// waits for on every commit (synchronous replication). It owns the server
// processes, their data directories and their logs, and nothing else: the
// tests talk to the servers through the DSNs it hands out. It is test-only;
// the server binary never imports it.
//
// The server binaries come from the Debian package postgresql
// (/usr/lib/postgresql/*/bin, or wherever `pg_config --bindir` points).
// Without them a test skips, except under CI (environment variable CI set),
// where it fails. PostgreSQL refuses to run as root, so when the tests run
// as root the servers run as the OS user postgres, which that package
// creates.
//
// The harness needs no Go PostgreSQL driver: it runs psql from the same
// directory for the few queries of its own.
package pgtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"d2m-mediator/internal/faultproxy"
)

// standbyName is the standby's application_name, the name the primary's
// synchronous_standby_names waits for.
const standbyName = "standby1"

// Timeouts for the harness's own waits; generous, because the machine that
// runs the tests may be busy.
const (
	readyTimeout = 30 * time.Second
	stopTimeout  = 30 * time.Second
	psqlTimeout  = 30 * time.Second
	pollInterval = 20 * time.Millisecond
)

// Options chooses what Start starts.
type Options struct {
	// Standby also starts a streaming standby (application_name standby1,
	// with a replication slot of the same name) and makes the primary
	// wait for it on every commit: synchronous_standby_names =
	// 'FIRST 1 (standby1)' and synchronous_commit = on. While the standby
	// is down, commits on the primary block until it is back.
	Standby bool
	// ReplicationProxy puts a fault proxy (package faultproxy) between
	// the standby and the primary: the standby's primary_conninfo names
	// the proxy, so Cluster.Replication can cut or slow replication
	// while both servers run.
	ReplicationProxy bool
}

// Cluster is a primary and, with Options.Standby, its synchronous standby.
type Cluster struct {
	Primary *Server
	Standby *Server // nil without Options.Standby
	// Replication is the proxy the standby reaches the primary through
	// (Options.ReplicationProxy), nil otherwise.
	Replication *faultproxy.Proxy

	env *env
	dir string // parent of both servers' directories; removed by close
}

// Server is one postgres process with its data directory and port. The
// port and data directory stay the same across Stop/Kill and Start.
type Server struct {
	name    string
	env     *env
	dir     string // socket directory and home of the log file
	dataDir string
	logPath string
	port    int

	mu   sync.Mutex // guards proc; held for no I/O
	proc *process   // nil while stopped
}

// process is one run of a postgres process; done closes when it has exited.
type process struct {
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}
	err  error // exit status, valid after done
}

// env is where the binaries are and which OS user runs the servers.
type env struct {
	binDir string
	cred   *syscall.Credential // nil: run as the current user
	uid    int
	gid    int
}

// Start starts a cluster as Options say and waits until it serves: with a
// standby, until the primary reports it as synchronous. It stops the
// servers and removes their directories when the test ends.
func Start(t testing.TB, o Options) *Cluster {
	t.Helper()
	e := lookupEnv(t)
	c, err := startCluster(e, o)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	t.Cleanup(c.close)
	return c
}

var (
	sharedMu  sync.Mutex
	shared    *Cluster
	sharedErr error
)

// Shared returns one cluster with a synchronous standby per test binary,
// started by the first call. Tests share it and isolate themselves with
// NewDatabase; a test that stops, kills or promotes a server starts a
// cluster of its own with Start. The shared cluster outlives the tests:
// a package that uses it stops it from TestMain,
//
//	func TestMain(m *testing.M) {
//		code := m.Run()
//		pgtest.StopShared()
//		os.Exit(code)
//	}
//
// Without that the servers still die with the test binary (they get
// SIGKILL when it exits), but their directories stay behind in the
// temporary directory.
func Shared(t testing.TB) *Cluster {
	t.Helper()
	e := lookupEnv(t)
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared == nil && sharedErr == nil {
		shared, sharedErr = startCluster(e, Options{Standby: true})
	}
	if sharedErr != nil {
		t.Fatalf("pgtest: shared cluster: %v", sharedErr)
	}
	return shared
}

// StopShared stops the cluster Shared started, if any, and removes its
// directories. Call it from TestMain after m.Run.
func StopShared() {
	sharedMu.Lock()
	c := shared
	shared, sharedErr = nil, nil
	sharedMu.Unlock()
	if c != nil {
		c.close()
	}
}

// lookupEnv finds the server binaries and the OS user to run them as, or
// skips the test (fails it under CI) saying what is missing.
func lookupEnv(t testing.TB) *env {
	t.Helper()
	missing := func(format string, args ...any) {
		t.Helper()
		msg := fmt.Sprintf(format, args...)
		if os.Getenv("CI") != "" {
			t.Fatalf("pgtest: %s (CI is set, so this fails instead of skipping)", msg)
		}
		t.Skip("pgtest: " + msg)
	}
	bin, err := findBinDir()
	if err != nil {
		missing("PostgreSQL server binaries not found (Debian package postgresql): %v", err)
	}
	e := &env{binDir: bin, uid: os.Getuid(), gid: os.Getgid()}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			missing("running as root and there is no OS user postgres to run the servers as (Debian package postgresql creates it): %v", err)
		}
		uid, err1 := strconv.Atoi(u.Uid)
		gid, err2 := strconv.Atoi(u.Gid)
		if err1 != nil || err2 != nil {
			t.Fatalf("pgtest: OS user postgres has uid %q gid %q", u.Uid, u.Gid)
		}
		e.uid, e.gid = uid, gid
		e.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}
	}
	return e
}

// findBinDir returns a directory holding initdb, postgres, pg_ctl,
// pg_basebackup, pg_isready and psql: pg_config's bindir (pg_config may
// come from libpq-dev alone, so the directory is checked), else the
// highest version under /usr/lib/postgresql.
func findBinDir() (string, error) {
	need := []string{"initdb", "postgres", "pg_basebackup", "pg_isready", "psql"}
	complete := func(dir string) bool {
		for _, n := range need {
			if _, err := os.Stat(filepath.Join(dir, n)); err != nil {
				return false
			}
		}
		return true
	}
	var tried []string
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		dir := strings.TrimSpace(string(out))
		if complete(dir) {
			return dir, nil
		}
		tried = append(tried, dir)
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	// Highest major version first: "15" sorts after "9.6" by number.
	version := func(dir string) float64 {
		v, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(dir)), 64)
		return v
	}
	slices.SortFunc(dirs, func(a, b string) int {
		switch va, vb := version(a), version(b); {
		case va > vb:
			return -1
		case va < vb:
			return 1
		}
		return 0
	})
	for _, dir := range dirs {
		if complete(dir) {
			return dir, nil
		}
		tried = append(tried, dir)
	}
	return "", fmt.Errorf("no directory with %s among pg_config --bindir and /usr/lib/postgresql/*/bin (tried %q)",
		strings.Join(need, ", "), tried)
}

// The servers run the configuration that ships: deploy/postgres/primary.conf
// (and, on the standby, deploy/postgres/standby.conf after it), which
// setup-primary.sh and setup-standby.sh install on Debian. Reading the
// files here means the tests and the shipped setup cannot drift apart.
// Their listen_addresses gives way to the command line's 127.0.0.1.
const (
	primaryConfFile = "deploy/postgres/primary.conf"
	standbyConfFile = "deploy/postgres/standby.conf"
)

// testConf follows the shipped configuration in the primary's
// postgresql.conf (and, through pg_basebackup, the standby's): smaller and
// quicker than production where durability does not depend on it.
const testConf = `
# pgtest
max_connections = 200
shared_buffers = '32MB'
wal_keep_size = '64MB'
wal_sender_timeout = '10s'
wal_receiver_timeout = '10s'
log_min_messages = warning
log_line_prefix = '%m [%p] '
`

// shippedConf reads a file of deploy/postgres from the repository this
// package is in.
func shippedConf(name string) (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("cannot locate the repository (runtime.Caller)")
	}
	b, err := os.ReadFile(filepath.Join(filepath.Dir(file), "..", "..", filepath.FromSlash(name)))
	if err != nil {
		return "", fmt.Errorf("the shipped configuration: %w", err)
	}
	return "\n# " + name + "\n" + string(b), nil
}

// startCluster starts the servers; on an error it stops whatever it
// started and removes the directories.
func startCluster(e *env, o Options) (c *Cluster, err error) {
	dir, err := os.MkdirTemp("", "pgtest-")
	if err != nil {
		return nil, err
	}
	c = &Cluster{env: e, dir: dir}
	defer func() {
		if err != nil {
			c.close()
			c = nil
		}
	}()
	// MkdirTemp makes the directory 0700 for the current user; the
	// servers' user must get through it to their own directories.
	if err := os.Chmod(dir, 0o755); err != nil {
		return c, err
	}
	p, err := c.newServer("primary")
	if err != nil {
		return c, err
	}
	c.Primary = p
	if err := e.run(p.dir, "initdb", "-D", p.dataDir, "-U", "postgres", "--auth=trust",
		"--encoding=UTF8", "--locale=C", "--no-instructions",
		// The catalog initdb writes only has to survive process crashes,
		// which the page cache does; the servers themselves run with
		// fsync on.
		"--no-sync"); err != nil {
		return c, err
	}
	conf, err := shippedConf(primaryConfFile)
	if err != nil {
		return c, err
	}
	conf += testConf
	if !o.Standby {
		// No standby to wait for.
		conf += "synchronous_standby_names = ''\n"
	}
	if err := appendFile(filepath.Join(p.dataDir, "postgresql.conf"), conf); err != nil {
		return c, err
	}
	if err := p.startFreshPort(); err != nil {
		return c, err
	}
	if !o.Standby {
		return c, nil
	}
	s, err := c.newServer("standby")
	if err != nil {
		return c, err
	}
	c.Standby = s
	upstream := fmt.Sprintf("host=127.0.0.1 port=%d", p.port)
	if o.ReplicationProxy {
		rp, err := faultproxy.Start(fmt.Sprintf("127.0.0.1:%d", p.port))
		if err != nil {
			return c, err
		}
		c.Replication = rp
		host, port, _ := net.SplitHostPort(rp.Addr())
		upstream = fmt.Sprintf("host=%s port=%s", host, port)
	}
	// -C -S: a replication slot keeps the WAL the standby has not got yet,
	// however long it is down. -R: standby.signal and primary_conninfo,
	// which carries application_name, the name the primary waits for.
	if err := e.run(s.dir, "pg_basebackup", "-D", s.dataDir,
		"-d", fmt.Sprintf("%s user=postgres application_name=%s", upstream, standbyName),
		"-C", "-S", standbyName, "-R", "-X", "stream", "-c", "fast", "--no-sync"); err != nil {
		return c, err
	}
	// The copied postgresql.conf has the primary's settings; the standby's
	// follow them (the later line wins), as on Debian, where
	// setup-standby.sh installs standby.conf.
	sconf, err := shippedConf(standbyConfFile)
	if err != nil {
		return c, err
	}
	if err := appendFile(filepath.Join(s.dataDir, "postgresql.conf"), sconf); err != nil {
		return c, err
	}
	if err := s.startFreshPort(); err != nil {
		return c, err
	}
	if err := c.waitSync(); err != nil {
		return c, err
	}
	return c, nil
}

// newServer makes the directory of one server, owned by the servers' user.
func (c *Cluster) newServer(name string) (*Server, error) {
	dir := filepath.Join(c.dir, name)
	s := &Server{
		name:    name,
		env:     c.env,
		dir:     dir,
		dataDir: filepath.Join(dir, "data"),
		logPath: filepath.Join(dir, "postgres.log"),
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, err
	}
	if err := os.Chown(dir, c.env.uid, c.env.gid); err != nil {
		return nil, err
	}
	return s, nil
}

// close stops both servers and removes their directories.
func (c *Cluster) close() {
	for _, s := range []*Server{c.Standby, c.Primary} {
		if s != nil {
			_ = s.stop()
		}
	}
	if c.Replication != nil {
		c.Replication.Close()
	}
	_ = os.RemoveAll(c.dir)
}

// NewDatabase creates a database with a name of its own on the primary and
// returns its DSN. The database is dropped when the test ends.
func (c *Cluster) NewDatabase(t testing.TB) string {
	t.Helper()
	name := databaseName(t.Name())
	if _, err := c.Primary.psql("postgres", "CREATE DATABASE "+name); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	t.Cleanup(func() {
		// Best effort: the primary may be stopped or gone by now. The drop
		// does not wait for the standby, which may be down, and ends
		// sessions the test left open.
		_, _ = c.Primary.psqlEnv([]string{"PGOPTIONS=-c synchronous_commit=local"},
			"postgres", "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
	})
	return c.Primary.DSN(name)
}

var dbSeq atomic.Int64

// databaseName makes an identifier from a test name: lower case letters,
// digits and underscores, unique in this process, within PostgreSQL's 63
// bytes.
func databaseName(test string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(test) {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	base := b.String()
	if len(base) > 40 {
		base = base[:40]
	}
	return fmt.Sprintf("t%d_%d_%s", os.Getpid(), dbSeq.Add(1), base)
}

// WaitSync waits until the primary reports the standby as connected and
// synchronous, for example after the standby was restarted.
func (c *Cluster) WaitSync(t testing.TB) {
	t.Helper()
	if err := c.waitSync(); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
}

func (c *Cluster) waitSync() error {
	if c.Standby == nil {
		return errors.New("WaitSync: the cluster has no standby")
	}
	q := "SELECT sync_state FROM pg_stat_replication WHERE application_name = '" + standbyName + "'"
	deadline := time.Now().Add(readyTimeout)
	last := ""
	for {
		out, err := c.Primary.psql("postgres", q)
		if err == nil && out == "sync" {
			return nil
		}
		if err != nil {
			last = err.Error()
		} else {
			last = fmt.Sprintf("sync_state %q", out)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("standby %s not synchronous after %v (last: %s)\nstandby log:\n%s",
				standbyName, readyTimeout, last, c.Standby.logTail())
		}
		time.Sleep(pollInterval)
	}
}

// Promote makes the standby a primary and waits until it accepts writes.
// It stays c.Standby; it waits for no standby of its own.
func (c *Cluster) Promote(t testing.TB) {
	t.Helper()
	if c.Standby == nil {
		t.Fatal("pgtest: Promote: the cluster has no standby")
	}
	s := c.Standby
	if _, err := s.psql("postgres", "SELECT pg_promote(true, 60)"); err != nil {
		t.Fatalf("pgtest: promote: %v", err)
	}
	deadline := time.Now().Add(readyTimeout)
	for {
		// txid_current assigns a transaction id, which a server in
		// recovery refuses.
		_, err := s.psql("postgres", "SELECT txid_current()")
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pgtest: promoted standby takes no writes after %v: %v", readyTimeout, err)
		}
		time.Sleep(pollInterval)
	}
}

// Port is the server's loopback TCP port.
func (s *Server) Port() int { return s.port }

// DSN is the URL of database db on the server, as user postgres with
// trust authentication.
func (s *Server) DSN(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", s.port, db)
}

// PID is the postmaster's process id, 0 while the server is stopped.
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc == nil {
		return 0
	}
	return s.proc.cmd.Process.Pid
}

// Start starts the stopped or killed server again on the same port and
// data directory and waits until it accepts connections (after a kill,
// once crash recovery is done).
func (s *Server) Start(t testing.TB) {
	t.Helper()
	if err := s.start(); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
}

// Stop shuts the server down fast (SIGINT: sessions are ended, the
// checkpoint written) and waits for it to exit.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	if err := s.stop(); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
}

// Kill sends SIGKILL to the postmaster and all its backends at once, as a
// crash would, and waits for the postmaster to exit.
func (s *Server) Kill(t testing.TB) {
	t.Helper()
	p := s.take()
	if p == nil {
		t.Fatalf("pgtest: Kill: %s is not running", s.name)
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
	p.log.Close()
}

// take removes the running process from s, nil if none.
func (s *Server) take() *process {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.proc
	s.proc = nil
	return p
}

func (s *Server) stop() error {
	p := s.take()
	if p == nil {
		return nil
	}
	defer p.log.Close()
	// A test may have left the server stopped with SIGSTOP; a stopped
	// process would not act on the SIGINT.
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGCONT)
	_ = p.cmd.Process.Signal(syscall.SIGINT)
	select {
	case <-p.done:
		return nil
	case <-time.After(stopTimeout):
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("%s did not shut down within %v; killed it\nlog:\n%s", s.name, stopTimeout, s.logTail())
	}
}

// startFreshPort starts the server for the first time on a free port,
// trying another if someone else took the port between choosing and
// binding it.
func (s *Server) startFreshPort() error {
	var err error
	for range 3 {
		if s.port, err = freePort(); err != nil {
			return err
		}
		if err = s.start(); err == nil || !errors.Is(err, errPortTaken) {
			return err
		}
	}
	return err
}

var errPortTaken = errors.New("port taken")

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// start launches postgres and waits until it accepts connections. After a
// kill, backends of the old postmaster may still hold its shared memory
// for a moment, and postgres refuses to start over it: start retries that.
func (s *Server) start() error {
	s.mu.Lock()
	running := s.proc != nil
	s.mu.Unlock()
	if running {
		return fmt.Errorf("Start: %s is already running", s.name)
	}
	deadline := time.Now().Add(readyTimeout)
	for {
		p, err := s.launch()
		if err != nil {
			return err
		}
		err = s.waitReady(p, deadline)
		if err == nil {
			s.mu.Lock()
			s.proc = p
			s.mu.Unlock()
			return nil
		}
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
		p.log.Close()
		tail := s.logTail()
		if strings.Contains(tail, "could not bind") {
			return fmt.Errorf("%s: %w: %v\nlog:\n%s", s.name, errPortTaken, err, tail)
		}
		if strings.Contains(tail, "pre-existing shared memory block") && time.Now().Before(deadline) {
			time.Sleep(pollInterval)
			continue
		}
		return fmt.Errorf("%s: %v\nlog:\n%s", s.name, err, tail)
	}
}

// launch starts the postmaster in a process group of its own (so Kill
// reaches its backends too), writing its log to s.logPath.
func (s *Server) launch() (*process, error) {
	log, err := os.OpenFile(s.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := s.env.command(s.dir, "postgres", "-D", s.dataDir, "-p", strconv.Itoa(s.port),
		"-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="+s.dir)
	// A file, not a pipe: the backends inherit it, and Wait would wait
	// for them to close a pipe.
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr.Setpgid = true
	if err := cmd.Start(); err != nil {
		log.Close()
		return nil, fmt.Errorf("start %s: %w", s.name, err)
	}
	p := &process{cmd: cmd, log: log, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// waitReady polls pg_isready until the server accepts connections, the
// process exits or the deadline passes.
func (s *Server) waitReady(p *process, deadline time.Time) error {
	isready := filepath.Join(s.env.binDir, "pg_isready")
	for {
		select {
		case <-p.done:
			return fmt.Errorf("postgres exited: %v", p.err)
		default:
		}
		cmd := exec.Command(isready, "-q", "-h", "127.0.0.1", "-p", strconv.Itoa(s.port), "-U", "postgres", "-d", "postgres", "-t", "1")
		cmd.Env = cleanEnv()
		if cmd.Run() == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not accepting connections after %v", readyTimeout)
		}
		time.Sleep(pollInterval)
	}
}

// psql runs one statement in database db and returns its output, unaligned
// and without headers.
func (s *Server) psql(db, sql string) (string, error) {
	out, err := s.psqlEnv(nil, db, sql)
	return out.stdout, err
}

// psqlOutput is what psql printed: the result on stdout, notices and
// warnings on stderr.
type psqlOutput struct{ stdout, stderr string }

// psqlEnv runs psql with extraEnv added to its environment (PGOPTIONS sets
// parameters of the session).
func (s *Server) psqlEnv(extraEnv []string, db, sql string) (psqlOutput, error) {
	ctx, cancel := context.WithTimeout(context.Background(), psqlTimeout)
	defer cancel()
	conn := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres dbname=%s connect_timeout=5", s.port, db)
	cmd := exec.CommandContext(ctx, filepath.Join(s.env.binDir, "psql"),
		"-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", conn, "-c", sql)
	cmd.Env = append(cleanEnv(), extraEnv...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	out := psqlOutput{strings.TrimSpace(stdout.String()), strings.TrimSpace(stderr.String())}
	if err != nil {
		return out, fmt.Errorf("psql on %s (port %d): %s: %v: %s", s.name, s.port, sql, err, out.stderr)
	}
	return out, nil
}

// logTail is the end of the server's log, for error messages.
func (s *Server) logTail() string {
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > 30 {
		lines = lines[len(lines)-30:]
	}
	return strings.Join(lines, "\n")
}

// command prepares a binary from the bin directory to run as the servers'
// user in dir. It gets SIGKILL when the test binary dies, so no server
// outlives the tests.
func (e *env) command(dir, name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(e.binDir, name), args...)
	cmd.Dir = dir
	cmd.Env = cleanEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: e.cred, Pdeathsig: syscall.SIGKILL}
	return cmd
}

// run runs a binary to completion, its output in the error.
func (e *env) run(dir, name string, args ...string) error {
	cmd := e.command(dir, name, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v\n%s", name, err, out)
	}
	return nil
}

// cleanEnv is the environment without PG* variables, which would point
// libpq and the servers elsewhere.
func cleanEnv() []string {
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "PG") })
	return append(env, "LC_ALL=C")
}

func appendFile(path, text string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(text); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
