package cspclient

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"d2m-mediator/chatproxy/csp"
	"d2m-mediator/d2d/blake2b"

	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/nacl/box"
)

// Identity is a Threema identity with its long-term key pair (CK).
type Identity struct {
	ID        string // 8 characters, e.g. "ECHOECHO"
	SecretKey [32]byte
	PublicKey [32]byte
}

// NewIdentity returns an identity with the given ID and a fresh key pair.
func NewIdentity(id string) (Identity, error) {
	if _, err := csp.ParseIdentity(id); err != nil {
		return Identity{}, err
	}
	pub, sec, err := box.GenerateKey(rand.Reader)
	if err != nil {
		return Identity{}, fmt.Errorf("cspclient: generate identity key: %w", err)
	}
	return Identity{ID: id, SecretKey: *sec, PublicKey: *pub}, nil
}

// IdentityFromSecret returns the identity with the given ID and secret key.
func IdentityFromSecret(id string, secretKey [32]byte) (Identity, error) {
	if _, err := csp.ParseIdentity(id); err != nil {
		return Identity{}, err
	}
	pub, err := curve25519.X25519(secretKey[:], curve25519.Basepoint)
	if err != nil {
		return Identity{}, fmt.Errorf("cspclient: identity key: %w", err)
	}
	ident := Identity{ID: id, SecretKey: secretKey}
	copy(ident.PublicKey[:], pub)
	return ident, nil
}

// LoginOptions tune the login. The zero value is a valid multi-device login
// with a random csp-device-id.
type LoginOptions struct {
	// CSPDeviceID is sent as the csp-device-id extension, which lets one
	// identity hold several chat-server connections (docs/protocol.md §8.1).
	// Zero means a random non-zero id.
	CSPDeviceID uint64
	// ClientInfo is sent as the client-info extension.
	ClientInfo string
	// SplitLogin sends the login box and the extensions box in two Sends,
	// as iOS does (docs/protocol.md §9.1, §16), instead of one.
	SplitLogin bool
}

// Client is a logged-in CSP session. SendFrame (and the helpers built on it)
// may be called from several goroutines; so may Recv, concurrently with
// sending. Client does not own the Transport: close it separately.
type Client struct {
	t        Transport
	identity Identity
	id       csp.Identity
	deviceID uint64
	sess     *csp.Session

	sendMu sync.Mutex // keeps nonce order = wire order
	recvMu sync.Mutex
}

// Login performs the CSP handshake (docs/protocol.md §9.3) over t: client-hello
// (one Send), server-hello check against the pinned serverPublicKey, login
// box ‖ extensions box (one Send, or two with SplitLogin), login-ack check.
// ctx bounds the whole handshake.
func Login(ctx context.Context, t Transport, ident Identity, serverPublicKey [32]byte, opts LoginOptions) (*Client, error) {
	c, err := login(ctx, t, ident, serverPublicKey, opts)
	if err != nil {
		return nil, fmt.Errorf("cspclient: login %s: %w", ident.ID, err)
	}
	return c, nil
}

