package mediator_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/mediator"
	"d2m-mediator/mediator/mediatortest"
	"d2m-mediator/proto/d2mpb"
	"d2m-mediator/reflection"
)

var errInjected = errors.New("injected storage failure")

// faultyStore delegates to a real bbolt store but can be switched to fail
// writes, as a full or broken disk would: failAppend fails Append and
// ReleaseHeld (the reflection path), failAll every write (each commit).
// A failed write still completes on the committer goroutine and in
// submission order, as the Store contract requires: it is queued as a write
// that changes nothing (pruning tombstones older than 1970) whose result is
// replaced by the error.
type faultyStore struct {
	reflection.Store
	failAppend atomic.Bool
	failAll    atomic.Bool
	failed     atomic.Int64

	// stall holds every Append until release (a database that stopped
	// answering).
	stallMu sync.Mutex
	stall   bool
	held    []func()
}

// setStall holds Appends (true) or submits the held ones, in order, and
// lets the next ones through (false).
func (s *faultyStore) setStall(on bool) {
	s.stallMu.Lock()
	s.stall = on
	held := s.held
	s.held = nil
	s.stallMu.Unlock()
	for _, f := range held {
		f()
	}
}

func (s *faultyStore) failLater(done func(error)) {
	s.failed.Add(1)
	s.Store.PruneTombstones(math.MinInt64, func(error) {
		if done != nil {
			done(fmt.Errorf("reflection: commit: %w", errInjected))
		}
	})
}

func (s *faultyStore) failAppendLater(done func(reflection.AppendResult, error)) {
	s.failLater(func(err error) {
		if done != nil {
			done(reflection.AppendResult{}, err)
		}
	})
}

func (s *faultyStore) Append(r reflection.AppendRequest, done func(reflection.AppendResult, error)) {
	if s.failAppend.Load() || s.failAll.Load() {
		s.failAppendLater(done)
		return
	}
	s.stallMu.Lock()
	if s.stall {
		s.held = append(s.held, func() { s.Store.Append(r, done) })
		s.stallMu.Unlock()
		return
	}
	s.stallMu.Unlock()
	s.Store.Append(r, done)
}

func (s *faultyStore) ReleaseHeld(g reflection.GroupID, sender reflection.DeviceID, done func(reflection.AppendResult, error)) {
	if s.failAppend.Load() || s.failAll.Load() {
		s.failAppendLater(done)
		return
	}
	s.Store.ReleaseHeld(g, sender, done)
}

func (s *faultyStore) PutSlot(g reflection.GroupID, sl reflection.Slot, done func(error)) {
	if s.failAll.Load() {
		s.failLater(done)
		return
	}
	s.Store.PutSlot(g, sl, done)
}

func (s *faultyStore) DeleteSlot(g reflection.GroupID, d reflection.DeviceID, t *reflection.Tombstone, done func(error)) {
	if s.failAll.Load() {
		s.failLater(done)
		return
	}
	s.Store.DeleteSlot(g, d, t, done)
}

func (s *faultyStore) SetSharedDeviceData(g reflection.GroupID, data []byte, done func(error)) {
	if s.failAll.Load() {
		s.failLater(done)
		return
	}
	s.Store.SetSharedDeviceData(g, data, done)
}

func (s *faultyStore) Ack(g reflection.GroupID, d reflection.DeviceID, seq uint64, done func(error)) {
	if s.failAll.Load() {
		s.failLater(done)
		return
	}
	s.Store.Ack(g, d, seq, done)
}

func newFaultyServer(t *testing.T, cfg mediator.Config) (*mediatortest.Server, *faultyStore) {
	t.Helper()
	db, err := reflection.Open(filepath.Join(t.TempDir(), "mediator.db"), reflection.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() }) // runs after the server's cleanup
	fs := &faultyStore{Store: db}
	return mediatortest.NewServer(t, cfg, mediatortest.WithStore(fs)), fs
}

// device is a d2mclient with the helpers these tests need.
type device struct {
	*d2mclient.Client
	t *testing.T
}

