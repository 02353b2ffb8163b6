package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"d2m-mediator/chatproxy/cspclient"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2dpb"
	"d2m-mediator/proto/d2mpb"
)

// Timers. The echo interval is what Android and iOS use with multi-device
// (docs/protocol.md §9.5); the mediator closes a device after 90 s without an
// inbound frame, so a d2m-only device sends GetDevicesInfo as keep-alive.
const (
	dialTimeout       = 15 * time.Second
	replyTimeout      = 10 * time.Second
	echoInterval      = 15 * time.Second
	d2mOnlyKeepAlive  = 30 * time.Second
	closeCodeDeadline = 5 * time.Second
)

// device is one connected device session. Goroutines: readD2M handles
// every non-Proxy d2m message, readCSP every chat-server frame, keepAlive
// sends echoes; the caller of runDevice runs the commands. Output goes
// through out, one whole line (or block) at a time.
type device struct {
	o   *options
	out *printer
	c   *d2mclient.Client
	id  uint64

	reflectID atomic.Uint32 // Client.Reflect is not safe for concurrent use
	d2mDone   chan struct{} // closed when readD2M has handled the last message

	wmu     sync.Mutex
	waiters map[waitKey]chan d2mclient.Message

	mu        sync.Mutex
	leader    bool
	csp       *cspclient.Client
	unblocked bool
	holdsLock bool // between BeginTransactionAck and CommitTransactionAck

	echoSent, echoSeen atomic.Uint64
}

// waitKey names a reply a command (or the leader's CSP path) waits for:
// a ReflectAck by reflect id, a DropDeviceAck by device id, DevicesInfo,
// the answer to BeginTransaction (ack or rejected) or CommitTransactionAck.
type waitKey struct {
	t  d2m.PayloadType
	id uint64
}

// runDevice connects, logs in to the chat server through the proxy and
// runs commands from in until quit, end of input, SIGINT/SIGTERM (nil) or
// the end of the connection (an error naming the close code).
func runDevice(o *options, in io.Reader, out *printer) error {
	ex, exp := o.slotPolicies()
	info, err := o.keys.SealDeviceInfo(d2d.NewDeviceInfo(o.platform, "d2m-device simulator", "d2m-device", o.label))
	if err != nil {
		return err
	}
	cfg := d2mclient.Config{
		URL: o.url, Keys: o.keys, ServerGroup: o.serverGroup, DeviceID: o.deviceID,
		ExhaustedPolicy: ex, ExpirationPolicy: exp, DeviceInfo: info,
	}
	if o.existing {
		cfg.ExpectedState = d2mclient.Expect(d2mpb.DeviceSlotState_EXISTING)
	}
	gid := d2m.DeviceGroupID(o.keys.DeviceGroupID())
	out.printf("device %s (%q), group %s, connecting to %s", fmtID(o.deviceID), o.label, gid.Short(), o.url)
	ctx, cancel := context.WithTimeout(context.Background(), dialTimeout)
	c, err := d2mclient.Dial(ctx, cfg)
	cancel()
	if err != nil {
		if c != nil && errors.Is(err, d2mclient.ErrClosed) {
			code := closeCode(c)
			out.printf("mediator closed the connection during the handshake: %s", describeClose(code))
			return fmt.Errorf("handshake: close %d", code)
		}
		if c != nil {
			c.CloseNow()
		}
		return fmt.Errorf("connect: %w", err)
	}
	d := &device{o: o, out: out, c: c, id: c.DeviceID(), d2mDone: make(chan struct{}),
		waiters: map[waitKey]chan d2mclient.Message{}}
	d.printServerInfo(c.ServerInfo)
	go d.readD2M()

	if o.noCSP {
		out.printf("d2m only (--no-csp): no chat-server login")
		go d.keepAlive(nil)
	} else {
		d.loginCSP()
	}
	return d.commandLoop(in)
}

