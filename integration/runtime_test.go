package integration

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
)

// TestServeSetsSchedtrace: `mediator serve` runs with GODEBUG's
// schedtrace set, which keeps the runtime's sysmon out of deep sleep
// (cmd/mediator/runtime.go), after re-executing itself: same process,
// still serving devices.
func TestServeSetsSchedtrace(t *testing.T) {
	s := startServer(t)
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", s.cmd.Process.Pid))
	if err != nil {
		t.Skipf("cannot read the server's environment: %v", err)
	}
	var godebug string
	for _, kv := range bytes.Split(env, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("GODEBUG=")); ok {
			godebug = string(v)
		}
	}
	if !slices.Contains(strings.Split(godebug, ","), "schedtrace=2147483647") {
		t.Fatalf("server GODEBUG is %q, without schedtrace=2147483647", godebug)
	}
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	a.Close()
}

// TestServeMemoryLimit: --memory-limit sets the runtime's soft memory
// limit, which the startup line reports.
func TestServeMemoryLimit(t *testing.T) {
	s := startServer(t, "--memory-limit", "512MiB")
	if logs := s.Logs(); !strings.Contains(logs, `"memory_limit":"512 MiB"`) {
		t.Fatalf("startup line without the memory limit:\n%s", logs)
	}
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	if logs := startServer(t).Logs(); !strings.Contains(logs, `"memory_limit":"none"`) {
		t.Fatalf("startup line without memory_limit none:\n%s", logs)
	}
}