func dialDevice(t *testing.T, url string, keys d2d.Keys, id uint64) *device {
	t.Helper()
	c, err := d2mclient.Dial(tctx(t, 10*time.Second), d2mclient.Config{URL: url, Keys: keys, DeviceID: id,
		ExpirationPolicy: d2mpb.DeviceSlotExpirationPolicy_PERSISTENT})
	if err != nil {
		t.Fatalf("device %d: %v", id, err)
	}
	t.Cleanup(func() { c.CloseNow() })
	return &device{Client: c, t: t}
}

// ready dials and consumes the backlog up to ReflectionQueueDry, acking it.
func readyDevice(t *testing.T, url string, keys d2d.Keys, id uint64) (*device, [][]byte) {
	t.Helper()
	d := dialDevice(t, url, keys, id)
	var backlog [][]byte
	for {
		m := d.next()
		switch m.Type {
		case d2m.TypeReflected:
			r, _ := d2m.DecodeReflected(m.Payload)
			backlog = append(backlog, r.Envelope)
			d.AckReflected(tctx(t, time.Second), r.ID)
		case d2m.TypeReflectionQueueDry:
			return d, backlog
		default:
			t.Fatalf("device %d: %v before ReflectionQueueDry", id, m.Type)
		}
	}
}

func tctx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// next returns the next message other than RolePromotedToLeader.
func (d *device) next() d2mclient.Message {
	d.t.Helper()
	for {
		m, err := d.Recv(tctx(d.t, 10*time.Second))
		if err != nil {
			d.t.Fatalf("device %d: recv: %v (close %d)", d.DeviceID(), err, d.CloseCode(tctx(d.t, time.Second)))
		}
		if m.Type != d2m.TypeRolePromotedToLeader {
			return m
		}
	}
}

func (d *device) reflectAcked(env []byte) {
	d.t.Helper()
	id, err := d.Reflect(tctx(d.t, time.Second), env, 0)
	if err != nil {
		d.t.Fatal(err)
	}
	m := d.next()
	if a, _ := d2m.DecodeReflectAck(m.Payload); m.Type != d2m.TypeReflectAck || a.ID != id {
		d.t.Fatalf("device %d: got %v, want ReflectAck %d", d.DeviceID(), m.Type, id)
	}
}

func (d *device) expectReflected(env []byte) {
	d.t.Helper()
	m := d.next()
	r, err := d2m.DecodeReflected(m.Payload)
	if m.Type != d2m.TypeReflected || err != nil || !bytes.Equal(r.Envelope, env) {
		d.t.Fatalf("device %d: got %v %q, want Reflected %q", d.DeviceID(), m.Type, r.Envelope, env)
	}
	d.AckReflected(tctx(d.t, time.Second), r.ID)
}

// expectClosed requires the server to close with code, with nothing but
// ignorable messages before it (no ReflectAck above all).
func (d *device) expectClosed(code d2m.CloseCode) {
	d.t.Helper()
	for {
		m, err := d.Recv(tctx(d.t, 10*time.Second))
		if err != nil {
			break
		}
		if m.Type == d2m.TypeReflectAck {
			d.t.Fatalf("device %d: ReflectAck for a reflection that was not stored", d.DeviceID())
		}
	}
	if got := d.CloseCode(tctx(d.t, 10*time.Second)); got != int(code) {
		d.t.Fatalf("device %d: close %d, want %d (%v)", d.DeviceID(), got, code, d.Err())
	}
}

func (d *device) expectSilence(dur time.Duration) {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	for {
		m, err := d.Recv(ctx)
		if err != nil {
			return
		}
		if m.Type != d2m.TypeRolePromotedToLeader {
			d.t.Fatalf("device %d: unexpected %v", d.DeviceID(), m.Type)
		}
	}
}

func newKeys() d2d.Keys { return d2d.DeriveKeys(d2d.NewDeviceGroupKey()) }

