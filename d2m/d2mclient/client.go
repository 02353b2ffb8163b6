// Package d2mclient is a device-side d2m client: it dials a mediator,
// performs the device half of the handshake from a device group key and
// offers typed sends and receives. Tests, the device simulator and the
// load tool use it; the server never imports it.
package d2mclient

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"

	"github.com/coder/websocket"
	"google.golang.org/protobuf/proto"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/proto/d2mpb"
)

// Config describes one device.
type Config struct {
	// URL is the mediator base URL, e.g. ws://127.0.0.1:8765; the client
	// appends /{prefix}/{hex ClientUrlInfo}.
	URL         string
	Keys        d2d.Keys
	ServerGroup string // default "7f"
	DeviceID    uint64 // random if zero
	// Policies and device info as sent in ClientHello.
	ExhaustedPolicy  d2mpb.ClientHello_DeviceSlotsExhaustedPolicy
	ExpirationPolicy d2mpb.DeviceSlotExpirationPolicy
	DeviceInfo       []byte // encrypted device info; a sealed default if nil
	// ExpectedState, if set, is sent as expected_device_slot_state.
	ExpectedState *d2mpb.DeviceSlotState
	Version       uint32
	// EarlyProxy is sent as Proxy frames right after the socket opens,
	// before ClientHello, as real clients send their CSP client-hello.
	EarlyProxy [][]byte
	// HTTPClient overrides the dialer's client (e.g. for connection reuse
	// limits in load tests).
	HTTPClient *http.Client
	// RecvQueue is the capacity of each of the two receive queues between
	// the reader goroutine and Recv/RecvProxy; 0 means DefaultRecvQueue.
	// The queues are allocated up front (about 56 KiB per connection at
	// the default), so a load tool holding tens of thousands of
	// connections sets it low.
	RecvQueue int
}

// DefaultRecvQueue is the receive queue capacity of DialRaw and of a
// Config without RecvQueue.
const DefaultRecvQueue = 1024

// Expect returns a pointer to s, for Config.ExpectedState.
func Expect(s d2mpb.DeviceSlotState) *d2mpb.DeviceSlotState { return &s }

// Message is one received d2m message.
type Message struct {
	Type    d2m.PayloadType
	Payload []byte // container payload
}

// Conn is a raw d2m WebSocket: frames in, frames out. A reader goroutine
// splits Proxy frames from the rest.
type Conn struct {
	ws      *websocket.Conn
	msgs    chan Message
	proxy   chan []byte
	done    chan struct{}
	errMu   sync.Mutex
	err     error
	closeMu sync.Mutex
}

// DialRaw opens a WebSocket to url (full URL including the path) without
// any handshake.
func DialRaw(ctx context.Context, url string, hc *http.Client) (*Conn, *http.Response, error) {
	return dialRaw(ctx, url, hc, DefaultRecvQueue)
}

func dialRaw(ctx context.Context, url string, hc *http.Client, queue int) (*Conn, *http.Response, error) {
	if queue <= 0 {
		queue = DefaultRecvQueue
	}
	ws, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{
		CompressionMode: websocket.CompressionDisabled,
		HTTPClient:      hc,
	})
	if err != nil {
		return nil, resp, err
	}
	ws.SetReadLimit(d2m.MaxFrameSize + 1024)
	c := &Conn{ws: ws, msgs: make(chan Message, queue), proxy: make(chan []byte, queue), done: make(chan struct{})}
	go c.readLoop()
	return c, resp, nil
}

func (c *Conn) readLoop() {
	defer close(c.done)
	for {
		typ, b, err := c.ws.Read(context.Background())
		if err != nil {
			c.errMu.Lock()
			c.err = err
			c.errMu.Unlock()
			return
		}
		if typ != websocket.MessageBinary {
			continue
		}
		t, payload, err := d2m.DecodeContainer(b)
		if err != nil {
			continue
		}
		if t == d2m.TypeProxy {
			c.proxy <- payload
			continue
		}
		c.msgs <- Message{Type: t, Payload: payload}
	}
}

// ErrClosed is returned by Recv once the connection ended; CloseCode tells
// how.
var ErrClosed = errors.New("d2mclient: connection closed")

