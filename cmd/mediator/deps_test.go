package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestServerBinaryDependencies keeps device-side and test code out of the
// server binary: the server never decrypts (d2d), never acts as a device
// (d2mclient, cspclient) and carries no test support (mediatortest, the
// testing package, the embedded etcd server).
func TestServerBinaryDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	forbidden := []string{
		"d2m-mediator/d2d",
		"d2m-mediator/d2m/d2mclient",
		"d2m-mediator/chatproxy/cspclient",
		"d2m-mediator/mediator/mediatortest",
		"testing",
		"go.etcd.io/etcd/server/v3",
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list -deps listed only %d packages", len(deps))
	}
	for _, d := range deps {
		for _, f := range forbidden {
			if d == f || strings.HasPrefix(d, f+"/") {
				t.Errorf("cmd/mediator links %s", d)
			}
		}
	}
}