// TestStoreFaultAppend: a reflection whose commit fails gets no
// ReflectAck, reaches nobody, its sender is closed with 1011 and the
// failure is logged; once the store works again so does the server.
func TestStoreFaultAppend(t *testing.T) {
	srv, fs := newFaultyServer(t, mediator.Config{})
	g := newKeys()
	a, _ := readyDevice(t, srv.URL, g, 1)
	b, _ := readyDevice(t, srv.URL, g, 2)
	a.reflectAcked([]byte("before"))
	b.expectReflected([]byte("before"))

	fs.failAppend.Store(true)
	a.Reflect(tctx(t, time.Second), []byte("lost"), 0)
	a.expectClosed(d2m.CloseInternalError)
	b.expectSilence(200 * time.Millisecond)
	logs := srv.Logs()
	if !strings.Contains(logs, `"storing reflection failed"`) || !strings.Contains(logs, errInjected.Error()) ||
		!strings.Contains(logs, `"level":"error"`) {
		t.Fatalf("no error logged for the failed commit:\n%s", logs)
	}

	// Ephemeral reflections store nothing, but their counter update is a
	// write too: the same rule.
	a, _ = readyDevice(t, srv.URL, g, 1)
	a.Reflect(tctx(t, time.Second), []byte("typing"), d2m.FlagEphemeral)
	a.expectClosed(d2m.CloseInternalError)
	b.expectSilence(100 * time.Millisecond)

	fs.failAppend.Store(false)
	a, _ = readyDevice(t, srv.URL, g, 1)
	a.reflectAcked([]byte("after"))
	b.expectReflected([]byte("after"))
	// A new device gets only what was stored.
	c, backlog := readyDevice(t, srv.URL, g, 3)
	if len(backlog) != 0 {
		t.Fatalf("new device got %q", backlog)
	}
	c.reflectAcked([]byte("from-c"))
	if fs.failed.Load() < 2 {
		t.Fatalf("only %d injected failures", fs.failed.Load())
	}
}

// TestStoreFaultEveryCommit: with every commit failing, a handshake (slot
// write) ends with 1011 and a connected device's reflect too; the server
// recovers when the store does.
func TestStoreFaultEveryCommit(t *testing.T) {
	srv, fs := newFaultyServer(t, mediator.Config{})
	g := newKeys()
	a, _ := readyDevice(t, srv.URL, g, 1)
	b, _ := readyDevice(t, srv.URL, g, 2)

	fs.failAll.Store(true)
	c, err := d2mclient.Dial(tctx(t, 10*time.Second), d2mclient.Config{URL: srv.URL, Keys: g, DeviceID: 3})
	if err == nil {
		c.CloseNow()
		t.Fatal("handshake succeeded while the slot could not be stored")
	}
	if c == nil || c.CloseCode(tctx(t, 10*time.Second)) != int(d2m.CloseInternalError) {
		t.Fatalf("handshake during storage failure: %v", err)
	}
	a.Reflect(tctx(t, time.Second), []byte("lost"), 0)
	a.expectClosed(d2m.CloseInternalError)
	b.expectSilence(100 * time.Millisecond)
	if !strings.Contains(srv.Logs(), errInjected.Error()) {
		t.Fatal("storage failure not logged")
	}

	fs.failAll.Store(false)
	a, _ = readyDevice(t, srv.URL, g, 1)
	a.reflectAcked([]byte("after"))
	b.expectReflected([]byte("after"))
	// Device 3's slot was never stored: it starts NEW and empty ("after"
	// was reflected before it existed, "lost" was never acked or stored).
	c2, backlog := readyDevice(t, srv.URL, g, 3)
	if st := c2.ServerInfo.DeviceSlotState; st != d2mpb.DeviceSlotState_NEW || len(backlog) != 0 {
		t.Fatalf("device 3 after the failure: state %v, backlog %q", st, backlog)
	}
	c2.reflectAcked([]byte("from-3"))
	a.expectReflected([]byte("from-3"))
	b.expectReflected([]byte("from-3"))
}

