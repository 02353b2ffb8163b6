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
