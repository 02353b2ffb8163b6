package main

import (
	"bytes"
	"context"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"d2m-mediator/mediator"
	"d2m-mediator/mediator/adminapi"
	"d2m-mediator/reflection"
)

// singleNode serves the real admin API of a single-node server over a
// fresh database and returns the global flags that point the CLI at it.
func singleNode(t *testing.T) []string {
	t.Helper()
	dir := t.TempDir()
	db, err := reflection.Open(filepath.Join(dir, "mediator.db"), reflection.Options{Logger: zerolog.Nop()})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := mediator.New(mediator.Config{}, db, zerolog.Nop())
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(adminapi.Handler(srv, "tok", zerolog.Nop()))
	t.Cleanup(func() {
		hs.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		db.Close()
	})
	tokenFile := filepath.Join(dir, "admin.token")
	if err := os.WriteFile(tokenFile, []byte("tok\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"--admin", hs.URL, "--admin-token-file", tokenFile}
}

// runAdmin runs an admin command and returns what it printed.
func runAdmin(t *testing.T, globals []string, args ...string) (string, error) {
	t.Helper()
	var buf bytes.Buffer
	stdout = &buf
	defer func() { stdout = os.Stdout }()
	err := adminCommand(context.Background(), args, globals)
	return buf.String(), err
}

// TestClusterCommandsOnSingleNode: the cluster commands against a single
// node say that it is not in cluster mode; groups list and stats keep
// their one-node form there, with or without --local.
func TestClusterCommandsOnSingleNode(t *testing.T) {
	g := singleNode(t)
	for _, cmd := range [][]string{{"cluster", "nodes"}, {"cluster", "shards"}, {"cluster", "drain", "m1"}} {
		out, err := runAdmin(t, g, cmd...)
		if err == nil || !strings.HasPrefix(err.Error(), "not in cluster mode: this mediator runs as a single node") || out != "" {
			t.Errorf("%v: %v (printed %q)", cmd, err, out)
		}
	}
	for _, local := range []bool{false, true} {
		args := []string{"groups", "list"}
		if local {
			args = append(args, "--local")
		}
		out, err := runAdmin(t, g, args...)
		if err != nil || out != "no device groups\n" {
			t.Errorf("%v: %q %v", args, out, err)
		}
		args = []string{"stats"}
		if local {
			args = append(args, "--local")
		}
		out, err = runAdmin(t, g, args...)
		if err != nil || !strings.HasPrefix(out, "uptime ") || strings.Contains(out, "NODE") {
			t.Errorf("%v: %q %v", args, out, err)
		}
	}
	if _, err := runAdmin(t, g, "slots", "list", "ab", "--local"); err == nil || !strings.Contains(err.Error(), "-local") {
		t.Errorf("--local on slots list: %v", err)
	}
}

func TestClusterFlags(t *testing.T) {
	dir := t.TempDir()
	notPEM := filepath.Join(dir, "ca.pem")
	os.WriteFile(notPEM, []byte("not a certificate\n"), 0o600)
	for _, tc := range []struct {
		c    clusterFlags
		want string
	}{
		{clusterFlags{caFile: notPEM}, "need --cluster-etcd"},
		{clusterFlags{adminAdvertise: "h:1"}, "need --cluster-etcd"},
		{clusterFlags{etcd: "http://e:2379", nodeID: "m1", leaseTTL: time.Second, adminAdvertise: "h"}, `--cluster-admin-advertise "h": want host:port`},
		{clusterFlags{etcd: "http://e:2379", nodeID: "m1", leaseTTL: time.Second, caFile: notPEM}, "--cluster-ca-file " + notPEM + ": no PEM certificate in it"},
		{clusterFlags{etcd: "http://e:2379", nodeID: "m1", leaseTTL: time.Second, caFile: filepath.Join(dir, "missing")}, "--cluster-ca-file: open"},
	} {
		if _, err := tc.c.config(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.c, err, tc.want)
		}
	}
	cc, err := (&clusterFlags{etcd: "http://e:2379", nodeID: "m1", leaseTTL: time.Second, adminAdvertise: "10.0.0.1:8766"}).config()
	if err != nil || cc.AdminAdvertise != "10.0.0.1:8766" || cc.RootCAs != nil {
		t.Fatalf("%+v %v", cc, err)
	}
}
