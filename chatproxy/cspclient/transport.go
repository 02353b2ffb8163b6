package cspclient

import (
	"context"
	"fmt"
	"net"
	"sync"

	"d2m-mediator/chatproxy"
)

// Transport carries CSP units. Send takes client→server bytes (one call per
// unit the client would write; the server sees a byte stream). Recv returns
// exactly one server→client CSP unit per call: the 80-byte server-hello, the
// 32-byte login-ack, then one frame with its length prefix. A mediator
// Proxy message is such a unit (docs/protocol.md §9.2).
type Transport interface {
	Send(p []byte) error
	Recv(ctx context.Context) ([]byte, error)
}

// TCPTransport is a Transport straight to a chat server over TCP, cutting
// units with chatproxy.Reframer exactly as the mediator does. Use it to test
// against chatstub without a mediator.
//
// A reader goroutine feeds Recv, so a Recv cancelled by its context loses
// nothing: the next Recv gets the next unit. Close stops the goroutine.
type TCPTransport struct {
	conn    net.Conn
	units   chan []byte
	closing chan struct{}
	done    chan struct{}
	err     error // set before done is closed

	closeOnce sync.Once
}

// DialTCP connects to a chat server at addr ("host:port").
func DialTCP(ctx context.Context, addr string) (*TCPTransport, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("cspclient: dial %s: %w", addr, err)
	}
	return NewTCPTransport(conn), nil
}

// NewTCPTransport wraps an established connection. The transport owns conn.
func NewTCPTransport(conn net.Conn) *TCPTransport {
	t := &TCPTransport{
		conn:    conn,
		units:   make(chan []byte),
		closing: make(chan struct{}),
		done:    make(chan struct{}),
	}
	go t.readLoop()
	return t
}

func (t *TCPTransport) readLoop() {
	defer close(t.done)
	rf := chatproxy.NewReframer(t.conn, 0)
	for {
		u, err := rf.Next()
		if err != nil {
			t.err = err
			return
		}
		// Unbuffered: the goroutine holds at most one unit, and TCP
		// pushes back on the server when the test does not read.
		select {
		case t.units <- u:
		case <-t.closing:
			t.err = net.ErrClosed
			return
		}
	}
}

// Send writes p to the connection.
func (t *TCPTransport) Send(p []byte) error {
	if _, err := t.conn.Write(p); err != nil {
		return fmt.Errorf("cspclient: send: %w", err)
	}
	return nil
}

// Recv returns the next unit. After the server closes the connection it
// returns an error wrapping chatproxy.ErrClosed (or ErrFrameTooLarge); every
// complete unit is delivered first.
func (t *TCPTransport) Recv(ctx context.Context) ([]byte, error) {
	select {
	case u := <-t.units:
		return u, nil
	case <-t.done:
		return nil, t.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Close closes the connection and waits for the reader goroutine.
func (t *TCPTransport) Close() error {
	var err error
	t.closeOnce.Do(func() {
		close(t.closing)
		err = t.conn.Close()
	})
	<-t.done
	return err
}
