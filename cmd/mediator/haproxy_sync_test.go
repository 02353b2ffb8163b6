package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rs/zerolog"
)

// TestHAProxySyncMapSource: the map comes from the first admin address
// that answers, and stays with it; a node that is not in cluster mode and
// a wrong token get errors that say what to check.
func TestHAProxySyncMapSource(t *testing.T) {
	const served = "# d2m-mediator shard map at etcd revision 9: <prefix8> <backend>\n2a node-a\n"
	node := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/cluster/haproxy.map" || r.Header.Get("Authorization") != "Bearer tok" {
			http.Error(w, "no", http.StatusUnauthorized)
			return
		}
		w.Write([]byte(served))
	}))
	defer node.Close()
	single := httptest.NewServer(http.NotFoundHandler()) // a node without --cluster-etcd
	defer single.Close()
	tokenFile := filepath.Join(t.TempDir(), "admin.token")
	os.WriteFile(tokenFile, []byte("tok\n"), 0o600)

	down := "127.0.0.1:1"
	src, err := newMapSource(down+", "+node.URL, tokenFile)
	if err != nil {
		t.Fatal(err)
	}
	src.log = zerolog.Nop()
	for range 2 {
		text, err := src.fetch(context.Background())
		if err != nil || text != served {
			t.Fatalf("fetch: %q %v", text, err)
		}
		if src.cur != 1 {
			t.Fatalf("answering node %d, want 1", src.cur)
		}
	}

	src, _ = newMapSource(single.URL, tokenFile)
	if _, err := src.fetch(context.Background()); err == nil || !strings.Contains(err.Error(), "cluster mode") {
		t.Fatalf("a single node: %v", err)
	}
	bad := filepath.Join(t.TempDir(), "admin.token")
	os.WriteFile(bad, []byte("wrong\n"), 0o600)
	src, _ = newMapSource(node.URL, bad)
	if _, err := src.fetch(context.Background()); err == nil || !strings.Contains(err.Error(), "admin token rejected") {
		t.Fatalf("a wrong token: %v", err)
	}
	if _, err := newMapSource(" , ", tokenFile); err == nil {
		t.Fatal("an empty --admin was accepted")
	}
}

func TestHAProxySyncFlags(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--interval", "1ms"}, "--interval 1ms: at least 10ms"},
		{[]string{"--socket", ""}, "--socket"},
		{[]string{"--map-file", "/nonexistent/dir/shards.map"}, "its directory does not exist"},
		{[]string{"extra"}, "want 0 argument(s)"},
	} {
		err := runHAProxySync(context.Background(), tc.args, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want %q", tc.args, err, tc.want)
		}
	}
}