func login(ctx context.Context, t Transport, ident Identity, serverPublicKey [32]byte, opts LoginOptions) (*Client, error) {
	id, err := csp.ParseIdentity(ident.ID)
	if err != nil {
		return nil, err
	}
	deviceID := opts.CSPDeviceID
	for deviceID == 0 {
		var b [8]byte
		rand.Read(b[:])
		deviceID = binary.LittleEndian.Uint64(b[:])
	}

	// 1. client-hello: a fresh temporary key pair TCK and cookie CCK.
	tckPub, tckSec, err := box.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	hello := csp.ClientHello{TempPublicKey: *tckPub}
	rand.Read(hello.Cookie[:])
	if err := t.Send(hello.Marshal()); err != nil {
		return nil, fmt.Errorf("send client-hello: %w", err)
	}

	// 2. server-hello.
	unit, err := t.Recv(ctx)
	if err != nil {
		return nil, fmt.Errorf("receive server-hello: %w", err)
	}
	sh, err := csp.OpenServerHello(unit, &serverPublicKey, tckSec)
	if err != nil {
		return nil, err
	}
	if err := sh.CheckCookies(hello.Cookie); err != nil {
		return nil, err
	}
	sess := csp.NewSession(&sh.TempPublicKey, tckSec,
		csp.NewNonceCounter(hello.Cookie, csp.LoginSeq),
		csp.NewNonceCounter(sh.Cookie, csp.LoginAckSeq))

	// 3. login: login box (CCK‖1) then extensions box (CCK‖2).
	ext := csp.Extensions{
		ClientInfo: opts.ClientInfo, HasClientInfo: opts.ClientInfo != "",
		CSPDeviceID: deviceID, HasCSPDeviceID: true,
		// 1 = message-with-metadata-box, the layout SendMessage builds.
		MessagePayloadVersion: 1, HasMessagePayloadVersion: true,
	}
	extPlain, err := ext.Marshal()
	if err != nil {
		return nil, err
	}
	vouch, err := Vouch(&ident.SecretKey, &serverPublicKey, &sh.TempPublicKey, sh.Cookie, tckPub)
	if err != nil {
		return nil, err
	}
	ld := csp.LoginData{
		Identity:            id,
		HasExtensions:       true,
		ExtensionsBoxLength: uint16(len(extPlain) + csp.BoxOverhead),
		ServerCookie:        sh.Cookie,
		Vouch:               vouch,
	}
	ldPlain, err := ld.Marshal()
	if err != nil {
		return nil, err
	}
	loginBox := sess.Seal(ldPlain)
	extBox := sess.Seal(extPlain)
	if opts.SplitLogin {
		if err := t.Send(loginBox); err != nil {
			return nil, fmt.Errorf("send login: %w", err)
		}
		if err := t.Send(extBox); err != nil {
			return nil, fmt.Errorf("send extensions: %w", err)
		}
	} else if err := t.Send(append(loginBox, extBox...)); err != nil {
		return nil, fmt.Errorf("send login: %w", err)
	}

	// 4. login-ack (SCK‖2).
	unit, err = t.Recv(ctx)
	if err != nil {
		return nil, fmt.Errorf("receive login-ack: %w", err)
	}
	if err := csp.OpenLoginAck(sess, unit); err != nil {
		return nil, err
	}
	return &Client{t: t, identity: ident, id: id, deviceID: deviceID, sess: sess}, nil
}

// Vouch computes the login vouch (docs/protocol.md §9.3), which proves that the
// holder of the identity key CK made this connection's temporary key TCK:
//
//	SS1 = X25519HSalsa20(CK.secret, SK.public)
//	SS2 = X25519HSalsa20(CK.secret, TSK.public)
//	VouchKey = BLAKE2b-256(key=SS1‖SS2, salt="v2", personal="3ma-csp")
//	vouch = BLAKE2b-256(key=VouchKey, input=SCK‖TCK.public)
//
// The server computes the same from its side (SK.secret, TSK.secret and
// CK.public from its directory); the stand-in server does not check it.
func Vouch(identitySecretKey, serverPublicKey, tempServerPublicKey *[32]byte, serverCookie csp.Cookie, tempClientPublicKey *[32]byte) ([32]byte, error) {
	var ss [64]byte
	var ss1, ss2 [32]byte
	box.Precompute(&ss1, serverPublicKey, identitySecretKey)
	box.Precompute(&ss2, tempServerPublicKey, identitySecretKey)
	copy(ss[:32], ss1[:])
	copy(ss[32:], ss2[:])
	vouchKey, err := blake2b.Sum256(ss[:], []byte("v2"), []byte("3ma-csp"), nil)
	if err != nil {
		return [32]byte{}, fmt.Errorf("vouch key: %w", err)
	}
	input := make([]byte, 0, csp.CookieSize+csp.KeySize)
	input = append(input, serverCookie[:]...)
	input = append(input, tempClientPublicKey[:]...)
	vouch, err := blake2b.Sum256(vouchKey[:], nil, nil, input)
	if err != nil {
		return [32]byte{}, fmt.Errorf("vouch: %w", err)
	}
	return vouch, nil
}

// Identity returns the logged-in identity.
func (c *Client) Identity() Identity { return c.identity }

// CSPDeviceID returns the csp-device-id sent at login.
func (c *Client) CSPDeviceID() uint64 { return c.deviceID }

// SendFrame seals one frame and sends it as one unit (one Proxy message
// through the mediator, docs/protocol.md §9.1).
func (c *Client) SendFrame(typ csp.PayloadType, data []byte) error {
	c.sendMu.Lock()
	defer c.sendMu.Unlock()
	frame, err := c.sess.SealFrame(typ, data)
	if err != nil {
		return fmt.Errorf("cspclient: %w", err)
	}
	if err := c.t.Send(frame); err != nil {
		return fmt.Errorf("cspclient: send %s: %w", typ, err)
	}
	return nil
}

