package main

import (
	"context"
	"encoding/binary"
	"errors"
	"time"

	"d2m-mediator/chatproxy/csp"
	"d2m-mediator/chatproxy/cspclient"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2mpb"
)

// loginCSP runs the chat-server login through the mediator's proxy and
// starts the CSP reader and the echo keep-alive. A failed login leaves the
// device d2m-only.
func (d *device) loginCSP() {
	ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
	defer cancel()
	cl, err := cspclient.Login(ctx, d2mclient.Transport{C: d.c.Conn}, d.o.identity, d.o.chatKey,
		cspclient.LoginOptions{ClientInfo: "d2m-device"})
	if err != nil {
		select {
		case <-d.c.Done(): // the close code says why
		default:
			d.out.printf("csp: login failed: %v (continuing d2m only)", err)
		}
		return
	}
	d.out.printf("csp: logged in as %s (csp device id %s)", cl.Identity().ID, fmtID(cl.CSPDeviceID()))
	d.mu.Lock()
	d.csp = cl
	d.mu.Unlock()
	go d.readCSP(cl)
	go d.keepAlive(cl)
	d.maybeUnblock()
}

// maybeUnblock sends unblock-incoming-messages once the device is both
// CSP-authenticated and leader (docs/protocol.md §8.1).
func (d *device) maybeUnblock() {
	d.mu.Lock()
	cl := d.csp
	ready := d.leader && cl != nil && !d.unblocked
	if ready {
		d.unblocked = true
	}
	d.mu.Unlock()
	if !ready {
		return
	}
	if err := cl.Unblock(); err != nil {
		d.out.printf("csp: unblock: %v", err)
		return
	}
	d.out.printf("csp: unblocked incoming messages (leader)")
}

func (d *device) cspClient() *cspclient.Client {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.csp
}

func (d *device) isLeader() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.leader
}

// keepAlive sends a CSP echo-request every echoInterval, or with cl nil
// (d2m only) a GetDevicesInfo every d2mOnlyKeepAlive, until the connection
// ends.
func (d *device) keepAlive(cl *cspclient.Client) {
	every := echoInterval
	if cl == nil {
		every = d2mOnlyKeepAlive
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-d.c.Done():
			return
		case <-t.C:
		}
		if cl == nil {
			ctx, cancel := context.WithTimeout(context.Background(), replyTimeout)
			d.c.SendMessage(ctx, d2m.TypeGetDevicesInfo, &d2mpb.GetDevicesInfo{})
			cancel()
			continue
		}
		seq := d.echoSent.Add(1)
		if seen := d.echoSeen.Load(); seq > 1 && seen < seq-1 {
			d.out.printf("csp: no echo-response for %v (echo %d unanswered)", every, seq-1)
		}
		var data [8]byte
		binary.LittleEndian.PutUint64(data[:], seq)
		if err := cl.Echo(data[:]); err != nil {
			return
		}
	}
}

// readCSP handles chat-server frames until the session ends.
func (d *device) readCSP(cl *cspclient.Client) {
	for {
		typ, data, err := cl.Recv(context.Background())
		if err != nil {
			if !errors.Is(err, d2mclient.ErrClosed) {
				d.out.printf("csp: %v (chat-server session stopped)", err)
			}
			return
		}
		switch typ {
		case csp.EchoRequest:
			// Clients answer the server's echoes (docs/protocol.md §9.5).
			if err := cl.SendFrame(csp.EchoResponse, data); err != nil {
				d.out.printf("csp: echo-response: %v", err)
			}
		case csp.EchoResponse:
			if len(data) == 8 {
				d.echoSeen.Store(max(d.echoSeen.Load(), binary.LittleEndian.Uint64(data)))
			}
		case csp.IncomingMessage:
			d.onIncoming(cl, data)
		case csp.OutgoingMessageAck:
			d.onOutgoingAck(data)
		case csp.QueueSendComplete:
			d.out.printf("csp: queue-send-complete (all queued messages delivered)")
		case csp.CloseErrorType:
			if ce, err := csp.ParseCloseError(data); err == nil {
				d.out.printf("csp: close-error from the chat server: %q (can reconnect: %v)", ce.Message, ce.CanReconnect)
			} else {
				d.out.printf("csp: malformed close-error: %v", err)
			}
		case csp.Alert:
			d.out.printf("csp: alert from the chat server: %q", data)
		default:
			d.out.printf("csp: received %s (%d bytes)", typ, len(data))
		}
	}
}

// onIncoming handles incoming-message (0x02) as leader: print it, reflect
// it as IncomingMessage, wait for the ReflectAck and only then ack it to
// the chat server (docs/protocol.md §8.2).
func (d *device) onIncoming(cl *cspclient.Client, data []byte) {
	msg, err := cspclient.ParseMessage(data)
	if err != nil {
		d.out.printf("csp: malformed incoming message: %v", err)
		return
	}
	d.out.printf("incoming message from %s id %s sent %s: %q",
		msg.Sender, fmtMsgID(msg.MessageID), msg.CreatedAt.Format(timeFormat), msg.Body)
	if !d.isLeader() {
		// Real clients treat this as fatal (§8.1); the simulator only
		// refuses to ack it.
		d.out.printf("error: incoming message while not leader: not reflected, not acked")
		return
	}
	env := d2d.NewIncomingMessageEnvelope(d.id, msg.Sender, msg.MessageID, msg.Body, uint64(msg.CreatedAt.UnixMilli()))
	ack, err := d.reflect(env)
	if err != nil {
		d.out.printf("could not reflect incoming message from %s id %s: %v (not acked; the chat server keeps it)",
			msg.Sender, fmtMsgID(msg.MessageID), err)
		return
	}
	if err := cl.AckIncoming(msg.Sender, msg.MessageID); err != nil {
		d.out.printf("csp: incoming-message-ack: %v", err)
		return
	}
	d.out.printf("reflected incoming message from %s id %s (stored %s), acked to the chat server",
		msg.Sender, fmtMsgID(msg.MessageID), fmtMillis(ack.Timestamp))
}

// onOutgoingAck handles outgoing-message-ack (0x81) and reflects the
// "sent" update, as the apps do.
func (d *device) onOutgoingAck(data []byte) {
	to, id, err := cspclient.ParseOutgoingAck(data)
	if err != nil {
		d.out.printf("csp: malformed outgoing-message-ack: %v", err)
		return
	}
	d.out.printf("chat server acked message to %s id %s", to, fmtMsgID(id))
	if _, err := d.reflect(d2d.NewOutgoingMessageSentUpdate(d.id, to, id)); err != nil {
		d.out.printf("could not reflect the sent update: %v", err)
	}
}
