package integration

import (
	"bytes"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"d2m-mediator/chatproxy/csp"
	"d2m-mediator/chatproxy/cspclient"
	"d2m-mediator/cluster"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/internal/deploytest"
)

// The shipped TLS proxies (deploy/nginx, deploy/haproxy, deploy/caddy) are
// tested by using them: each test runs the real proxy from the shipped file
// with only addresses, ports and certificate paths substituted (every
// substitution must match exactly, see deploytest.Render), TLS terminated
// at the proxy with a certificate from a CA made in the test, and real
// devices behind it.

// devicePathPatterns finds the device path pattern in each shipped file.
var devicePathPatterns = []struct {
	file string
	find *regexp.Regexp
}{
	{"deploy/nginx/mediator.conf", regexp.MustCompile(`location ~ "([^"]+)"`)},
	{"deploy/haproxy/haproxy.cfg", regexp.MustCompile(`\{ path -m reg (\S+) \}`)},
	{"deploy/haproxy/haproxy-cluster.cfg", regexp.MustCompile(`\{ path -m reg (\S+) \}`)},
	{"deploy/caddy/Caddyfile", regexp.MustCompile(`@device path_regexp (\S+)`)},
}

// TestDeployPathPatternMatchesDeviceURL: the path a device sends, as
// d2mclient builds it, passes every shipped proxy's pattern (and iOS's
// "//" and upper case), and its first segment is the shard key of the
// cluster's HAProxy map; anything else is refused. The patterns are plain
// character classes, quantifiers and anchors, read the same by Go's RE2,
// nginx's and HAProxy's PCRE and Caddy's RE2.
func TestDeployPathPatternMatchesDeviceURL(t *testing.T) {
	root := deploytest.Root(t)
	var pattern string
	for _, p := range devicePathPatterns {
		b, err := os.ReadFile(filepath.Join(root, p.file))
		if err != nil {
			t.Fatal(err)
		}
		m := p.find.FindAllStringSubmatch(string(b), -1)
		if len(m) != 1 {
			t.Fatalf("%s: %d device path patterns (%s), want 1", p.file, len(m), p.find)
		}
		if pattern == "" {
			pattern = m[0][1]
		} else if m[0][1] != pattern {
			t.Fatalf("%s: pattern %q differs from %s's %q", p.file, m[0][1], devicePathPatterns[0].file, pattern)
		}
	}
	re := regexp.MustCompile(pattern)
	// The cluster form looks the shard up by this expression.
	cfg, _ := os.ReadFile(filepath.Join(root, "deploy/haproxy/haproxy-cluster.cfg"))
	if !strings.Contains(string(cfg), "use_backend %[path,field(2,/),lower,map(") {
		t.Fatal("haproxy-cluster.cfg: no use_backend by path,field(2,/),lower,map(…)")
	}
	haproxyKey := func(path string) string { return strings.ToLower(strings.Split(path, "/")[1]) } // field(2,/)

	seen := map[byte]bool{}
	for range 600 {
		g := newGroup()
		id := g.keys.DeviceGroupID()
		u, err := url.Parse(d2mclient.URLFor("wss://mediator.example.org", g.keys, ""))
		if err != nil {
			t.Fatal(err)
		}
		seg := strings.Split(u.Path, "/")[1]
		if want := fmt.Sprintf("%02x", id[0]); seg != want {
			t.Fatalf("device URL %s: first segment %q, want the group id's first byte %s", u, seg, want)
		}
		seen[id[0]] = true
		ios := strings.Replace(u.Path, seg+"/", seg+"//", 1)
		for _, path := range []string{u.Path, ios, strings.ToUpper(u.Path)} {
			if !re.MatchString(path) {
				t.Fatalf("the shipped pattern %q refuses the device path %s", pattern, path)
			}
			if k := haproxyKey(path); k != cluster.Shard(id[0]).String() {
				t.Fatalf("path %s: haproxy looks up %q, the cluster's map has %q", path, k, cluster.Shard(id[0]).String())
			}
		}
	}
	if len(seen) < 200 {
		t.Fatalf("600 groups covered only %d first bytes", len(seen))
	}
	info := d2m.EncodeClientURLInfo(d2m.ClientURLInfo{ServerGroup: "7f"})
	for _, path := range []string{"/", "/readyz", "/metrics", "/cluster/haproxy.map", "/2a", "/2a/", "/2a/xyz",
		"/0a1b2c3d/" + info, // the 8-hex-digit form no device sends
		"/a/" + info, "/2a/" + info + "/"} {
		if re.MatchString(path) {
			t.Errorf("the shipped pattern %q accepts %s", pattern, path)
		}
	}
}

