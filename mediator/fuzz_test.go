package mediator_test

import (
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/mediator"
	"d2m-mediator/mediator/mediatortest"
	"d2m-mediator/proto/d2mpb"
)

// Stateful fuzzing of a whole server connection.
// One in-process server runs per fuzz process; every input gets a fresh
// device group A with an authenticated device A1 (the fuzzed one) and a
// peer A2 that has put two Reflected in flight to A1, so ReflectedAck,
// DropDevice and transactions reach their real states. The input's bytes
// become a sequence of frames sent on A1. Then:
//   - no panic anywhere (a panic in a server goroutine ends the process,
//     which the fuzzer reports with the input);
//   - A1 either answers a GetDevicesInfo probe (it stays up) or ends with a
//     close code of the protocol for bad input (never without one, never
//     1011);
//   - a healthy device of another group B still reflects and gets its
//     ReflectAck.

// fuzzServer starts the server for a fuzz target on a tmpfs data directory
// when there is one: bbolt's fsync is the slowest step of every input.
func fuzzServer(f *testing.F, cfg mediator.Config) *mediatortest.Server {
	var opts []mediatortest.Option
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		if dir, err := os.MkdirTemp("/dev/shm", "mediator-fuzz-"); err == nil {
			f.Cleanup(func() { os.RemoveAll(dir) })
			opts = append(opts, mediatortest.WithDataDir(dir))
		}
	}
	opts = append(opts, mediatortest.WithChatStub())
	return mediatortest.NewServer(f, cfg, opts...)
}

func fuzzConfig() mediator.Config {
	return mediator.Config{
		IdleTimeout:      time.Hour, // the healthy group stays connected for the whole run
		HandshakeTimeout: 5 * time.Second,
		WriteTimeout:     2 * time.Second,
	}
}

// Frame kinds: the low nibble of a frame's selector byte.
const (
	kProxy = iota
	kClientHello
	kGetDevicesInfo
	kDropDevice
	kSetSharedDeviceData
	kBeginTransaction
	kCommitTransaction
	kReflect
	kReflectedAck
	kAnyType      // chunk[0] is the type, the rest the payload
	kRaw          // the chunk is the whole frame (may be shorter than 4 bytes); 0xffff bytes: oversize
	kText         // a text frame
	kDropID       // DropDevice{id}: self (1), the peer (2) or chunk-derived
	kAckID        // ReflectedAck of id chunk[0]%4 (1 and 2 are in flight)
	kReflectEnv   // a well-formed Reflect; flags from chunk[0]
	kBeginWithTTL // BeginTransaction{scope: chunk, ttl: 0 or 1}
)

var protobufKinds = map[int]d2m.PayloadType{
	kProxy: d2m.TypeProxy, kClientHello: d2m.TypeClientHello, kGetDevicesInfo: d2m.TypeGetDevicesInfo,
	kDropDevice: d2m.TypeDropDevice, kSetSharedDeviceData: d2m.TypeSetSharedDeviceData,
	kBeginTransaction: d2m.TypeBeginTransaction, kCommitTransaction: d2m.TypeCommitTransaction,
	kReflect: d2m.TypeReflect, kReflectedAck: d2m.TypeReflectedAck,
}

type fuzzFrame struct {
	text bool
	b    []byte
}

// splitFrames turns fuzz bytes into frames: data[0]%17 is the count; each
// frame is a selector byte (low nibble: kind; bit 7: two-byte length), a
// length (one byte, or two little-endian) and that many chunk bytes
// (fewer if the input ends).
func splitFrames(data []byte) []fuzzFrame {
	if len(data) == 0 {
		return nil
	}
	n := int(data[0]) % 17
	data = data[1:]
	var out []fuzzFrame
	for i := 0; i < n && len(data) > 0; i++ {
		sel := data[0]
		data = data[1:]
		var l int
		if sel&0x80 != 0 && len(data) >= 2 {
			l = int(binary.LittleEndian.Uint16(data))
			data = data[2:]
		} else if len(data) >= 1 {
			l = int(data[0])
			data = data[1:]
		}
		oversize := l == 0xffff
		chunk := data[:min(l, len(data))]
		data = data[len(chunk):]
		out = append(out, makeFrame(int(sel&0x0f), chunk, oversize))
	}
	return out
}

