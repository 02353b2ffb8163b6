// Package cluster is the mediator's cluster control plane: which node
// serves which shard of device groups, decided through etcd. It owns the
// node's etcd lease and the fence clock derived from it, a watched copy of
// the shard map (for routing and the HAProxy map), the controller that
// assigns shards, and the state machine of planned shard moves. It holds
// placement only, never messages, and must not sit on the reflect path:
// the one question a reflect asks it, MayAck, is answered from memory.
// It knows nothing of WebSockets or storage; the mediator moves a shard's
// data through the Hooks and Transport it implements.
package cluster
