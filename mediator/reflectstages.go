package mediator

import "time"

// The stages of a durable Reflect, for mediator_reflect_stage_seconds:
// frame read → handed to the store → commit started → commit done →
// ReflectAck written. Times travel with the Reflect as monotonic
// nanoseconds since monoBase (one time.Now per stage, no allocation): the
// read time from readFrame, the hand-off time from the group, the commit
// times from the store's AppendResult, the write time taken once per send
// round after the socket write.

var monoBase = time.Now()

// mono converts t to nanoseconds since monoBase on the monotonic clock; 0
// for the zero time (a store that does not report commit times).
func mono(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return int64(t.Sub(monoBase))
}

// reflectTimes are the stage times of one durable Reflect known when its
// commit completes.
type reflectTimes struct {
	read, submitted         time.Time
	commitStart, commitDone time.Time
}

// ackStamps collects, for one send round, the ReflectAcks written into the
// corked socket, so that their write stage ends when the round's bytes
// have left (one time.Now per round). It lives on the writer's stack.
type ackStamps struct {
	n          int
	read, done [64]int64
}

// observeQueued records the stages up to the commit's end; called when
// the ReflectAck is queued.
func (m *metrics) observeQueued(t reflectTimes) {
	m.stageSubmit.Observe(t.submitted.Sub(t.read).Seconds())
	if !t.commitStart.IsZero() {
		m.stageWait.Observe(t.commitStart.Sub(t.submitted).Seconds())
		m.stageCommit.Observe(t.commitDone.Sub(t.commitStart).Seconds())
	}
}

// observeWritten records the write and total stages of a ReflectAck
// written at now (monotonic nanoseconds).
func (m *metrics) observeWritten(read, done, now int64) {
	if done != 0 {
		m.stageWrite.Observe(float64(now-done) / 1e9)
	}
	m.stageTotal.Observe(float64(now-read) / 1e9)
}

// add remembers a written ReflectAck; it reports false when the round is
// full (the caller then observes it at once).
func (a *ackStamps) add(read, done int64) bool {
	if a == nil || a.n == len(a.read) {
		return false
	}
	a.read[a.n], a.done[a.n] = read, done
	a.n++
	return true
}

// flush observes the round's ReflectAcks as written now.
func (a *ackStamps) flush(m *metrics) {
	if a.n == 0 {
		return
	}
	now := mono(time.Now())
	for i := range a.n {
		m.observeWritten(a.read[i], a.done[i], now)
	}
	a.n = 0
}
