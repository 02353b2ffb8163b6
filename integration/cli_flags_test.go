package integration

import (
	"encoding/json"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"d2m-mediator/d2m"
)

// Flags stand where people type them: before the command, before or after
// the arguments. Device ids print and parse in one form.
func TestCLIFlagPlacementAndDeviceIDs(t *testing.T) {
	s := startServer(t)
	g := newGroup()
	gid := groupHex(g)
	const dev = 0x1f00aa42c0ffee01
	a, _ := connectReady(t, s, g.config(s, dev))
	id, _ := a.Reflect(ctxT(t, time.Second), []byte("x"), 0)
	expectAck(t, a, id)
	tokenFile := filepath.Join(s.dataDir, "admin.token")

	type slotsJSON struct {
		ID    string `json:"id"`
		Slots []struct {
			DeviceID string `json:"device_id"`
		} `json:"slots"`
	}
	decode := func(args []string, r cliResult) slotsJSON {
		t.Helper()
		var v slotsJSON
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &v) != nil || v.ID != gid || len(v.Slots) != 1 ||
			v.Slots[0].DeviceID != "2233972618858327553" {
			t.Fatalf("mediator %q: exit %d, %q, stderr %q", args, r.code, r.stdout, r.stderr)
		}
		return v
	}
	for _, args := range [][]string{
		{"slots", "list", gid[:8], "--json", "--admin", s.admin, "--admin-token-file", tokenFile},
		{"slots", "list", "--json", gid[:8], "--admin=" + s.admin, "--admin-token-file=" + tokenFile},
		{"--admin-token-file", tokenFile, "--admin", s.admin, "--json", "slots", "list", gid[:8]},
		{"--admin-token-file", tokenFile, "slots", "list", gid[:8], "--admin", s.admin, "-json"},
	} {
		decode(args, runCLI(t, nil, args...))
	}
	// Global flags before the command with a table, as the README shows.
	r := runCLI(t, nil, "--admin-token-file", tokenFile, "--admin", s.admin, "groups", "list")
	if r.code != 0 || !strings.Contains(r.stdout, gid) {
		t.Fatalf("groups list with global flags: %+v", r)
	}
	// --data before the command: the token is the one in DIR.
	r = runCLI(t, []string{"MEDIATOR_ADMIN=" + s.admin}, "--data", s.dataDir, "stats", "--json")
	var st struct {
		Connections struct {
			Authenticated int `json:"authenticated"`
		} `json:"connections"`
	}
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &st) != nil || st.Connections.Authenticated != 1 {
		t.Fatalf("mediator --data DIR stats: %+v", r)
	}
	// Unknown flags are still an error, wherever they stand.
	adminCLIFail(t, s.adminEnv(), "flag provided but not defined: -jsn", "slots", "list", gid, "--jsn")
	adminCLIFail(t, s.adminEnv(), "unknown flag --jsn before the command", "--jsn", "slots", "list", gid)
	adminCLIFail(t, s.adminEnv(), "want 1 argument(s), got 2", "slots", "list", gid, "extra")

	// The table prints the id as d2m-device does; every printed or typed
	// form finds the slot.
	printed := d2m.FormatDeviceID(dev)
	if printed != "0x1f00aa42c0ffee01" {
		t.Fatalf("FormatDeviceID: %s", printed)
	}
	out := s.adminCLI(t, "slots", "list", gid)
	if !regexp.MustCompile(`(?m)^` + printed + `\s+persistent\s+online\s+`).MatchString(out) {
		t.Fatalf("slots table:\n%s", out)
	}
	for _, form := range []string{printed, "1f00aa42c0ffee01", "0X1F00AA42C0FFEE01", "dec:2233972618858327553"} {
		out := s.adminCLI(t, "slots", "show", gid, form)
		if !regexp.MustCompile(`(?m)^device\s+` + printed + ` \(dec:2233972618858327553 in --json output\)$`).MatchString(out) {
			t.Fatalf("slots show %s:\n%s", form, out)
		}
	}
	adminCLIFail(t, s.adminEnv(), "dec:", "slots", "show", gid, "2233972618858327553")
}

func TestCLIVersion(t *testing.T) {
	r := runCLI(t, nil, "version")
	if r.code != 0 || !regexp.MustCompile(`^mediator d2m-mediator \S+\nrevision \S+.*\nbuilt with go1\.\d+`).MatchString(r.stdout) {
		t.Fatalf("version: %+v", r)
	}
	var v struct {
		Module    string `json:"module"`
		GoVersion string `json:"go_version"`
		Revision  string `json:"vcs_revision"`
	}
	r = runCLI(t, nil, "version", "--json")
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &v) != nil || v.Module != "d2m-mediator" ||
		!strings.HasPrefix(v.GoVersion, "go1.") || v.Revision == "" {
		t.Fatalf("version --json: %+v", r)
	}
}
