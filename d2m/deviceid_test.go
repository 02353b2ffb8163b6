package d2m

import (
	"math"
	"strings"
	"testing"
)

func TestFormatDeviceID(t *testing.T) {
	for id, want := range map[uint64]string{
		0:                  "0x0000000000000000",
		1:                  "0x0000000000000001",
		0xa3:               "0x00000000000000a3",
		math.MaxUint64:     "0xffffffffffffffff",
		0x1f00aa42c0ffee01: "0x1f00aa42c0ffee01",
	} {
		if got := FormatDeviceID(id); got != want {
			t.Errorf("FormatDeviceID(%d) = %q, want %q", id, got, want)
		}
		if back, err := ParseDeviceID(want); err != nil || back != id {
			t.Errorf("ParseDeviceID(%q) = %d, %v; want %d", want, back, err, id)
		}
	}
}

func TestParseDeviceID(t *testing.T) {
	for in, want := range map[string]uint64{
		"0x0000000000000011":       0x11,
		"0X00000000000000AB":       0xab,
		"0x11":                     0x11,
		"0xffffffffffffffff":       math.MaxUint64,
		"0000000000000011":         0x11, // the printed form without 0x: hex, not decimal
		"1f00aa42c0ffee01":         0x1f00aa42c0ffee01,
		"dec:17":                   17,
		"DEC:18446744073709551615": math.MaxUint64,
		" 0x2 ":                    2,
	} {
		if got, err := ParseDeviceID(in); err != nil || got != want {
			t.Errorf("ParseDeviceID(%q) = %#x, %v; want %#x", in, got, err, want)
		}
	}
	for _, in := range []string{
		"", "17", "0x", "0xZZ", "0x10000000000000000", "0x00000000000000011", "dec:", "dec:-1",
		"dec:0x11", "dec:18446744073709551616", "000000000000001g", "-0x1", "x11",
	} {
		if got, err := ParseDeviceID(in); err == nil {
			t.Errorf("ParseDeviceID(%q) = %#x, want an error", in, got)
		} else if !strings.Contains(err.Error(), "dec:") {
			t.Errorf("ParseDeviceID(%q): error %q does not say which forms work", in, err)
		}
	}
}

func FuzzParseDeviceID(f *testing.F) {
	f.Add("0x00000000000000a3")
	f.Add("dec:17")
	f.Add("17")
	f.Fuzz(func(t *testing.T, s string) {
		id, err := ParseDeviceID(s)
		if err != nil {
			return
		}
		if back, err := ParseDeviceID(FormatDeviceID(id)); err != nil || back != id {
			t.Fatalf("%q → %#x does not round-trip: %#x %v", s, id, back, err)
		}
	})
}
