package reflection

import "sync"

// queueKey names a slot's queue in the in-memory index.
type queueKey struct {
	g GroupID
	d DeviceID
}

// queueIndex mirrors the persisted queue meta of every existing slot so that
// QueueStats is O(1) without a disk read, and so the committer can find a
// queue's counter and bucket without a B+tree lookup.
//
// Invariant: the index equals the qmeta bucket as of the last successful
// commit. It is written only by a writer holding DB.commitMu (the
// committer, or Open's recovery before the committer starts), under mu and
// after the commit; such a writer may therefore read it without mu.
type queueIndex struct {
	mu sync.RWMutex
	m  map[queueKey]queueMeta
}

func newQueueIndex() *queueIndex { return &queueIndex{m: make(map[queueKey]queueMeta)} }

func (ix *queueIndex) stats(k queueKey) (QueueStats, bool) {
	ix.mu.RLock()
	m, ok := ix.m[k]
	ix.mu.RUnlock()
	if !ok {
		return QueueStats{}, false
	}
	return QueueStats{Length: int(m.length), Bytes: int64(m.bytes), NextSeq: m.lastSeq + 1}, true
}

// lookup is for writers holding DB.commitMu only (see the invariant).
func (ix *queueIndex) lookup(k queueKey) (queueMeta, bool) {
	m, ok := ix.m[k]
	return m, ok
}

// queueChange is one queue's state after a batch: present == false means
// the slot (and with it the queue) no longer exists.
type queueChange struct {
	meta    queueMeta
	present bool
}

func (ix *queueIndex) publish(changes map[queueKey]*queueChange) {
	if len(changes) == 0 {
		return
	}
	ix.mu.Lock()
	for k, c := range changes {
		if c.present {
			ix.m[k] = c.meta
		} else {
			delete(ix.m, k)
		}
	}
	ix.mu.Unlock()
}
