package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParseInterspersed(t *testing.T) {
	for _, tc := range []struct {
		args      []string
		pos       []string
		json      bool
		admin     string
		wantError string
	}{
		{args: []string{"3fa2", "--json"}, pos: []string{"3fa2"}, json: true, admin: "default"},
		{args: []string{"--json", "3fa2"}, pos: []string{"3fa2"}, json: true, admin: "default"},
		{args: []string{"3fa2", "--admin", "h:1", "0x2"}, pos: []string{"3fa2", "0x2"}, admin: "h:1"},
		{args: []string{"3fa2", "--admin=h:2", "-json", "0x2"}, pos: []string{"3fa2", "0x2"}, json: true, admin: "h:2"},
		{args: []string{"--", "--json"}, pos: []string{"--json"}, admin: "default"},
		{args: []string{"-"}, pos: []string{"-"}, admin: "default"},
		{args: []string{"3fa2", "--jsn"}, wantError: "flag provided but not defined: -jsn"},
		{args: []string{"3fa2", "--admin"}, wantError: "flag needs an argument: -admin"},
	} {
		captureOutput(t) // the usage printed on a parse error
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		j := fs.Bool("json", false, "")
		a := fs.String("admin", "default", "")
		pos, err := parseInterspersed(fs, tc.args)
		if tc.wantError != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantError) {
				t.Errorf("%q: error %v, want %q", tc.args, err, tc.wantError)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(pos, tc.pos) || *j != tc.json || *a != tc.admin {
			t.Errorf("%q: pos %q json %v admin %q err %v; want %q %v %q", tc.args, pos, *j, *a, err, tc.pos, tc.json, tc.admin)
		}
	}
}

func TestSplitGlobalFlags(t *testing.T) {
	for _, tc := range []struct {
		args, globals, rest []string
		wantError           string
	}{
		{args: []string{"groups", "list"}, rest: []string{"groups", "list"}},
		{args: []string{"--admin-token-file", "F", "groups", "list"}, globals: []string{"--admin-token-file", "F"}, rest: []string{"groups", "list"}},
		{args: []string{"--json", "--admin=h:1", "stats"}, globals: []string{"--json", "--admin=h:1"}, rest: []string{"stats"}},
		{args: []string{"-data", "/d", "db", "check"}, globals: []string{"-data", "/d"}, rest: []string{"db", "check"}},
		{args: []string{"--help"}, rest: []string{"help"}},
		{args: []string{"--listen", ":1", "serve"}, wantError: "unknown flag --listen before the command"},
		{args: []string{"--admin"}, wantError: "flag --admin needs a value"},
	} {
		g, r, err := splitGlobalFlags(tc.args)
		if tc.wantError != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantError) {
				t.Errorf("%q: error %v, want %q", tc.args, err, tc.wantError)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(g, tc.globals) || !reflect.DeepEqual(r, tc.rest) {
			t.Errorf("%q: globals %q rest %q err %v; want %q %q", tc.args, g, r, err, tc.globals, tc.rest)
		}
	}
}

func TestLoggerFormats(t *testing.T) {
	for _, tc := range []struct {
		format   string
		terminal bool
		noColor  bool
		json     bool
		ansi     bool
	}{
		{format: "auto", terminal: false, json: true},
		{format: "auto", terminal: true, ansi: true},
		{format: "auto", terminal: true, noColor: true},
		{format: "console", terminal: false},
		{format: "json", terminal: true, json: true},
	} {
		if tc.noColor {
			t.Setenv("NO_COLOR", "1")
		} else {
			t.Setenv("NO_COLOR", "")
		}
		var buf bytes.Buffer
		log, err := newLoggerTo(&buf, tc.terminal, tc.format, "info")
		if err != nil {
			t.Fatal(err)
		}
		log.Info().Dur("took", 220*time.Microsecond).Msg("hello")
		out := buf.String()
		var v struct{ Took string }
		isJSON := json.Unmarshal(buf.Bytes(), &v) == nil
		if isJSON != tc.json || strings.Contains(out, "\x1b[") != tc.ansi {
			t.Errorf("%+v: output %q (json %v)", tc, out, isJSON)
		}
		// The duration carries its unit in both formats.
		if !strings.Contains(out, "220µs") || (isJSON && v.Took != "220µs") {
			t.Errorf("%+v: duration without unit in %q", tc, out)
		}
	}
	if _, err := newLoggerTo(new(bytes.Buffer), false, "json", "loud"); err == nil {
		t.Error("bad level accepted")
	}
}

func TestVersion(t *testing.T) {
	var buf bytes.Buffer
	stdout = &buf
	defer func() { stdout = os.Stdout }()
	if err := versionCommand([]string{"--json"}); err != nil {
		t.Fatal(err)
	}
	var v buildVersion
	if err := json.Unmarshal(buf.Bytes(), &v); err != nil {
		t.Fatalf("%v in %q", err, buf.String())
	}
	if v.Module != "d2m-mediator" || !strings.HasPrefix(v.GoVersion, "go1.") || v.Version == "" || v.Revision == "" {
		t.Fatalf("version %+v", v)
	}
	if err := versionCommand([]string{"extra"}); err == nil {
		t.Fatal("version with an argument accepted")
	}
	if err := versionCommand([]string{"--bogus"}); err == nil || errors.Is(err, flag.ErrHelp) {
		t.Fatalf("version --bogus: %v", err)
	}
}

