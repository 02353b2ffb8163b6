package main

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"d2m-mediator/chatproxy/csp"
	"d2m-mediator/chatproxy/cspclient"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
)

// cspDevice is one identity with one device (the group's leader): it logs
// in to the chat server through the mediator's Proxy messages and sends
// messages to its partner identity. With --csp-reflect it behaves like a
// multi-device client: an outgoing message is reflected and sent only after
// its ReflectAck; an incoming message is reflected and acked to the chat
// server only after its ReflectAck (docs/protocol.md §8.2).
type cspDevice struct {
	idx     int
	ident   cspclient.Identity
	partner string
	c       *d2mclient.Client
	cl      *cspclient.Client
	slots   chan struct{}

	mu        sync.Mutex
	sentAt    map[uint64]time.Duration // message id → send start
	onReflect map[uint32]func()        // reflect id → continuation after ReflectAck
	nextRefl  uint32
	nextMsg   uint64
}

type cspStats struct {
	sent, serverAcked, received, reflects, late counter
	ackLat, e2eLat, reflLat                     *hist
	errs                                        *errCounter
	closing                                     atomic.Bool
}

func runCSP(ctx context.Context, env *runEnv) (*result, error) {
	o := env.o
	n := o.devices
	keyBytes, err := hex.DecodeString(o.chatServerKey)
	if err != nil || len(keyBytes) != 32 {
		return nil, fmt.Errorf("--chat-server-key: want 64 hex digits")
	}
	var serverKey [32]byte
	copy(serverKey[:], keyBytes)
	res := newResult("csp", map[string]any{
		"identities": n, "size": o.size, "rate": o.rate, "pipeline": o.pipeline,
		"reflect": o.reflect, "duration": o.duration.String(), "url": o.url,
	})
	st := &cspStats{ackLat: newHist("chat server ack (0x81)"), e2eLat: newHist("end-to-end sender→receiver"),
		reflLat: newHist("ReflectAck"), errs: &errCounter{}}
	login := newSetupHist("connect + CSP login + unblock (setup)")

	// Fresh identities per run: the stand-in keeps queues in memory.
	prefix := fmt.Sprintf("%c%c", 'A'+rand.IntN(26), 'A'+rand.IntN(26))
	keys := newGroupKeys(n)
	devs := make([]*cspDevice, n)
	for i := range devs {
		id, err := cspclient.NewIdentity(fmt.Sprintf("%s%06d", prefix, i))
		if err != nil {
			return nil, err
		}
		devs[i] = &cspDevice{idx: i, ident: id, partner: fmt.Sprintf("%s%06d", prefix, i^1),
			slots: make(chan struct{}, o.pipeline), sentAt: map[uint64]time.Duration{}, onReflect: map[uint32]func(){}}
	}
	conns := make([]*d2mclient.Client, n)
	defer func() { closeAll(conns, o.dialWorkers, true) }()
	ioCtx, ioCancel := context.WithCancel(context.Background())
	defer ioCancel()

	logf("csp: connecting and logging in %d identities", n)
	setupCtx, cancelSetup := context.WithTimeout(ctx, setupTimeout)
	var ready atomic.Int64
	setupProg := startProgress("login", st.errs, gauge("logged in", "identities", func() float64 { return float64(ready.Load()) }))
	err = forEach(setupCtx, n, o.dialWorkers, func(i int) error {
		d := devs[i]
		t0 := time.Now()
		c, err := env.dialer.dial(setupCtx, env.dialer.deviceConfig(keys[i], 1))
		if err != nil {
			return fmt.Errorf("identity %d: %w", i, err)
		}
		conns[i], d.c = c, c
		if _, err := readyDevice(setupCtx, c, nil); err != nil {
			return fmt.Errorf("identity %d: %w", i, err)
		}
		cl, err := cspclient.Login(setupCtx, d2mclient.Transport{C: c.Conn}, d.ident, serverKey, cspclient.LoginOptions{ClientInfo: "d2m-load"})
		if err != nil {
			return fmt.Errorf("identity %d: csp login: %w", i, err)
		}
		d.cl = cl
		if err := cl.Unblock(); err != nil {
			return err
		}
		if _, err := cl.RecvType(setupCtx, csp.QueueSendComplete); err != nil {
			return fmt.Errorf("identity %d: queue-send-complete: %w", i, err)
		}
		login.Record(time.Since(t0))
		ready.Add(1)
		return nil
	})
	setupProg.stopOnly()
	cancelSetup()
	if err != nil {
		return nil, fmt.Errorf("setup: %w", err)
	}

	recvCtx, stopRecv := context.WithCancel(context.Background())
	defer stopRecv()
	var recvWG sync.WaitGroup
	for _, d := range devs {
		recvWG.Add(2)
		go func() { defer recvWG.Done(); d.recvD2M(recvCtx, st) }()
		go func() { defer recvWG.Done(); d.recvCSP(recvCtx, ioCtx, o.reflect, st) }()
	}

	before, _ := env.probe.read(ctx, false)
	sendCtx, stopSend := context.WithTimeout(ctx, o.duration)
	defer stopSend()
	prog := startProgress("csp", st.errs, rateOf("received", st.received.get), rateOf("sent", st.sent.get),
		rateOf("reflects", st.reflects.get))
	start := time.Now()
	interval := deviceInterval(n, o.rate)
	var sendWG sync.WaitGroup
	for _, d := range devs {
		sendWG.Add(1)
		phase := randomPhase(interval)
		go func() { defer sendWG.Done(); d.send(sendCtx, ioCtx, max(o.size, 12), interval, phase, o.reflect, st) }()
	}
	<-sendCtx.Done()
	elapsed := time.Since(start)
	receivedInWindow := st.received.get()
	sendWG.Wait()
	drainUntil := time.Now().Add(10 * time.Second)
	for time.Now().Before(drainUntil) && (st.received.get() < st.sent.get() || st.serverAcked.get() < st.sent.get()) {
		time.Sleep(20 * time.Millisecond)
	}
	prog.finish(res)
	after, _ := env.probe.read(context.Background(), false)
	st.closing.Store(true)
	closeAll(conns, o.dialWorkers, false)
	stopRecv()
	recvWG.Wait()

	res.ElapsedS = round3(elapsed.Seconds())
	res.add("messages received end-to-end in window", float64(receivedInWindow), "")
	res.add("messages/s end-to-end (window mean)", round3(float64(receivedInWindow)/elapsed.Seconds()), "/s")
	res.add("messages/s end-to-end (median second)", medianRate(res.timelineValues("received")), "/s")
	res.add("reflects acked (total)", float64(st.reflects.get()), "")
	res.add("messages sent but not received after drain", float64(st.sent.get()-st.received.get()), "")
	if o.rate > 0 {
		res.add("target rate", o.rate, "/s")
		res.add("schedule slips > 1 s (target not kept)", float64(st.late.get()), "")
	}
	res.addHist(st.e2eLat)
	res.addHist(st.ackLat)
	res.addHist(st.reflLat)
	res.addHist(login)
	if env.probe.enabled() {
		res.Server = diffSnapshots(before, after)
	}
	res.note("the chat server is the mediator's in-process stand-in (same process, same CPUs); end-to-end latency runs from the sender's decision to send (before its reflect, with --csp-reflect) to the receiver getting the incoming message")
	res.finish(st.errs)
	return res, nil
}

