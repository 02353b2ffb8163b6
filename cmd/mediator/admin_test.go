package main

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestFormatHelpers(t *testing.T) {
	for d, want := range map[time.Duration]string{
		-time.Second: "0ms", 850 * time.Millisecond: "850ms", 42 * time.Second: "42s",
		5*time.Minute + 3*time.Second: "5m03s", 2*time.Hour + 5*time.Minute: "2h05m", 76 * time.Hour: "3d04h",
	} {
		if got := fmtDuration(d); got != want {
			t.Errorf("fmtDuration(%v) = %q, want %q", d, got, want)
		}
	}
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1536: "1.5 KiB", 64 << 20: "64.0 MiB"} {
		if got := fmtBytes(n); got != want {
			t.Errorf("fmtBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func testClient(t *testing.T, addr string) *adminClient {
	t.Helper()
	tokenFile := filepath.Join(t.TempDir(), "admin.token")
	os.WriteFile(tokenFile, []byte("tok\n"), 0o600)
	c, err := (&adminOptions{addr: addr, tokenFile: tokenFile}).client()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestAdminClientErrors(t *testing.T) {
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/unauthorized":
			w.WriteHeader(http.StatusUnauthorized)
		case "/conflict":
			w.WriteHeader(http.StatusConflict)
			w.Write([]byte(`{"error": "group prefix ab is ambiguous"}`))
		case "/teapot":
			w.WriteHeader(http.StatusNotFound) // not the admin API's JSON
		case "/ok":
			if r.Header.Get("Authorization") != "Bearer tok" {
				w.WriteHeader(http.StatusUnauthorized)
			}
		}
	}))
	defer hs.Close()
	c := testClient(t, hs.URL)
	for path, want := range map[string]string{
		"/unauthorized": "admin token rejected",
		"/conflict":     "group prefix ab is ambiguous",
		"/teapot":       "is it the mediator's admin address?",
	} {
		_, err := c.do(context.Background(), "GET", path)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", path, err, want)
		}
	}
	if resp, err := c.do(context.Background(), "GET", "/ok"); err != nil {
		t.Errorf("/ok: %v", err)
	} else {
		resp.Body.Close()
	}

	// Nobody listening.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, err = testClient(t, addr).do(context.Background(), "GET", "/api/v1/stats")
	if err == nil || err.Error() != "cannot reach the admin API at "+addr+": is the server running?" {
		t.Errorf("refused: %v", err)
	}
}

func TestAdminCommandUsage(t *testing.T) {
	for _, args := range [][]string{{"slots"}, {"slots", "bogus"}, {"lock", "--json"}} {
		err := adminCommand(context.Background(), args, nil)
		if err == nil || !strings.Contains(err.Error(), "mediator "+args[0]) {
			t.Errorf("%v: %v", args, err)
		}
	}
	if _, err := (&adminOptions{addr: "127.0.0.1:1", tokenFile: filepath.Join(t.TempDir(), "missing")}).client(); err == nil ||
		!strings.Contains(err.Error(), "MEDIATOR_ADMIN_TOKEN_FILE") {
		t.Errorf("missing token file: %v", err)
	}
}