// carryDevices drives real devices through a TLS proxy at urls (wss://,
// trusted through ca): two devices of one group complete the handshake,
// one reflects and the other receives it, one logs in to the stand-in
// chat server and gets its echo back; an iOS-style "//" URL gets the
// ServerHello; a path that is not a device's gets the proxy's 404.
func carryDevices(t *testing.T, s *server, ca *deploytest.CA, urls ...string) {
	t.Helper()
	hc := ca.Client()
	g := newGroup()
	cfg := func(dev uint64, u string) d2mclient.Config {
		c := g.config(s, dev)
		c.URL, c.HTTPClient = u, hc
		return c
	}
	a, _ := connectReady(t, s, cfg(1, urls[0]))
	b, _ := connectReady(t, s, cfg(2, urls[len(urls)-1]))
	env := []byte("reflected through the proxy")
	id, err := a.Reflect(ctxT(t, 5*time.Second), env, 0)
	if err != nil {
		t.Fatal(err)
	}
	expectAck(t, a, id)
	r, err := d2m.DecodeReflected(recvType(t, b.Conn, d2m.TypeReflected))
	if err != nil || !bytes.Equal(r.Envelope, env) {
		t.Fatalf("the second device got %q (%v), want %q", r.Envelope, err, env)
	}
	b.AckReflected(ctxT(t, time.Second), r.ID)

	x, _ := cspclient.NewIdentity("XXXXXXXX")
	cx := cspLogin(t, b, x, stubPublicKey(t, s))
	if err := cx.Echo([]byte("ping via proxy")); err != nil {
		t.Fatal(err)
	}
	if data, err := cx.RecvType(ctxT(t, 5*time.Second), csp.PayloadType(0x80)); err != nil || string(data) != "ping via proxy" {
		t.Fatalf("echo through the proxy: %q %v", data, err)
	}

	seg := fmt.Sprintf("%02x", g.keys.DeviceGroupID()[0])
	ios := strings.Replace(d2mclient.URLFor(urls[0], g.keys, ""), "/"+seg+"/", "/"+seg+"//", 1)
	c, _, err := d2mclient.DialRaw(ctxT(t, 10*time.Second), ios, hc)
	if err != nil {
		t.Fatalf("%s: %v", ios, err)
	}
	defer c.CloseNow()
	if m, err := c.Recv(ctxT(t, 10*time.Second)); err != nil || m.Type != d2m.TypeServerHello {
		t.Fatalf("%s: got %v %v, want ServerHello", ios, m.Type, err)
	}

	resp, err := hc.Get(strings.Replace(urls[0], "wss://", "https://", 1) + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 404 {
		t.Fatalf("GET /readyz through the proxy: %d, want the proxy's 404 (the mediator would answer 400)", resp.StatusCode)
	}
}

func hostPort(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		panic(err)
	}
	return p.Host
}

// TestDeployNginx runs deploy/nginx/mediator.conf in nginx.
func TestDeployNginx(t *testing.T) {
	bin := deploytest.Binary(t, "nginx", "nginx")
	s := startServer(t)
	dir := t.TempDir()
	os.Chmod(dir, 0o755) // nginx's workers run as another user when started as root
	ca := deploytest.NewCA(t)
	crt := ca.Issue(t, dir, "127.0.0.1")
	a1, a2 := deploytest.FreeAddr(t), deploytest.FreeAddr(t)
	conf := deploytest.Render(t, "deploy/nginx/mediator.conf",
		deploytest.S("listen 443 ssl;", "listen "+a1+" ssl;"),
		deploytest.S("listen [::]:443 ssl;", "listen "+a2+" ssl;"),
		deploytest.S("/etc/ssl/mediator/fullchain.pem", crt.ChainFile),
		deploytest.S("/etc/ssl/mediator/privkey.pem", crt.KeyFile),
		deploytest.S("server 127.0.0.1:8765;", "server "+hostPort(s.wsURL)+";"))
	write(t, filepath.Join(dir, "mediator.conf"), conf)
	// The main configuration is the operator's (Debian's nginx.conf); the
	// shipped file goes into its http {} block.
	write(t, filepath.Join(dir, "nginx.conf"), fmt.Sprintf(`pid %[1]s/nginx.pid;
error_log stderr notice;
worker_processes 1;
events {}
http {
    access_log off;
    client_body_temp_path %[1]s/body;
    proxy_temp_path %[1]s/proxy;
    fastcgi_temp_path %[1]s/fastcgi;
    uwsgi_temp_path %[1]s/uwsgi;
    scgi_temp_path %[1]s/scgi;
    include %[1]s/mediator.conf;
}
`, dir))
	p := deploytest.Start(t, "nginx", exec.Command(bin, "-e", "stderr", "-p", dir, "-c", filepath.Join(dir, "nginx.conf"), "-g", "daemon off;"))
	p.WaitTCP(t, a1, 10*time.Second)
	p.WaitTCP(t, a2, 10*time.Second)
	carryDevices(t, s, ca, "wss://"+a1, "wss://"+a2)
}

