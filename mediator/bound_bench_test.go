package mediator

// Physical bounds for BENCHMARKS.md: what the WebSocket library alone does
// on this machine, with no authentication, storage or protocol, so the
// server's figures can be read against them.

import (
	"context"
	"net"
	"net/http"
	"sync"
	"testing"

	"github.com/coder/websocket"
)

func startRawWebSocketServer(b *testing.B, handle func(*websocket.Conn)) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{CompressionMode: websocket.CompressionDisabled})
		if err != nil {
			return
		}
		handle(c)
	})}
	go srv.Serve(ln)
	b.Cleanup(func() { srv.Close() })
	return "ws://" + ln.Addr().String() + "/"
}

// BenchmarkBoundWebSocketHandshake: dial, upgrade and close, 64 at a time;
// the ceiling for authenticated handshakes/s.
func BenchmarkBoundWebSocketHandshake(b *testing.B) {
	url := startRawWebSocketServer(b, func(c *websocket.Conn) {
		c.Read(context.Background())
		c.CloseNow()
	})
	opts := &websocket.DialOptions{HTTPClient: &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}}
	b.SetParallelism(32) // × GOMAXPROCS dialers
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			c, _, err := websocket.Dial(context.Background(), url, opts)
			if err != nil {
				b.Error(err)
				return
			}
			c.CloseNow()
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "handshakes/s")
}

// BenchmarkBoundWebSocketFrames: 100-byte binary messages from 64 clients
// to a server that reads and discards them; the ceiling for frames/s
// through the library, one write system call per message on the client.
func BenchmarkBoundWebSocketFrames(b *testing.B) {
	url := startRawWebSocketServer(b, func(c *websocket.Conn) {
		for {
			if _, _, err := c.Read(context.Background()); err != nil {
				return
			}
		}
	})
	const clients = 64
	conns := make([]*websocket.Conn, clients)
	for i := range conns {
		c, _, err := websocket.Dial(context.Background(), url, nil)
		if err != nil {
			b.Fatal(err)
		}
		defer c.CloseNow()
		conns[i] = c
	}
	msg := make([]byte, 100)
	b.ResetTimer()
	var wg sync.WaitGroup
	for i, c := range conns {
		n := b.N / clients
		if i < b.N%clients {
			n++
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < n; j++ {
				if err := c.Write(context.Background(), websocket.MessageBinary, msg); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "frames/s")
}
