package cluster

import (
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// fence is the fence clock: it answers "may I still ack for shard S?" from
// memory. Readers (mayAck) take no lock: each shard has one atomic
// deadline, 0 when the node must not ack for it. Writers (the keepalive
// loop, the watch loop, move workers) serialise on mu, which guards no I/O.
//
// The deadline of every shard served under the current lease is
// sent + TTL − margin, where sent is when the last successful keepalive
// request (or the grant) was sent. etcd renews a lease when the leader
// handles the request, which is after it was sent, so the lease cannot
// expire on the server before sent + TTL; the margin covers clock rate
// differences. The client library's own deadline starts at the reply and
// would be late by the round trip, or by any pause between send and reply.
//
// Times are monotonic nanoseconds since base (time.Since uses the
// monotonic clock), so wall clock steps do not move the fence. A process
// stopped by SIGSTOP keeps its monotonic clock running: after SIGCONT,
// mayAck sees the deadline passed before any goroutine had a chance to
// talk to etcd.
type fence struct {
	base   time.Time
	margin time.Duration

	ackUntil [NumShards]atomic.Int64 // monotonic ns; 0: do not ack

	mu       sync.Mutex
	lease    clientv3.LeaseID // current lease; 0 between leases
	until    int64            // deadline of the current lease, monotonic ns
	lastSent time.Time        // send time of the last successful keepalive
	owned    [NumShards]ownership
}

// ownership is what the node knows about one shard it owns.
type ownership struct {
	lease  clientv3.LeaseID // lease the owner key is attached to; 0: not owned
	epoch  int64            // ModRevision of the owner key
	paused bool             // a move is draining it: owned, but no acks
}

func newFence(margin time.Duration) *fence {
	return &fence{base: time.Now(), margin: margin}
}

func (f *fence) mono(t time.Time) int64 { return int64(t.Sub(f.base)) }

// mayAck is the reflect path's question. O(1), lock-free.
func (f *fence) mayAck(s Shard) bool {
	return f.mono(time.Now()) < f.ackUntil[s].Load()
}

// granted starts a new lease whose grant request was sent at sent.
func (f *fence) granted(lease clientv3.LeaseID, sent time.Time, ttl time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lease = lease
	f.until = f.mono(sent.Add(ttl - f.margin))
	f.lastSent = sent
}

// renewed advances the deadline after a successful keepalive of lease sent
// at sent. It reports false if lease is not the current lease.
func (f *fence) renewed(lease clientv3.LeaseID, sent time.Time, ttl time.Duration) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if lease == 0 || lease != f.lease {
		return false
	}
	until := f.mono(sent.Add(ttl - f.margin))
	if until <= f.until {
		return true
	}
	f.until = until
	f.lastSent = sent
	for s := range f.owned {
		if o := &f.owned[s]; o.lease == lease && !o.paused {
			f.ackUntil[s].Store(until)
		}
	}
	return true
}

// leaseLost forgets lease and every shard owned under it, and returns
// those shards with their epochs.
func (f *fence) leaseLost(lease clientv3.LeaseID) []Event {
	f.mu.Lock()
	defer f.mu.Unlock()
	if lease == f.lease {
		f.lease = 0
		f.until = 0
	}
	var lost []Event
	for s := range f.owned {
		if o := &f.owned[s]; o.lease != 0 && o.lease == lease {
			lost = append(lost, Event{Kind: ShardLost, Shard: Shard(s), Epoch: o.epoch, Reason: "lease lost"})
			*o = ownership{}
			f.ackUntil[s].Store(0)
		}
	}
	return lost
}

// claim records that the owner key of s was written at epoch under lease.
// It reports false, and records nothing, if lease is not current (the
// write raced with the loss of the lease) or if it was already recorded
// (the writer and the watch both report a write).
func (f *fence) claim(s Shard, lease clientv3.LeaseID, epoch int64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if lease == 0 || lease != f.lease {
		return false
	}
	if o := f.owned[s]; o.lease == lease && o.epoch == epoch {
		return false
	}
	f.owned[s] = ownership{lease: lease, epoch: epoch}
	f.ackUntil[s].Store(f.until)
	return true
}

// release forgets s; it reports the epoch it was owned at, if it was.
func (f *fence) release(s Shard) (epoch int64, was bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	o := f.owned[s]
	f.owned[s] = ownership{}
	f.ackUntil[s].Store(0)
	return o.epoch, o.lease != 0
}

// pause stops acks for s while keeping it owned (a move drains it). It
// reports false if s is not owned at epoch.
func (f *fence) pause(s Shard, epoch int64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	o := &f.owned[s]
	if o.lease == 0 || o.epoch != epoch {
		return false
	}
	o.paused = true
	f.ackUntil[s].Store(0)
	return true
}

// resume undoes pause (an aborted move). It reports false if s is no
// longer owned at epoch under the current lease.
func (f *fence) resume(s Shard, epoch int64) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	o := &f.owned[s]
	if o.lease == 0 || o.lease != f.lease || o.epoch != epoch {
		return false
	}
	o.paused = false
	f.ackUntil[s].Store(f.until)
	return true
}

// ownedAt returns the epoch s is owned at, whether a move paused it, and
// whether it is owned.
func (f *fence) ownedAt(s Shard) (epoch int64, paused, ok bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	o := f.owned[s]
	return o.epoch, o.paused, o.lease != 0
}

func (f *fence) currentLease() clientv3.LeaseID {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lease
}

// FenceStatus is the node's fence clock, for metrics and tests.
type FenceStatus struct {
	Lease             clientv3.LeaseID // 0 while the node has no lease
	LastKeepAliveSent time.Time        // send time of the last successful keepalive (or grant)
	OwnedUntil        time.Time        // LastKeepAliveSent + TTL − margin; no acks from then on
}

func (f *fence) status() FenceStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := FenceStatus{Lease: f.lease, LastKeepAliveSent: f.lastSent}
	if f.lease != 0 {
		st.OwnedUntil = f.base.Add(time.Duration(f.until))
	}
	return st
}
