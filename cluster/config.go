package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/rs/zerolog"
)

// DefaultMoveTimeout bounds a planned move (Config.MoveTimeout).
const DefaultMoveTimeout = time.Minute

// Config configures a Node. Zero values mean the defaults noted.
type Config struct {
	NodeID    string // required; letters, digits, '.', '_', '-'
	Advertise string // required; host:port where other nodes and the load balancer reach this node's device listener
	Prefix    string // etcd key prefix of the cluster (DefaultPrefix)
	// AdminAdvertise is the host:port where other nodes reach this node's
	// admin API (they forward admin requests for its shards there); ""
	// if it has none. DeviceTLS: the device listener at Advertise serves
	// TLS, so other nodes forward devices and send shards to it over TLS.
	AdminAdvertise string
	DeviceTLS      bool

	LeaseTTL    time.Duration // the node lease's TTL, whole seconds (5s)
	FenceMargin time.Duration // acks stop at last keepalive send + LeaseTTL − FenceMargin (LeaseTTL/5)

	// AutoFailover lets the controller give a shard whose assigned node
	// is not live to another node. Off for the local bbolt store, whose
	// data for the shard lives only on the lost node: the shard waits for
	// that node (or Reassign with acceptDataLoss). On for a replicated
	// store.
	AutoFailover bool
	// SharedStore: every node reaches the same store (PostgreSQL), so a
	// move hands over only the epoch and no node holds a copy of its
	// own; off for bbolt, whose copies carry generations (Hooks).
	SharedStore bool
	// AutoRebalance lets the controller move shards (planned moves) from
	// the most to the least loaded live node until they differ by at most
	// one, and away from draining nodes: a node that joins a running
	// cluster takes its share, a drained one gives its shards away. At
	// most MaxConcurrentMoves at a time, only while the live set has been
	// stable for SettleDelay.
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
	// aborted and the donor serves the shard again. The shard's writes
	// wait while it is frozen, so this is also the longest a device can
	// wait for one (60s).
	MoveTimeout time.Duration

	// Hooks and Transport carry a shard's data during a planned move; the
	// mediator implements them. Without them this node can neither give
	// nor take a shard by a move.
	Hooks     Hooks
	Transport Transport

	// OnEvents receives the shards' lifecycle events in order, in
	// batches of what happened together (all shards claimed at start in
	// one), on a goroutine of the node. It must not block for long.
	OnEvents func([]Event)
	// OnPlannedMove, if set, is told the end of every move a rebalance,
	// a drain or the controller's AutoRebalance planned and this node
	// started (err nil: handed over).
	OnPlannedMove func(pm PlannedMove, err error)
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
		c.MoveTimeout = DefaultMoveTimeout
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
	case c.AdminAdvertise != "" && !isHostPort(c.AdminAdvertise):
		return fmt.Errorf("cluster: admin advertise address %q: want host:port", c.AdminAdvertise)
	case c.LeaseTTL < time.Second || c.LeaseTTL%time.Second != 0:
		return errors.New("cluster: lease ttl must be whole seconds, at least 1s (etcd leases count seconds)")
	case c.FenceMargin <= 0 || c.FenceMargin >= c.LeaseTTL:
		return errors.New("cluster: fence margin must be within (0, lease ttl)")
	case c.SettleDelay < 0 || c.MaxConcurrentMoves < 1 || c.MoveTimeout < 0:
		return errors.New("cluster: settle delay and move timeout must not be negative, max concurrent moves positive")
	}
	return nil
}

func isHostPort(addr string) bool {
	host, port, err := net.SplitHostPort(addr)
	return err == nil && host != "" && port != ""
}

// EventKind says what happened to a shard on this node.
type EventKind int

const (
	// ShardGained: this node owns the shard from Epoch on and admits its
	// writes; MayAck is already true for it.
	ShardGained EventKind = iota + 1
	// ShardLost: this node no longer serves the shard (Cause, To, Move
	// say why); its writes are refused and MayAck is already false. The
	// mediator closes the shard's devices.
	ShardLost
	// ShardFrozen: planned move Move to node To drains the shard: its
	// writes wait (Admit) until ShardThawed or ShardLost.
	ShardFrozen
	// ShardThawed: the move that froze the shard ended without handing it
	// over (aborted); its writes go on.
	ShardThawed
)