// Recv returns the next frame's payload type and data. A unit that is not
// exactly one frame, or does not open, is an error and leaves the session
// unusable (the nonce counters are out of step).
func (c *Client) Recv(ctx context.Context) (csp.PayloadType, []byte, error) {
	c.recvMu.Lock()
	defer c.recvMu.Unlock()
	unit, err := c.t.Recv(ctx)
	if err != nil {
		return 0, nil, err
	}
	typ, data, err := c.sess.OpenFrame(unit)
	if err != nil {
		return 0, nil, fmt.Errorf("cspclient: receive: %w", err)
	}
	return typ, data, nil
}

// RecvType receives frames until one of type want arrives and returns its
// data. Echo responses are skipped, since clients echo in the background; a
// close-error is returned as a *csp.CloseError; any other type is an error.
func (c *Client) RecvType(ctx context.Context, want csp.PayloadType) ([]byte, error) {
	for {
		typ, data, err := c.Recv(ctx)
		switch {
		case err != nil:
			return nil, err
		case typ == want:
			return data, nil
		case typ == csp.EchoResponse:
			continue
		case typ == csp.CloseErrorType:
			ce, err := csp.ParseCloseError(data)
			if err != nil {
				return nil, err
			}
			return nil, &ce
		default:
			return nil, fmt.Errorf("cspclient: got %s, want %s", typ, want)
		}
	}
}

// Echo sends echo-request (0x00) with data; the server answers with
// echo-response (0x80) carrying the same data.
func (c *Client) Echo(data []byte) error { return c.SendFrame(csp.EchoRequest, data) }

// Unblock sends unblock-incoming-messages (0x03): the leader's signal that
// it takes incoming messages (docs/protocol.md §8.1). The server replies with
// every queued message, then queue-send-complete (0xd0).
func (c *Client) Unblock() error { return c.SendFrame(csp.UnblockIncomingMessages, nil) }

// SendMessage sends an outgoing message (0x01) to the identity to, with body
// as the message box (the server never opens it) and a random nonce.
func (c *Client) SendMessage(to string, messageID uint64, body []byte) error {
	return c.SendMessageFlags(to, messageID, 0, body)
}

// SendMessageFlags is SendMessage with message flags, e.g.
// csp.FlagNoServerAck or csp.FlagNoServerQueuing.
func (c *Client) SendMessageFlags(to string, messageID uint64, flags csp.MessageFlags, body []byte) error {
	receiver, err := csp.ParseIdentity(to)
	if err != nil {
		return fmt.Errorf("cspclient: receiver: %w", err)
	}
	m := csp.Message{
		Sender:    c.id,
		Receiver:  receiver,
		MessageID: messageID,
		CreatedAt: uint32(time.Now().Unix()),
		Flags:     flags,
		Box:       body,
	}
	rand.Read(m.Nonce[:])
	data, err := m.Marshal()
	if err != nil {
		return fmt.Errorf("cspclient: %w", err)
	}
	return c.SendFrame(csp.OutgoingMessage, data)
}

// AckIncoming sends incoming-message-ack (0x82) for the message messageID
// from the identity from, which removes it from the server's queue. A leader
// sends it only after its reflection of the message was acked (§8.2).
func (c *Client) AckIncoming(from string, messageID uint64) error {
	sender, err := csp.ParseIdentity(from)
	if err != nil {
		return fmt.Errorf("cspclient: sender: %w", err)
	}
	ack := csp.MessageAck{Identity: sender, MessageID: messageID}
	return c.SendFrame(csp.IncomingMessageAck, ack.Marshal())
}

// Message is the fields of an incoming (0x02) or outgoing (0x01) message
// that tests look at.
type Message struct {
	Sender    string
	Receiver  string
	MessageID uint64
	CreatedAt time.Time
	Flags     csp.MessageFlags
	Body      []byte // the message box
}

// ParseMessage decodes the data of an incoming or outgoing message.
func ParseMessage(data []byte) (Message, error) {
	m, err := csp.ParseMessage(data)
	if err != nil {
		return Message{}, err
	}
	return Message{
		Sender:    m.Sender.String(),
		Receiver:  m.Receiver.String(),
		MessageID: m.MessageID,
		CreatedAt: time.Unix(int64(m.CreatedAt), 0),
		Flags:     m.Flags,
		Body:      m.Box,
	}, nil
}

// ParseOutgoingAck decodes outgoing-message-ack (0x81) data: the receiver
// and the message id.
func ParseOutgoingAck(data []byte) (receiver string, messageID uint64, err error) {
	a, err := csp.ParseMessageAck(data)
	if err != nil {
		return "", 0, err
	}
	return a.Identity.String(), a.MessageID, nil
}

// IsCloseError reports whether err is (or wraps) a close-error from the
// server and returns it.
func IsCloseError(err error) (*csp.CloseError, bool) {
	var ce *csp.CloseError
	ok := errors.As(err, &ce)
	return ce, ok
}
