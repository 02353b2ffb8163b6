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
