package main

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"d2m-mediator/chatproxy/csp"
	"d2m-mediator/chatproxy/cspclient"
)

func TestHelpSaysStandIn(t *testing.T) {
	var out bytes.Buffer
	err := serve(context.Background(), []string{"--help"}, &out, &out)
	if !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("got %v", err)
	}
	for _, want := range []string{"STAND-IN", "not a\nreal chat server", "-listen", "-key-file", "-log-format"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("help lacks %q:\n%s", want, out.String())
		}
	}
}

// syncBuffer lets the test read what serve prints while it runs.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestServePrintsKeyAndStops(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	var stdout, stderr syncBuffer
	keyFile := filepath.Join(t.TempDir(), "data", "chatstub.key")
	done := make(chan error, 1)
	go func() {
		done <- serve(ctx, []string{"--listen", "127.0.0.1:0", "--key-file", keyFile, "--log-format", "json"}, &stdout, &stderr)
	}()

	var addr, key string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && key == ""; time.Sleep(5 * time.Millisecond) {
		for _, line := range strings.Split(stdout.String(), "\n") {
			if a, ok := strings.CutPrefix(line, "chatstub (stand-in chat server, not for production) listening on "); ok {
				addr = a
			}
			if k, ok := strings.CutPrefix(line, "public key: "); ok {
				key = k
			}
		}
	}
	pub, err := hex.DecodeString(key)
	if err != nil || len(pub) != 32 || addr == "" {
		t.Fatalf("stdout %q", stdout.String())
	}

	// A client that pins the printed key can log in.
	tr, err := cspclient.DialTCP(ctx, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	ident, _ := cspclient.NewIdentity("MAINTEST")
	lctx, lcancel := context.WithTimeout(ctx, 5*time.Second)
	defer lcancel()
	if _, err := cspclient.Login(lctx, tr, ident, [32]byte(pub), cspclient.LoginOptions{}); err != nil {
		t.Fatal(err)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("serve did not stop after cancel")
	}
	if !strings.Contains(stderr.String(), `"identity":"MAINTEST"`) {
		t.Errorf("login not logged: %s", stderr.String())
	}
}

func TestBadLogFormat(t *testing.T) {
	var out bytes.Buffer
	if err := serve(context.Background(), []string{"--log-format", "xml", "--key-file", filepath.Join(t.TempDir(), "k")}, &out, &out); err == nil {
		t.Fatal("accepted --log-format xml")
	}
}

// TestServeSeveralAddresses: one process, several listeners (a mediator
// --chat-server template spreads its upstreams over them), one key; at
// --log-level warn a login is not logged.
func TestServeSeveralAddresses(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var stdout, stderr syncBuffer
	keyFile := filepath.Join(t.TempDir(), "chatstub.key")
	done := make(chan error, 1)
	go func() {
		done <- serve(ctx, []string{"--listen", "127.0.0.1:0, 127.0.0.1:0", "--key-file", keyFile, "--log-format", "json", "--log-level", "warn"}, &stdout, &stderr)
	}()
	var addrs []string
	var key string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && key == ""; time.Sleep(5 * time.Millisecond) {
		addrs = nil
		for _, line := range strings.Split(stdout.String(), "\n") {
			if a, ok := strings.CutPrefix(line, "chatstub (stand-in chat server, not for production) listening on "); ok {
				addrs = append(addrs, a)
			}
			if k, ok := strings.CutPrefix(line, "public key: "); ok {
				key = k
			}
		}
	}
	pub, err := hex.DecodeString(key)
	if err != nil || len(pub) != 32 || len(addrs) != 2 || addrs[0] == addrs[1] {
		t.Fatalf("stdout %q", stdout.String())
	}
	for i, addr := range addrs {
		tr, err := cspclient.DialTCP(ctx, addr)
		if err != nil {
			t.Fatal(err)
		}
		ident, _ := cspclient.NewIdentity(fmt.Sprintf("MULTI%03d", i))
		lctx, lcancel := context.WithTimeout(ctx, 5*time.Second)
		cl, err := cspclient.Login(lctx, tr, ident, [32]byte(pub), cspclient.LoginOptions{})
		if err != nil {
			t.Fatalf("%s: %v", addr, err)
		}
		if err := cl.Echo([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		if b, err := cl.RecvType(lctx, csp.EchoResponse); err != nil || string(b) != "ping" {
			t.Fatalf("%s: echo %q %v", addr, b, err)
		}
		lcancel()
		tr.Close()
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("serve did not stop after cancel")
	}
	if strings.Contains(stderr.String(), "MULTI") {
		t.Errorf("login logged at --log-level warn: %s", stderr.String())
	}
}

func TestBadListenAndLevel(t *testing.T) {
	var out bytes.Buffer
	dir := t.TempDir()
	for _, args := range [][]string{
		{"--log-level", "loud"},
		{"--listen", " , "},
		{"--listen", "127.0.0.1:0,256.0.0.1:1"},
	} {
		if err := serve(context.Background(), append(args, "--key-file", filepath.Join(dir, "k")), &out, &out); err == nil {
			t.Errorf("%q accepted", args)
		}
	}
}
