package mediator

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

func TestCorkConnBatchesAndFlushesOnClose(t *testing.T) {
	server, client := net.Pipe()
	defer client.Close()
	c := &corkConn{Conn: server, writeTimeout: time.Second, early: []byte("early")}

	got := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(client); got <- b }()

	// Early bytes are read before the socket's.
	buf := make([]byte, 16)
	n, err := c.Read(buf)
	if err != nil || string(buf[:n]) != "early" {
		t.Fatalf("early read = %q, %v", buf[:n], err)
	}

	c.cork()
	for _, s := range []string{"a", "bb", "ccc"} {
		if n, err := c.Write([]byte(s)); err != nil || n != len(s) {
			t.Fatalf("corked write = %d, %v", n, err)
		}
	}
	if err := c.uncork(); err != nil {
		t.Fatal(err)
	}
	c.cork()
	c.Write([]byte("close reply")) // written during a burst, then Close
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if b := <-got; !bytes.Equal(b, []byte("abbcccclose reply")) {
		t.Fatalf("peer got %q", b)
	}
}

func TestCorkConnWriteTimeout(t *testing.T) {
	server, client := net.Pipe() // nobody reads client
	defer client.Close()
	var timedOut atomic.Bool
	c := &corkConn{Conn: server, writeTimeout: 50 * time.Millisecond, onWriteTimeout: func() { timedOut.Store(true) }}
	c.cork()
	c.Write([]byte("never read"))
	start := time.Now()
	if err := c.uncork(); !errors.Is(err, errWriteTimeout) {
		t.Fatalf("uncork = %v, want errWriteTimeout", err)
	}
	if !timedOut.Load() {
		t.Fatal("onWriteTimeout not called")
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("timeout took %v", d)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, errWriteTimeout) {
		t.Fatalf("write after a failed flush = %v", err)
	}
	c.Close()
}

func TestCtrlQueueFIFOAndLimit(t *testing.T) {
	q := newCtrlQueue(2)
	if !q.push(outFrame{b: []byte{1}}, false) || !q.push(outFrame{b: []byte{2}}, false) {
		t.Fatal("push within the limit failed")
	}
	if q.push(outFrame{b: []byte{3}}, false) {
		t.Fatal("push over the limit succeeded")
	}
	if !q.push(outFrame{b: []byte{3}}, true) {
		t.Fatal("forced push failed")
	}
	select {
	case <-q.ready:
	default:
		t.Fatal("no ready signal")
	}
	for want := byte(1); want <= 3; want++ {
		f, ok := q.pop()
		if !ok || f.b[0] != want {
			t.Fatalf("pop = %v, %v; want %d", f.b, ok, want)
		}
	}
	if _, ok := q.pop(); ok {
		t.Fatal("queue not empty")
	}
}

// tcpPair returns the two ends of a loopback TCP connection, the server's
// wrapped in a corkConn with raw access (as after an upgrade).
func tcpPair(t *testing.T) (*corkConn, net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); accepted <- c }()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server := <-accepted
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	raw, err := server.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	c := &corkConn{Conn: server, writeTimeout: 5 * time.Second}
	c.setRaw(raw)
	return c, client
}

// TestCorkConnTryUncorkNeverWaits: with a peer that does not read,
// tryUncork returns at once, keeps what the socket did not take (ahead of
// bytes collected later) and a blocking uncork then sends all of it in
// order.
func TestCorkConnTryUncorkNeverWaits(t *testing.T) {
	c, client := tcpPair(t)
	var want bytes.Buffer
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB
	partial := false
	for i := 0; i < 256 && !partial; i++ {
		c.cork()
		for j := range chunk {
			chunk[j] = byte(i + j)
		}
		c.appendFrame(chunk, false)
		want.Write(appendFrameHeader(nil, len(chunk)))
		want.Write(chunk)
		start := time.Now()
		sent, err := c.tryUncork()
		if err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d > 500*time.Millisecond {
			t.Fatalf("tryUncork took %v", d)
		}
		partial = !sent
	}
	if !partial {
		t.Fatal("the socket took 16 MiB without the peer reading")
	}
	if c.buffered() == 0 {
		t.Fatal("nothing kept after a partial write")
	}
	// Collected after the partial write: must follow the kept rest.
	c.Write([]byte("tail"))
	want.WriteString("tail")
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, want.Len())
		_, err := io.ReadFull(client, b)
		if err != nil {
			t.Error(err)
		}
		got <- b
	}()
	if err := c.uncork(); err != nil {
		t.Fatal(err)
	}
	if b := <-got; !bytes.Equal(b, want.Bytes()) {
		t.Fatalf("peer got %d bytes that differ from the %d written", len(b), want.Len())
	}
}

func TestAppendFrameHeader(t *testing.T) {
	for _, tc := range []struct {
		n    int
		want []byte
	}{
		{0, []byte{0x82, 0}},
		{125, []byte{0x82, 125}},
		{126, []byte{0x82, 126, 0, 126}},
		{65535, []byte{0x82, 126, 0xff, 0xff}},
		{65536, []byte{0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0}},
	} {
		if got := appendFrameHeader(nil, tc.n); !bytes.Equal(got, tc.want) {
			t.Errorf("header(%d) = %x, want %x", tc.n, got, tc.want)
		}
	}
}
