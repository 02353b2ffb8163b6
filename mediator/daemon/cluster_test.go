package daemon

import (
	"net"
	"testing"
)

func TestDefaultAdminAdvertise(t *testing.T) {
	for _, tc := range []struct {
		device string
		admin  *net.TCPAddr
		want   string
	}{
		{"m1.internal:8765", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8766}, "127.0.0.1:8766"},
		{"m1.internal:8765", &net.TCPAddr{IP: net.IPv4(10, 0, 0, 7), Port: 8766}, "10.0.0.7:8766"},
		{"m1.internal:8765", &net.TCPAddr{IP: net.IPv4zero, Port: 8766}, "m1.internal:8766"},
		{"[fd00::1]:8765", &net.TCPAddr{IP: net.IPv6unspecified, Port: 9000}, "[fd00::1]:9000"},
	} {
		if got := defaultAdminAdvertise(tc.device, tc.admin); got != tc.want {
			t.Errorf("device %s, admin %s: %s, want %s", tc.device, tc.admin, got, tc.want)
		}
	}
}
