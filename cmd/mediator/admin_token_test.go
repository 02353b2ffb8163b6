package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestServeToken: a named token file is used as it is or refused with the
// reason; only the default file is generated.
func TestServeToken(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // past the umask
			t.Fatal(err)
		}
		return p
	}
	good := write("good", "s3cret-token\n", 0o600)
	for _, tc := range []struct {
		name, path string
		want       string // error substring; "" = ok
	}{
		{"ok", good, ""},
		{"owner read-only", write("ro", "tok", 0o400), ""},
		{"missing", filepath.Join(dir, "nope"), "does not exist: create it once with (umask 077; od"},
		{"world readable", write("world", "tok", 0o644), "readable or writable by group or others (mode 0644)"},
		{"group readable", write("group", "tok", 0o640), "chmod 0600"},
		{"empty", write("empty", "\n", 0o600), "is empty"},
		{"two words", write("words", "a b", 0o600), "does not hold a token"},
		{"directory", dir, "not a regular file"},
	} {
		tok, err := serveToken(tc.path, true)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: token %q, error %v; want an error with %q", tc.name, tok, err, tc.want)
		}
	}
	if tok, _ := serveToken(good, true); tok != "s3cret-token" {
		t.Errorf("token %q", tok)
	}
	// systemd's credential copy may show group bits (an ACL on tmpfs).
	creds := filepath.Join(dir, "creds")
	os.Mkdir(creds, 0o700)
	cred := filepath.Join(creds, "admin.token")
	os.WriteFile(cred, []byte("tok"), 0o440)
	os.Chmod(cred, 0o440)
	if _, err := serveToken(cred, true); err == nil {
		t.Error("0440 file accepted without CREDENTIALS_DIRECTORY")
	}
	t.Setenv("CREDENTIALS_DIRECTORY", creds)
	if tok, err := serveToken(cred, true); err != nil || tok != "tok" {
		t.Errorf("credential: %q %v", tok, err)
	}
	if _, err := serveToken(filepath.Join(dir, "group"), true); err == nil {
		t.Error("a 0640 file outside the credentials directory accepted")
	}

	// The default path is generated (0600) and read back the next time.
	def := filepath.Join(dir, "data", "admin.token")
	tok, err := serveToken(def, false)
	if err != nil || len(tok) != 64 {
		t.Fatalf("generated: %q %v", tok, err)
	}
	if again, err := serveToken(def, false); err != nil || again != tok {
		t.Fatalf("second start: %q %v, want %q", again, err, tok)
	}
	if _, err := serveToken(filepath.Join(dir, "data", "other.token"), true); err == nil {
		t.Fatal("a named missing file was accepted (generated?)")
	}
}

// TestClusterNeedsSharedPieces: cluster mode refuses to start without a
// chat server and a token file common to all nodes, saying why.
func TestClusterNeedsSharedPieces(t *testing.T) {
	t.Setenv("MEDIATOR_CHAT_SERVER", "")
	os.Unsetenv("MEDIATOR_CHAT_SERVER")
	t.Setenv("MEDIATOR_ADMIN_TOKEN_FILE", "")
	os.Unsetenv("MEDIATOR_ADMIN_TOKEN_FILE")
	base := []string{"--cluster-etcd", "http://127.0.0.1:2379", "--node-id", "m1"}
	for _, tc := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{nil, nil, "cluster mode needs --chat-server: every node must proxy to the same chat server"},
		{[]string{"--chat-server", "chat:5222"}, nil, "cluster mode needs --admin-token-file (or MEDIATOR_ADMIN_TOKEN_FILE): every node"},
		{[]string{"--chat-server", "chat:5222", "--admin-token-file", "/etc/mediator/admin.token"}, nil, ""},
		{nil, map[string]string{"MEDIATOR_CHAT_SERVER": "chat:5222", "MEDIATOR_ADMIN_TOKEN_FILE": "/t"}, ""},
	} {
		for k, v := range tc.env {
			t.Setenv(k, v)
		}
		_, err := parseServeFlags(append(append([]string{}, base...), tc.args...))
		for k := range tc.env {
			os.Unsetenv(k)
		}
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%q %v: %v", tc.args, tc.env, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%q: %v, want %q", tc.args, err, tc.want)
		}
	}
	// A single node still starts its stand-in and generates its token.
	if _, err := parseServeFlags(nil); err != nil {
		t.Fatalf("single node: %v", err)
	}
}