// TestDeployHAProxy runs deploy/haproxy/haproxy.cfg in HAProxy; its health
// check (/readyz on the admin port) passes against the running mediator.
func TestDeployHAProxy(t *testing.T) {
	bin := deploytest.Binary(t, "haproxy", "haproxy")
	s := startServer(t)
	dir := t.TempDir()
	ca := deploytest.NewCA(t)
	crt := ca.Issue(t, dir, "127.0.0.1")
	a1, a2 := deploytest.FreeAddr(t), deploytest.FreeAddr(t)
	sock := filepath.Join(dir, "admin.sock")
	cfg := deploytest.Render(t, "deploy/haproxy/haproxy.cfg",
		deploytest.S("stats socket /run/haproxy/admin.sock ", "stats socket "+sock+" "),
		deploytest.S("bind :443 ssl", "bind "+a1+" ssl"),
		deploytest.S("bind :::443 ssl", "bind "+a2+" ssl"),
		deploytest.Sub{Old: "/etc/haproxy/certs/mediator.pem", New: crt.Combined, N: 3}, // two binds and a comment,
		deploytest.S("127.0.0.1:8765 check port 8766", hostPort(s.wsURL)+" check port "+deploytest.Port(hostPort(s.admin))))
	write(t, filepath.Join(dir, "haproxy.cfg"), cfg)
	args := append([]string{"-db", "-f", filepath.Join(dir, "haproxy.cfg")}, deploytest.HAProxyArgs(t, cfg)...)
	p := deploytest.Start(t, "haproxy", exec.Command(bin, args...))
	p.WaitTCP(t, a1, 10*time.Second)
	p.WaitTCP(t, a2, 10*time.Second)
	deploytest.WaitHAProxyServer(t, sock, "mediator", "mediator1", "UP L7OK") // /readyz on the admin port
	carryDevices(t, s, ca, "wss://"+a1, "wss://"+a2)
}

// TestDeployCaddy runs deploy/caddy/Caddyfile in Caddy with the own-
// certificate line the file offers instead of automatic HTTPS, hermetic:
// its HOME and XDG directories are the test's, no ACME, no network.
func TestDeployCaddy(t *testing.T) {
	bin := deploytest.Binary(t, "caddy", "caddy")
	s := startServer(t)
	dir := t.TempDir()
	ca := deploytest.NewCA(t)
	crt := ca.Issue(t, dir, "127.0.0.1")
	admin, httpAddr, httpsAddr := deploytest.FreeAddr(t), deploytest.FreeAddr(t), deploytest.FreeAddr(t)
	cfg := deploytest.Render(t, "deploy/caddy/Caddyfile",
		deploytest.S("admin localhost:2019", "admin "+admin),
		deploytest.S("http_port 80", "http_port "+deploytest.Port(httpAddr)),
		deploytest.S("https_port 443", "https_port "+deploytest.Port(httpsAddr)),
		deploytest.S("mediator.example.org {", "127.0.0.1 {"),
		deploytest.S("# tls /etc/ssl/mediator/fullchain.pem /etc/ssl/mediator/privkey.pem", "tls "+crt.ChainFile+" "+crt.KeyFile),
		deploytest.S("reverse_proxy 127.0.0.1:8765", "reverse_proxy "+hostPort(s.wsURL)))
	file := filepath.Join(dir, "Caddyfile")
	write(t, file, cfg)
	home := filepath.Join(dir, "home")
	cmd := exec.Command(bin, "run", "--adapter", "caddyfile", "--config", file)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + home,
		"XDG_DATA_HOME=" + filepath.Join(home, "data"), "XDG_CONFIG_HOME=" + filepath.Join(home, "config")}
	p := deploytest.Start(t, "caddy", cmd)
	p.WaitTCP(t, httpsAddr, 15*time.Second)
	p.WaitLine(t, 10*time.Second, "the certificate taken from the file", func(l string) bool {
		return strings.Contains(l, "skipping automatic certificate management")
	})
	carryDevices(t, s, ca, "wss://"+httpsAddr)
	if _, err := os.Stat(filepath.Join(home, "config", "caddy", "autosave.json")); err != nil {
		t.Fatalf("caddy's state is not in the test's XDG_CONFIG_HOME: %v", err)
	}
	if out := p.Output(); strings.Contains(strings.ToLower(out), "acme") {
		t.Fatalf("caddy tried ACME:\n%s", out)
	}
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
