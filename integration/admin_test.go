package integration

// The operator commands (`mediator groups|slots|queue|lock|stats|db …`)
// run as the real binary against a running server's admin API, and the
// offline database commands against its stopped data directory.

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/mediator/adminapi"
	"d2m-mediator/proto/d2mpb"
	"d2m-mediator/reflection"
)

type cliResult struct {
	stdout, stderr string
	code           int
}

// runCLI runs the mediator binary with extra environment variables.
func runCLI(t testing.TB, env []string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(binDir, "mediator"), args...)
	cmd.Env = append(append(os.Environ(), "GORACE=halt_on_error=1"), env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	res := cliResult{stdout: out.String(), stderr: errOut.String()}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		res.code = exit.ExitCode()
	case err != nil:
		t.Fatalf("mediator %v: %v", args, err)
	}
	if strings.Contains(res.stderr, "DATA RACE") {
		t.Fatalf("mediator %v: data race:\n%s", args, res.stderr)
	}
	return res
}

// adminEnv points the CLI at s through the environment.
func (s *server) adminEnv() []string {
	return []string{"MEDIATOR_ADMIN=" + s.admin, "MEDIATOR_ADMIN_TOKEN_FILE=" + filepath.Join(s.dataDir, "admin.token")}
}

// adminCLI runs a command that must succeed and returns its output.
func (s *server) adminCLI(t testing.TB, args ...string) string {
	t.Helper()
	r := runCLI(t, s.adminEnv(), args...)
	if r.code != 0 {
		t.Fatalf("mediator %v: exit %d\nstdout: %s\nstderr: %s", args, r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// adminCLIJSON runs a command with --json (set through MEDIATOR_JSON) and
// decodes its output.
func (s *server) adminCLIJSON(t testing.TB, v any, args ...string) {
	t.Helper()
	r := runCLI(t, append(s.adminEnv(), "MEDIATOR_JSON=true"), args...)
	if r.code != 0 {
		t.Fatalf("mediator %v: exit %d\nstderr: %s", args, r.code, r.stderr)
	}
	if err := json.Unmarshal([]byte(r.stdout), v); err != nil {
		t.Fatalf("mediator %v: %v in %q", args, err, r.stdout)
	}
}

// adminCLIFail runs a command that must fail with want in its stderr.
func adminCLIFail(t testing.TB, env []string, want string, args ...string) cliResult {
	t.Helper()
	r := runCLI(t, env, args...)
	if r.code == 0 || !strings.Contains(r.stderr, want) {
		t.Fatalf("mediator %v: exit %d, stderr %q; want a failure mentioning %q", args, r.code, r.stderr, want)
	}
	return r
}

func groupHex(g *group) string {
	id := g.keys.DeviceGroupID()
	return hex.EncodeToString(id[:])
}

func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func slotOf(d adminapi.GroupDetail, dev uint64) *adminapi.SlotInfo {
	for i := range d.Slots {
		if uint64(d.Slots[i].DeviceID) == dev {
			return &d.Slots[i]
		}
	}
	return nil
}

func TestAdminListsGroupsAndQueues(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	gid := groupHex(g)
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	c, _ := connectReady(t, s, g.config(s, 3))
	c.Close()
	// A second group, to see that listing is per group.
	other := newGroup()
	connectReady(t, s, other.config(s, 9))

	const n = 7
	var bytesQueued int64
	for i := 0; i < n; i++ {
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		expectAck(t, a, id)
		bytesQueued += int64(len(envelope(i)))
		r := expectReflected(t, b, envelope(i))
		b.AckReflected(ctxT(t, time.Second), r.ID)
	}
	var d adminapi.GroupDetail
	eventually(t, "device 3 offline with a full queue and device 2's acks stored", func() bool {
		s.adminCLIJSON(t, &d, "slots", "list", gid[:12])
		s3, s2 := slotOf(d, 3), slotOf(d, 2)
		return s3 != nil && !s3.Connected && s3.QueueLength == n && s2 != nil && s2.QueueLength == 0
	})
	s3 := slotOf(d, 3)
	if d.ID != gid || len(d.Slots) != 3 || d.Connected != 2 || d.Queued != n || d.QueuedBytes != bytesQueued ||
		s3.QueueBytes != bytesQueued || s3.OldestQueuedAgeSeconds == nil || s3.LastDisconnectAt == nil ||
		s3.ConnectedSince != nil || s3.Policy != "persistent" || d.Lock.Held {
		t.Fatalf("group detail %+v", d)
	}
	if s1 := slotOf(d, 1); !s1.Connected || s1.ConnectedSince == nil || s1.LastDisconnectAt != nil ||
		d.Leader == nil || !slotOf(d, uint64(*d.Leader)).Leader {
		t.Fatalf("slot 1 %+v, leader %v", s1, d.Leader)
	}

	var list adminapi.GroupList
	s.adminCLIJSON(t, &list, "groups", "list")
	var mine *adminapi.GroupSummary
	for i := range list.Groups {
		if list.Groups[i].ID == gid {
			mine = &list.Groups[i]
		}
	}
	if len(list.Groups) != 2 || mine == nil || mine.Slots != 3 || mine.Connected != 2 || mine.Queued != n ||
		mine.QueuedBytes != bytesQueued || mine.LockHolder != nil || mine.Prefix != gid[:8] {
		t.Fatalf("groups %+v", list.Groups)
	}

	// The tables show the same.
	out := s.adminCLI(t, "groups", "list")
	if !regexp.MustCompile(`(?m)^` + gid[:8] + `\s+3\s+2\s+7\s+\S+ B\s+-\s+` + gid + `$`).MatchString(out) {
		t.Fatalf("groups table:\n%s", out)
	}
	out = s.adminCLI(t, "slots", "list", gid[:12])
	if !regexp.MustCompile(`(?m)^0x0000000000000003\s+persistent\s+offline\s+\S+ ago\s+7\s+`+fmt.Sprint(bytesQueued)+` B\s+`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^0x0000000000000001\s+persistent\s+online\s+.*\s+leader$`).MatchString(out) {
		t.Fatalf("slots table:\n%s", out)
	}
	out = s.adminCLI(t, "slots", "show", gid, "0x3")
	if !strings.Contains(out, "7 reflection(s)") || !strings.Contains(out, "offline since") {
		t.Fatalf("slot show:\n%s", out)
	}

	// The device sees what the CLI said.
	c, backlog := connectReady(t, s, g.config(s, 3))
	if len(backlog) != n || c.ServerInfo.ReflectionQueueLength != n {
		t.Fatalf("backlog %d, ServerInfo %d", len(backlog), c.ServerInfo.ReflectionQueueLength)
	}

	// Unknown and malformed arguments.
	unknown := strings.Repeat("0", 64)
	if strings.HasPrefix(gid, "0") {
		unknown = strings.Repeat("f", 64)
	}
	adminCLIFail(t, s.adminEnv(), "unknown group", "slots", "list", unknown)
	adminCLIFail(t, s.adminEnv(), "has no slot for device 0x000000000000004d", "slots", "show", gid[:12], "dec:77")
	adminCLIFail(t, s.adminEnv(), "device id", "slots", "show", gid[:12], "0xZZ")
	// A bare short number is neither guessed as decimal nor as hex.
	adminCLIFail(t, s.adminEnv(), `device id "3": want 0x`, "slots", "show", gid[:12], "3")
	adminCLIFail(t, s.adminEnv(), "flag provided but not defined: -jsn", "slots", "list", gid[:12], "--jsn")
}

func TestAdminDropClosesDevice(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	gid := groupHex(g)
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	// b holds the lock with a held reflection: dropping it ends the
	// transaction for a.
	begin(t, b, []byte("scope"), 0)
	recvType(t, b.Conn, d2m.TypeBeginTransactionAck)
	id, _ := b.Reflect(ctxT(t, time.Second), []byte("held"), 0)
	expectAck(t, b, id)

	out := s.adminCLI(t, "slots", "drop", gid[:16], "0x2")
	if !strings.Contains(out, "dropped device 0x0000000000000002") || !strings.Contains(out, "4113") {
		t.Fatalf("drop output %q", out)
	}
	expectClose(t, b.Conn, d2m.CloseDropped)
	expectReflected(t, a, []byte("held"))
	expectEnded(t, a, 2, []byte("scope"))

	var d adminapi.GroupDetail
	s.adminCLIJSON(t, &d, "slots", "list", gid)
	if len(d.Slots) != 1 || len(d.Tombstones) != 1 || d.Tombstones[0].DeviceID != 2 ||
		d.Tombstones[0].Reason != "dropped" || d.Tombstones[0].AtMS == nil || d.Lock.Held {
		t.Fatalf("after drop %+v", d)
	}
	out = s.adminCLI(t, "slots", "list", gid)
	if !regexp.MustCompile(`(?m)^0x0000000000000002\s+dropped\s+`).MatchString(out) {
		t.Fatalf("tombstone not listed:\n%s", out)
	}
	// The device learns why when it comes back expecting its slot.
	cfg := g.config(s, 2)
	cfg.ExpectedState = d2mpb.DeviceSlotState_EXISTING.Enum()
	expectRejected(t, cfg, d2m.CloseDropped)
	adminCLIFail(t, s.adminEnv(), "has no slot for device 0x0000000000000002", "slots", "drop", gid, "0x0000000000000002")

	// An offline device's slot can be dropped too.
	c, _ := connectReady(t, s, g.config(s, 3))
	c.Close()
	eventually(t, "device 3 offline", func() bool {
		s.adminCLIJSON(t, &d, "slots", "list", gid)
		return slotOf(d, 3) != nil && !slotOf(d, 3).Connected
	})
	if out := s.adminCLI(t, "slots", "drop", gid, "dec:3"); !strings.Contains(out, "offline") {
		t.Fatalf("drop output %q", out)
	}
	if info := devicesInfo(t, a); len(info) != 1 {
		t.Fatalf("slots after drops: %v", keys(info))
	}
}

func TestAdminPurgeQueue(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	gid := groupHex(g)
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	c, _ := connectReady(t, s, g.config(s, 3))
	c.Close()
	var ids []uint32
	for i := 0; i < 5; i++ {
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		expectAck(t, a, id)
		ids = append(ids, expectReflected(t, b, envelope(i)).ID) // in flight, not acked
	}
	var d adminapi.GroupDetail
	eventually(t, "device 3 offline", func() bool {
		s.adminCLIJSON(t, &d, "slots", "list", gid)
		return !slotOf(d, 3).Connected
	})

	var pr adminapi.PurgeResult
	s.adminCLIJSON(t, &pr, "queue", "purge", gid[:10], "0x3")
	if pr.PurgedCount != 5 || pr.Connected {
		t.Fatalf("purge offline %+v", pr)
	}
	out := s.adminCLI(t, "queue", "purge", gid[:10], "0000000000000002")
	if !strings.Contains(out, "purged 5 reflection(s)") {
		t.Fatalf("purge output %q", out)
	}
	s.adminCLIJSON(t, &d, "slots", "list", gid)
	if d.Queued != 0 || slotOf(d, 2).OldestQueuedAtMS != nil {
		t.Fatalf("after purge %+v", d)
	}
	// Acking what was in flight when the queue was purged is fine.
	for _, id := range ids {
		if err := b.AckReflected(ctxT(t, time.Second), id); err != nil {
			t.Fatal(err)
		}
	}
	if info := devicesInfo(t, b); len(info) != 3 {
		t.Fatalf("device 2 after acking purged ids: %v", keys(info))
	}
	// The queue goes on: new reflections arrive, the purged ones are gone.
	id, _ := a.Reflect(ctxT(t, time.Second), []byte("after purge"), 0)
	expectAck(t, a, id)
	if r := expectReflected(t, b, []byte("after purge")); r.ID != ids[4]+1 {
		t.Fatalf("id after purge %d, last before %d", r.ID, ids[4])
	}
	_, backlog := connectReady(t, s, g.config(s, 3))
	if len(backlog) != 1 || string(backlog[0].Envelope) != "after purge" {
		t.Fatalf("device 3 backlog after purge: %d entries", len(backlog))
	}
}

func TestAdminLockShowAndRelease(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	gid := groupHex(g)
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	if out := s.adminCLI(t, "lock", "show", gid); strings.TrimSpace(out) != "none" {
		t.Fatalf("lock before: %q", out)
	}
	adminCLIFail(t, s.adminEnv(), "no transaction lock", "lock", "release", gid)

	scope := []byte("scope-of-a")
	begin(t, a, scope, 0)
	recvType(t, a.Conn, d2m.TypeBeginTransactionAck)
	id, _ := a.Reflect(ctxT(t, time.Second), []byte("held"), 0)
	expectAck(t, a, id)

	var l adminapi.LockInfo
	s.adminCLIJSON(t, &l, "lock", "show", gid[:8])
	if !l.Held || l.Holder == nil || *l.Holder != 1 || l.Ending || l.ScopeBytes != len(scope) || l.HeldSeconds == nil {
		t.Fatalf("lock %+v", l)
	}
	if out := s.adminCLI(t, "lock", "show", gid); !strings.Contains(out, "held by device 0x0000000000000001") {
		t.Fatalf("lock show %q", out)
	}
	var list adminapi.GroupList
	s.adminCLIJSON(t, &list, "groups", "list")
	if len(list.Groups) != 1 || list.Groups[0].LockHolder == nil || *list.Groups[0].LockHolder != 1 {
		t.Fatalf("groups %+v", list.Groups)
	}

	out := s.adminCLI(t, "lock", "release", gid[:8])
	if !strings.Contains(out, "held by device 0x0000000000000001") || !strings.Contains(out, "TransactionEnded") {
		t.Fatalf("release output %q", out)
	}
	// As if the holder had gone: its held reflection first, then the end.
	expectReflected(t, b, []byte("held"))
	expectEnded(t, b, 1, scope)
	s.adminCLIJSON(t, &l, "lock", "show", gid)
	if l.Held {
		t.Fatalf("lock after release %+v", l)
	}
	// The holder is still connected and its reflections flow again; the
	// lock is free for the others.
	id, _ = a.Reflect(ctxT(t, time.Second), []byte("free"), 0)
	expectAck(t, a, id)
	expectReflected(t, b, []byte("free"))
	begin(t, b, []byte("scope-of-b"), 0)
	recvType(t, b.Conn, d2m.TypeBeginTransactionAck)
}

func TestAdminBackupAndOfflineDB(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	gid := groupHex(g)
	a, _ := connectReady(t, s, g.config(s, 1))
	c, _ := connectReady(t, s, g.config(s, 3))
	c.Close()
	for i := 0; i < 3; i++ {
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		expectAck(t, a, id)
	}
	var live adminapi.GroupDetail
	eventually(t, "device 3 offline", func() bool {
		s.adminCLIJSON(t, &live, "slots", "list", gid)
		return !slotOf(live, 3).Connected
	})

	dir := t.TempDir()
	file := filepath.Join(dir, "backup.db")
	out := s.adminCLI(t, "db", "backup", file)
	if !strings.Contains(out, "passed the check") {
		t.Fatalf("backup output %q", out)
	}
	if st, err := os.Stat(file); err != nil || st.Size() == 0 || st.Mode().Perm() != 0o600 {
		t.Fatalf("backup file: %v %v", st, err)
	}
	adminCLIFail(t, s.adminEnv(), "exists", "db", "backup", file)
	// --force is typed or absent: MEDIATOR_FORCE does not replace a backup.
	before, _ := os.ReadFile(file)
	adminCLIFail(t, append(s.adminEnv(), "MEDIATOR_FORCE=1"), "exists: remove it or pass --force", "db", "backup", file)
	if after, _ := os.ReadFile(file); !bytes.Equal(before, after) {
		t.Fatal("MEDIATOR_FORCE=1 replaced the backup")
	}
	if out := s.adminCLI(t, "db", "backup", file, "--force"); !strings.Contains(out, "passed the check") {
		t.Fatalf("backup --force: %q", out)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Fatalf("backup left temporary files: %v", entries)
	}

	// The copy is a sound database with the same state.
	if out := runCLI(t, nil, "db", "check", file); out.code != 0 || !strings.HasPrefix(out.stdout, "ok: "+file+" is consistent") {
		t.Fatalf("db check of the backup file: %+v", out)
	}
	restored := t.TempDir()
	copyFile(t, file, filepath.Join(restored, "mediator.db"))
	if out := runCLI(t, nil, "db", "check", "--data", restored); out.code != 0 || !strings.Contains(out.stdout, "ok:") {
		t.Fatalf("db check of the backup: %+v", out)
	}
	if out := runCLI(t, nil, "db", "check", restored); out.code != 0 || !strings.Contains(out.stdout, filepath.Join(restored, "mediator.db")) {
		t.Fatalf("db check DIR: %+v", out)
	}
	adminCLIFail(t, nil, "give FILE or --data, not both", "db", "check", file, "--data", restored)
	adminCLIFail(t, nil, "no database at "+file+".missing", "db", "check", file+".missing")
	// A damaged copy fails the check: the check reads the file it is given.
	damaged := filepath.Join(dir, "damaged.db")
	copyFile(t, file, damaged)
	corruptPage(t, damaged)
	if r := adminCLIFail(t, nil, "problem(s)", "db", "check", damaged); !strings.Contains(r.stdout, "invalid") {
		t.Fatalf("db check of a damaged file: %+v", r)
	}
	db, err := reflection.Open(file, reflection.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var rid reflection.GroupID
	hex.Decode(rid[:], []byte(gid))
	st, err := db.Group(rid)
	q3, ok := db.QueueStats(rid, 3)
	db.Close()
	if err != nil || len(st.Slots) != len(live.Slots) || !ok || q3.Length != 3 || q3.Length != slotOf(live, 3).QueueLength ||
		q3.Bytes != slotOf(live, 3).QueueBytes {
		t.Fatalf("backup state %+v %+v %v, live %+v", st, q3, err, live)
	}

	// Offline commands refuse a database the server has open, quickly.
	start := time.Now()
	adminCLIFail(t, nil, "is the server running?", "db", "check", "--data", s.dataDir)
	adminCLIFail(t, nil, "is the server running?", "db", "compact", "--data", s.dataDir)
	if d := time.Since(start); d > 15*time.Second {
		t.Fatalf("locked database took %v to report", d)
	}

	env := s.adminEnv()
	s.stop()
	adminCLIFail(t, env, "cannot reach the admin API at "+s.admin+": is the server running?", "stats")
	adminCLIFail(t, env, "is the server running?", "groups", "list")
	if out := runCLI(t, nil, "db", "check", "--data", s.dataDir); out.code != 0 || !strings.Contains(out.stdout, "is consistent") {
		t.Fatalf("db check after stop: %+v", out)
	}
	var compact struct {
		Before     int64 `json:"bytes_before"`
		After      int64 `json:"bytes_after"`
		DiskBefore int64 `json:"disk_bytes_before"`
		DiskAfter  int64 `json:"disk_bytes_after"`
		DataBefore int64 `json:"data_bytes_before"`
		DataAfter  int64 `json:"data_bytes_after"`
	}
	dbFile := filepath.Join(s.dataDir, "mediator.db")
	lenBefore, diskBefore := fileSizes(t, dbFile)
	r := runCLI(t, []string{"MEDIATOR_DATA=" + s.dataDir}, "db", "compact", "--json")
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &compact) != nil {
		t.Fatalf("db compact: %+v", r)
	}
	// The sizes it reports are the file's, before and after.
	lenAfter, diskAfter := fileSizes(t, dbFile)
	if compact.Before != lenBefore || compact.DiskBefore != diskBefore || compact.After != lenAfter || compact.DiskAfter != diskAfter ||
		compact.DataAfter <= 0 || compact.DataAfter > compact.After || compact.DataBefore > compact.Before {
		t.Fatalf("db compact reported %+v; the file was %d bytes (%d on disk), is %d (%d on disk)",
			compact, lenBefore, diskBefore, lenAfter, diskAfter)
	}
	r = runCLI(t, nil, "db", "compact", "--data", s.dataDir)
	if r.code != 0 || !regexp.MustCompile(`(?m)^file length\s+\S+ \S+\s+\S+ \S+$`).MatchString(r.stdout) ||
		!regexp.MustCompile(`(?m)^on disk\s+`).MatchString(r.stdout) {
		t.Fatalf("db compact table: %+v", r)
	}
	if out := runCLI(t, nil, "db", "check", "--data", s.dataDir); out.code != 0 {
		t.Fatalf("db check after compact: %+v", out)
	}
	adminCLIFail(t, nil, "no database at", "db", "check", "--data", t.TempDir())

	// The compacted database still serves the group.
	s.start()
	_, backlog := connectReady(t, s, g.config(s, 3))
	if len(backlog) != 3 {
		t.Fatalf("backlog after compact: %d", len(backlog))
	}
}

// fileSizes is a file's length and the disk space its blocks take.
func fileSizes(t testing.TB, path string) (length, disk int64) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size(), fi.Sys().(*syscall.Stat_t).Blocks * 512
}

// corruptPage overwrites both meta pages of a bbolt file with garbage.
// (A damaged data page makes bbolt panic in a goroutine of its own while it
// opens the file, which no caller can recover.)
func corruptPage(t testing.TB, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xa5}, 2*4096), 0); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// metricValue returns the value of one series (name plus labels exactly
// as exposed, e.g. `mediator_reflects_total{kind="durable"}`).
func metricValue(body []byte, series string) (float64, bool) {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`)
	m := re.FindSubmatch(body)
	if m == nil {
		return 0, false
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	return v, err == nil
}

func TestAdminMetricsAndToken(t *testing.T) {
	s := startServer(t)
	// Health needs no token; everything else does.
	for path, want := range map[string]int{"/healthz": 200, "/readyz": 200, "/metrics": 401, "/api/v1/groups": 401, "/api/v1/stats": 401} {
		resp, err := http.Get(s.admin + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("GET %s without token: %d, want %d", path, resp.StatusCode, want)
		}
	}
	bad := filepath.Join(t.TempDir(), "wrong.token")
	os.WriteFile(bad, []byte("not-the-token\n"), 0o600)
	adminCLIFail(t, []string{"MEDIATOR_ADMIN=" + s.admin, "MEDIATOR_ADMIN_TOKEN_FILE=" + bad}, "admin token rejected", "stats")
	adminCLIFail(t, []string{"MEDIATOR_ADMIN=" + s.admin, "MEDIATOR_ADMIN_TOKEN_FILE=" + bad + ".missing"}, "admin token", "groups", "list")

	metrics := func() []byte {
		t.Helper()
		code, body := s.adminGet("/metrics")
		if code != 200 {
			t.Fatalf("/metrics: %d", code)
		}
		return body
	}
	before := metrics()
	value := func(body []byte, series string) float64 {
		t.Helper()
		v, ok := metricValue(body, series)
		if !ok {
			t.Fatalf("no series %s in /metrics", series)
		}
		return v
	}

	g := newGroup()
	a, _ := connectReady(t, s, g.config(s, 1))
	b, _ := connectReady(t, s, g.config(s, 2))
	c, _ := connectReady(t, s, g.config(s, 3))
	c.Close()
	const n = 4
	for i := 0; i < n; i++ {
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		expectAck(t, a, id)
		r := expectReflected(t, b, envelope(i))
		b.AckReflected(ctxT(t, time.Second), r.ID)
	}
	begin(t, a, []byte("s"), 0)
	recvType(t, a.Conn, d2m.TypeBeginTransactionAck)
	commit(t, a)
	recvType(t, a.Conn, d2m.TypeCommitTransactionAck)
	expectEnded(t, b, 1, []byte("s"))
	// Ephemeral while device 3 is offline: dropped for it.
	a.Reflect(ctxT(t, time.Second), []byte("typing"), d2m.FlagEphemeral)

	var after []byte
	eventually(t, "metrics to follow the traffic", func() bool {
		after = metrics()
		v, _ := metricValue(after, `mediator_ephemeral_drops_total{reason="offline"}`)
		acked, _ := metricValue(after, "mediator_reflected_acked_total")
		conns, _ := metricValue(after, `mediator_connections{state="authenticated"}`)
		return v >= 1 && acked >= n && conns == 2
	})
	for _, name := range []string{
		"mediator_connections", "mediator_handshakes_total", "mediator_close_codes_total", "mediator_reflects_total",
		"mediator_reflected_sent_total", "mediator_commit_batch_size", "mediator_commit_seconds",
		"mediator_transaction_hold_seconds", "mediator_upstream_", "mediator_ephemeral_drops_total",
		"mediator_queue_depth", "mediator_groups_loaded",
	} {
		if !regexp.MustCompile(`(?m)^` + name + `\S*[ {]`).Match(after) {
			t.Errorf("/metrics has no %s series", name)
		}
	}
	moved := func(series string, atLeast float64) {
		t.Helper()
		b0, _ := metricValue(before, series)
		if d := value(after, series) - b0; d < atLeast {
			t.Errorf("%s moved by %v, want at least %v", series, d, atLeast)
		}
	}
	moved(`mediator_reflects_total{kind="durable"}`, n)
	moved(`mediator_reflects_total{kind="ephemeral"}`, 1)
	moved("mediator_reflected_sent_total", n)
	moved(`mediator_handshakes_total{outcome="ok"}`, 3)
	moved("mediator_commit_batch_size_count", 1)
	moved("mediator_commit_seconds_count", 1)
	moved("mediator_transaction_hold_seconds_count", 1)
	moved(`mediator_close_codes_total{code="1000"}`, 1)
	if v := value(after, `mediator_connections{state="authenticated"}`); v != 2 {
		t.Errorf("authenticated connections %v, want 2", v)
	}

	// stats agrees.
	var st adminapi.ServerStats
	s.adminCLIJSON(t, &st, "stats")
	if st.Connections.Authenticated != 2 || st.Goroutines == 0 || st.Memory.HeapAllocBytes == 0 || st.UptimeSeconds <= 0 ||
		!strings.HasSuffix(st.Store.Path, "mediator.db") || st.Store.FileBytes == 0 || !st.Ready {
		t.Fatalf("stats %+v", st)
	}
	if out := s.adminCLI(t, "stats"); !regexp.MustCompile(`(?m)^connections\s+2 open: 2 authenticated`).MatchString(out) {
		t.Fatalf("stats output:\n%s", out)
	}
}
