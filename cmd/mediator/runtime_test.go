package main

import (
	"slices"
	"testing"
)

func TestSysmonEnv(t *testing.T) {
	for _, tc := range []struct {
		in, want []string // want nil: nothing to change
	}{
		{[]string{"HOME=/root"}, []string{"HOME=/root", "GODEBUG=" + sysmonSchedtrace}},
		{[]string{"GODEBUG=", "A=b"}, []string{"GODEBUG=" + sysmonSchedtrace, "A=b"}},
		{[]string{"GODEBUG=madvdontneed=1"}, []string{"GODEBUG=madvdontneed=1," + sysmonSchedtrace}},
		{[]string{"GODEBUG=schedtrace=0"}, nil},
		{[]string{"GODEBUG=madvdontneed=1, schedtrace=1000"}, nil},
	} {
		if got := sysmonEnv(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("sysmonEnv(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestParseByteSize(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "123": 123, "10B": 10, "2KiB": 2048, "1536MiB": 1536 << 20, "2GiB": 2 << 30, "1TiB": 1 << 40} {
		if got, err := parseByteSize(in); err != nil || got != want {
			t.Errorf("parseByteSize(%q) = %d, %v, want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1", "1.5GiB", "1GB", "GiB", "9999999999TiB"} {
		if got, err := parseByteSize(in); err == nil {
			t.Errorf("parseByteSize(%q) = %d, want an error", in, got)
		}
	}
}
