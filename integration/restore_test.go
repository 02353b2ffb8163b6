package integration

import (
	"encoding/json"
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
// backup was taken, in order. What the runbook says the operator sees is
// checked too: `db check --json` of the backup says ok but not
// closed_cleanly, and the restored server's first start logs the recovery
// of the device that was connected when the backup was taken.
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
	type checkJSON struct {
		OK            bool  `json:"ok"`
		ClosedCleanly *bool `json:"closed_cleanly"`
		Slots         int   `json:"slots"`
	}
	checkReport := func(args ...string) checkJSON {
		t.Helper()
		r := runCLI(t, nil, append([]string{"db", "check", "--json"}, args...)...)
		var v checkJSON
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &v) != nil || v.ClosedCleanly == nil {
			t.Fatalf("db check --json %v: %+v", args, r)
		}
		return v
	}
	if v := checkReport(backup); !v.OK || *v.ClosedCleanly || v.Slots != 2 {
		t.Fatalf("db check --json of a hot backup: %+v (closed_cleanly %v), want ok, not closed cleanly, 2 slots", v, *v.ClosedCleanly)
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
	// Device 1 was connected when the backup was taken: its slot is
	// marked disconnected at the first start, which says so.
	recovered := false
	for _, l := range strings.Split(restored.Logs(), "\n") {
		var v struct {
			Message             string
			Requests            int
			HeldCopiesDelivered int `json:"held_copies_delivered"`
		}
		if json.Unmarshal([]byte(l), &v) == nil && v.Message == "reflection: recovered state left by an unclean shutdown" {
			recovered = v.Requests == 1 && v.HeldCopiesDelivered == 0
		}
	}
	if !recovered {
		t.Fatalf("the restored server did not log the recovery of one slot:\n%s", restored.Logs())
	}
	restored.stop()
	if v := checkReport("--data", restoredDir); !v.OK || !*v.ClosedCleanly {
		t.Fatalf("db check --json after a clean stop: %+v (closed_cleanly %v)", v, *v.ClosedCleanly)
	}
}
