package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"d2m-mediator/proto/d2mpb"
)

// OPERATIONS.md's restore procedure, end to end: a hot backup through the
// CLI while devices keep reflecting, then a new server on the restored file,
// where the offline device receives exactly what was queued for it when the
// backup was taken, in order.
func TestBackupRestoreDeliversQueuedReflections(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	b.Close() // device 2 is offline: what a reflects is queued for it
	const before, after = 40, 5
	for i := 0; i < before; i++ {
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		expectAck(t, a, id)
	}

	backup := filepath.Join(t.TempDir(), "mediator-backup.db")
	if out := s.adminCLI(t, "db", "backup", backup); !strings.Contains(out, "passed the check") {
		t.Fatalf("backup: %q", out)
	}
	// The server keeps running; what comes after the backup is not in it.
	for i := before; i < before+after; i++ {
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		expectAck(t, a, id)
	}
	if r := runCLI(t, nil, "db", "check", backup); r.code != 0 {
		t.Fatalf("db check %s: %+v", backup, r)
	}

	// Restore: the file becomes <data>/mediator.db of a new server (0600,
	// as the server creates it).
	restoredDir := filepath.Join(t.TempDir(), "restored")
	if err := os.Mkdir(restoredDir, 0o700); err != nil {
		t.Fatal(err)
	}
	copyFile(t, backup, filepath.Join(restoredDir, "mediator.db"))
	restored := &server{t: t, dataDir: restoredDir}
	restored.start()
	t.Cleanup(restored.kill)

	cfg := g.config(restored, 2)
	cfg.ExpectedState = d2mpb.DeviceSlotState_EXISTING.Enum() // its slot came back with the file
	c, backlog := connectReady(t, restored, cfg)
	defer c.Close()
	if c.ServerInfo.ReflectionQueueLength != before || len(backlog) != before {
		t.Fatalf("restored server: ServerInfo queue length %d, backlog %d; want %d", c.ServerInfo.ReflectionQueueLength, len(backlog), before)
	}
	for i, r := range backlog {
		if string(r.Envelope) != string(envelope(i)) {
			t.Fatalf("backlog[%d] = %q, want %q", i, r.Envelope, envelope(i))
		}
	}
	restored.stop()
	if r := runCLI(t, nil, "db", "check", "--data", restoredDir); r.code != 0 {
		t.Fatalf("db check after the restored server ran: %+v", r)
	}
}
