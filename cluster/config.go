package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/rs/zerolog"
)

// Config configures a Node. Zero values mean the defaults noted.
type Config struct {
	NodeID    string // required; letters, digits, '.', '_', '-'
	Advertise string // required; host:port where other nodes and the load balancer reach this node's device listener
	Prefix    string // etcd key prefix of the cluster (DefaultPrefix)

	LeaseTTL    time.Duration // the node lease's TTL, whole seconds (5s)
	FenceMargin time.Duration // acks stop at last keepalive send + LeaseTTL − FenceMargin (LeaseTTL/5)

	// AutoFailover lets the controller give a shard whose assigned node
	// is not live to another node. Off for the local bbolt store, whose
	// data for the shard lives only on the lost node: the shard waits for
	// that node (or Reassign with acceptDataLoss). On for a replicated
	// store.
	AutoFailover bool
	// AutoRebalance lets the controller move shards (planned moves) from
	// the most to the least loaded live node until they differ by at most
	// one, for example after a node joined a running cluster.
	AutoRebalance bool
	// NoController keeps this node out of the controller election.
	NoController bool
	// SettleDelay: the controller assigns shards only once the set of
	// live nodes has not changed for this long, so nodes starting
	// together share the first assignment (1s).
	SettleDelay time.Duration
	// MaxConcurrentMoves bounds the moves Drain and rebalancing run at
	// once (4).
	MaxConcurrentMoves int
	// MoveTimeout bounds the donor's side of one move (drain, export,
	// transfer, the recipient's import and flip); past it the move is
	// aborted and the donor serves the shard again (5m).
	MoveTimeout time.Duration

	// Hooks and Transport carry a shard's data during a planned move; the
	// mediator implements them. Without them this node can neither give
	// nor take a shard by a move.
	Hooks     Hooks
	Transport Transport

	// OnEvent receives ShardGained and ShardLost events in order, one
	// at a time, on a goroutine of the node. It must not block for long.
	OnEvent func(Event)
	// OnKeepAlive, if set, is told the send time and round trip of every
	// successful lease keepalive (a metric).
	OnKeepAlive func(sent time.Time, rtt time.Duration)

	Log zerolog.Logger
}

func (c Config) withDefaults() Config {
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = 5 * time.Second
	}
	if c.FenceMargin == 0 {
		c.FenceMargin = c.LeaseTTL / 5
	}
	if c.SettleDelay == 0 {
		c.SettleDelay = time.Second
	}
	if c.MaxConcurrentMoves == 0 {
		c.MaxConcurrentMoves = 4
	}
	if c.MoveTimeout == 0 {
		c.MoveTimeout = 5 * time.Minute
	}
	return c
}

// Validate reports the first unusable setting.
func (c Config) Validate() error {
	c = c.withDefaults()
	switch {
	case !ValidNodeID(c.NodeID):
		return fmt.Errorf("cluster: node id %q: want 1-63 of [A-Za-z0-9._-], starting with a letter or digit", c.NodeID)
	case c.Advertise == "":
		return errors.New("cluster: advertise address required")
	case c.LeaseTTL < time.Second || c.LeaseTTL%time.Second != 0:
		return errors.New("cluster: lease ttl must be whole seconds, at least 1s (etcd leases count seconds)")
	case c.FenceMargin <= 0 || c.FenceMargin >= c.LeaseTTL:
		return errors.New("cluster: fence margin must be within (0, lease ttl)")
	case c.SettleDelay < 0 || c.MaxConcurrentMoves < 1 || c.MoveTimeout < 0:
		return errors.New("cluster: settle delay and move timeout must not be negative, max concurrent moves positive")
	}
	return nil
}

// EventKind says what happened to a shard on this node.
type EventKind int

const (
	// ShardGained: this node owns the shard from Epoch on; MayAck is
	// already true for it.
	ShardGained EventKind = iota + 1
	// ShardLost: this node no longer owns the shard (lease lost, moved
	// away, key deleted); MayAck is already false. The mediator closes
	// the shard's devices.
	ShardLost
)

func (k EventKind) String() string {
	switch k {
	case ShardGained:
		return "gained"
	case ShardLost:
		return "lost"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is a change of this node's ownership of one shard.
type Event struct {
	Kind   EventKind
	Shard  Shard
	Epoch  int64  // the epoch gained, or the epoch that ended
	Reason string // for ShardLost: why
}

// Member is a live node.
type Member struct {
	ID        string
	Advertise string
	Started   time.Time
}

// MoveInfo identifies one planned move; Transport carries it with the data.
type MoveInfo struct {
	ID        string
	Shard     Shard
	From, To  string
	FromEpoch int64
}

// Hooks is what the mediator does with a shard's data during a planned
// move. Each call gets the move's context; an error aborts the move.
type Hooks interface {
	// Drain runs on the donor after MayAck(shard) turned false: reject
	// the shard's new reflects and wait for the in-flight commit.
	Drain(ctx context.Context, shard Shard) error
	// Export runs on the donor after Drain: the shard's whole state
	// (slots, tombstones, shared data, queues, held reflections).
	Export(ctx context.Context, shard Shard) (io.ReadCloser, error)
	// Import runs on the recipient: replace whatever it holds for the
	// shard with data, in one fsynced transaction, before ownership flips.
	Import(ctx context.Context, shard Shard, data io.Reader) error
	// Resume runs on the donor when a move it drained for was aborted
	// and it serves the shard again (MayAck is true again).
	Resume(shard Shard)
}

// Transport carries an export from donor to recipient. Send returns once
// the recipient's Node.Receive returned, with its error.
type Transport interface {
	Send(ctx context.Context, to Member, move MoveInfo, data io.Reader) error
}
