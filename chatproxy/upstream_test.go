package chatproxy

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// fakeChatServer listens on loopback and runs serve on the first connection.
// It returns the address; the listener and connection close with the test.
func fakeChatServer(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		serve(c)
	}()
	return ln.Addr().String()
}

func dialTest(t *testing.T, addr string, opts Options) *Upstream {
	t.Helper()
	u, err := Dial(context.Background(), addr, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	return u
}

// readUnits reads len(want) units, compares them, and returns the error
// ReadUnit gives after them.
func readUnits(t *testing.T, u *Upstream, want [][]byte) error {
	t.Helper()
	for i, w := range want {
		got, err := u.ReadUnit()
		if err != nil {
			t.Fatalf("unit %d: %v", i, err)
		}
		if !bytes.Equal(got, w) {
			t.Fatalf("unit %d: got %d bytes, want %d", i, len(got), len(w))
		}
	}
	_, err := u.ReadUnit()
	return err
}

func TestUpstreamManyUnitsInOneWrite(t *testing.T) {
	units := testUnits(5, 0, 200, MaxFrameBoxSize, 17)
	addr := fakeChatServer(t, func(c net.Conn) {
		c.Write(bytes.Join(units, nil))
		// Closing right after the write: the units must still come out
		// before ErrClosed (docs/protocol.md §8.2, forward then 4000).
	})
	u := dialTest(t, addr, Options{})
	err := readUnits(t, u, units)
	if !errors.Is(err, ErrClosed) {
		t.Fatalf("after units: %v, want ErrClosed", err)
	}
}

func TestUpstreamOneUnitAcrossOneByteWrites(t *testing.T) {
	units := testUnits(300)
	addr := fakeChatServer(t, func(c net.Conn) {
		for _, b := range bytes.Join(units, nil) {
			if _, err := c.Write([]byte{b}); err != nil {
				return
			}
		}
	})
	u := dialTest(t, addr, Options{ReadBufferSize: 16})
	if err := readUnits(t, u, units); !errors.Is(err, ErrClosed) || !errors.Is(err, io.EOF) {
		t.Fatalf("after units: %v, want ErrClosed wrapping EOF", err)
	}
}

func TestUpstreamFrameTooLarge(t *testing.T) {
	units := testUnits(1)
	addr := fakeChatServer(t, func(c net.Conn) {
		c.Write(append(bytes.Join(units, nil), 0xff, 0xff))
		io.Copy(io.Discard, c) // keep the connection open until the client closes
	})
	u := dialTest(t, addr, Options{})
	if err := readUnits(t, u, units); !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("got %v, want ErrFrameTooLarge", err)
	}
}

func TestUpstreamPartialUnitAtEOF(t *testing.T) {
	units := testUnits(8)
	addr := fakeChatServer(t, func(c net.Conn) {
		c.Write(append(bytes.Join(units, nil), 8, 0, 1, 2, 3))
	})
	u := dialTest(t, addr, Options{})
	if err := readUnits(t, u, units); !errors.Is(err, ErrClosed) || !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("got %v, want ErrClosed wrapping io.ErrUnexpectedEOF", err)
	}
}

func TestUpstreamWriteIsVerbatim(t *testing.T) {
	// The login split in two writes, as iOS sends it (docs/protocol.md §9.1).
	writes := [][]byte{fill(make([]byte, 48), 1), fill(make([]byte, 144), 2), fill(make([]byte, 40), 3), {2, 0, 9, 9}}
	want := bytes.Join(writes, nil)
	got := make(chan []byte, 1)
	addr := fakeChatServer(t, func(c net.Conn) {
		b, _ := io.ReadAll(c)
		got <- b
	})
	u := dialTest(t, addr, Options{})
	for _, w := range writes {
		if err := u.Write(w); err != nil {
			t.Fatal(err)
		}
	}
	u.Close()
	if b := <-got; !bytes.Equal(b, want) {
		t.Fatalf("server got %d bytes, want %d", len(b), len(want))
	}
	if err := u.Write([]byte{1}); !errors.Is(err, ErrClosed) {
		t.Fatalf("Write after Close: %v, want ErrClosed", err)
	}
}

func TestDialClosedPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, err = Dial(context.Background(), addr, Options{DialTimeout: 2 * time.Second})
	if !errors.Is(err, ErrDial) {
		t.Fatalf("got %v, want ErrDial", err)
	}
}

func TestCloseUnblocksReadUnit(t *testing.T) {
	addr := fakeChatServer(t, func(c net.Conn) {
		io.Copy(io.Discard, c) // never sends anything
	})
	u := dialTest(t, addr, Options{})
	errc := make(chan error, 1)
	go func() {
		_, err := u.ReadUnit()
		errc <- err
	}()
	time.Sleep(20 * time.Millisecond) // let ReadUnit block in the kernel
	if err := u.Close(); err != nil {
		t.Fatal(err)
	}
	if err := u.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("got %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadUnit still blocked after Close")
	}
}

func TestWriteTimeout(t *testing.T) {
	stop := make(chan struct{})
	addr := fakeChatServer(t, func(c net.Conn) {
		c.(*net.TCPConn).SetReadBuffer(4096)
		<-stop // a chat server that stops reading
	})
	defer close(stop)
	u := dialTest(t, addr, Options{WriteTimeout: 100 * time.Millisecond})
	u.conn.(*net.TCPConn).SetWriteBuffer(4096)
	start := time.Now()
	err := u.Write(make([]byte, 8<<20))
	if !errors.Is(err, ErrWriteTimeout) {
		t.Fatalf("got %v, want ErrWriteTimeout", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("Write blocked %v", d)
	}
	if err2 := u.Write([]byte{1}); err2 != err {
		t.Fatalf("error not sticky: %v", err2)
	}
}

// TestWaitReadable: WaitReadable returns once bytes arrive, at once while
// units read with an earlier chunk are still buffered (the socket will
// not become readable for them again), and when the connection is closed.
func TestWaitReadable(t *testing.T) {
	units := testUnits(10, 20, 30)
	var stream []byte
	for _, u := range units {
		stream = append(stream, u...)
	}
	release := make(chan struct{})
	addr := fakeChatServer(t, func(c net.Conn) {
		<-release
		c.Write(stream) // every unit in one write: one read takes them all
		io.Copy(io.Discard, c)
	})
	u := dialTest(t, addr, Options{})
	done := make(chan struct{})
	go func() { u.WaitReadable(); close(done) }()
	close(release)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("WaitReadable did not return after the server wrote")
	}
	for i, want := range units {
		if i > 0 {
			u.WaitReadable() // buffered: must not wait for the socket
		}
		got, err := u.ReadUnit()
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("unit %d: %d bytes, %v", i, len(got), err)
		}
	}
	closed := make(chan struct{})
	go func() { u.WaitReadable(); close(closed) }()
	u.Close()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("WaitReadable did not return after Close")
	}
}

// TestWaitReadableThenEOF: units read by WaitReadable come out of
// ReadUnit before the end of the stream, which then wraps ErrClosed and
// io.EOF, as without WaitReadable.
func TestWaitReadableThenEOF(t *testing.T) {
	units := testUnits(5000, 1, 8192)
	addr := fakeChatServer(t, func(c net.Conn) {
		for _, u := range units {
			c.Write(u)
		}
	})
	u := dialTest(t, addr, Options{})
	for i, want := range units {
		u.WaitReadable()
		got, err := u.ReadUnit()
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("unit %d: %d bytes, %v", i, len(got), err)
		}
	}
	u.WaitReadable()
	if _, err := u.ReadUnit(); !errors.Is(err, ErrClosed) || !errors.Is(err, io.EOF) {
		t.Fatalf("after the last unit: %v, want ErrClosed and io.EOF", err)
	}
}
