package pgstore

import "d2m-mediator/reflection"

type opKind uint8

const (
	opPutSlot opKind = iota + 1
	opDeleteSlot
	opSetShared
	opAppend
	opReleaseHeld
	opPurgeQueue
	opPruneTombstones
	opClaim   // bring the shard's epoch in the database to this node's
	opBarrier // writes nothing; completes after every earlier request
)

// request is one queued write; only the fields of its op are set.
type request struct {
	op        opKind
	g         reflection.GroupID
	d         reflection.DeviceID
	slot      reflection.Slot
	tomb      *reflection.Tombstone
	data      []byte
	app       reflection.AppendRequest
	olderThan int64
	shard     byte

	done       func(error)
	doneAppend func(reflection.AppendResult, error)
	result     reflection.AppendResult
	err        error // set when the request alone failed (fenced, not owned)
}

func (r *request) shardOf() (byte, bool) {
	switch r.op {
	case opPruneTombstones, opBarrier:
		return 0, false
	case opClaim:
		return r.shard, true
	}
	return r.g[0], true
}

func (r *request) complete(err error) {
	if r.doneAppend != nil {
		if err != nil {
			r.doneAppend(reflection.AppendResult{}, err)
			return
		}
		r.doneAppend(r.result, nil)
		return
	}
	if r.done != nil {
		r.done(err)
	}
}