func makeFrame(kind int, chunk []byte, oversize bool) fuzzFrame {
	first := byte(0)
	if len(chunk) > 0 {
		first = chunk[0]
	}
	if t, ok := protobufKinds[kind]; ok {
		return fuzzFrame{b: d2m.EncodeRaw(t, chunk)}
	}
	switch kind {
	case kAnyType:
		if len(chunk) == 0 {
			return fuzzFrame{b: d2m.EncodeRaw(0, nil)}
		}
		return fuzzFrame{b: d2m.EncodeRaw(d2m.PayloadType(chunk[0]), chunk[1:])}
	case kRaw:
		if oversize {
			b := make([]byte, d2m.MaxFrameSize+1)
			copy(b, chunk)
			return fuzzFrame{b: b}
		}
		return fuzzFrame{b: slices.Clone(chunk)}
	case kText:
		return fuzzFrame{text: true, b: slices.Clone(chunk)}
	case kDropID:
		id := uint64(first%3 + 1) // 1 self, 2 peer, 3 unknown
		if len(chunk) >= 9 {
			id = binary.LittleEndian.Uint64(chunk[1:])
		}
		return fuzzFrame{b: d2m.MustEncodeMessage(d2m.TypeDropDevice, &d2mpb.DropDevice{DeviceId: id})}
	case kAckID:
		return fuzzFrame{b: d2m.EncodeReflectedAck(uint32(first % 4))}
	case kReflectEnv:
		env := chunk
		if len(env) > 0 {
			env = env[1:]
		}
		return fuzzFrame{b: d2m.EncodeReflect(uint16(first&1), uint32(len(env)), env)}
	case kBeginWithTTL:
		return fuzzFrame{b: d2m.MustEncodeMessage(d2m.TypeBeginTransaction, &d2mpb.BeginTransaction{EncryptedScope: chunk, Ttl: uint32(first & 1)})}
	}
	panic("unreachable")
}

// seedFrames encodes frames in splitFrames' format, for the seed corpus.
func seedFrames(frames ...[]byte) []byte {
	out := []byte{byte(len(frames))}
	for _, f := range frames {
		out = append(out, f...)
	}
	return out
}

// sf encodes one frame of kind with chunk.
func sf(kind int, chunk []byte) []byte {
	if len(chunk) > 0xff {
		b := []byte{byte(kind) | 0x80, 0, 0}
		binary.LittleEndian.PutUint16(b[1:], uint16(len(chunk)))
		return append(b, chunk...)
	}
	return append([]byte{byte(kind), byte(len(chunk))}, chunk...)
}

func addFrameSeeds(f *testing.F) {
	f.Add([]byte{})
	f.Add(seedFrames(sf(kGetDevicesInfo, nil)))
	f.Add(seedFrames(sf(kBeginWithTTL, []byte("scope")), sf(kReflectEnv, []byte("\x00held")), sf(kCommitTransaction, nil)))
	f.Add(seedFrames(sf(kBeginWithTTL, []byte("s")), sf(kBeginWithTTL, []byte("s"))))
	f.Add(seedFrames(sf(kDropID, []byte{0}))) // self
	f.Add(seedFrames(sf(kDropID, []byte{1}), sf(kGetDevicesInfo, nil)))
	f.Add(seedFrames(sf(kAckID, []byte{1}), sf(kAckID, []byte{2}), sf(kAckID, []byte{1})))
	f.Add(seedFrames(sf(kReflect, []byte{7, 0, 0, 0, 1, 0, 0, 0, 'x'})))
	f.Add(seedFrames(sf(kReflectEnv, []byte("\x01typing")), sf(kReflectEnv, []byte("\x00durable"))))
	f.Add(seedFrames(sf(kRaw, []byte{0x80, 0})))
	f.Add(seedFrames(sf(kText, []byte("hi"))))
	f.Add(seedFrames(sf(kProxy, make([]byte, 48))))
	f.Add(seedFrames(sf(kClientHello, nil)))
	f.Add(seedFrames(sf(kAnyType, []byte{0x45, 0x08, 0x01})))
	f.Add(seedFrames(sf(kSetSharedDeviceData, []byte{0x0a, 0x03, 's', 'd', 'd'}), sf(kGetDevicesInfo, nil)))
	f.Add(seedFrames([]byte{kRaw | 0x80, 0xff, 0xff}))
}

// healthyGroup is group B: b1 reflects, b2 acks whatever it receives.
type healthyGroup struct {
	mu sync.Mutex
	b1 *d2mclient.Client
	n  uint32
}

func startHealthyGroup(f *testing.F, url string) *healthyGroup {
	keys := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	b1, err := d2mclient.Dial(ctx, d2mclient.Config{URL: url, Keys: keys, DeviceID: 1})
	if err != nil {
		f.Fatal(err)
	}
	b2, err := d2mclient.Dial(ctx, d2mclient.Config{URL: url, Keys: keys, DeviceID: 2})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { b1.CloseNow(); b2.CloseNow() })
	go func() {
		for {
			m, err := b2.Recv(context.Background())
			if err != nil {
				return
			}
			if m.Type == d2m.TypeReflected {
				r, _ := d2m.DecodeReflected(m.Payload)
				b2.AckReflected(context.Background(), r.ID)
			}
		}
	}()
	return &healthyGroup{b1: b1}
}

