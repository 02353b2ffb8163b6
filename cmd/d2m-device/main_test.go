package main

import "testing"

// d2m-device reads and prints device ids as the mediator CLI does
// (d2m.FormatDeviceID / d2m.ParseDeviceID); zero is not a device id.
func TestDeviceIDForms(t *testing.T) {
	for in, want := range map[string]uint64{
		"0x1f00aa42c0ffee01": 0x1f00aa42c0ffee01, "1f00aa42c0ffee01": 0x1f00aa42c0ffee01,
		"0x2": 2, "dec:17": 17,
	} {
		if got, err := parseDeviceID(in); err != nil || got != want {
			t.Errorf("parseDeviceID(%q) = %#x, %v; want %#x", in, got, err, want)
		}
	}
	for _, in := range []string{"0x0", "dec:0", "0000000000000000", "17", ""} {
		if _, err := parseDeviceID(in); err == nil {
			t.Errorf("parseDeviceID(%q) accepted", in)
		}
	}
	if got := fmtID(0x2a); got != "0x000000000000002a" {
		t.Errorf("fmtID(0x2a) = %q", got)
	}
}
