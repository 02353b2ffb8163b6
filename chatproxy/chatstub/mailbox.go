package chatstub

import (
	"slices"

	"d2m-mediator/chatproxy/csp"
)

// mailbox is one identity's state: messages waiting for an ack, and the
// logged-in connections that messages are delivered to. It exists while
// either is non-empty. Guarded by Server.mu.
type mailbox struct {
	queue []queuedMessage // in arrival order
	conns map[*conn]struct{}
}

// queuedMessage is an incoming message kept until the receiver acks it
// (0x82 with sender ‖ message id).
type queuedMessage struct {
	sender    csp.Identity
	messageID uint64
	data      []byte // the outgoing message's data, sent unchanged as 0x02
}

// mailboxLocked returns id's mailbox, creating it. Caller holds s.mu.
func (s *Server) mailboxLocked(id csp.Identity) *mailbox {
	mb := s.mailboxes[id]
	if mb == nil {
		mb = &mailbox{conns: make(map[*conn]struct{})}
		s.mailboxes[id] = mb
	}
	return mb
}

// dropIfEmptyLocked forgets a mailbox with nothing in it, so identities
// that come and go do not accumulate. Caller holds s.mu.
func (s *Server) dropIfEmptyLocked(id csp.Identity, mb *mailbox) {
	if len(mb.queue) == 0 && len(mb.conns) == 0 {
		delete(s.mailboxes, id)
	}
}

// register makes a logged-in connection a delivery target of its identity.
func (s *Server) register(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mailboxLocked(c.identity).conns[c] = struct{}{}
}

// unregister removes a connection; its undelivered or unacked messages stay
// queued for the identity's next unblocked connection.
func (s *Server) unregister(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if mb := s.mailboxes[c.identity]; mb != nil {
		delete(mb.conns, c)
		s.dropIfEmptyLocked(c.identity, mb)
	}
}

// deliver queues an outgoing message for its receiver (unless it carries
// no-server-queuing) and hands it as incoming-message to every connection
// of the receiver that has unblocked. It reports false when the receiver's
// queue is full and the message was refused.
func (s *Server) deliver(m *csp.Message, data []byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	mb := s.mailboxLocked(m.Receiver)
	defer s.dropIfEmptyLocked(m.Receiver, mb)
	if m.Flags&csp.FlagNoServerQueuing == 0 {
		if len(mb.queue) >= s.cfg.MaxQueuedPerIdentity {
			return false
		}
		mb.queue = append(mb.queue, queuedMessage{sender: m.Sender, messageID: m.MessageID, data: data})
	}
	for c := range mb.conns {
		if c.unblocked {
			c.push(csp.IncomingMessage, data)
		}
	}
	return true
}

// unblock handles unblock-incoming-messages (0x03) from c: every queued
// message, then queue-send-complete, once per connection. Because this runs
// under s.mu, a message delivered concurrently is either in the snapshot or
// delivered live after it, never both and never neither.
func (s *Server) unblock(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.unblocked {
		return
	}
	c.unblocked = true
	mb := s.mailboxLocked(c.identity)
	for _, q := range mb.queue {
		c.push(csp.IncomingMessage, q.data)
	}
	c.push(csp.QueueSendComplete, nil)
}

// ack handles incoming-message-ack (0x82) from a connection of receiver:
// the message leaves the queue. Acks for unknown messages are ignored
// (another connection of the identity may have acked it first).
func (s *Server) ack(receiver csp.Identity, a csp.MessageAck) {
	s.mu.Lock()
	defer s.mu.Unlock()
	mb := s.mailboxes[receiver]
	if mb == nil {
		return
	}
	for i, q := range mb.queue {
		if q.sender == a.Identity && q.messageID == a.MessageID {
			// slices.Delete zeroes the vacated tail element, so the
			// acked message's bytes can be collected.
			mb.queue = slices.Delete(mb.queue, i, i+1)
			break
		}
	}
	s.dropIfEmptyLocked(receiver, mb)
}

// QueuedMessages returns the number of unacknowledged messages queued for
// identity id (an 8-character ID), for tests and diagnostics.
func (s *Server) QueuedMessages(id string) int {
	var ident csp.Identity
	copy(ident[:], id)
	s.mu.Lock()
	defer s.mu.Unlock()
	if mb := s.mailboxes[ident]; mb != nil {
		return len(mb.queue)
	}
	return 0
}
