// Package cluster is the mediator's cluster control plane: which node
// serves which shard of device groups, decided through etcd. It owns the
// node's etcd lease and the fence clock derived from it, a watched copy of
// the shard map (for routing and the HAProxy map), the lifecycle of every
// shard on this node (lifecycle.go: the one place a shard's state on the
// node changes), the controller that assigns and rebalances shards, and
// planned shard moves.
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
//	assign/<NN>      {"node","by","gen","fresh"}  no lease            the node that holds the shard's data: where it must be served, and which copy
//	shards/<NN>      {"node","advertise"}     on the owner's lease    the node serving it now; its ModRevision is the shard's epoch
//	moves/<NN>       {"id","from","to","state","from_epoch",…}  no lease   a planned move in progress (or just finished)
//	drain/<node-id>  {"since"}                no lease                the node takes no shards and gives its own away (DrainNode, until Undrain)
//	secret           base64 of 32 bytes       no lease                the cluster's secret: nodes sign shard transfers with it
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
// reads two atomics, the lease a shard may be acked under (its lifecycle
// sets it) and the fence's lease and deadline, and compares time.Now's
// monotonic reading: no lock, no etcd call. After a SIGSTOP past the TTL it is false at once
// on SIGCONT, before any goroutine has run; the first keepalive then learns
// the lease is gone, every shard is reported lost, and the node joins again
// under a new lease. Jepsen found etcd locks unsafe without downstream
// fencing, so the epoch (shards/<NN>'s ModRevision) is what a store that can
// check it (PostgreSQL) compares, not the lease alone. The controller's
// election has its own session lease: losing the controller role does not
// cost a node its shards, nor the reverse.
//
// # Shard lifecycle on a node
//
// What a node knows and does about a shard lives in one place: a state
// per shard (absent, serving, frozen, receiving, fenced) that changes only
// through typed events (claimed, lost with its cause, lease lost, freeze,
// exported, thaw, receive, receive ended, store fenced) reported by the
// watch loop, claims, the donor and recipient sides of a move and the
// lease keeper (lifecycle.go, with its transition table in
// lifecycle_test.go). Each transition returns its effects: an event for
// the mediator (OnEvents: ShardGained, ShardLost with a Cause, ShardFrozen,
// ShardThawed), a donor to start or cancel, a copy to drop.
//
// The mediator passes every group write of a shard through Admit, with the
// epoch its in-memory state was loaded under: a served shard admits it, a
// frozen one holds it until the move ends (thawed: it goes on; handed
// over: *ShardGoneError, and the device, closed with 1001, redoes it on
// the new owner), any other state refuses it. MayAck is true for a served
// or frozen shard under a live fence clock: a frozen shard's admitted
// writes were made durable before its export, so the recipient has them.
// Nothing is acknowledged that the new owner will not have.
//
// Copies carry generations (bbolt; not with SharedStore): a copy's
// generation is the etcd revision of the "exported" record of the move
// that brought it (0 for a shard never moved). The flip writes it into
// assign/<NN>; a node claims a shard only while holding the copy the
// assignment names, or, for a shard reassigned with data loss ("fresh"),
// after emptying its copy (Hooks.Reset), and settles a claimed shard
// before serving it (Hooks.Settle: slots disconnected, held reflections
// released). The donor drops its copy at the hand-over by generation, so a
// drop that comes late (the shard moved away and came back, A→B→A) keeps
// the fresh copy; a recipient whose import did not flip discards it; a
// node's copies of shards assigned elsewhere (strays, left by a crash) are
// dropped by the watch.
//
// # Controller
//
// One per cluster, elected with concurrency.Election. On every change of
// the shard map it assigns never-assigned shards to the least loaded live
// node that is not draining (balanced), keeps assignments while their
// nodes live (sticky), applies AutoFailover, deletes finished move records
// and unreadable ones, aborts moves whose donor no longer serves the
// shard, and with AutoRebalance starts the planned moves of a rebalance
// plan (below), at most MaxConcurrentMoves in flight. Assignments and
// rebalancing wait until the set of live nodes has been stable for
// SettleDelay, so nodes starting together share the first assignment and
// a restarting node is not rebalanced around. Each write also compares
// the controller's election key, so a deposed controller writes nothing;
// it watches that key and campaigns again when it is gone.
//
// # Planned moves
//
// StartMove(ctx, shard, to) creates the move record; from then on the move
// belongs to the cluster, not to the caller. WaitMove follows it (Move
// does both); a caller that stops waiting gets ErrMoveRunning and the move
// goes on; AbortMove stops it. The states, each a compare-guarded write of
// moves/<NN> so every node sees it:
//
//	serving      no moves/<NN>; the owner serves the shard
//	draining     created by StartMove (compare: no unfinished move, the owner's
//	             epoch, the recipient's node key); the donor freezes the shard,
//	             waits for the writes admitted before (Release), then Hooks.Drain
//	             (they are durable) and Hooks.Export
//	exported     written by the donor (compare: the move's and the owner's
//	             revisions); its revision is the copy's generation; the donor
//	             sends the export with Transport.Send
//	handed-over  written by the recipient in Receive after Hooks.Import, in one
//	             transaction that compares the move and the donor's epoch and
//	             writes assign/ (with the generation), shards/ (its lease) and
//	             the move: the new, higher epoch
//
// The donor's watch sees shards/<NN> change to the recipient: ShardLost
// with CauseMovedAway (the mediator closes the shard's devices with 1001,
// reason "shard moved to NODE"; they reconnect to the new owner) and the
// drop of its copy. A failure in any hook or in the transfer, MoveTimeout,
// or AbortMove writes "aborted" with the reason; the donor thaws the shard
// (ShardThawed) and its held writes go on. The donor never cancels the
// recipient at the flip, and the recipient flips under its own context
// once the copy is imported. A second move of a shard, a move to a node
// that is not live (unknown, or its lease expired) or to the owner, and a
// move of a shard without a live owner are refused with
// ErrMoveInProgress, ErrNodeNotLive, ErrAlreadyOwner, ErrShardUnavailable.
//
// # Rebalancing and drains
//
// One plan function (rebalance.go) serves every executor: shards of
// draining nodes go to the others, then the most loaded node gives to the
// least loaded until all are within one, moving only served shards
// without a move in flight, never more than a budget (Kafka's cooperative
// sticky assignor: incremental, only the excess moves). A node that joins
// and a node that is drained are the same case. The controller with
// AutoRebalance starts moves from it; Rebalance and DrainNode (which marks
// the node draining first) run it to completion on the node asked, under
// the node's context: a caller that goes away gets ErrMoveRunning and
// the work goes on. Leave is DrainNode of itself, then Close.
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
// reflect path asks MayAck(ShardOf(groupID)) before every ReflectAck;
// every group write passes Admit/Release; the accept path asks Status and
// Owner and forwards when another node owns the shard. OnEvents receives
// the lifecycle's events; the mediator implements Hooks (Drain, Export,
// Import, Drop, Reset, Settle, Generation) over its store and Transport
// over a node-to-node connection whose receiving end calls Receive. The
// admin API and CLI map onto Members, Shards, StartMove, WaitMove,
// AbortMove, DrainNode, Undrain, Rebalance, Reassign and HAProxyMap.
//
// # Concurrency
//
// A Node runs a keepalive loop (the lease and the fence clock), a watch
// loop (the only writer of the view: it applies etcd events, then
// reports to the lifecycle what it sees and carries out the effects:
// claims, donors, drops), one event goroutine (delivers events in order
// so no loop waits on the mediator), the controller campaign, and one
// goroutine per donated move, per drop, per followed planned move and per
// drain or rebalance run. Every one is started with spawn and counted;
// Close cancels them all and waits. Node.mu guards the view and the
// copies and is held only for memory work; each shard's lifecycle cell
// has its own mutex, which may be taken under Node.mu, never the reverse;
// fence.mu serialises the fence's writers. No etcd call and no store call
// is made while holding any of them.
package cluster