// captureOutput points stdout and stderr at buffers for one test.
func captureOutput(t *testing.T) (out, errOut *bytes.Buffer) {
	out, errOut = new(bytes.Buffer), new(bytes.Buffer)
	stdout, stderr = out, errOut
	t.Cleanup(func() { stdout, stderr = os.Stdout, os.Stderr })
	return out, errOut
}

// One rule for help everywhere: asked for, it goes to stdout and the exit
// status is 0, whether the command is a group (slots), a command with a
// flag set (slots list, serve) or the db dispatcher.
func TestHelpGoesToStdout(t *testing.T) {
	for _, args := range [][]string{
		{"--help"}, {"-h"}, {"help"},
		{"serve", "--help"}, {"serve", "-h"},
		{"groups", "--help"}, {"slots", "--help"}, {"queue", "-h"}, {"lock", "--help"}, {"cluster", "--help"},
		{"slots", "list", "--help"}, {"cluster", "reassign", "-help"}, {"stats", "--help"},
		{"db", "--help"}, {"db", "backup", "--help"}, {"db", "check", "-h"}, {"db", "compact", "--help"},
		{"version", "--help"},
	} {
		out, errOut := captureOutput(t)
		status := exitStatus(run(args))
		if status != 0 || !strings.Contains(strings.ToLower(out.String()), "usage") || errOut.Len() != 0 {
			t.Errorf("mediator %q: exit %d, stdout %q, stderr %q; want the help on stdout and exit 0", args, status, out.String(), errOut.String())
		}
	}
	// The group help lists the group's commands.
	out, _ := captureOutput(t)
	run([]string{"cluster", "--help"})
	for _, want := range []string{"mediator cluster move [flags] SHARD NODE", "mediator cluster reassign [flags] SHARD NODE", "mediator cluster nodes"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("cluster --help lacks %q:\n%s", want, out)
		}
	}
	// Mistakes are errors: exit 1, the message and the usage on stderr.
	for _, args := range [][]string{{"slots"}, {"slots", "list", "--bogus"}, {"serve", "--bogus"}, {"nonsense"}, {"db"}} {
		out, errOut := captureOutput(t)
		status := exitStatus(run(args))
		if status != 1 || out.Len() != 0 || errOut.Len() == 0 {
			t.Errorf("mediator %q: exit %d, stdout %q, stderr %q; want exit 1 with stderr only", args, status, out.String(), errOut.String())
		}
	}
}

// --force and --accept-data-loss are typed, never inherited: with
// MEDIATOR_FORCE=1 an existing backup file is refused and left as it was,
// and MEDIATOR_ACCEPT_DATA_LOSS=1 does not confirm a reassign. Both
// refusals come before any request to the server.
func TestSafetyFlagsIgnoreEnvironment(t *testing.T) {
	dir := t.TempDir()
	token := filepath.Join(dir, "admin.token")
	os.WriteFile(token, []byte("tok\n"), 0o600)
	existing := filepath.Join(dir, "backup.db")
	os.WriteFile(existing, []byte("yesterday's backup"), 0o600)
	t.Setenv("MEDIATOR_FORCE", "1")
	t.Setenv("MEDIATOR_ACCEPT_DATA_LOSS", "true")
	t.Setenv("MEDIATOR_ADMIN", "127.0.0.1:1") // nothing listens: no request may be needed

	_, errOut := captureOutput(t)
	err := run([]string{"db", "backup", existing, "--admin-token-file", token})
	if err == nil || !strings.Contains(err.Error(), "exists: remove it or pass --force") {
		t.Fatalf("db backup EXISTING with MEDIATOR_FORCE=1: %v", err)
	}
	if b, _ := os.ReadFile(existing); string(b) != "yesterday's backup" {
		t.Fatalf("the existing backup was changed: %q", b)
	}
	if !strings.Contains(errOut.String(), "MEDIATOR_FORCE is ignored: --force is taken from the command line only") {
		t.Fatalf("no warning about MEDIATOR_FORCE: %q", errOut)
	}

	_, errOut = captureOutput(t)
	err = run([]string{"cluster", "reassign", "0a", "m2", "--admin-token-file", token})
	if err == nil || !strings.Contains(err.Error(), "add --accept-data-loss to confirm") {
		t.Fatalf("cluster reassign with MEDIATOR_ACCEPT_DATA_LOSS=true: %v", err)
	}
	if !strings.Contains(errOut.String(), "MEDIATOR_ACCEPT_DATA_LOSS is ignored") {
		t.Fatalf("no warning about MEDIATOR_ACCEPT_DATA_LOSS: %q", errOut)
	}
}

// A backup into a directory that does not exist names the directory, not
// the temporary file the copy would have been written to, and fails
// before asking the server for anything.
func TestBackupMissingDirectory(t *testing.T) {
	dir := t.TempDir()
	token := filepath.Join(dir, "admin.token")
	os.WriteFile(token, []byte("tok\n"), 0o600)
	missing := filepath.Join(dir, "no-such-dir")
	captureOutput(t)
	err := run([]string{"db", "backup", filepath.Join(missing, "mediator.db"), "--admin", "127.0.0.1:1", "--admin-token-file", token})
	if err == nil || !strings.Contains(err.Error(), "directory "+missing+" does not exist") || strings.Contains(err.Error(), "partial") {
		t.Fatalf("backup into a missing directory: %v", err)
	}
	err = run([]string{"db", "backup", dir, "--admin", "127.0.0.1:1", "--admin-token-file", token})
	if err == nil || !strings.Contains(err.Error(), dir+" is a directory") {
		t.Fatalf("backup onto a directory: %v", err)
	}
}
