package integration

import (
	"bufio"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// `make run` execs the server, so stopping make stops the server: SIGTERM
// (what a process manager or `kill` sends to make) and SIGINT to the
// process group (Ctrl-C) both end in the server's clean shutdown, with no
// "make: *** … Error" and the ports free again.
func TestMakeRunStopsServer(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the mediator through make")
	}
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("make is not installed: " + err.Error())
	}
	bin := t.TempDir()
	for _, tc := range []struct {
		name  string
		group bool // signal the process group, as a terminal's Ctrl-C does
		sig   syscall.Signal
	}{
		{"SIGTERM to make", false, syscall.SIGTERM},
		{"Ctrl-C", true, syscall.SIGINT},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ports := freePorts(t, 2)
			cmd := exec.Command("make", "--no-print-directory", "-C", "..", "run", "BIN="+bin)
			cmd.Env = append(os.Environ(), "MEDIATOR_DATA="+t.TempDir(),
				"MEDIATOR_LISTEN="+ports[0], "MEDIATOR_ADMIN_LISTEN="+ports[1], "MEDIATOR_LOG_FORMAT=json")
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			out, err := cmd.StderrPipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd.Stdout = cmd.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
			lines := make(chan string, 100)
			go func() {
				sc := bufio.NewScanner(out)
				for sc.Scan() {
					lines <- sc.Text()
				}
				close(lines)
			}()
			var log strings.Builder
			waitFor := func(what string) {
				t.Helper()
				timeout := time.After(2 * time.Minute)
				for {
					select {
					case l, ok := <-lines:
						if !ok {
							t.Fatalf("output ended before %q:\n%s", what, log.String())
						}
						log.WriteString(l + "\n")
						if strings.Contains(l, what) {
							return
						}
					case <-timeout:
						t.Fatalf("no %q:\n%s", what, log.String())
					}
				}
			}
			waitFor(`"mediator listening"`)
			// The README names these startup lines, in this order (make
			// first echoes its two commands, which are not JSON).
			var msgs []string
			for _, l := range strings.Split(log.String(), "\n") {
				var v struct{ Message string }
				if json.Unmarshal([]byte(l), &v) == nil && v.Message != "" {
					msgs = append(msgs, v.Message)
				}
			}
			if want := []string{
				"no --chat-server given: started the local stand-in chat server (development and tests only)",
				"mediator listening",
			}; !slices.Equal(msgs, want) {
				t.Fatalf("startup lines %q, want %q (README, \"The two commands\"):\n%s", msgs, want, log.String())
			}
			pid := cmd.Process.Pid
			if tc.group {
				pid = -pid
			}
			if err := syscall.Kill(pid, tc.sig); err != nil {
				t.Fatal(err)
			}
			waitFor(`"stopped"`)
			for l := range lines {
				log.WriteString(l + "\n")
			}
			cmd.Wait()
			if strings.Contains(log.String(), "make: ***") {
				t.Fatalf("make reported an error:\n%s", log.String())
			}
			// Make is gone, and so is the server: its ports are free.
			for _, p := range ports {
				ln, err := net.Listen("tcp", p)
				if err != nil {
					t.Fatalf("port %s still taken after make ended: %v\n%s", p, err, log.String())
				}
				ln.Close()
			}
			if _, err := os.Stat(filepath.Join(bin, "mediator")); err != nil {
				t.Fatalf("make run did not build bin/mediator: %v", err)
			}
		})
	}
}

// freePorts returns n loopback addresses that were free a moment ago.
func freePorts(t *testing.T, n int) []string {
	t.Helper()
	var addrs []string
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addrs = append(addrs, ln.Addr().String())
		defer ln.Close()
	}
	return addrs
}
