package mediator

import "sync"

// ctrlQueue is a connection's FIFO of control frames (answers, ReflectAcks,
// TransactionEnded, ...) between the goroutines that produce them and
// sendLoop. It replaces a buffered channel sized for the worst case: such
// a channel costs its full capacity (≈13 KiB at a 256-frame window) on
// every idle connection, while this queue holds memory only while frames
// wait.
type ctrlQueue struct {
	mu     sync.Mutex
	frames []outFrame
	head   int
	limit  int           // bound for frames queued by other parties
	ready  chan struct{} // coalescing "a frame was pushed", capacity 1
}

func newCtrlQueue(limit int) ctrlQueue {
	return ctrlQueue{limit: limit, ready: make(chan struct{}, 1)}
}

// push appends f. Unless force is set, it fails when limit frames are
// waiting: the device does not read, and the caller closes it. Forced
// pushes are bounded by the caller (a semaphore per kind of frame).
func (q *ctrlQueue) push(f outFrame, force bool) bool {
	q.mu.Lock()
	if !force && len(q.frames)-q.head >= q.limit {
		q.mu.Unlock()
		return false
	}
	q.frames = append(q.frames, f)
	q.mu.Unlock()
	select {
	case q.ready <- struct{}{}:
	default:
	}
	return true
}

// pending reports whether frames wait.
func (q *ctrlQueue) pending() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.head < len(q.frames)
}

// signal sets the ready flag without pushing.
func (q *ctrlQueue) signal() {
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// pop takes the oldest frame without blocking.
func (q *ctrlQueue) pop() (outFrame, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.head == len(q.frames) {
		return outFrame{}, false
	}
	f := q.frames[q.head]
	q.frames[q.head] = outFrame{}
	q.head++
	if q.head == len(q.frames) {
		q.head = 0
		if cap(q.frames) > 32 {
			q.frames = nil // give a burst's memory back
		} else {
			q.frames = q.frames[:0]
		}
	}
	return f, true
}

// maxPendingReplies bounds the answers to a device's own requests waiting
// to be written; a device that sends requests without reading blocks its
// own read loop there, and TCP pushes back on it alone.
const maxPendingReplies = 64