// TestStoreFaultReleaseHeld: the commit that releases a transaction's held
// reflections fails. The holder gets no CommitTransactionAck but 1011, the
// lock does not stay taken, and the held reflections (durable since their
// ReflectAck) are not lost: they are released with the holder's next
// transaction.
func TestStoreFaultReleaseHeld(t *testing.T) {
	srv, fs := newFaultyServer(t, mediator.Config{})
	g := newKeys()
	a, _ := readyDevice(t, srv.URL, g, 1)
	b, _ := readyDevice(t, srv.URL, g, 2)
	a.SendMessage(tctx(t, time.Second), d2m.TypeBeginTransaction, &d2mpb.BeginTransaction{EncryptedScope: []byte("scope")})
	if m := a.next(); m.Type != d2m.TypeBeginTransactionAck {
		t.Fatalf("got %v", m.Type)
	}
	a.reflectAcked([]byte("held"))
	fs.failAppend.Store(true)
	a.SendMessage(tctx(t, time.Second), d2m.TypeCommitTransaction, &d2mpb.CommitTransaction{})
	for {
		m, err := a.Recv(tctx(t, 10*time.Second))
		if err != nil {
			break
		}
		if m.Type == d2m.TypeCommitTransactionAck {
			t.Fatal("CommitTransactionAck although the release failed")
		}
	}
	if code := a.CloseCode(tctx(t, 10*time.Second)); code != int(d2m.CloseInternalError) {
		t.Fatalf("holder closed with %d", code)
	}
	if m := b.next(); m.Type != d2m.TypeTransactionEnded {
		t.Fatalf("other device got %v, want TransactionEnded", m.Type)
	}
	fs.failAppend.Store(false)
	// The lock is free.
	b.SendMessage(tctx(t, time.Second), d2m.TypeBeginTransaction, &d2mpb.BeginTransaction{EncryptedScope: []byte("b")})
	if m := b.next(); m.Type != d2m.TypeBeginTransactionAck {
		t.Fatalf("lock after failed release: %v", m.Type)
	}
	b.SendMessage(tctx(t, time.Second), d2m.TypeCommitTransaction, &d2mpb.CommitTransaction{})
	if m := b.next(); m.Type != d2m.TypeCommitTransactionAck {
		t.Fatalf("got %v", m.Type)
	}
	// The holder's next transaction releases the old held entry too.
	a, _ = readyDevice(t, srv.URL, g, 1)
	a.SendMessage(tctx(t, time.Second), d2m.TypeBeginTransaction, &d2mpb.BeginTransaction{EncryptedScope: []byte("again")})
	if m := a.next(); m.Type != d2m.TypeBeginTransactionAck {
		t.Fatalf("got %v", m.Type)
	}
	a.SendMessage(tctx(t, time.Second), d2m.TypeCommitTransaction, &d2mpb.CommitTransaction{})
	if m := a.next(); m.Type != d2m.TypeCommitTransactionAck {
		t.Fatalf("got %v", m.Type)
	}
	b.expectReflected([]byte("held"))
	if m := b.next(); m.Type != d2m.TypeTransactionEnded {
		t.Fatalf("got %v", m.Type)
	}
}

