package d2m

import (
	"errors"
	"fmt"
)

// PayloadType is the first byte of every d2m container (§3).
type PayloadType uint8

// Payload types. The comment gives the direction and the encoding.
const (
	TypeProxy                PayloadType = 0x00 // C↔S raw CSP bytes (§9)
	TypeServerHello          PayloadType = 0x10 // S→C protobuf
	TypeClientHello          PayloadType = 0x11 // C→S protobuf
	TypeServerInfo           PayloadType = 0x12 // S→C protobuf
	TypeReflectionQueueDry   PayloadType = 0x20 // S→C protobuf (empty)
	TypeRolePromotedToLeader PayloadType = 0x21 // S→C protobuf (empty)
	TypeGetDevicesInfo       PayloadType = 0x30 // C→S protobuf (empty)
	TypeDevicesInfo          PayloadType = 0x31 // S→C protobuf
	TypeDropDevice           PayloadType = 0x32 // C→S protobuf
	TypeDropDeviceAck        PayloadType = 0x33 // S→C protobuf
	TypeSetSharedDeviceData  PayloadType = 0x34 // C→S protobuf, no ack exists
	TypeBeginTransaction     PayloadType = 0x40 // C→S protobuf
	TypeBeginTransactionAck  PayloadType = 0x41 // S→C protobuf (empty)
	TypeCommitTransaction    PayloadType = 0x42 // C→S protobuf (empty)
	TypeCommitTransactionAck PayloadType = 0x43 // S→C protobuf (empty)
	TypeTransactionRejected  PayloadType = 0x44 // S→C protobuf
	TypeTransactionEnded     PayloadType = 0x45 // S→C protobuf
	TypeReflect              PayloadType = 0x80 // C→S HL(1) 0(1) flags(2) id(4) envelope
	TypeReflectAck           PayloadType = 0x81 // S→C 0(4) id(4) timestamp(8)
	TypeReflected            PayloadType = 0x82 // S→C HL=16(1) 0(1) flags(2) id(4) timestamp(8) envelope
	TypeReflectedAck         PayloadType = 0x83 // C→S reserved(4, ignored) id(4)
)

var typeNames = map[PayloadType]string{
	TypeProxy: "Proxy", TypeServerHello: "ServerHello", TypeClientHello: "ClientHello",
	TypeServerInfo: "ServerInfo", TypeReflectionQueueDry: "ReflectionQueueDry",
	TypeRolePromotedToLeader: "RolePromotedToLeader", TypeGetDevicesInfo: "GetDevicesInfo",
	TypeDevicesInfo: "DevicesInfo", TypeDropDevice: "DropDevice", TypeDropDeviceAck: "DropDeviceAck",
	TypeSetSharedDeviceData: "SetSharedDeviceData", TypeBeginTransaction: "BeginTransaction",
	TypeBeginTransactionAck: "BeginTransactionAck", TypeCommitTransaction: "CommitTransaction",
	TypeCommitTransactionAck: "CommitTransactionAck", TypeTransactionRejected: "TransactionRejected",
	TypeTransactionEnded: "TransactionEnded", TypeReflect: "Reflect", TypeReflectAck: "ReflectAck",
	TypeReflected: "Reflected", TypeReflectedAck: "ReflectedAck",
}

// String returns the protocol name of the type, or its hex value.
func (t PayloadType) String() string {
	if n, ok := typeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("0x%02x", uint8(t))
}

// Known reports whether t is a payload type of the protocol (§3).
func (t PayloadType) Known() bool {
	_, ok := typeNames[t]
	return ok
}

// Size limits (§2, §5.6, §18 row 13).
const (
	HeaderSize          = 4     // container header: type + 3 reserved bytes
	MaxFrameSize        = 65536 // one WebSocket message, header included
	MaxPayloadSize      = MaxFrameSize - HeaderSize
	ReflectedHeaderLen  = 16                                  // Reflected HL, always exactly 16 (Android rejects others)
	MinReflectHeaderLen = 8                                   // Reflect HL must be at least 8
	MaxEnvelopeSize     = MaxPayloadSize - ReflectedHeaderLen // 65516: what a Reflected can carry
	ReflectAckSize      = 16
	ReflectedAckSize    = 8
	FlagEphemeral       = 0x0001 // Reflect/Reflected flags: online-only, no ReflectAck (§18 row 4)
)

// ErrMalformed is matched (errors.Is) by every decode error of this package.
var ErrMalformed = errors.New("d2m: malformed message")

// DecodeError describes why untrusted bytes were rejected.
type DecodeError struct {
	Type   PayloadType // the container type being decoded, if known
	Reason string      // fixed text, safe to log
}

func (e *DecodeError) Error() string {
	return fmt.Sprintf("d2m: malformed %v: %s", e.Type, e.Reason)
}

// Is makes errors.Is(err, ErrMalformed) true.
func (e *DecodeError) Is(target error) bool { return target == ErrMalformed }

func malformed(t PayloadType, reason string) error {
	return &DecodeError{Type: t, Reason: reason}
}

// DecodeContainer splits a frame into its type and payload. The payload
// aliases frame. Reserved bytes are ignored on receipt (§3); the frame size
// must be within 4..65536 (§18 row 13).
func DecodeContainer(frame []byte) (PayloadType, []byte, error) {
	if len(frame) < HeaderSize {
		return 0, nil, malformed(0, "frame shorter than the 4-byte header")
	}
	t := PayloadType(frame[0])
	if len(frame) > MaxFrameSize {
		return t, nil, malformed(t, "frame larger than 65536 bytes")
	}
	return t, frame[HeaderSize:], nil
}

// EncodeRaw returns a container of type t around payload (one allocation).
func EncodeRaw(t PayloadType, payload []byte) []byte {
	b := make([]byte, HeaderSize+len(payload))
	b[0] = byte(t)
	copy(b[HeaderSize:], payload)
	return b
}
