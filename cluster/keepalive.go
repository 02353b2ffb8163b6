package cluster

import (
	"context"
	"errors"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// leaseAPI is the part of clientv3.Lease the keepalive loop uses; unit
// tests give it a fake under testing/synctest.
type leaseAPI interface {
	Grant(ctx context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error)
	KeepAliveOnce(ctx context.Context, id clientv3.LeaseID) (*clientv3.LeaseKeepAliveResponse, error)
}

// errLeaseLost means etcd no longer knows the lease: it expired.
var errLeaseLost = errors.New("cluster: lease expired")

// keeper keeps one lease alive with its own loop instead of the client's
// KeepAlive, because the fence needs the send time of every successful
// request (the client library keeps only the reply time).
type keeper struct {
	lease leaseAPI
	fence *fence
	ttl   time.Duration
	// observe, if set, is told the send time and round trip of every
	// successful keepalive (a metric).
	observe func(sent time.Time, rtt time.Duration)
}

// grant creates a lease and starts the fence clock from the request's
// send time.
func (k *keeper) grant(ctx context.Context) (clientv3.LeaseID, error) {
	sent := time.Now()
	resp, err := k.lease.Grant(ctx, int64(k.ttl/time.Second))
	if err != nil {
		return 0, err
	}
	// etcd may raise a TTL below its minimum, never lower it: the
	// requested TTL is the safe one.
	k.fence.granted(resp.ID, sent, k.ttl)
	return resp.ID, nil
}

// run keeps id alive every TTL/3 until ctx ends or etcd says the lease is
// gone (errLeaseLost). A failed request is retried after TTL/12; the fence clock only moves on success, so while etcd is
// unreachable the deadline approaches and mayAck turns false at
// last send + TTL − margin.
func (k *keeper) run(ctx context.Context, id clientv3.LeaseID) error {
	interval := k.ttl / 3
	retry := interval / 4
	timer := time.NewTimer(0)
	defer timer.Stop()
	<-timer.C
	for {
		sent := time.Now()
		// A slow keepalive is waited for, not abandoned at the next
		// interval: its reply renews the fence from its send time, so
		// one that takes longer than TTL/3 on a busy machine still
		// keeps the fence from lapsing; past 2/3 of the TTL the fence
		// is about to lapse anyway and a fresh request is better.
		rctx, cancel := context.WithTimeout(ctx, k.ttl-interval)
		resp, err := k.lease.KeepAliveOnce(rctx, id)
		cancel()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		wait := retry
		switch {
		case err == nil && resp.TTL > 0:
			ttl := min(k.ttl, time.Duration(resp.TTL)*time.Second)
			if !k.fence.renewed(id, sent, ttl) {
				return errLeaseLost
			}
			if k.observe != nil {
				k.observe(sent, time.Since(sent))
			}
			wait = time.Until(sent.Add(interval))
		case errors.Is(err, rpctypes.ErrLeaseNotFound) || (err == nil && resp.TTL <= 0):
			return errLeaseLost
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C:
		}
	}
}
