package cluster

import (
	"flag"
	"os"
	"path/filepath"
	"testing"
)

var update = flag.Bool("update", false, "rewrite golden files")

// TestHAProxyMapGolden: three nodes own the shards round-robin, shard 10
// has no live owner and is left out (the default backend answers).
func TestHAProxyMapGolden(t *testing.T) {
	var owners [NumShards]string
	for i := range owners {
		owners[i] = []string{"node-a", "node-b", "node-c"}[i%3]
	}
	owners[0x10] = ""
	got := RenderHAProxyMap(1234, owners)
	path := filepath.Join("testdata", "haproxy.map.golden")
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got != string(want) {
		t.Fatalf("map differs from %s (run with -update to rewrite):\n%s", path, got)
	}
}
