package mediator_test

import (
	"context"
	"testing"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/mediator"
	"d2m-mediator/mediator/mediatortest"
)

// TestTimeoutsTellHandshakeFromIdle: both close with 4013 (docs/protocol.md
// §13), but the metrics and the log line say which, and a handshake that
// timed out is counted once, as "timeout".
func TestTimeoutsTellHandshakeFromIdle(t *testing.T) {
	srv := mediatortest.NewServer(t, mediator.Config{HandshakeTimeout: 200 * time.Millisecond, IdleTimeout: 300 * time.Millisecond})
	keys := newKeys()

	raw, _, err := d2mclient.DialRaw(tctx(t, 5*time.Second), d2mclient.URLFor(srv.URL, keys, "7f"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.CloseNow()
	if code := raw.CloseCode(tctx(t, 5*time.Second)); code != int(d2m.CloseIdleTimeout) {
		t.Fatalf("silent handshake: close %d, want 4013", code)
	}
	idle := dialDevice(t, srv.URL, keys, 1)
	if code := idle.CloseCode(tctx(t, 5*time.Second)); code != int(d2m.CloseIdleTimeout) {
		t.Fatalf("idle device: close %d, want 4013", code)
	}
	waitMetric(t, srv, "mediator_timeouts_total", "phase", "idle", 1)
	for _, c := range []struct{ name, label, value string }{
		{"mediator_timeouts_total", "phase", "handshake"},
		{"mediator_handshakes_total", "outcome", "timeout"},
		{"mediator_handshakes_total", "outcome", "ok"},
	} {
		if v := metric(t, srv, c.name, c.label, c.value); v != 1 {
			t.Errorf("%s{%s=%q} = %v, want 1", c.name, c.label, c.value, v)
		}
	}
	if v := metric(t, srv, "mediator_handshakes_total", "outcome", "aborted"); v != 0 {
		t.Errorf(`the timed-out handshake also counted as "aborted" (%v)`, v)
	}
}

// metric reads one labelled series from the server's registry (0 if absent).
func metric(t *testing.T, srv *mediatortest.Server, name, label, value string) float64 {
	t.Helper()
	mfs, err := srv.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					if c := m.GetCounter(); c != nil {
						return c.GetValue()
					}
					return m.GetGauge().GetValue()
				}
			}
		}
	}
	return 0
}

func waitMetric(t *testing.T, srv *mediatortest.Server, name, label, value string, want float64) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for metric(t, srv, name, label, value) != want {
		select {
		case <-ctx.Done():
			t.Fatalf("%s{%s=%q} never reached %v", name, label, value, want)
		case <-time.After(10 * time.Millisecond):
		}
	}
}