// reflect sends a Reflect and runs then after its ReflectAck.
func (d *cspDevice) reflect(ioCtx context.Context, env []byte, st *cspStats, then func()) error {
	t0 := sinceBase()
	d.mu.Lock()
	d.nextRefl++
	id := d.nextRefl
	d.onReflect[id] = func() {
		st.reflLat.Record(sinceBase() - t0)
		st.reflects.Add(1)
		then()
	}
	d.mu.Unlock()
	return d.c.ReflectWithID(ioCtx, id, env, 0)
}

func (d *cspDevice) send(ctx, ioCtx context.Context, size int, interval, phase time.Duration, reflect bool, st *cspStats) {
	filler := randomBytes(size)
	pace := newPacer(interval, phase, &st.late)
	defer pace.stop()
	for pace.acquire(ctx, d.slots) {
		body := append([]byte(nil), filler...)
		stampEnvelope(body, d.idx)
		d.mu.Lock()
		d.nextMsg++
		id := d.nextMsg
		d.sentAt[id] = sinceBase()
		d.mu.Unlock()
		sendMsg := func() {
			if err := d.cl.SendMessage(d.partner, id, body); err != nil && !st.closing.Load() {
				st.errs.add(fmt.Errorf("csp send: %w", err))
			}
		}
		st.sent.Add(1)
		if reflect {
			if err := d.reflect(ioCtx, body, st, sendMsg); err != nil {
				if !st.closing.Load() {
					st.errs.add(fmt.Errorf("reflect: %w", err))
				}
				return
			}
		} else {
			sendMsg()
		}
	}
}

func (d *cspDevice) recvD2M(ctx context.Context, st *cspStats) {
	for {
		m, ok := recvSession(ctx, d.c.Conn, &st.closing, st.errs)
		if !ok {
			return
		}
		if m.Type != d2m.TypeReflectAck {
			continue
		}
		ra, err := d2m.DecodeReflectAck(m.Payload)
		if err != nil {
			st.errs.add(err)
			continue
		}
		d.mu.Lock()
		fn := d.onReflect[ra.ID]
		delete(d.onReflect, ra.ID)
		d.mu.Unlock()
		if fn != nil {
			fn()
		}
	}
}

func (d *cspDevice) recvCSP(ctx, ioCtx context.Context, reflect bool, st *cspStats) {
	for {
		typ, data, err := d.cl.Recv(ctx)
		if err != nil {
			if ctx.Err() == nil && !st.closing.Load() {
				if errors.Is(err, d2mclient.ErrClosed) {
					err = connEnd(d.c.Conn)
				}
				st.errs.add(fmt.Errorf("csp: %w", err))
			}
			return
		}
		switch typ {
		case csp.OutgoingMessageAck:
			_, id, err := cspclient.ParseOutgoingAck(data)
			if err != nil {
				st.errs.add(err)
				continue
			}
			d.mu.Lock()
			t, ok := d.sentAt[id]
			delete(d.sentAt, id)
			d.mu.Unlock()
			if ok {
				st.ackLat.Record(sinceBase() - t)
				st.serverAcked.Add(1)
				<-d.slots
			}
		case csp.IncomingMessage:
			msg, err := cspclient.ParseMessage(data)
			if err != nil {
				st.errs.add(err)
				continue
			}
			if age, ok := envelopeAge(msg.Body); ok {
				st.e2eLat.Record(age)
			}
			st.received.Add(1)
			ack := func() {
				if err := d.cl.AckIncoming(msg.Sender, msg.MessageID); err != nil && !st.closing.Load() {
					st.errs.add(fmt.Errorf("csp ack: %w", err))
				}
			}
			if reflect {
				if err := d.reflect(ioCtx, msg.Body, st, ack); err != nil && !st.closing.Load() {
					st.errs.add(fmt.Errorf("reflect: %w", err))
				}
			} else {
				ack()
			}
		case csp.CloseErrorType:
			st.errs.addKey("csp close-error")
		}
	}
}
