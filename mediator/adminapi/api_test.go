package adminapi

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"d2m-mediator/mediator"
	"d2m-mediator/reflection"
)

const testToken = "test-token"

type adminFixture struct {
	t     *testing.T
	db    *reflection.DB
	srv   *mediator.Server
	http  *httptest.Server
	store reflection.Store
}

// newAdminFixture serves the admin handler of a server over a fresh
// database; wrap, if set, replaces the store the server sees.
func newAdminFixture(t *testing.T, wrap func(reflection.Store) reflection.Store) *adminFixture {
	t.Helper()
	db, err := reflection.Open(filepath.Join(t.TempDir(), "mediator.db"), reflection.Options{Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	var st reflection.Store = db
	if wrap != nil {
		st = wrap(db)
	}
	srv, err := mediator.New(mediator.Config{}, st, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(Handler(srv, testToken, zerolog.Nop()))
	t.Cleanup(func() {
		hs.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		db.Close()
	})
	return &adminFixture{t: t, db: db, srv: srv, http: hs, store: st}
}

// groupID pads a hex prefix with zeros to a full group id.
func groupID(prefix string) reflection.GroupID {
	var g reflection.GroupID
	if _, err := hex.Decode(g[:], []byte(prefix+strings.Repeat("0", 64-len(prefix)))); err != nil {
		panic(err)
	}
	return g
}

func (f *adminFixture) putSlot(g reflection.GroupID, dev reflection.DeviceID) {
	f.t.Helper()
	err := reflection.Sync(func(done func(error)) {
		f.db.PutSlot(g, reflection.Slot{DeviceID: dev, Policy: reflection.Persistent, CreatedAt: 1000, LastDisconnectAt: 2000}, done)
	})
	if err != nil {
		f.t.Fatal(err)
	}
}

func (f *adminFixture) reflect(g reflection.GroupID, from reflection.DeviceID, env string) {
	f.t.Helper()
	_, err := reflection.SyncAppend(func(done func(reflection.AppendResult, error)) {
		f.db.Append(reflection.AppendRequest{Group: g, Sender: from, Envelope: []byte(env)}, done)
	})
	if err != nil {
		f.t.Fatal(err)
	}
}

func (f *adminFixture) do(method, path, token string) (int, []byte) {
	f.t.Helper()
	req, _ := http.NewRequest(method, f.http.URL+path, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// get requires status and decodes the JSON answer into v (if not nil).
func (f *adminFixture) want(method, path string, status int, v any) {
	f.t.Helper()
	code, body := f.do(method, path, testToken)
	if code != status {
		f.t.Fatalf("%s %s: %d %s, want %d", method, path, code, body, status)
	}
	if v != nil {
		if err := json.Unmarshal(body, v); err != nil {
			f.t.Fatalf("%s %s: %v in %s", method, path, err, body)
		}
	}
}

func TestAdminAPIGroupsAndResolution(t *testing.T) {
	f := newAdminFixture(t, nil)
	g1, g2, g3 := groupID("ab01"), groupID("ab02"), groupID("cd")
	f.putSlot(g1, 1)
	f.putSlot(g1, 2)
	f.putSlot(g2, 7)
	f.putSlot(g3, 1<<63+5) // above 2^53: must survive JSON
	f.reflect(g1, 1, "hello")
	f.reflect(g1, 1, "world!")

	var list GroupList
	f.want("GET", "/api/v1/groups", 200, &list)
	if len(list.Groups) != 3 || list.Groups[0].ID != g1.String() || list.Groups[0].Slots != 2 ||
		list.Groups[0].Queued != 2 || list.Groups[0].QueuedBytes != 11 || list.Groups[0].LockHolder != nil ||
		list.Groups[0].Prefix != "ab010000" {
		t.Fatalf("groups %+v", list.Groups)
	}

	var e APIError
	f.want("GET", "/api/v1/groups/ab", http.StatusConflict, &e)
	if !strings.Contains(e.Error, "ambiguous") || !strings.Contains(e.Error, "2 groups") {
		t.Fatalf("ambiguous: %q", e.Error)
	}
	f.want("GET", "/api/v1/groups/ef", http.StatusNotFound, &e)
	f.want("GET", "/api/v1/groups/"+groupID("ef").String(), http.StatusNotFound, &e)
	f.want("GET", "/api/v1/groups/xyz", http.StatusBadRequest, &e)

	var d GroupDetail
	f.want("GET", "/api/v1/groups/AB01", 200, &d) // case-insensitive prefix
	if d.ID != g1.String() || len(d.Slots) != 2 || d.Queued != 2 || d.Lock.Held || d.Leader != nil {
		t.Fatalf("detail %+v", d)
	}
	s2 := d.Slots[1]
	if s2.DeviceID != 2 || s2.QueueLength != 2 || s2.QueueBytes != 11 || s2.Connected ||
		s2.OldestQueuedAgeSeconds == nil || s2.OldestQueuedAtMS == nil || s2.Policy != "persistent" ||
		s2.LastDisconnectAtMS == nil || *s2.LastDisconnectAtMS != 2000 || s2.ConnectedSince != nil {
		t.Fatalf("slot %+v", s2)
	}

	var sd SlotDetail
	f.want("GET", "/api/v1/groups/cd/slots/0x8000000000000005", 200, &sd)
	if sd.DeviceID != 1<<63+5 || sd.Group != g3.String() {
		t.Fatalf("slot detail %+v", sd)
	}
	_, raw := f.do("GET", "/api/v1/groups/cd/slots/9223372036854775813", testToken)
	if !bytes.Contains(raw, []byte(`"device_id": "9223372036854775813"`)) {
		t.Fatalf("device id not a decimal string: %s", raw)
	}
	f.want("GET", "/api/v1/groups/cd/slots/3", http.StatusNotFound, &e)
	f.want("GET", "/api/v1/groups/cd/slots/-1", http.StatusBadRequest, &e)
	f.want("GET", "/api/v1/nothing", http.StatusNotFound, &e)

	// Purge keeps the slot and empties the queue.
	var pr PurgeResult
	f.want("DELETE", "/api/v1/groups/ab01/slots/2/queue", 200, &pr)
	if pr.PurgedCount != 2 || pr.PurgedBytes != 11 || pr.Connected {
		t.Fatalf("purge %+v", pr)
	}
	f.want("GET", "/api/v1/groups/ab01/slots/2", 200, &sd)
	if sd.QueueLength != 0 || sd.OldestQueuedAtMS != nil {
		t.Fatalf("after purge %+v", sd)
	}
	f.want("DELETE", "/api/v1/groups/ab01/slots/9/queue", http.StatusNotFound, &e)

	// Drop deletes the slot and writes a tombstone; no lock to release.
	var dr DropResult
	f.want("DELETE", "/api/v1/groups/ab01/slots/1", 200, &dr)
	if dr.DeviceID != 1 || dr.WasConnected {
		t.Fatalf("drop %+v", dr)
	}
	f.want("DELETE", "/api/v1/groups/ab01/slots/1", http.StatusNotFound, &e)
	// The group leaves memory once the drop's store write has completed.
	for deadline := time.Now().Add(5 * time.Second); f.srv.GroupsLoaded() != 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("admin drops left %d idle group(s) in memory", f.srv.GroupsLoaded())
		}
	}
	f.want("GET", "/api/v1/groups/ab01", 200, &d)
	if len(d.Slots) != 1 || len(d.Tombstones) != 1 || d.Tombstones[0].DeviceID != 1 || d.Tombstones[0].Reason != "dropped" {
		t.Fatalf("after drop %+v", d)
	}
	var l LockInfo
	f.want("GET", "/api/v1/groups/ab01/lock", 200, &l)
	if l.Held || l.Holder != nil {
		t.Fatalf("lock %+v", l)
	}
	f.want("DELETE", "/api/v1/groups/ab01/lock", http.StatusConflict, &e)
}

func TestAdminAPIAuthStatsBackup(t *testing.T) {
	f := newAdminFixture(t, nil)
	f.putSlot(groupID("01"), 1)
	code, body := f.do("GET", "/api/v1/groups", "")
	if code != http.StatusUnauthorized || !bytes.Contains(body, []byte(`"error"`)) {
		t.Fatalf("without token: %d %s", code, body)
	}
	if code, _ := f.do("GET", "/api/v1/groups", "wrong"); code != http.StatusUnauthorized {
		t.Fatalf("wrong token: %d", code)
	}
	if code, _ := f.do("GET", "/healthz", ""); code != 200 {
		t.Fatalf("healthz %d", code)
	}

	var st ServerStats
	f.want("GET", "/api/v1/stats", 200, &st)
	if st.Goroutines == 0 || st.Memory.HeapAllocBytes == 0 || st.Store.Path == "" || st.Store.FileBytes == 0 ||
		st.UptimeSeconds <= 0 || st.Config.MaxDeviceSlots != 5 {
		t.Fatalf("stats %+v", st)
	}
	if _, err := os.Stat("/proc/self/status"); err == nil && st.Memory.RSSBytes == 0 {
		t.Fatal("no RSS")
	}

	code, body = f.do("GET", "/api/v1/backup", testToken)
	if code != 200 || len(body) == 0 {
		t.Fatalf("backup %d (%d bytes)", code, len(body))
	}
	path := filepath.Join(t.TempDir(), "backup.db")
	if err := os.WriteFile(path, body, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := reflection.Check(path); err != nil {
		t.Fatalf("backup does not check: %v", err)
	}
	copyDB, err := reflection.Open(path, reflection.Options{Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	defer copyDB.Close()
	if gs, err := copyDB.Group(groupID("01")); err != nil || len(gs.Slots) != 1 || gs.Slots[0].DeviceID != 1 {
		t.Fatalf("backup content %+v %v", gs, err)
	}
}

// storeOnly hides the optional methods of the concrete store.
type storeOnly struct{ reflection.Store }

func TestAdminAPIBackupUnsupported(t *testing.T) {
	f := newAdminFixture(t, func(s reflection.Store) reflection.Store { return storeOnly{s} })
	var e APIError
	f.want("GET", "/api/v1/backup", http.StatusNotImplemented, &e)
	if e.Error == "" {
		t.Fatal("no error message")
	}
}

// routeRequest turns a registered pattern into a request line: its
// method (GET for a pattern without one) and a path with a sample value
// for every wildcard.
func routeRequest(pattern string) (method, path string) {
	method, path, ok := strings.Cut(pattern, " ")
	if !ok {
		method, path = "GET", pattern
	}
	samples := map[string]string{"group": "ab", "device": "1", "shard": "00", "node": "m1"}
	for {
		i := strings.Index(path, "{")
		if i < 0 {
			return method, path
		}
		j := strings.Index(path[i:], "}") + i
		v, ok := samples[strings.TrimSuffix(path[i+1:j], "...")]
		if !ok {
			v = "x"
		}
		path = path[:i] + v + path[j+1:]
	}
}

// TestAdminAPIRoutesNeedToken walks every route the handler registers
// (Routes): each answers 401 without the token and with a wrong one,
// except health and readiness. The cluster endpoints exist on a single
// node too and say it is not in cluster mode.
func TestAdminAPIRoutesNeedToken(t *testing.T) {
	f := newAdminFixture(t, nil)
	public, private := Routes(f.http.Config.Handler)
	if len(public) != 2 || len(private) < 15 || !slices.Contains(private, "GET /api/v1/cluster/nodes") {
		t.Fatalf("routes: public %q, private %q", public, private)
	}
	for _, p := range public {
		method, path := routeRequest(p)
		if code, _ := f.do(method, path, ""); code == http.StatusUnauthorized {
			t.Errorf("%s %s without a token: 401, but health and readiness need none", method, path)
		}
	}
	for _, p := range private {
		method, path := routeRequest(p)
		for _, tok := range []string{"", "wrong"} {
			if code, body := f.do(method, path, tok); code != http.StatusUnauthorized {
				t.Errorf("%s %s with token %q: %d %s, want 401", method, path, tok, code, body)
			}
		}
	}
	var e APIError
	for _, path := range []string{"/api/v1/cluster/nodes", "/api/v1/cluster/shards"} {
		f.want("GET", path, http.StatusNotFound, &e)
		if !strings.Contains(e.Error, "not in cluster mode") {
			t.Errorf("%s on a single node: %q", path, e.Error)
		}
	}
}
