package integration

import (
	"debug/elf"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The container image as shipped, without a container runtime (none runs
// here, and no registry is reachable for its base images): the build
// stage's RUN line builds the binary as the image does, and the final
// stage's COPY, USER, ENV, STOPSIGNAL, ENTRYPOINT and CMD are carried out
// on a scratch root, with the -e settings of the header's first `docker
// run` example. Only paths and addresses are substituted: /out and the
// image's root become scratch directories, the listeners' 0.0.0.0 ports
// become free loopback ports, chat.example.org:5222 a stand-in chat server.

const dockerfile = "../deploy/docker/Dockerfile"

// dockerInstr is one Dockerfile instruction with its continuation lines
// joined.
type dockerInstr struct {
	stage int // 0: the build stage, 1: the final one
	op    string
	args  string
}

func parseDockerfile(t *testing.T) (instrs []dockerInstr, header string) {
	t.Helper()
	b, err := os.ReadFile(dockerfile)
	if err != nil {
		t.Fatal(err)
	}
	stage := -1
	var cur strings.Builder
	for _, l := range strings.Split(string(b), "\n") {
		trim := strings.TrimSpace(l)
		if strings.HasPrefix(trim, "#") {
			if stage < 0 {
				header += strings.TrimSpace(strings.TrimPrefix(trim, "#")) + "\n"
			}
			continue
		}
		if trim == "" && cur.Len() == 0 {
			continue
		}
		if s, ok := strings.CutSuffix(trim, `\`); ok {
			cur.WriteString(s + " ")
			continue
		}
		cur.WriteString(trim)
		line := cur.String()
		cur.Reset()
		op, args, _ := strings.Cut(line, " ")
		if op == "FROM" {
			stage++
		}
		instrs = append(instrs, dockerInstr{stage, op, strings.TrimSpace(args)})
	}
	if stage != 1 {
		t.Fatalf("%s: %d stages, want a build stage and a final one", dockerfile, stage+1)
	}
	return instrs, header
}

// TestDockerfileAsShipped: the image's build line makes a static binary;
// started as the image starts it (user 65532, the image's environment,
// CMD serve), it serves a phone and a desktop of one user through the
// chat server named by -e, the header's `docker exec … stats` works with
// the token the server wrote into its volume, and the STOPSIGNAL ends it
// with status 0 within `docker stop -t 30`.
func TestDockerfileAsShipped(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the image runs as user 65532 and its build stage chowns the data directory")
	}
	instrs, header := parseDockerfile(t)
	out := t.TempDir()
	root := t.TempDir()
	// The image's files are world-readable where the image has them so;
	// the scratch directories must be too, for user 65532.
	for _, d := range []string{filepath.Dir(root), root} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	sub := func(s string) string { return strings.ReplaceAll(s, "/out/", out+"/") }

	buildArgs := []string{"REVISION=dockerfile-test"}
	var env []string
	var user, stopSignal string
	var entrypoint, cmd []string
	for _, in := range instrs {
		switch {
		case in.stage == 0 && in.op == "RUN" && strings.Contains(in.args, "go build"):
			c := exec.Command("bash", "-euc", sub(in.args))
			c.Dir = ".." // WORKDIR /src after COPY . .
			c.Env = append(os.Environ(), buildArgs...)
			start := time.Now()
			if b, err := c.CombinedOutput(); err != nil {
				t.Fatalf("the image's build line: %v\n%s", err, b)
			}
			t.Logf("built as the image builds it in %v", time.Since(start).Round(time.Millisecond))
		case in.stage == 1 && in.op == "COPY":
			f := strings.Fields(in.args)
			var chown string
			var paths []string
			for _, a := range f {
				switch {
				case strings.HasPrefix(a, "--chown="):
					chown = strings.TrimPrefix(a, "--chown=")
				case strings.HasPrefix(a, "--from="):
				default:
					paths = append(paths, a)
				}
			}
			if len(paths) != 2 {
				t.Fatalf("COPY %s: want one source and one destination", in.args)
			}
			copyFromBuild(t, sub(paths[0]), filepath.Join(root, paths[1]), chown)
		case in.stage == 1 && in.op == "USER":
			user = in.args
		case in.stage == 1 && in.op == "ENV":
			env = append(env, strings.Fields(in.args)...)
		case in.stage == 1 && in.op == "STOPSIGNAL":
			stopSignal = in.args
		case in.stage == 1 && in.op == "ENTRYPOINT":
			if err := json.Unmarshal([]byte(in.args), &entrypoint); err != nil {
				t.Fatalf("ENTRYPOINT %s: %v", in.args, err)
			}
		case in.stage == 1 && in.op == "CMD":
			if err := json.Unmarshal([]byte(in.args), &cmd); err != nil {
				t.Fatalf("CMD %s: %v", in.args, err)
			}
		}
	}
	if user == "" || stopSignal != "SIGTERM" || len(entrypoint) == 0 || len(cmd) == 0 {
		t.Fatalf("final stage: USER %q, STOPSIGNAL %q, ENTRYPOINT %q, CMD %q", user, stopSignal, entrypoint, cmd)
	}
	bin := filepath.Join(root, entrypoint[0])
	if f, err := elf.Open(bin); err != nil {
		t.Fatal(err)
	} else {
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Fatalf("%s is dynamically linked: distroless/static has no loader", entrypoint[0])
			}
		}
		f.Close()
	}

	// The header's first `docker run`: its -e settings.
	run := regexp.MustCompile(`(?s)docker run .*?\n\n`).FindString(strings.ReplaceAll(header, "\\\n", " "))
	for _, m := range regexp.MustCompile(`-e (MEDIATOR_[A-Z_]+=\S+)`).FindAllStringSubmatch(run, -1) {
		env = append(env, m[1])
	}

	chatstub := buildBinary(t, "chatstub")
	ports := freePorts(t, 3)
	chat := startBackground(t, "chatstub", os.Environ(), chatstub, "--listen", ports[2], "--key-file", filepath.Join(t.TempDir(), "chatstub.key"))
	chatKey := strings.TrimPrefix(chat.waitLine(t, "public key: "), "public key: ")

	data := ""
	for i, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "MEDIATOR_DATA":
			data = filepath.Join(root, v)
			v = data
		case "MEDIATOR_LISTEN":
			v = strings.Replace(v, "0.0.0.0:8765", ports[0], 1)
		case "MEDIATOR_ADMIN_LISTEN":
			v = strings.Replace(v, "0.0.0.0:8766", ports[1], 1)
		case "MEDIATOR_CHAT_SERVER":
			v = strings.Replace(v, "chat.example.org:5222", ports[2], 1)
		}
		env[i] = k + "=" + v
	}
	if data == "" || !strings.Contains(strings.Join(env, " "), "MEDIATOR_CHAT_SERVER="+ports[2]) {
		t.Fatalf("environment %q: want MEDIATOR_DATA and the example's MEDIATOR_CHAT_SERVER", env)
	}
	uid, gid, _ := strings.Cut(user, ":")
	cred := func() *syscall.Credential {
		u, err1 := strconv.Atoi(uid)
		g, err2 := strconv.Atoi(gid)
		if err1 != nil || err2 != nil {
			t.Fatalf("USER %q: want numeric uid:gid", user)
		}
		return &syscall.Credential{Uid: uint32(u), Gid: uint32(g)}
	}()

	p := exec.Command(bin, append(entrypoint[1:], cmd...)...)
	p.Env = append([]string{"PATH=/usr/local/bin"}, env...)
	p.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	p.Dir = root // the final stage has no WORKDIR: /
	logR, logW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	p.Stdout, p.Stderr = logW, logW
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	logW.Close()
	lines := &lineLog{changed: make(chan struct{})}
	go lines.collect(logR)
	exited := make(chan struct{})
	go func() { p.Wait(); close(exited) }()
	t.Cleanup(func() {
		p.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("the image's process logged:\n%s", tailString(lines.text(), 6000))
		}
	})
	startup := lines.wait(t, 60*time.Second, exited, `.*"message":"mediator listening".*`)[0]
	for _, want := range []string{`"devices":"ws://` + ports[0] + `/"`, `"admin":"http://` + ports[1] + `/"`, `"data":"` + data + `"`} {
		if !strings.Contains(startup, want) {
			t.Fatalf("startup line %s: want %s", startup, want)
		}
	}

	phone, desktop := phoneAndDesktop(t, "ws://"+ports[0], chatKey, "through the image")

	// docker exec mediator mediator --admin-token-file /var/lib/mediator/admin.token stats
	exe := regexp.MustCompile(`docker exec mediator mediator (.*)`).FindStringSubmatch(header)
	if exe == nil {
		t.Fatalf("no `docker exec` example in the header of %s", dockerfile)
	}
	args := strings.Fields(strings.ReplaceAll(exe[1], "/var/lib/mediator", data))
	ex := exec.Command(bin, args...)
	ex.Env = append([]string{"PATH=/usr/local/bin", "MEDIATOR_ADMIN=" + ports[1]}, env...)
	ex.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	ex.Dir = root
	if b, err := ex.CombinedOutput(); err != nil || !strings.Contains(string(b), "authenticated") {
		t.Fatalf("the header's docker exec line: %v\n%s", err, b)
	}
	desktop.quit()
	phone.quit()

	// docker stop -t 30: STOPSIGNAL, then 30 s.
	p.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		t.Fatal("still running 30 s after SIGTERM (docker stop -t 30 would kill it)")
	}
	if code := p.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit status %d after SIGTERM", code)
	}
	if st, err := os.Stat(filepath.Join(data, "admin.token")); err != nil {
		t.Fatal(err)
	} else if sys := st.Sys().(*syscall.Stat_t); sys.Uid != cred.Uid || st.Mode().Perm() != 0o600 {
		t.Fatalf("admin.token in the volume: owner %d, mode %v; want %d and 0600", sys.Uid, st.Mode().Perm(), cred.Uid)
	}
}

// copyFromBuild carries out a COPY --from=build: a file keeps its mode; a
// directory is created with the source's mode; --chown=uid:gid sets the
// owner of what it creates.
func copyFromBuild(t *testing.T, src, dst, chown string) {
	t.Helper()
	st, err := os.Stat(src)
	if err != nil {
		t.Fatalf("COPY --from=build %s: %v", src, err)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		t.Fatal(err)
	}
	if st.IsDir() {
		if err := os.Mkdir(dst, st.Mode().Perm()); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dst, st.Mode().Perm()); err != nil { // past the umask
			t.Fatal(err)
		}
	} else {
		in, err := os.Open(src)
		if err != nil {
			t.Fatal(err)
		}
		defer in.Close()
		o, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, st.Mode().Perm())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(o, in); err != nil {
			t.Fatal(err)
		}
		if err := o.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if chown != "" {
		u, g, _ := strings.Cut(chown, ":")
		uid, err1 := strconv.Atoi(u)
		gid, err2 := strconv.Atoi(g)
		if err1 != nil || err2 != nil {
			t.Fatalf("--chown=%s: want numeric uid:gid", chown)
		}
		if err := os.Chown(dst, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
}