func (d *device) printServerInfo(si *d2mpb.ServerInfo) {
	offset := time.Since(time.UnixMilli(int64(si.GetCurrentTime()))).Round(time.Millisecond)
	d.out.printf("server info: slot state %s, max slots %d, reflection queue length %d, server time %s (clock difference %v)",
		si.GetDeviceSlotState(), si.GetMaxDeviceSlots(), si.GetReflectionQueueLength(),
		fmtMillis(si.GetCurrentTime()), offset)
	if b := si.GetEncryptedSharedDeviceData(); len(b) > 0 {
		if sd, err := d.o.keys.OpenSharedDeviceData(b); err != nil {
			d.out.printf("shared device data: cannot decrypt: %v", err)
		} else {
			d.out.printf("shared device data: version %d", sd.GetVersion())
		}
	}
}

// commandLoop runs stdin commands until the session ends.
func (d *device) commandLoop(in io.Reader) error {
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(in)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sig)
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				return d.quit("end of input")
			}
			if d.command(line) {
				return d.quit("quit")
			}
		case s := <-sig:
			return d.quit(s.String())
		case <-d.d2mDone:
			code := closeCode(d.c)
			d.out.printf("connection closed: %s", describeClose(code))
			return fmt.Errorf("connection closed (%d)", code)
		}
	}
}

// quit closes the connection normally (1000).
func (d *device) quit(why string) error {
	d.out.printf("%s: closing", why)
	d.c.Close()
	<-d.d2mDone
	d.out.printf("closed")
	return nil
}

func closeCode(c *d2mclient.Client) int {
	ctx, cancel := context.WithTimeout(context.Background(), closeCodeDeadline)
	defer cancel()
	return c.CloseCode(ctx)
}

// --- replies ---

// expect registers interest in a reply before the request is sent, so the
// reply cannot overtake the registration.
func (d *device) expect(k waitKey) chan d2mclient.Message {
	ch := make(chan d2mclient.Message, 1)
	d.wmu.Lock()
	d.waiters[k] = ch
	d.wmu.Unlock()
	return ch
}

// take removes and returns the waiter for k, or nil.
func (d *device) take(k waitKey) chan d2mclient.Message {
	d.wmu.Lock()
	defer d.wmu.Unlock()
	ch := d.waiters[k]
	delete(d.waiters, k)
	return ch
}

// await waits for the reply registered with expect, the end of the
// connection or the reply timeout.
func (d *device) await(k waitKey, ch chan d2mclient.Message) (d2mclient.Message, error) {
	t := time.NewTimer(replyTimeout)
	defer t.Stop()
	select {
	case m := <-ch:
		return m, nil
	case <-d.c.Done():
		d.take(k)
		return d2mclient.Message{}, errors.New("connection closed")
	case <-t.C:
		d.take(k)
		return d2mclient.Message{}, fmt.Errorf("no %v within %v", k.t, replyTimeout)
	}
}

// reflect seals env, reflects it and waits for its ReflectAck.
func (d *device) reflect(env *d2dpb.Envelope) (d2m.ReflectAck, error) {
	blob, err := d.o.keys.SealEnvelope(env)
	if err != nil {
		return d2m.ReflectAck{}, err
	}
	id := d.reflectID.Add(1)
	k := waitKey{d2m.TypeReflectAck, uint64(id)}
	ch := d.expect(k)
	ctx, cancel := context.WithTimeout(context.Background(), replyTimeout)
	err = d.c.ReflectWithID(ctx, id, blob, 0)
	cancel()
	if err != nil {
		d.take(k)
		return d2m.ReflectAck{}, err
	}
	m, err := d.await(k, ch)
	if err != nil {
		return d2m.ReflectAck{}, err
	}
	return d2m.DecodeReflectAck(m.Payload)
}

// --- d2m ---

func (d *device) readD2M() {
	defer close(d.d2mDone)
	for {
		m, err := d.c.Recv(context.Background())
		if err != nil {
			return
		}
		if err := d.handleD2M(m); err != nil {
			d.out.printf("bad %v from the mediator: %v", m.Type, err)
		}
	}
}

