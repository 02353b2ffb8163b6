package main

import (
	"errors"
	"fmt"
	"math"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
)

// The Go runtime's system monitor (sysmon) goes into a deep sleep while
// every processor is idle, and the next system call of any goroutine wakes
// it with its shortest period, 20 µs, again. A mediator carrying the
// traffic real devices produce (a frame every few hundred microseconds,
// nothing in between) goes idle and busy again thousands of times a
// second, so sysmon spent its time waking, napping 20 µs a few times and
// sleeping deeply again: thread sleeps and wake-ups that cost, on the
// 2-core VM of BENCHMARKS.md, a third of the server's CPU in the
// production-shape run. While a scheduler trace is configured
// (GODEBUG=schedtrace=N) the runtime never puts sysmon into deep sleep, so
// it backs off to its longest period (10 ms) instead and stays there while
// the server is quiet: about 100 wake-ups a second, 0.2 % of a core with
// no traffic at all.
//
// serve therefore re-executes itself once with schedtrace set to its
// largest value (2^31−1 ms, 24.8 days), the period of the one-line
// scheduler trace the runtime then writes to stderr (also once at start
// on a machine up longer than that). An explicit schedtrace in GODEBUG,
// e.g. GODEBUG=schedtrace=0, is kept as it is.
const sysmonSchedtrace = "schedtrace=2147483647"

// sysmonEnv returns environ with GODEBUG extended by sysmonSchedtrace, or
// nil if GODEBUG already names schedtrace.
func sysmonEnv(environ []string) []string {
	out := make([]string, 0, len(environ)+1)
	found := false
	for _, kv := range environ {
		v, ok := strings.CutPrefix(kv, "GODEBUG=")
		if !ok {
			out = append(out, kv)
			continue
		}
		for _, setting := range strings.Split(v, ",") {
			if strings.HasPrefix(strings.TrimSpace(setting), "schedtrace=") {
				return nil
			}
		}
		found = true
		if v != "" {
			v += ","
		}
		out = append(out, "GODEBUG="+v+sysmonSchedtrace)
	}
	if !found {
		out = append(out, "GODEBUG="+sysmonSchedtrace)
	}
	return out
}

// reexecWithSysmonSetting replaces the process by itself with the
// setting (same PID, arguments and descriptors) unless it is set. It
// returns only if nothing was to be done or the exec failed; then serve
// goes on with the runtime's defaults.
func reexecWithSysmonSetting() {
	env := sysmonEnv(os.Environ())
	if env == nil {
		return
	}
	exe, err := os.Executable()
	if err != nil || strings.HasSuffix(exe, ".test") {
		return // never replace a test binary that calls serve
	}
	_ = syscall.Exec(exe, os.Args, env)
}

// parseByteSize reads a size as GOMEMLIMIT writes it: a non-negative
// integer with an optional unit B, KiB, MiB, GiB or TiB.
func parseByteSize(v string) (int64, error) {
	num, mult := strings.TrimSpace(v), int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}, {"B", 1}} {
		if n, ok := strings.CutSuffix(num, u.suffix); ok {
			num, mult = n, u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%q is not a size such as 1536MiB or 2GiB", v)
	}
	if n > math.MaxInt64/mult {
		return 0, errors.New("size too large")
	}
	return n * mult, nil
}

// memoryLimitString is the runtime's memory limit for the startup line:
// "none" or the limit in MiB.
func memoryLimitString() string {
	limit := debug.SetMemoryLimit(-1) // -1: read without changing
	if limit == math.MaxInt64 {
		return "none"
	}
	return fmt.Sprintf("%d MiB", limit>>20)
}
