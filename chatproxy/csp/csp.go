package csp

import (
	"errors"
	"fmt"
	"unicode/utf8"
)

// Handshake and frame sizes (docs/protocol.md §9.3, §9.4).
const (
	CookieSize       = 16
	KeySize          = 32
	NonceSize        = 24
	BoxOverhead      = 16 // Poly1305 tag, box.Overhead
	IdentitySize     = 8
	ClientHelloSize  = KeySize + CookieSize                            // TCK.public ‖ CCK = 48
	ServerHelloSize  = CookieSize + KeySize + CookieSize + BoxOverhead // SCK ‖ box[TSK.public ‖ CCK] = 80
	LoginDataSize    = 128                                             // plaintext login-data
	LoginBoxSize     = LoginDataSize + BoxOverhead                     // 144
	LoginAckDataSize = 16                                              // zero bytes
	LoginAckSize     = LoginAckDataSize + BoxOverhead                  // 32
	FrameLengthSize  = 2                                               // u16-le box length
	MaxBoxSize       = 8192                                            // CSP "Size Limitations"
	ContainerHeader  = 4                                               // type u8 ‖ 3 reserved bytes
	MaxContainerSize = MaxBoxSize - BoxOverhead                        // plaintext container
	MaxPayloadSize   = MaxContainerSize - ContainerHeader              // data in one frame
	MaxFrameSize     = FrameLengthSize + MaxBoxSize                    // largest frame with prefix
	ExtensionHeader  = 3                                               // type u8 ‖ length u16-le
	MessageAckSize   = IdentitySize + 8                                // identity ‖ message id
	ExtensionMagic   = "threema-clever-extension-field"                // 30 bytes, §9.3
	legacyInfoSize   = 32                                              // client-info-or-extension-indicator
	extensionMagicSz = len(ExtensionMagic)                             // 30
)

// Sequence numbers: one counter per direction, starting at 1 (docs/protocol.md
// §9.3; Android NonceCounter starts at 1). The handshake uses the first two
// of each direction, so frames start at FirstFrameSeq.
const (
	ServerHelloSeq = 1 // server: SCK‖1 boxes the server-hello
	LoginAckSeq    = 2 // server: SCK‖2 boxes the login-ack
	LoginSeq       = 1 // client: CCK‖1 boxes the login-data
	ExtensionsSeq  = 2 // client: CCK‖2 boxes the extensions
	FirstFrameSeq  = 3 // both: first post-login frame
)

// PayloadType is the type byte of a plaintext frame container (§9.4).
type PayloadType uint8

// Payload types. Dir: C→S client to chat server, S→C the reverse.
const (
	EchoRequest              PayloadType = 0x00 // C↔S, arbitrary data, echoed back
	EchoResponse             PayloadType = 0x80 // C↔S, the request's data
	OutgoingMessage          PayloadType = 0x01 // C→S, Message
	OutgoingMessageAck       PayloadType = 0x81 // S→C, MessageAck{receiver, id}
	IncomingMessage          PayloadType = 0x02 // S→C, Message
	IncomingMessageAck       PayloadType = 0x82 // C→S, MessageAck{sender, id}
	UnblockIncomingMessages  PayloadType = 0x03 // C→S, empty; sent by the leader (§8.1)
	SetPushToken             PayloadType = 0x20 // C→S
	SetHighPriorityPushToken PayloadType = 0x24 // C→S
	DeletePushTokens         PayloadType = 0x25 // C→S
	SetConnectionIdleTimeout PayloadType = 0x30 // C→S, u16-le seconds
	QueueSendComplete        PayloadType = 0xd0 // S→C, empty
	LastEphemeralKeyHash     PayloadType = 0xd1 // S→C
	DeviceCookieChange       PayloadType = 0xd2 // S→C, device-cookie-change-indication
	ClearDeviceCookieChange  PayloadType = 0xd3 // C→S, clear the indication
	CloseErrorType           PayloadType = 0xe0 // S→C, CloseError
	Alert                    PayloadType = 0xe1 // S→C, UTF-8 message
)

var payloadTypeNames = map[PayloadType]string{
	EchoRequest:              "echo-request",
	EchoResponse:             "echo-response",
	OutgoingMessage:          "outgoing-message",
	OutgoingMessageAck:       "outgoing-message-ack",
	IncomingMessage:          "incoming-message",
	IncomingMessageAck:       "incoming-message-ack",
	UnblockIncomingMessages:  "unblock-incoming-messages",
	SetPushToken:             "set-push-token",
	SetHighPriorityPushToken: "set-high-priority-push-token",
	DeletePushTokens:         "delete-push-tokens",
	SetConnectionIdleTimeout: "set-connection-idle-timeout",
	QueueSendComplete:        "queue-send-complete",
	LastEphemeralKeyHash:     "last-ephemeral-key-hash",
	DeviceCookieChange:       "device-cookie-change-indication",
	ClearDeviceCookieChange:  "clear-device-cookie-change-indication",
	CloseErrorType:           "close-error",
	Alert:                    "alert",
}

// String returns the protocol's name for t, or its hex value.
func (t PayloadType) String() string {
	if n, ok := payloadTypeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("0x%02x", uint8(t))
}

// ErrMalformed is wrapped by every error about malformed input.
var ErrMalformed = errors.New("csp: malformed input")

// ErrDecrypt means a box did not open: wrong key, wrong nonce (the counters
// are out of step) or tampered bytes.
var ErrDecrypt = errors.New("csp: box does not open")

// FormatError describes malformed input. errors.Is(err, ErrMalformed) holds
// for every FormatError.
type FormatError struct {
	What   string // the structure being parsed, e.g. "login-data"
	Reason string
}

func (e *FormatError) Error() string { return "csp: malformed " + e.What + ": " + e.Reason }

// Is makes every FormatError match ErrMalformed.
func (e *FormatError) Is(target error) bool { return target == ErrMalformed }

func malformed(what, format string, args ...any) error {
	return &FormatError{What: what, Reason: fmt.Sprintf(format, args...)}
}

func wrongSize(what string, got, want int) error {
	return malformed(what, "%d bytes, want %d", got, want)
}

// Identity is an 8-byte Threema ID. Parsers accept any 8 bytes (the stub
// treats identities as opaque keys); ParseIdentity checks the character set.
type Identity [IdentitySize]byte

// ParseIdentity converts a Threema ID such as "ECHOECHO" or "*SUPPORT":
// exactly 8 characters from 0-9, A-Z and '*'.
func ParseIdentity(s string) (Identity, error) {
	var id Identity
	if len(s) != IdentitySize {
		return id, malformed("identity", "%q has %d characters, want %d", s, len(s), IdentitySize)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'A' <= c && c <= 'Z' || c == '*') {
			return id, malformed("identity", "%q: character %q not in [0-9A-Z*]", s, c)
		}
	}
	copy(id[:], s)
	return id, nil
}

func (id Identity) String() string { return string(id[:]) }

// Cookie is a 16-byte random connection cookie: CCK (client) or SCK (server).
type Cookie [CookieSize]byte

// validUTF8 checks a text field that the protocol declares UTF-8.
func validUTF8(what string, b []byte) error {
	if !utf8.Valid(b) {
		return malformed(what, "not valid UTF-8")
	}
	return nil
}