func (d *device) handleD2M(m d2mclient.Message) error {
	switch m.Type {
	case d2m.TypeReflected:
		return d.onReflected(m.Payload)
	case d2m.TypeReflectionQueueDry:
		d.out.printf("queue dry (backlog delivered)")
	case d2m.TypeRolePromotedToLeader:
		d.out.printf("promoted to leader")
		d.mu.Lock()
		d.leader = true
		d.mu.Unlock()
		d.maybeUnblock()
	case d2m.TypeReflectAck:
		ack, err := d2m.DecodeReflectAck(m.Payload)
		if err != nil {
			return err
		}
		if ch := d.take(waitKey{m.Type, uint64(ack.ID)}); ch != nil {
			ch <- m
		} else {
			d.out.printf("reflect ack for unknown reflect id %d", ack.ID)
		}
	case d2m.TypeDevicesInfo:
		info, err := d2m.DecodeDevicesInfo(m.Payload)
		if err != nil {
			return err
		}
		// Unrequested ones answer the d2m-only keep-alive: not printed.
		if ch := d.take(waitKey{m.Type, 0}); ch != nil {
			d.out.block(d.devicesTable(info))
			ch <- m
		}
	case d2m.TypeDropDeviceAck:
		ack, err := d2m.DecodeDropDeviceAck(m.Payload)
		if err != nil {
			return err
		}
		d.out.printf("device %s dropped", fmtID(ack.GetDeviceId()))
		d.notify(waitKey{m.Type, ack.GetDeviceId()}, m)
	case d2m.TypeBeginTransactionAck:
		d.out.printf("transaction begun: this device holds the lock")
		d.setHoldsLock(true)
		d.notify(waitKey{d2m.TypeBeginTransaction, 0}, m)
	case d2m.TypeTransactionRejected:
		r, err := d2m.DecodeTransactionRejected(m.Payload)
		if err != nil {
			return err
		}
		d.out.printf("transaction rejected: device %s holds the lock (scope %s); wait for \"transaction ended\", then begin again",
			fmtID(r.GetDeviceId()), d.scopeName(r.GetEncryptedScope()))
		d.notify(waitKey{d2m.TypeBeginTransaction, 0}, m)
	case d2m.TypeCommitTransactionAck:
		d.out.printf("transaction committed")
		d.setHoldsLock(false)
		d.notify(waitKey{d2m.TypeCommitTransaction, 0}, m)
	case d2m.TypeTransactionEnded:
		e, err := d2m.DecodeTransactionEnded(m.Payload)
		if err != nil {
			return err
		}
		d.out.printf("transaction ended: device %s released the lock (scope %s)",
			fmtID(e.GetDeviceId()), d.scopeName(e.GetEncryptedScope()))
	default:
		d.out.printf("received %v (%d bytes)", m.Type, len(m.Payload))
	}
	return nil
}

func (d *device) setHoldsLock(v bool) {
	d.mu.Lock()
	d.holdsLock = v
	d.mu.Unlock()
}

func (d *device) notify(k waitKey, m d2mclient.Message) {
	if ch := d.take(k); ch != nil {
		ch <- m
	}
}

// onReflected prints a sibling's reflection decrypted and acks it (not an
// ephemeral one, docs/protocol.md §10).
func (d *device) onReflected(p []byte) error {
	r, err := d2m.DecodeReflected(p)
	if err != nil {
		return err
	}
	what := ""
	if r.Ephemeral() {
		what = ", ephemeral"
	}
	env, err := d.o.keys.OpenEnvelope(r.Envelope)
	if err != nil {
		d.out.printf("reflected #%d (stored %s%s): cannot decrypt: %v", r.ID, fmtMillis(r.Timestamp), what, err)
	} else {
		d.out.printf("reflected #%d from device %s (stored %s%s): %s",
			r.ID, fmtID(env.GetDeviceId()), fmtMillis(r.Timestamp), what, describeEnvelope(env))
	}
	if r.Ephemeral() {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), replyTimeout)
	defer cancel()
	return d.c.AckReflected(ctx, r.ID)
}
