// Package deploytest lets tests run the files in deploy/ as shipped: it
// finds the external program a test needs (nginx, haproxy, caddy; a skip
// without it, a failure under CI), renders a shipped file with exact-string
// substitutions that must each match (so a test fails loudly when the file
// changes shape instead of testing something else), issues TLS
// certificates from a throwaway CA, and runs the program with its output
// kept for the test log.
package deploytest

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/csv"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Strict reports whether a missing program fails the test instead of
// skipping it: under CI (CI set) and with DEPLOY_CHECK_STRICT=1, as
// deploy/check.sh does; .ci/run installs every program.
func Strict() bool {
	return os.Getenv("CI") != "" || os.Getenv("DEPLOY_CHECK_STRICT") == "1"
}

// Binary returns the path of program name, or skips the test saying which
// Debian package has it (fails it under Strict).
func Binary(t testing.TB, name, debianPackage string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := fmt.Sprintf("%s is not installed (Debian package %s; .ci/run installs it)", name, debianPackage)
	if Strict() {
		t.Fatalf("%s; CI or DEPLOY_CHECK_STRICT=1 is set, so this fails instead of skipping", msg)
	}
	t.Skip(msg)
	return ""
}

// Root returns the repository root: the nearest directory upwards from the
// working directory that holds deploy/ and the go.mod of module
// d2m-mediator (tests run in their package's directory).
func Root(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		mod, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.HasPrefix(mod, []byte("module d2m-mediator\n")) {
			if st, err := os.Stat(filepath.Join(dir, "deploy")); err == nil && st.IsDir() {
				return dir
			}
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("deploytest: no repository root (go.mod of d2m-mediator with deploy/) above the working directory")
		}
		dir = parent
	}
}

// Sub is one substitution in a shipped file: Old must occur exactly N
// times (N 0 means once).
type Sub struct {
	Old, New string
	N        int
}

// S is a substitution of a string that must occur exactly once.
func S(old, new string) Sub { return Sub{Old: old, New: new} }

// Render reads rel (relative to the repository root) and applies subs in
// order. Each Old must occur exactly N times at the moment it is applied,
// or the test fails naming the file and the string: a shipped file that
// changed shape must change its test too.
func Render(t testing.TB, rel string, subs ...Sub) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(Root(t), rel))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for _, sub := range subs {
		want := max(sub.N, 1)
		if got := strings.Count(s, sub.Old); got != want {
			t.Fatalf("%s: %q occurs %d times, the test expects %d: the shipped file changed shape, adapt its test", rel, sub.Old, got, want)
		}
		s = strings.ReplaceAll(s, sub.Old, sub.New)
	}
	return s
}

// FreeAddr returns a loopback address with a port that was free a moment
// ago, for programs that take their listen address from a config file.
func FreeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// Port returns the port of a host:port address.
func Port(addr string) string {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		panic(err)
	}
	return p
}

// CA is a throwaway certificate authority.
type CA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	Pool *x509.CertPool // holds only this CA
}

// NewCA generates a CA valid for an hour.
func NewCA(t testing.TB) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "d2m-mediator test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &CA{cert: cert, key: key, Pool: pool}
}

// Cert is a server certificate issued by a CA, written to files.
type Cert struct {
	ChainFile string // leaf then CA certificate (nginx's fullchain.pem)
	KeyFile   string
	Combined  string // chain and key in one file (HAProxy's crt)
}

// Issue writes a server certificate for hosts (IP addresses or names) into
// dir.
func (ca *CA) Issue(t testing.TB, dir string, hosts ...string) Cert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: hosts[0]},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	chain := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})...)
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
	c := Cert{
		ChainFile: filepath.Join(dir, "fullchain.pem"),
		KeyFile:   filepath.Join(dir, "privkey.pem"),
		Combined:  filepath.Join(dir, "combined.pem"),
	}
	for f, b := range map[string][]byte{c.ChainFile: chain, c.KeyFile: keyPEM, c.Combined: append(chain, keyPEM...)} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// Client returns an HTTP client that trusts only the CA (for wss:// dials
// through a proxy: d2mclient.Config.HTTPClient).
func (ca *CA) Client() *http.Client {
	return &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: ca.Pool, MinVersion: tls.VersionTLS12},
		Proxy:           nil,
	}}
}

// Process is a running external program.
type Process struct {
	Name string
	cmd  *exec.Cmd
	done chan struct{}

	mu    sync.Mutex
	out   bytes.Buffer
	lines []string
	seen  chan struct{} // closed and replaced on every new line
}

// Start runs cmd, keeps its stdout and stderr, logs them when the test
// fails and ends the process (SIGTERM, then SIGKILL after 10 s) when the
// test ends.
func Start(t testing.TB, name string, cmd *exec.Cmd) *Process {
	t.Helper()
	p := &Process{Name: name, cmd: cmd, done: make(chan struct{}), seen: make(chan struct{})}
	r, w := io.Pipe()
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.out.WriteString(sc.Text() + "\n")
			p.lines = append(p.lines, sc.Text())
			close(p.seen)
			p.seen = make(chan struct{})
			p.mu.Unlock()
		}
		io.Copy(io.Discard, r)
	}()
	go func() {
		cmd.Wait()
		w.Close()
		<-copied
		close(p.done)
	}()
	t.Cleanup(func() {
		p.Stop(10 * time.Second)
		if t.Failed() {
			t.Logf("%s output:\n%s", name, p.Output())
		}
	})
	return p
}

