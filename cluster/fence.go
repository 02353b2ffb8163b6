package cluster

import (
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// fence is the fence clock: it answers "may I still ack under lease L?"
// from memory. Readers (mayAck) take no lock: the current lease and its
// deadline are atomics. Writers (the keepalive loop, rejoin, Close)
// serialise on mu, which guards no I/O. Which shards are owned under which
// lease is the lifecycle's (lifecycle.ackLease); the fence only knows the
// lease.
//
// The deadline of the current lease is sent + TTL − margin, where sent is
// when the last successful keepalive request (or the grant) was sent.
// etcd renews a lease when the leader handles the request, which is after
// it was sent, so the lease cannot expire on the server before sent + TTL;
// the margin covers clock rate differences. The client library's own
// deadline starts at the reply and would be late by the round trip, or by
// any pause between send and reply.
//
// Times are monotonic nanoseconds since base (time.Since uses the
// monotonic clock), so wall clock steps do not move the fence. A process
// stopped by SIGSTOP keeps its monotonic clock running: after SIGCONT,
// mayAck sees the deadline passed before any goroutine had a chance to
// talk to etcd.
type fence struct {
	base   time.Time
	margin time.Duration

	lease atomic.Int64 // current lease; 0 between leases
	until atomic.Int64 // deadline of the current lease, monotonic ns

	mu       sync.Mutex
	lastSent time.Time // send time of the last successful keepalive
}

func newFence(margin time.Duration) *fence {
	return &fence{base: time.Now(), margin: margin}
}

func (f *fence) mono(t time.Time) int64 { return int64(t.Sub(f.base)) }

// mayAck reports whether lease is current and its deadline has not
// passed. O(1), lock-free.
func (f *fence) mayAck(lease clientv3.LeaseID) bool {
	return lease != 0 && int64(lease) == f.lease.Load() && f.mono(time.Now()) < f.until.Load()
}

// granted starts a new lease whose grant request was sent at sent.
func (f *fence) granted(lease clientv3.LeaseID, sent time.Time, ttl time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	// The deadline first: a reader that sees the new lease sees its
	// deadline too.
	f.until.Store(f.mono(sent.Add(ttl - f.margin)))
	f.lease.Store(int64(lease))
	f.lastSent = sent
}

// renewed advances the deadline after a successful keepalive of lease sent
// at sent. It reports false if lease is not the current lease.
func (f *fence) renewed(lease clientv3.LeaseID, sent time.Time, ttl time.Duration) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if lease == 0 || int64(lease) != f.lease.Load() {
		return false
	}
	if until := f.mono(sent.Add(ttl - f.margin)); until > f.until.Load() {
		f.until.Store(until)
		f.lastSent = sent
	}
	return true
}

// leaseLost ends lease if it is the current one; acks under it stop at
// once.
func (f *fence) leaseLost(lease clientv3.LeaseID) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if lease != 0 && int64(lease) == f.lease.Load() {
		f.lease.Store(0)
		f.until.Store(0)
	}
}

func (f *fence) currentLease() clientv3.LeaseID {
	return clientv3.LeaseID(f.lease.Load())
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
	st := FenceStatus{Lease: f.currentLease(), LastKeepAliveSent: f.lastSent}
	if st.Lease != 0 {
		st.OwnedUntil = f.base.Add(time.Duration(f.until.Load()))
	}
	return st
}
