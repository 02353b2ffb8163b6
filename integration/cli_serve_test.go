package integration

import (
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func runMediator(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "mediator"), args...)
	cmd.Env = append(os.Environ(), env...)
	done := make(chan struct{})
	var out []byte
	go func() { out, _ = cmd.CombinedOutput(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("mediator %v did not exit", args)
	}
	return string(out), cmd.ProcessState.ExitCode()
}

func TestServeRejectsBadFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"serve", "--max-device-slots", "0"}, nil, "max device slots"},
		{[]string{"serve", "--idle-timeout", "soon"}, nil, "idle-timeout"},
		{[]string{"serve", "--log-format", "xml"}, nil, "log-format"},
		{[]string{"serve", "--tls-cert", "x.pem"}, nil, "--tls-key"},
		{[]string{"serve", "--chat-server", "no-port"}, nil, "chat-server"},
		{[]string{"serve"}, []string{"MEDIATOR_MAX_QUEUE_LENGTH=-1"}, "max-queue-length"},
		{[]string{"serve"}, []string{"MEDIATOR_HANDSHAKE_TIMEOUT=bogus"}, "MEDIATOR_HANDSHAKE_TIMEOUT"},
		{[]string{"nonsense"}, nil, "unknown command"},
		{[]string{"--listen", ":1", "serve"}, nil, "unknown flag --listen before the command"},
	} {
		out, code := runMediator(t, tc.env, append(tc.args, "--data", t.TempDir())...)
		if code == 0 || !strings.Contains(out, tc.want) {
			t.Errorf("%v %v: exit %d, output %q (want %q)", tc.args, tc.env, code, out, tc.want)
		}
	}
}

func TestServeLockedDatabase(t *testing.T) {
	s := startServer(t)
	out, code := runMediator(t, nil, "serve", "--data", s.dataDir, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
	if code == 0 || !strings.Contains(out, "locked") || !strings.Contains(out, "is another mediator running with --data "+s.dataDir+"?") {
		t.Fatalf("second server on the same data: exit %d, %q", code, out)
	}
}

func TestServeEnvAndFilesModes(t *testing.T) {
	// Flags can come from MEDIATOR_* variables; flags win over them.
	s := startServer(t)
	resp, err := http.Get(s.admin + "/healthz")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("healthz: %v %v", resp, err)
	}
	resp.Body.Close()
	for name, want := range map[string]os.FileMode{"mediator.db": 0o600, "admin.token": 0o600} {
		st, err := os.Stat(filepath.Join(s.dataDir, name))
		if err != nil || st.Mode().Perm() != want {
			t.Errorf("%s: %v %v", name, st.Mode(), err)
		}
	}
	out, code := runMediator(t, []string{"MEDIATOR_IDLE_TIMEOUT=1s"}, "serve", "--idle-timeout", "bad", "--data", t.TempDir())
	if code == 0 || !strings.Contains(out, "idle-timeout") {
		t.Fatalf("want flag error, got %d %q", code, out)
	}
	t.Setenv("MEDIATOR_MAX_DEVICE_SLOTS", "2")
	fromEnv := startServer(t)
	if c := connect(t, fromEnv, newGroup().config(fromEnv, 1)); c.ServerInfo.MaxDeviceSlots != 2 {
		t.Fatalf("env ignored: %d", c.ServerInfo.MaxDeviceSlots)
	}
	flagWins := startServer(t, "--max-device-slots", "3")
	if c := connect(t, flagWins, newGroup().config(flagWins, 1)); c.ServerInfo.MaxDeviceSlots != 3 {
		t.Fatalf("flag did not win over env: %d", c.ServerInfo.MaxDeviceSlots)
	}
	dir := filepath.Join(t.TempDir(), "fresh")
	fresh := &server{t: t, dataDir: dir}
	fresh.start()
	defer fresh.kill()
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("data dir mode %v %v", st.Mode(), err)
	}
}