// roundTrip reflects from b1 and waits for the ReflectAck.
func (h *healthyGroup) roundTrip(t *testing.T) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.n++
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.b1.ReflectWithID(ctx, h.n, []byte(fmt.Sprintf("healthy-%d", h.n)), 0); err != nil {
		t.Fatalf("healthy group B: send: %v", err)
	}
	for {
		m, err := h.b1.Recv(ctx)
		if err != nil {
			t.Fatalf("healthy group B: no ReflectAck: %v (close %d)", err, h.b1.CloseCode(ctx))
		}
		if m.Type == d2m.TypeReflectAck {
			if a, _ := d2m.DecodeReflectAck(m.Payload); a.ID == h.n {
				return
			}
		}
	}
}

// closeCodesForBadInput are the codes a device may get for what it sent.
var closeCodesForBadInput = []int{
	int(d2m.CloseMessageTooBig), int(d2m.CloseUpstreamClosed), int(d2m.CloseUpstreamUnreachable),
	int(d2m.CloseUpstreamError), int(d2m.CloseProtocolError), int(d2m.CloseTransactionTTL),
	int(d2m.CloseUnknownAck), int(d2m.CloseDropped),
}

func FuzzServerFrames(f *testing.F) {
	addFrameSeeds(f)
	srv := fuzzServer(f, fuzzConfig())
	healthy := startHealthyGroup(f, srv.URL)

	f.Fuzz(func(t *testing.T, data []byte) {
		frames := splitFrames(data)
		keys := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
		defer cancel()
		a2, err := d2mclient.Dial(ctx, d2mclient.Config{URL: srv.URL, Keys: keys, DeviceID: 2})
		if err != nil {
			t.Fatalf("peer A2: %v", err)
		}
		defer a2.CloseNow()
		a1, err := d2mclient.Dial(ctx, d2mclient.Config{URL: srv.URL, Keys: keys, DeviceID: 1})
		if err != nil {
			t.Fatalf("device A1: %v", err)
		}
		defer a1.CloseNow()
		go drain(a2.Conn)
		// Two Reflected in flight to A1 (ids 1 and 2), not acked.
		for i := 0; i < 2; i++ {
			a2.Reflect(ctx, []byte{byte('a' + i)}, 0)
		}
		for got := 0; got < 2; {
			m, err := a1.Recv(ctx)
			if err != nil {
				t.Fatalf("A1 before the frames: %v", err)
			}
			if m.Type == d2m.TypeReflected {
				got++
			}
		}

		// A1's answers are read as they come, so the server never sees a
		// slow consumer; the probe's answer is picked out.
		answers := make(chan d2m.PayloadType, 64)
		go func() {
			defer close(answers)
			for {
				m, err := a1.Recv(context.Background())
				if err != nil {
					return
				}
				if m.Type == d2m.TypeDevicesInfo {
					select {
					case answers <- m.Type:
					default:
					}
				}
			}
		}()
		for _, fr := range frames {
			if fr.text {
				err = a1.SendText(ctx, string(fr.b))
			} else {
				err = a1.Send(ctx, fr.b)
			}
			if err != nil {
				break
			}
		}
		// Drain answers to requests the frames made, then probe.
		for len(answers) > 0 {
			<-answers
		}
		a1.SendMessage(ctx, d2m.TypeGetDevicesInfo, &d2mpb.GetDevicesInfo{})
		select {
		case _, ok := <-answers:
			if !ok {
				code := a1.CloseCode(ctx)
				if !slices.Contains(closeCodesForBadInput, code) {
					t.Fatalf("A1 ended with close code %d (err %v)", code, a1.Err())
				}
				t.Logf("%d frames: closed with %d", len(frames), code)
			} else {
				t.Logf("%d frames: still up", len(frames))
			}
		case <-ctx.Done():
			t.Fatalf("A1 neither answered nor closed")
		}
		healthy.roundTrip(t)
	})
}

func drain(c *d2mclient.Conn) {
	for {
		if _, err := c.Recv(context.Background()); err != nil {
			return
		}
	}
}

