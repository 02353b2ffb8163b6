package cluster

import (
	"encoding/hex"
	"fmt"
	"regexp"
	"strings"
	"time"
)

// NumShards is the number of shards: one per value of the first byte of a
// device group id.
const NumShards = 256

// Shard is the first byte of a device group id. Clients put it in the URL
// as the /{prefix8}/ path segment (docs/protocol.md §2), so a load balancer can
// route by it and everything of one group stays on one node.
type Shard uint8

// ShardOf returns the shard of a device group id (its first byte).
func ShardOf(deviceGroupID []byte) Shard {
	if len(deviceGroupID) == 0 {
		return 0
	}
	return Shard(deviceGroupID[0])
}

// String is the shard as two lowercase hex digits, as in the URL and the
// etcd keys.
func (s Shard) String() string { return hex.EncodeToString([]byte{byte(s)}) }

// ParseShard parses two hex digits (either case).
func ParseShard(v string) (Shard, error) {
	b, err := hex.DecodeString(v)
	if err != nil || len(b) != 1 {
		return 0, fmt.Errorf("cluster: shard %q: want two hex digits", v)
	}
	return Shard(b[0]), nil
}

var nodeIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// ValidNodeID reports whether id can name a node: it becomes part of etcd
// keys and of HAProxy backend names.
func ValidNodeID(id string) bool { return nodeIDPattern.MatchString(id) }

// DefaultPrefix is the etcd key prefix of one cluster.
const DefaultPrefix = "/d2m-mediator/"

// keys spells the key layout (see the package doc).
type keys struct{ prefix string }

func newKeys(prefix string) keys {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	return keys{prefix: prefix}
}

func (k keys) nodes() string          { return k.prefix + "nodes/" }
func (k keys) node(id string) string  { return k.nodes() + id }
func (k keys) assigns() string        { return k.prefix + "assign/" }
func (k keys) assign(s Shard) string  { return k.assigns() + s.String() }
func (k keys) owners() string         { return k.prefix + "shards/" }
func (k keys) owner(s Shard) string   { return k.owners() + s.String() }
func (k keys) moves() string          { return k.prefix + "moves/" }
func (k keys) move(s Shard) string    { return k.moves() + s.String() }
func (k keys) drains() string         { return k.prefix + "drain/" }
func (k keys) drain(id string) string { return k.drains() + id }
func (k keys) electionPrefix() string { return k.prefix + "controller" }
func (k keys) secret() string         { return k.prefix + "secret" }
func (k keys) shardSuffix(key, dir string) (Shard, bool) {
	if !strings.HasPrefix(key, dir) {
		return 0, false
	}
	s, err := ParseShard(key[len(dir):])
	return s, err == nil && len(key)-len(dir) == 2
}

// nodeRecord is the value of nodes/<id>, attached to the node's lease.
type nodeRecord struct {
	Advertise string    `json:"advertise"`
	Started   time.Time `json:"started"`
	// Admin is where other nodes reach this node's admin API (host:port;
	// empty: none), TLS whether its device listener serves TLS.
	Admin string `json:"admin,omitempty"`
	TLS   bool   `json:"tls,omitempty"`
}

// assignRecord is the value of assign/<NN>, without a lease: the node that
// holds (or must come back to serve) the shard's data.
type assignRecord struct {
	Node string `json:"node"`
	// By says who wrote it: "controller", "failover", "move" or
	// "reassign" (an operator accepted data loss).
	By string `json:"by"`
	// Gen is the generation of the copy Node must serve (Hooks): a
	// move's export revision, 0 for a shard never moved.
	Gen int64 `json:"gen,omitempty"`
	// Fresh: Node serves the shard from empty (reassign, failover); its
	// copy's generation becomes this record's revision.
	Fresh bool `json:"fresh,omitempty"`
}

// ownerRecord is the value of shards/<NN>, attached to the owner's lease
// and written only by the owner itself. Its ModRevision is the epoch.
type ownerRecord struct {
	Node      string `json:"node"`
	Advertise string `json:"advertise"`
}

// drainRecord is the value of drain/<id>, without a lease: the node takes
// no shards and gives its shards away (DrainNode) until Undrain.
type drainRecord struct {
	Since time.Time `json:"since"`
}

// MoveState names the states of a planned move.
type MoveState string

// The move states in order; a move ends in StateHandedOver or StateAborted.
// "serving" is the state of a shard with no move record.
const (
	StateServing    MoveState = "serving"
	StateDraining   MoveState = "draining"
	StateExported   MoveState = "exported"
	StateHandedOver MoveState = "handed-over"
	StateAborted    MoveState = "aborted"
)

// moveRecord is the value of moves/<NN>, without a lease.
type moveRecord struct {
	ID        string    `json:"id"`
	From      string    `json:"from"`
	To        string    `json:"to"`
	State     MoveState `json:"state"`
	FromEpoch int64     `json:"from_epoch"`
	Reason    string    `json:"reason,omitempty"`
	Started   time.Time `json:"started"`
}

func (m moveRecord) finished() bool { return m.State == StateHandedOver || m.State == StateAborted }
