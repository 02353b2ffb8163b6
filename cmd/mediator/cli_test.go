package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
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
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		fs.SetOutput(new(bytes.Buffer))
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
