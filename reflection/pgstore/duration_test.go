package pgstore

import (
	"testing"
	"time"
)

func TestPGDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"1000": time.Second, "250ms": 250 * time.Millisecond, "2s": 2 * time.Second,
		"1min": time.Minute, " 3 s": 3 * time.Second, "1h": time.Hour, "500us": 500 * time.Microsecond,
	} {
		if got, ok := pgDuration(in); !ok || got != want {
			t.Errorf("pgDuration(%q) = %v %v, want %v", in, got, ok, want)
		}
	}
	for _, bad := range []string{"", "s", "1x", "-1", "1.5s"} {
		if got, ok := pgDuration(bad); ok {
			t.Errorf("pgDuration(%q) = %v, want refused", bad, got)
		}
	}
}