func (k EventKind) String() string {
	switch k {
	case ShardGained:
		return "gained"
	case ShardLost:
		return "lost"
	case ShardFrozen:
		return "frozen"
	case ShardThawed:
		return "thawed"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is a change of the lifecycle of one shard on this node.
type Event struct {
	Kind  EventKind
	Shard Shard
	Epoch int64  // the epoch gained, or the epoch the change is about
	Cause Cause  // ShardLost: why
	To    string // ShardLost (moved away, owner changed), ShardFrozen/Thawed: the other node
	Move  string // ShardLost (moved away), ShardFrozen/Thawed: the move id
}

// Describe says what happened in words, for logs and close reasons.
func (e Event) Describe() string {
	switch {
	case e.Kind == ShardLost && e.Cause == CauseMovedAway:
		return "moved to " + e.To
	case e.Kind == ShardLost && e.To != "":
		return e.Cause.String() + ": now served by " + e.To
	case e.Kind == ShardLost:
		return e.Cause.String()
	case e.Kind == ShardFrozen:
		return "frozen for a move to " + e.To
	case e.Kind == ShardThawed:
		return "move to " + e.To + " aborted, serving again"
	}
	return e.Kind.String()
}

// Member is a live node.
type Member struct {
	ID        string
	Advertise string
	Started   time.Time
	Draining  bool   // marked draining (DrainNode): it takes no shards
	Admin     string // its admin API, host:port ("" if it publishes none)
	TLS       bool   // its device listener serves TLS
}

// MoveInfo identifies one planned move; Transport carries it with the data.
type MoveInfo struct {
	ID        string
	Shard     Shard
	From, To  string
	FromEpoch int64
}

// Hooks is what the mediator does with a shard's data during a planned
// move, and with the copies it holds. Each call gets the move's (or the
// node's) context; an error of a move's hook aborts the move.
//
// With a store every node reaches (Config.SharedStore) no data moves:
// Export returns an empty stream, Import reads it, and Drop, Reset,
// Settle and Generation are not called (the store settles a shard when
// it claims it).
type Hooks interface {
	// Drain runs on the donor once the shard is frozen and the writes
	// admitted before the freeze have been submitted (the node waited for
	// their Release): return once they are durable (the store's Barrier).
	Drain(ctx context.Context, shard Shard) error
	// Export runs on the donor after Drain: the shard's whole state
	// (slots, tombstones, shared data, queues, held reflections).
	Export(ctx context.Context, shard Shard) (io.ReadCloser, error)
	// Import runs on the recipient: replace whatever it holds for the
	// shard with data as a copy of generation gen, in one fsynced
	// transaction, before ownership flips.
	Import(ctx context.Context, shard Shard, gen int64, data io.Reader) error
	// Drop deletes this node's copy of the shard if its generation is at
	// most gen (a newer copy, imported since, is kept).
	Drop(ctx context.Context, shard Shard, gen int64) error
	// Reset deletes this node's copy whatever its generation and records
	// gen: the cluster gave the node the shard to serve from empty.
	Reset(ctx context.Context, shard Shard, gen int64) error
	// Settle runs before the node serves shards it claims (not imports):
	// none of their devices is connected here, so slots still marked
	// connected are marked disconnected and held reflections released
	// (a lease lost earlier closed the devices without writing that).
	Settle(ctx context.Context, shards ...Shard) error
	// Generation reports the generation of this node's copy of the shard
	// (0 if none was recorded) and whether it holds any data of it.
	Generation(shard Shard) (gen int64, hasData bool)
}

// Transport carries an export from donor to recipient. Send returns once
// the recipient's Node.Receive returned, with its error.
type Transport interface {
	Send(ctx context.Context, to Member, move MoveInfo, data io.Reader) error
}
