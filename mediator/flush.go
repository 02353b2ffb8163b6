package mediator

import (
	"fmt"
	"runtime/debug"

	"d2m-mediator/d2m"
)

// Writing from the goroutine that produced the frames.
//
// A connection's writer goroutine runs only while there is something to
// write (conn.go, kick). At the rates real devices produce, nearly every
// frame found no writer running, so every ReflectAck and every Reflected
// started a goroutine, and on a mostly idle server each start woke an idle
// thread: thread wake-ups, not bytes, were most of the CPU a reflect cost.
// As NATS does for its clients (server/client.go, flushClients), the
// goroutine that queued the frames now writes them itself when no writer
// runs and the socket takes them at once:
//
//   - the store's committer, for what the completions of one commit queued
//     (ReflectAcks, deliveries): the store brackets the completions with
//     beginCompletions/endCompletions, kicks in between only collect the
//     connections, and endCompletions writes them (a commit that reaches
//     more than maxInlineFlush connections gets writer goroutines instead);
//   - a connection's own goroutines that hold no lock: the upstream reader
//     (Proxy units), the read loop (replies) and the handshake (ServerHello,
//     ServerInfo).
//
// The inline round never waits: frames are appended to the corked buffer
// (corkConn.appendFrame) up to inlineBytes, and the buffer is written with
// one write that does not wait for the socket (corkConn.tryUncork).
// Whatever is left, a closing connection and any error go to a writer
// goroutine as before, which also keeps the slow-consumer timeout.

// maxInlineFlush bounds the connections one commit's completions write on
// the committer goroutine. A commit that reaches more gets writer
// goroutines for all of them, at once: they run in parallel, and the
// first requests of a large batch do not wait for the last one's
// completion nor delay the next commit.
const maxInlineFlush = 32

// inlineBytes bounds what one inline round collects (one frame may go
// past it): a larger backlog is sent by a writer goroutine.
const inlineBytes = 16 << 10

// storeWithCompletionHooks is a store that brackets the completion
// callbacks of each commit (reflection.DB, pgstore.Store).
type storeWithCompletionHooks interface {
	SetCompletionHooks(begin, end func())
}

// beginCompletions is called by the store's committer before the
// completion callbacks of a commit.
func (s *Server) beginCompletions() {
	s.flushMu.Lock()
	s.completing.Store(true)
	s.flushOverflow = false
	s.flushMu.Unlock()
}

// endCompletions is called by the store's committer after the completion
// callbacks of a commit: it writes what they queued.
func (s *Server) endCompletions() {
	s.flushMu.Lock()
	s.completing.Store(false)
	list := s.flushList
	s.flushList = s.flushSpare[:0]
	s.flushMu.Unlock()
	for i, c := range list {
		c.writeNow()
		list[i] = nil
	}
	s.flushMu.Lock()
	s.flushSpare = list[:0]
	s.flushMu.Unlock()
}

// deferFlush takes c, whose writer role the caller has just claimed, into
// the current commit's list if the store is completing a commit and the
// list has room; endCompletions then writes it. It reports false
// otherwise: the caller starts a writer goroutine.
func (s *Server) deferFlush(c *deviceConn) bool {
	if !s.completing.Load() {
		return false
	}
	s.flushMu.Lock()
	defer s.flushMu.Unlock()
	if !s.completing.Load() || s.flushOverflow {
		return false
	}
	if len(s.flushList) == maxInlineFlush {
		// A large batch: writer goroutines for everyone, the listed
		// (older) connections first.
		s.flushOverflow = true
		for i, lc := range s.flushList {
			go lc.sendLoop()
			s.flushList[i] = nil
		}
		s.flushList = s.flushList[:0]
		return false
	}
	s.flushList = append(s.flushList, c)
	return true
}

// flushNow writes what is queued for c from the calling goroutine, unless
// a writer runs already (it picks the frames up). The caller must hold no
// lock: the round may take the group's (ReflectionQueueDry).
func (c *deviceConn) flushNow() {
	if c.writerRunning.CompareAndSwap(false, true) {
		c.writeNow()
	}
}

// writeNow does one inline send round for c, whose writer role the caller
// holds, and gives the role up; anything it cannot finish without waiting
// goes to a writer goroutine, which takes the role over.
func (c *deviceConn) writeNow() {
	if c.cork == nil || c.isClosing() || c.ctx.Err() != nil {
		go c.sendLoop()
		return
	}
	handOver := false
	defer func() {
		if r := recover(); r != nil {
			// A bug: end this connection, not the caller (the committer).
			c.batching, c.inlining = false, false
			c.logger().Error().Str("panic", fmt.Sprint(r)).Bytes("stack", debug.Stack()).Msg("inline writer panicked")
			c.closeWith(d2m.CloseInternalError, fmt.Errorf("writer panic: %v", r))
			c.ws.CloseNow()
			c.writerEnded.Do(func() { close(c.writerDone) })
			return
		}
		if handOver {
			go c.sendLoop() // takes the writer role over, corked or not
		}
	}()
	var acks ackStamps
	c.cork.cork()
	c.batching, c.inlining = true, true
	_, err := c.drainRounds(&c.dlv, &acks)
	c.batching, c.inlining = false, false
	if err != nil {
		// The writer goroutine meets the error too and ends the
		// connection.
		handOver = true
		return
	}
	sent, err := c.cork.tryUncork()
	// ReflectAcks the socket did not take at once count as written now;
	// the writer goroutine sends them next.
	acks.flush(c.srv.metrics)
	if err != nil || !sent {
		handOver = true
		return
	}
	// Give the role up as writeUntilIdle does: a producer that signalled
	// after the round saw the role taken and did not claim it.
	c.writerRunning.Store(false)
	if c.hasWork() && c.writerRunning.CompareAndSwap(false, true) {
		handOver = true
	}
}

// inlineFull reports that an inline round has collected enough.
func (c *deviceConn) inlineFull() bool {
	return c.inlining && c.cork.buffered() >= inlineBytes
}
