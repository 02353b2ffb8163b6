package csp

import (
	"encoding/binary"
	"unicode/utf8"
)

// MessageFlags is the flags byte of a message (CSP message-with-metadata-box).
type MessageFlags uint8

// Message flags the stand-in server acts on.
const (
	// FlagSendPush asks the server to send a push notification.
	FlagSendPush MessageFlags = 0x01
	// FlagNoServerQueuing: deliver only to connections that are online now,
	// never queue (typing indicators and other discardable messages).
	FlagNoServerQueuing MessageFlags = 0x02
	// FlagNoServerAck: the server must not send outgoing-message-ack (0x81).
	FlagNoServerAck MessageFlags = 0x04
)

// Offsets and sizes of message-with-metadata-box.
const (
	msgSenderOff    = 0
	msgReceiverOff  = msgSenderOff + IdentitySize   // 8
	msgIDOff        = msgReceiverOff + IdentitySize // 16
	msgCreatedAtOff = msgIDOff + 8                  // 24
	msgFlagsOff     = msgCreatedAtOff + 4           // 28
	msgReservedOff  = msgFlagsOff + 1               // 29
	msgMetaLenOff   = msgReservedOff + 1            // 30
	msgNicknameOff  = msgMetaLenOff + 2             // 32
	NicknameSize    = 32
	// MessageHeaderSize is the fixed part before the metadata.
	MessageHeaderSize = msgNicknameOff + NicknameSize // 64
	// MinMessageSize is a message with no metadata and an empty box.
	MinMessageSize = MessageHeaderSize + NonceSize // 88
)

// Message is the data of an outgoing (0x01) or incoming (0x02) message,
// layout message-with-metadata-box: sender(8) ‖ receiver(8) ‖ message-id
// u64-le ‖ created-at u32-le ‖ flags u8 ‖ reserved u8 ‖ metadata-length
// u16-le ‖ legacy-sender-nickname(32) ‖ metadata ‖ message-nonce(24) ‖
// message-box. A legacy message is the same with metadata-length 0. The
// server never opens Metadata or Box: they are end-to-end encrypted.
type Message struct {
	Sender         Identity
	Receiver       Identity
	MessageID      uint64
	CreatedAt      uint32 // Unix seconds
	Flags          MessageFlags
	LegacyNickname [NicknameSize]byte
	Metadata       []byte
	Nonce          [NonceSize]byte
	Box            []byte
}

// Marshal encodes m. The reserved byte is zero.
func (m *Message) Marshal() ([]byte, error) {
	if len(m.Metadata) > 0xffff {
		return nil, malformed("message", "metadata of %d bytes exceeds 65535", len(m.Metadata))
	}
	out := make([]byte, MessageHeaderSize, MinMessageSize+len(m.Metadata)+len(m.Box))
	copy(out[msgSenderOff:], m.Sender[:])
	copy(out[msgReceiverOff:], m.Receiver[:])
	binary.LittleEndian.PutUint64(out[msgIDOff:], m.MessageID)
	binary.LittleEndian.PutUint32(out[msgCreatedAtOff:], m.CreatedAt)
	out[msgFlagsOff] = byte(m.Flags)
	binary.LittleEndian.PutUint16(out[msgMetaLenOff:], uint16(len(m.Metadata)))
	copy(out[msgNicknameOff:], m.LegacyNickname[:])
	out = append(out, m.Metadata...)
	out = append(out, m.Nonce[:]...)
	return append(out, m.Box...), nil
}

// ParseMessage decodes message-with-metadata-box. Metadata and Box alias p.
func ParseMessage(p []byte) (Message, error) {
	var m Message
	if len(p) < MinMessageSize {
		return m, malformed("message", "%d bytes, shorter than %d", len(p), MinMessageSize)
	}
	copy(m.Sender[:], p[msgSenderOff:])
	copy(m.Receiver[:], p[msgReceiverOff:])
	m.MessageID = binary.LittleEndian.Uint64(p[msgIDOff:])
	m.CreatedAt = binary.LittleEndian.Uint32(p[msgCreatedAtOff:])
	m.Flags = MessageFlags(p[msgFlagsOff])
	metaLen := int(binary.LittleEndian.Uint16(p[msgMetaLenOff:]))
	copy(m.LegacyNickname[:], p[msgNicknameOff:])
	rest := p[MessageHeaderSize:]
	if metaLen+NonceSize > len(rest) {
		return m, malformed("message", "metadata length %d leaves no room for the %d-byte nonce in %d bytes", metaLen, NonceSize, len(rest))
	}
	m.Metadata = rest[:metaLen:metaLen]
	copy(m.Nonce[:], rest[metaLen:])
	m.Box = rest[metaLen+NonceSize:]
	return m, nil
}

// MessageAck is the data of outgoing-message-ack (0x81: receiver ‖ id) and
// incoming-message-ack (0x82: sender ‖ id).
type MessageAck struct {
	Identity  Identity
	MessageID uint64
}

// Marshal returns the 16-byte ack.
func (a *MessageAck) Marshal() []byte {
	out := make([]byte, MessageAckSize)
	copy(out, a.Identity[:])
	binary.LittleEndian.PutUint64(out[IdentitySize:], a.MessageID)
	return out
}

// ParseMessageAck decodes a 16-byte message ack.
func ParseMessageAck(p []byte) (MessageAck, error) {
	var a MessageAck
	if len(p) != MessageAckSize {
		return a, wrongSize("message-ack", len(p), MessageAckSize)
	}
	copy(a.Identity[:], p)
	a.MessageID = binary.LittleEndian.Uint64(p[IdentitySize:])
	return a, nil
}

// CloseError is the data of close-error (0xe0): can-reconnect u8 ‖ UTF-8
// message. Clients let its can-reconnect byte, not the WebSocket close code,
// decide whether to reconnect (docs/protocol.md §13). It is also an error, so a
// client can return it when the server ends the session.
type CloseError struct {
	CanReconnect bool
	Message      string
}

func (e *CloseError) Error() string {
	if e.CanReconnect {
		return "csp: chat server closed the connection: " + e.Message
	}
	return "csp: chat server closed the connection (do not reconnect): " + e.Message
}

// Marshal encodes the close-error.
func (e *CloseError) Marshal() []byte {
	out := make([]byte, 1, 1+len(e.Message))
	if e.CanReconnect {
		out[0] = 1
	}
	return append(out, e.Message...)
}

// ParseCloseError decodes a close-error. Any non-zero can-reconnect byte
// means true.
func ParseCloseError(p []byte) (CloseError, error) {
	if len(p) < 1 {
		return CloseError{}, malformed("close-error", "empty")
	}
	if !utf8.Valid(p[1:]) {
		return CloseError{}, malformed("close-error", "message is not valid UTF-8")
	}
	return CloseError{CanReconnect: p[0] != 0, Message: string(p[1:])}, nil
}