// FuzzClientHello fuzzes the pre-authentication path: a fresh group's
// socket gets a ClientHello built from the fuzzed fields (or raw fuzzed
// bytes), optionally after early Proxy bytes. The property that matters is
// authentication: ServerInfo must come only for a response made with the
// group's key to this connection's challenge, and version 0; everything
// else ends with a close code of §6.2, never a panic.
func FuzzClientHello(f *testing.F) {
	f.Add(uint32(0), uint64(1), int32(0), int32(1), int32(-1), []byte("info"), uint8(0), []byte{})
	f.Add(uint32(1), uint64(1), int32(0), int32(1), int32(-1), []byte("info"), uint8(0), []byte{})
	f.Add(uint32(0), uint64(7), int32(1), int32(0), int32(1), []byte{}, uint8(0), []byte{})
	f.Add(uint32(0), uint64(2), int32(9), int32(300), int32(5), []byte{}, uint8(0), []byte{})
	f.Add(uint32(0), uint64(3), int32(0), int32(0), int32(0), []byte("x"), uint8(1), []byte{})
	f.Add(uint32(0), uint64(3), int32(0), int32(0), int32(-1), []byte("x"), uint8(2), make([]byte, 72))
	f.Add(uint32(0), uint64(3), int32(0), int32(0), int32(-1), []byte("x"), uint8(3), []byte{})
	f.Add(uint32(0), uint64(0), int32(0), int32(0), int32(-1), []byte{}, uint8(0x80), []byte{0xff, 0xff})
	f.Add(uint32(0), uint64(4), int32(0), int32(0), int32(-1), []byte{}, uint8(0x40), make([]byte, 48))
	srv := fuzzServer(f, fuzzConfig())
	other := d2d.DeriveKeys(d2d.NewDeviceGroupKey())

	f.Fuzz(func(t *testing.T, version uint32, deviceID uint64, exhausted, expiration, expected int32, deviceInfo []byte, mode uint8, raw []byte) {
		keys := d2d.DeriveKeys(d2d.NewDeviceGroupKey())
		ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
		defer cancel()
		conn, _, err := d2mclient.DialRaw(ctx, d2mclient.URLFor(srv.URL, keys, "7f"), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.CloseNow()
		m, err := conn.Recv(ctx)
		if err != nil || m.Type != d2m.TypeServerHello {
			t.Fatalf("no ServerHello: %v %v", m.Type, err)
		}
		hello, err := d2m.DecodeServerHello(m.Payload)
		if err != nil {
			t.Fatal(err)
		}
		if mode&0x40 != 0 && len(raw) > 0 {
			conn.SendProxy(ctx, raw) // early CSP bytes
		}
		var esk [32]byte
		copy(esk[:], hello.Esk)
		valid := false
		var frame []byte
		if mode&0x80 != 0 {
			frame = d2m.EncodeRaw(d2m.TypeClientHello, raw)
		} else {
			ch := &d2mpb.ClientHello{
				Version: version, DeviceId: deviceID,
				DeviceSlotsExhaustedPolicy: d2mpb.ClientHello_DeviceSlotsExhaustedPolicy(exhausted),
				DeviceSlotExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy(expiration),
				EncryptedDeviceInfo:        deviceInfo[:min(len(deviceInfo), 60000)],
			}
			if expected >= 0 {
				ch.ExpectedDeviceSlotState = d2mclient.Expect(d2mpb.DeviceSlotState(expected))
			}
			switch mode % 4 {
			case 0:
				ch.Response, _ = d2d.ChallengeResponse(keys, &esk, hello.Challenge)
				valid = version == 0
			case 1: // one bit flipped
				ch.Response, _ = d2d.ChallengeResponse(keys, &esk, hello.Challenge)
				ch.Response[deviceID%72] ^= 1 << (deviceID / 72 % 8)
			case 2:
				ch.Response = raw
			case 3: // made with another group's key
				ch.Response, _ = d2d.ChallengeResponse(other, &esk, hello.Challenge)
			}
			frame, err = d2m.EncodeMessage(d2m.TypeClientHello, ch)
			if err != nil {
				t.Skip("ClientHello does not fit a frame")
			}
		}
		if err := conn.Send(ctx, frame); err != nil {
			t.Fatalf("send ClientHello: %v", err)
		}
		m, err = conn.Recv(ctx)
		if err == nil && m.Type == d2m.TypeServerInfo {
			if !valid {
				t.Fatalf("authenticated without a valid response (mode %d, version %d)", mode, version)
			}
			return
		}
		code := conn.CloseCode(ctx)
		switch {
		case err == nil:
			t.Fatalf("got %v instead of ServerInfo or a close", m.Type)
		case valid && (expected < 0 || expected == int32(d2mpb.DeviceSlotState_NEW)):
			t.Fatalf("valid ClientHello for a fresh group refused with %d", code)
		case !slices.Contains([]int{4010, 4110, 4115, 1009}, code):
			t.Fatalf("close code %d", code)
		}
	})
}