// Recv returns the next non-Proxy message.
func (c *Conn) Recv(ctx context.Context) (Message, error) {
	select {
	case m := <-c.msgs:
		return m, nil
	default:
	}
	select {
	case m := <-c.msgs:
		return m, nil
	case <-c.done:
		select {
		case m := <-c.msgs:
			return m, nil
		default:
		}
		return Message{}, fmt.Errorf("%w: %v", ErrClosed, c.Err())
	case <-ctx.Done():
		return Message{}, ctx.Err()
	}
}

// RecvProxy returns the next Proxy payload (one CSP unit).
func (c *Conn) RecvProxy(ctx context.Context) ([]byte, error) {
	select {
	case p := <-c.proxy:
		return p, nil
	case <-c.done:
		select {
		case p := <-c.proxy:
			return p, nil
		default:
		}
		return nil, fmt.Errorf("%w: %v", ErrClosed, c.Err())
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Incoming returns the queues Recv and RecvProxy read from, for a caller
// that waits on both (and on its own timers) in one select instead of
// running a goroutine per queue. What it takes from them Recv and
// RecvProxy do not see; Done is closed when the connection has ended.
func (c *Conn) Incoming() (msgs <-chan Message, proxy <-chan []byte) { return c.msgs, c.proxy }

// Send writes one complete frame.
func (c *Conn) Send(ctx context.Context, frame []byte) error {
	return c.ws.Write(ctx, websocket.MessageBinary, frame)
}

// SendText writes a text frame (only to test the server's rejection).
func (c *Conn) SendText(ctx context.Context, text string) error {
	return c.ws.Write(ctx, websocket.MessageText, []byte(text))
}

// SendMessage encodes and writes a protobuf message of type t.
func (c *Conn) SendMessage(ctx context.Context, t d2m.PayloadType, m proto.Message) error {
	b, err := d2m.EncodeMessage(t, m)
	if err != nil {
		return err
	}
	return c.Send(ctx, b)
}

// SendProxy writes one Proxy frame.
func (c *Conn) SendProxy(ctx context.Context, p []byte) error {
	return c.Send(ctx, d2m.EncodeRaw(d2m.TypeProxy, p))
}

// Done is closed when the connection ended.
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err returns the error that ended the connection, or nil while it is open.
func (c *Conn) Err() error {
	c.errMu.Lock()
	defer c.errMu.Unlock()
	return c.err
}

// CloseCode waits for the connection to end (at most until ctx ends) and
// returns the close code the server sent, or -1 if it sent none.
func (c *Conn) CloseCode(ctx context.Context) int {
	select {
	case <-c.done:
	case <-ctx.Done():
		return -1
	}
	return int(websocket.CloseStatus(c.Err()))
}

// Close ends the connection with a normal closure.
func (c *Conn) Close() error {
	c.closeMu.Lock()
	defer c.closeMu.Unlock()
	return c.ws.Close(websocket.StatusNormalClosure, "")
}

// CloseNow drops the connection without a close handshake.
func (c *Conn) CloseNow() error { return c.ws.CloseNow() }

// Client is an authenticated device connection.
type Client struct {
	*Conn
	Config     Config
	ServerInfo *d2mpb.ServerInfo
	reflectID  uint32
}

// URLFor returns the device URL for a base URL and device group.
func URLFor(base string, keys d2d.Keys, serverGroup string) string {
	if serverGroup == "" {
		serverGroup = "7f"
	}
	info := d2m.ClientURLInfo{DeviceGroupID: keys.DeviceGroupID(), ServerGroup: serverGroup}
	return strings.TrimRight(base, "/") + d2m.ClientURLPath(info)
}

// Dial connects and authenticates. On a server close during the handshake
// the error wraps ErrClosed and CloseCode reports the code.
func Dial(ctx context.Context, cfg Config) (*Client, error) {
	if cfg.DeviceID == 0 {
		var b [8]byte
		rand.Read(b[:])
		cfg.DeviceID = binary.LittleEndian.Uint64(b[:]) | 1
	}
	if cfg.DeviceInfo == nil {
		info, err := cfg.Keys.SealDeviceInfo(d2d.NewDeviceInfo(0, "go", "d2mclient", "test device"))
		if err != nil {
			return nil, err
		}
		cfg.DeviceInfo = info
	}
	conn, _, err := dialRaw(ctx, URLFor(cfg.URL, cfg.Keys, cfg.ServerGroup), cfg.HTTPClient, cfg.RecvQueue)
	if err != nil {
		return nil, err
	}
	c := &Client{Conn: conn, Config: cfg}
	if err := c.handshake(ctx); err != nil {
		return c, err
	}
	return c, nil
}

func (c *Client) handshake(ctx context.Context) error {
	for _, p := range c.Config.EarlyProxy {
		if err := c.SendProxy(ctx, p); err != nil {
			return err
		}
	}
	m, err := c.Recv(ctx)
	if err != nil {
		return err
	}
	if m.Type != d2m.TypeServerHello {
		return fmt.Errorf("d2mclient: expected ServerHello, got %v", m.Type)
	}
	hello, err := d2m.DecodeServerHello(m.Payload)
	if err != nil {
		return err
	}
	var esk [32]byte
	copy(esk[:], hello.Esk)
	resp, err := d2d.ChallengeResponse(c.Config.Keys, &esk, hello.Challenge)
	if err != nil {
		return err
	}
	ch := &d2mpb.ClientHello{
		Version:                    c.Config.Version,
		Response:                   resp,
		DeviceId:                   c.Config.DeviceID,
		DeviceSlotsExhaustedPolicy: c.Config.ExhaustedPolicy,
		DeviceSlotExpirationPolicy: c.Config.ExpirationPolicy,
		EncryptedDeviceInfo:        c.Config.DeviceInfo,
		ExpectedDeviceSlotState:    c.Config.ExpectedState,
	}
	if err := c.SendMessage(ctx, d2m.TypeClientHello, ch); err != nil {
		return err
	}
	m, err = c.Recv(ctx)
	if err != nil {
		return err
	}
	if m.Type != d2m.TypeServerInfo {
		return fmt.Errorf("d2mclient: expected ServerInfo, got %v", m.Type)
	}
	c.ServerInfo, err = d2m.DecodeServerInfo(m.Payload)
	return err
}

// DeviceID returns the device's id.
func (c *Client) DeviceID() uint64 { return c.Config.DeviceID }

// Reflect sends a Reflect with the next reflect id and returns that id.
func (c *Client) Reflect(ctx context.Context, envelope []byte, flags uint16) (uint32, error) {
	c.reflectID++
	id := c.reflectID
	return id, c.Send(ctx, d2m.EncodeReflect(flags, id, envelope))
}

// ReflectWithID sends a Reflect with a caller-chosen id.
func (c *Client) ReflectWithID(ctx context.Context, id uint32, envelope []byte, flags uint16) error {
	return c.Send(ctx, d2m.EncodeReflect(flags, id, envelope))
}

// AckReflected acknowledges a Reflected id.
func (c *Client) AckReflected(ctx context.Context, id uint32) error {
	return c.Send(ctx, d2m.EncodeReflectedAck(id))
}

// Transport adapts the client's Proxy stream to a CSP client: each Recv
// returns one CSP unit, as the mediator re-frames them.
type Transport struct{ C *Conn }

// Send writes p as one Proxy frame.
func (t Transport) Send(p []byte) error { return t.C.SendProxy(context.Background(), p) }

// Recv returns the next Proxy payload.
func (t Transport) Recv(ctx context.Context) ([]byte, error) { return t.C.RecvProxy(ctx) }

// Decode returns the typed value of the message: d2m.Reflected,
// d2m.ReflectAck, or the protobuf message (*d2mpb.ServerInfo, …).
func (m Message) Decode() (any, error) {
	switch m.Type {
	case d2m.TypeReflected:
		return d2m.DecodeReflected(m.Payload)
	case d2m.TypeReflectAck:
		return d2m.DecodeReflectAck(m.Payload)
	}
	return d2m.DecodeMessage(m.Type, m.Payload)
}
