package cluster

import (
	"fmt"
	"strings"
)

// HAProxyMap renders the shard map in HAProxy map-file format: one line
// per served shard, "<prefix8> <node id>", where prefix8 is the shard as
// two lowercase hex digits (the first path segment of every device URL,
// docs/protocol.md §2) and the value names the HAProxy backend of the owner
// node. Shards without a live owner are left out, so the lookup falls
// back to the default backend, whose nodes answer 503 with Retry-After
// or forward. See the package doc for the haproxy.cfg lines that use it.
func (n *Node) HAProxyMap() string {
	n.mu.Lock()
	rev := n.view.rev
	var owners [NumShards]string
	for i, o := range n.view.owner {
		if o != nil {
			owners[i] = o.Node
		}
	}
	n.mu.Unlock()
	return RenderHAProxyMap(rev, owners)
}

// RenderHAProxyMap renders owners (node id per shard, "" for none) as
// HAProxyMap does; rev goes into the header comment.
func RenderHAProxyMap(rev int64, owners [NumShards]string) string {
	var b strings.Builder
	b.Grow(16 + NumShards*16)
	fmt.Fprintf(&b, "# d2m-mediator shard map at etcd revision %d: <prefix8> <backend>\n", rev)
	for i, node := range owners {
		if node == "" {
			continue
		}
		b.WriteString(Shard(i).String())
		b.WriteByte(' ')
		b.WriteString(node)
		b.WriteByte('\n')
	}
	return b.String()
}