// Output returns everything the process wrote so far.
func (p *Process) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

// Done is closed when the process has exited and its output is read.
func (p *Process) Done() <-chan struct{} { return p.done }

// ExitCode is the exit status after Done (-1 for a signal).
func (p *Process) ExitCode() int { return p.cmd.ProcessState.ExitCode() }

// Signal sends sig to the process.
func (p *Process) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// Stop sends SIGTERM and waits up to grace, then SIGKILL. It reports
// whether the process ended within the grace period.
func (p *Process) Stop(grace time.Duration) bool {
	select {
	case <-p.done:
		return true
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return true
	case <-time.After(grace):
		p.cmd.Process.Kill()
		<-p.done
		return false
	}
}

// WaitLine waits until the process has written a line for which match
// holds (at most timeout) and returns it; lines already written count.
func (p *Process) WaitLine(t testing.TB, timeout time.Duration, what string, match func(string) bool) string {
	t.Helper()
	deadline := time.After(timeout)
	next := 0
	for {
		p.mu.Lock()
		lines, seen := p.lines[next:], p.seen
		next = len(p.lines)
		p.mu.Unlock()
		for _, l := range lines {
			if match(l) {
				return l
			}
		}
		select {
		case <-seen:
		case <-p.done:
			t.Fatalf("%s exited (%v) while the test waited for %s:\n%s", p.Name, p.cmd.ProcessState, what, p.Output())
		case <-deadline:
			t.Fatalf("%s: no %s within %v:\n%s", p.Name, what, timeout, p.Output())
		}
	}
}

// WaitTCP waits until addr accepts TCP connections, failing the test if
// the process exits first or timeout passes.
func (p *Process) WaitTCP(t testing.TB, addr string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-p.done:
			t.Fatalf("%s exited before listening on %s:\n%s", p.Name, addr, p.Output())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: nothing listens on %s after %v:\n%s", p.Name, addr, timeout, p.Output())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var maxconnLine = regexp.MustCompile(`(?m)^\s*maxconn\s+(\d+)\s*$`)

// HAProxyArgs returns extra haproxy arguments for a configuration whose
// global maxconn needs more file descriptors (two per connection) than the
// hard limit allows here, where HAProxy cannot raise it (a container
// without CAP_SYS_RESOURCE) and refuses to start (strict-limits, its
// default): "-n N", which takes priority over maxconn, with N fitting the
// limit. Nil where the limit suffices. It changes the connection limit
// only, never the routing under test, and logs that it did.
func HAProxyArgs(t testing.TB, cfg string) []string {
	t.Helper()
	m := maxconnLine.FindStringSubmatch(cfg)
	if m == nil {
		return nil
	}
	maxconn, _ := strconv.Atoi(m[1])
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		t.Fatal(err)
	}
	const reserve = 1000 // listeners, checks, sockets
	if uint64(2*maxconn+reserve) <= rl.Max || os.Geteuid() == 0 && canRaiseNOFILE(uint64(2*maxconn+reserve)) {
		return nil
	}
	n := (int(rl.Max) - reserve) / 2
	t.Logf("the hard file descriptor limit (%d) is below what maxconn %d needs and cannot be raised here: haproxy -n %d", rl.Max, maxconn, n)
	return []string{"-n", strconv.Itoa(n)}
}

// canRaiseNOFILE reports whether this process may raise its hard
// RLIMIT_NOFILE to n (as HAProxy started as root would), by trying it in a
// child that exits at once.
func canRaiseNOFILE(n uint64) bool {
	return exec.Command("sh", "-c", fmt.Sprintf("ulimit -Hn %d", n)).Run() == nil
}

// WaitHAProxyServer waits until the HAProxy whose runtime API listens on
// socket reports server svname of backend pxname in state want: status and
// check_status of `show stat`, e.g. "UP L7OK" (an HTTP check passed), "UP
// L4OK" (a TCP connect passed), "DOWN L4CON" (connection refused).
func WaitHAProxyServer(t testing.TB, socket, pxname, svname, want string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var last string
	for {
		out, err := haproxyCommand(socket, "show stat")
		if err == nil {
			last = "not in show stat"
			rows, _ := csv.NewReader(strings.NewReader(strings.TrimPrefix(out, "# "))).ReadAll()
			if len(rows) > 0 {
				col := map[string]int{}
				for i, h := range rows[0] {
					col[h] = i
				}
				for _, r := range rows[1:] {
					if len(r) > col["check_status"] && r[col["pxname"]] == pxname && r[col["svname"]] == svname {
						last = r[col["status"]] + " " + r[col["check_status"]]
					}
				}
			}
			if last == want {
				return
			}
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			t.Fatalf("haproxy %s/%s: %s, want %s", pxname, svname, last, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func haproxyCommand(socket, cmd string) (string, error) {
	c, err := net.DialTimeout("unix", socket, 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}