// TestStoreFullDisk runs the server on a real, tiny tmpfs and fills it: the
// first reflection that cannot be written gets no ReflectAck and its
// sender 1011; every acked reflection is delivered once space is back; the
// file passes reflection.Check. Needs root and mount(8); skipped otherwise.
func TestStoreFullDisk(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a tmpfs")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, 0); err != nil {
			t.Errorf("umount %s: %v", dir, err)
		}
	})
	srv := mediatortest.NewServer(t, mediator.Config{}, mediatortest.WithDataDir(dir))
	g := newKeys()
	a, _ := readyDevice(t, srv.URL, g, 1)
	b, _ := readyDevice(t, srv.URL, g, 2)
	b.Close() // offline: everything a stores is queued for b

	// Fill the filesystem to the last block.
	filler, err := os.Create(filepath.Join(dir, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	for {
		if _, err := filler.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	for _, n := range []int{4096, 512, 1} { // the last partial blocks
		for {
			if _, err := filler.Write(chunk[:n]); err != nil {
				break
			}
		}
	}
	// Give back 256 KiB so that some reflections are stored (and acked)
	// before the disk is full again.
	if st, err := filler.Stat(); err == nil {
		filler.Truncate(st.Size() - 256<<10)
	}
	filler.Close()

	var acked [][]byte
	env := make([]byte, 8<<10)
	failedAt := -1
	for i := 0; i < 400; i++ {
		e := append([]byte(fmt.Sprintf("full-%04d-", i)), env...)
		id, err := a.Reflect(tctx(t, time.Second), e, 0)
		if err != nil {
			t.Fatal(err)
		}
		m, err := a.Recv(tctx(t, 10*time.Second))
		for err == nil && m.Type == d2m.TypeRolePromotedToLeader {
			m, err = a.Recv(tctx(t, 10*time.Second))
		}
		if err != nil {
			failedAt = i
			break
		}
		if r, _ := d2m.DecodeReflectAck(m.Payload); m.Type != d2m.TypeReflectAck || r.ID != id {
			t.Fatalf("got %v", m.Type)
		}
		acked = append(acked, e)
	}
	if failedAt < 0 {
		t.Fatal("the disk never filled up")
	}
	if code := a.CloseCode(tctx(t, 10*time.Second)); code != int(d2m.CloseInternalError) {
		t.Fatalf("close %d on a full disk, want 1011", code)
	}
	t.Logf("disk full after %d acked reflections", len(acked))

	if err := os.Remove(filepath.Join(dir, "filler")); err != nil {
		t.Fatal(err)
	}
	a, _ = readyDevice(t, srv.URL, g, 1)
	a.reflectAcked([]byte("after"))
	_, backlog := readyDevice(t, srv.URL, g, 2)
	acked = append(acked, []byte("after"))
	if len(backlog) != len(acked) {
		t.Fatalf("b got %d entries, %d were acked", len(backlog), len(acked))
	}
	for i := range acked {
		if !bytes.Equal(backlog[i], acked[i]) {
			t.Fatalf("entry %d differs", i)
		}
	}
	srv.Close()
	if err := reflection.Check(srv.DBPath); err != nil {
		t.Fatalf("check after a full disk: %v", err)
	}
}

// TestStoreStallIsNotIdle: a device whose Reflect window is full because
// the store has not answered is not read meanwhile; that silence is the
// server's, so the idle timeout does not close it with 4013 ("client
// idle"). Once the store answers, every reflection is acked, and a device
// that then really goes quiet is closed with 4013 as before. (Found by
// TestFaultPostgresPrimaryBlackhole: behind a silent database, busy
// writers were closed with 4013 before their commits failed with 1011.)
func TestStoreStallIsNotIdle(t *testing.T) {
	idle := 300 * time.Millisecond
	srv, fs := newFaultyServer(t, mediator.Config{IdleTimeout: idle, ReflectWindow: 4})
	keys := newKeys()
	a, _ := readyDevice(t, srv.URL, keys, 1)
	fs.setStall(true)
	var ids []uint32
	for i := range 10 {
		id, err := a.Reflect(tctx(t, time.Second), []byte(fmt.Sprintf("stalled-%d", i)), 0)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	a.expectSilence(4 * idle) // no 4013 while the server does not read
	fs.setStall(false)
	for _, id := range ids {
		m := a.next()
		if ack, _ := d2m.DecodeReflectAck(m.Payload); m.Type != d2m.TypeReflectAck || ack.ID != id {
			t.Fatalf("got %v, want ReflectAck %d", m.Type, id)
		}
	}
	if code := a.CloseCode(tctx(t, 5*time.Second)); code != int(d2m.CloseIdleTimeout) {
		t.Fatalf("quiet device after the stall: close %d, want 4013", code)
	}
}
