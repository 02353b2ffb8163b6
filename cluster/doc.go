// Package cluster is the mediator's cluster control plane: which node
// serves which shard of device groups, decided through etcd. It owns the
// node's etcd lease and the fence clock derived from it, a watched copy of
// the shard map (for routing and the HAProxy map), the controller that
// assigns shards, and the state machine of planned shard moves.
//
// It holds placement only, never messages, and must not sit on the
// reflect path: the one question a reflect asks it, MayAck, is answered
// from memory. It knows nothing of WebSockets or storage; the mediator
// moves a shard's data through the Hooks and Transport it implements and
// forwards connections itself.
//
// # Shards
//
// A shard is the first byte of the device group id (256 shards). Clients
// put it in the URL as the /{prefix8}/ segment (docs/protocol.md §2), so a load
// balancer can route by it, and everything of one group (ordering, slots,
// transaction lock, leader) stays on one node.
//
// # Key layout
//
// Under a prefix (DefaultPrefix, "/d2m-mediator/"):
//
//	nodes/<node-id>  {"advertise","started","admin","tls"}  on the node's lease     a live node (one lease per node, as CockroachDB's node liveness)
//	assign/<NN>      {"node","by"}            no lease                the node that holds the shard's data: where it must be served
//	shards/<NN>      {"node","advertise"}     on the owner's lease    the node serving it now; its ModRevision is the shard's epoch
//	moves/<NN>       {"id","from","to","state","from_epoch",…}  no lease   a planned move in progress (or just finished)
//	controller/…     concurrency.Election keys (own session lease)
//
// <NN> is the shard as two lowercase hex digits. assign/ and shards/ are
// separate because the data of a shard lives on one node's bbolt: when
// that node's lease expires, shards/<NN> vanishes with it, but assign/<NN>
// still says where the data is. Only the controller (new shards, and
// failover when allowed), a move's flip and an operator's Reassign write
// assign/; only the owner itself writes shards/<NN>, attached to its own
// lease, in a transaction that compares assign/<NN>'s revision and the
// absence of shards/<NN> and moves/<NN>. Every write is such a compare
// transaction; there are no blind puts.
//
// # Node loss and AutoFailover
//
// With the local bbolt store (AutoFailover false) a shard whose node's
// lease expired is not given to anyone: a new owner would serve an empty
// store (acked reflections lost, and devices expecting an EXISTING slot
// would get 4115). It stays unserved (Owner reports !ok; the mediator
// answers 503 with Retry-After) until the node comes back, which claims it
// again under its new lease at a higher epoch, or until an operator calls
// Reassign(shard, node, acceptDataLoss=true). With a replicated store
// (AutoFailover true) the controller reassigns it to the least loaded live
// node at once.
//
// # Fencing
//
// A node may ack a reflection for shard S only while it is sure it owns S.
// etcd's client computes a lease's deadline from when the keepalive reply
// arrived (etcd's client/v3/lease.go; SCALING.md, "Background"); but the
// server renews the lease when it handles the request, which can be any
// time after the request was sent, and a process paused between send and
// reply (GC, SIGSTOP, a slow network) would believe in a lease that etcd
// has already expired and given away. So the Node runs its own keepalive
// loop (KeepAliveOnce every TTL/3), records when each successful request
// was sent, and fences at
//
//	ownedUntil = send time of the last successful keepalive + TTL − margin
//
// (margin FenceMargin, default TTL/5, for clock rate differences). MayAck
// compares time.Now's monotonic reading with one atomic deadline per shard:
// no lock, no etcd call. After a SIGSTOP past the TTL it is false at once
// on SIGCONT, before any goroutine has run; the first keepalive then learns
// the lease is gone, every shard is reported lost, and the node joins again
// under a new lease. Jepsen found etcd locks unsafe without downstream
// fencing, so the epoch (shards/<NN>'s ModRevision) is what a store that can
// check it (PostgreSQL) compares, not the lease alone. The controller's
// election has its own session lease: losing the controller role does not
// cost a node its shards, nor the reverse.
//
// # Controller
//
// One per cluster, elected with concurrency.Election. On every change of
// the shard map it assigns never-assigned shards to the least loaded live
// node (balanced), keeps assignments while their nodes live (sticky),
// applies AutoFailover, deletes finished move records and aborts moves
// whose donor no longer serves the shard, and with AutoRebalance moves
// shards from the most to the least loaded node until they differ by at
// most one. Assignments wait until the set of live nodes has been stable
// for SettleDelay, so nodes starting together share the first assignment.
// Each write also compares the controller's election key, so a deposed
// controller writes nothing.
//
// # Planned moves
//
// Move(ctx, shard, to) drives one move through etcd so both nodes see it:
//
//	serving      no moves/<NN>; the owner acks
//	draining     the caller created moves/<NN> (compare: no unfinished move, the
//	             owner's epoch, the recipient's node key); the donor's MayAck turns
//	             false at once, then Hooks.Drain, Hooks.Export
//	exported     written by the donor (compare: the move's and the owner's
//	             revisions); the donor sends the export with Transport.Send
//	handed-over  written by the recipient in Receive after Hooks.Import, in one
//	             transaction that compares the move and the donor's epoch and
//	             writes assign/ and shards/ (its lease): the new, higher epoch
//
// The donor's watch sees shards/<NN> change and reports ShardLost (the
// mediator closes the shard's devices with 1001; they reconnect to the new
// owner). A failure in any hook or in the transfer, or MoveTimeout, writes
// "aborted" with the reason; the donor then serves the shard again
// (Hooks.Resume). A second move of a shard, a move to a node that is not
// live (unknown, or its lease expired) or to the owner, and a move of a
// shard without a live owner are refused with ErrMoveInProgress,
// ErrNodeNotLive, ErrAlreadyOwner, ErrShardUnavailable. DrainNode moves
// every shard of a node away; Leave is DrainNode of itself, then Close.
//
// # Routing and HAProxy
//
// Owner(shard) answers from the watched map, for forwarding a connection
// to the owner's advertise address. HAProxyMap renders the map for
// HAProxy's map converter, one "<prefix8> <node-id>" line per served shard;
// with one backend per node, named by its node id:
//
//	frontend devices
//	    use_backend %[path,field(2,/),lower,map(/etc/haproxy/mediator-shards.map,mediator_nodes)]
//	    default_backend mediator_nodes   # all nodes: they forward, or answer 503
//
// deploy/haproxy/haproxy-cluster.cfg is the complete configuration;
// `mediator cluster haproxy-sync` (package cluster/haproxysync) keeps a
// running HAProxy's map current.
//
// # Wiring into the mediator
//
// New(client, Config) then Join(ctx); Close(ctx) on shutdown (the node's
// shards stay assigned to it, for a restart), Leave(ctx) to retire it. The
// reflect path asks MayAck(ShardOf(groupID)) before every ReflectAck; the
// accept path asks Owner(shard) and forwards when another node owns it.
// OnEvent receives ShardGained and ShardLost; the mediator implements
// Hooks (Drain, Export, Import, Resume) over its store and Transport over
// a node-to-node connection whose receiving end calls Receive. The admin
// API and CLI map onto Members, Shards, Move, DrainNode, Reassign,
// Rebalance and HAProxyMap.
//
// # Concurrency
//
// A Node runs a keepalive loop (the lease and the fence clock), a watch
// loop (the only writer of the view: it applies etcd events, then
// reconciles what this node holds: releases, claims, donor work), one
// event goroutine (delivers events in order so no loop waits on the
// mediator), the controller campaign, and one goroutine per donated move.
// Close cancels them all and waits. Node.mu guards the view and is held
// only for memory work; fence.mu serialises the fence's writers and may be
// taken under Node.mu, never the reverse. No etcd call is made while
// holding either.
package cluster
