package d2m

import (
	"google.golang.org/protobuf/proto"

	"d2m-mediator/proto/d2mpb"
)

// newMessage returns an empty protobuf message for a protobuf payload type,
// or nil for Proxy, the binary structs and unknown types.
func newMessage(t PayloadType) proto.Message {
	switch t {
	case TypeServerHello:
		return new(d2mpb.ServerHello)
	case TypeClientHello:
		return new(d2mpb.ClientHello)
	case TypeServerInfo:
		return new(d2mpb.ServerInfo)
	case TypeReflectionQueueDry:
		return new(d2mpb.ReflectionQueueDry)
	case TypeRolePromotedToLeader:
		return new(d2mpb.RolePromotedToLeader)
	case TypeGetDevicesInfo:
		return new(d2mpb.GetDevicesInfo)
	case TypeDevicesInfo:
		return new(d2mpb.DevicesInfo)
	case TypeDropDevice:
		return new(d2mpb.DropDevice)
	case TypeDropDeviceAck:
		return new(d2mpb.DropDeviceAck)
	case TypeSetSharedDeviceData:
		return new(d2mpb.SetSharedDeviceData)
	case TypeBeginTransaction:
		return new(d2mpb.BeginTransaction)
	case TypeBeginTransactionAck:
		return new(d2mpb.BeginTransactionAck)
	case TypeCommitTransaction:
		return new(d2mpb.CommitTransaction)
	case TypeCommitTransactionAck:
		return new(d2mpb.CommitTransactionAck)
	case TypeTransactionRejected:
		return new(d2mpb.TransactionRejected)
	case TypeTransactionEnded:
		return new(d2mpb.TransactionEnded)
	}
	return nil
}

// EncodeMessage returns a complete frame of type t with m as its protobuf
// payload. An empty message encodes to the bare header, e.g.
// ReflectionQueueDry is exactly 20 00 00 00 (§3).
func EncodeMessage(t PayloadType, m proto.Message) ([]byte, error) {
	size := proto.Size(m)
	b := make([]byte, HeaderSize, HeaderSize+size)
	b[0] = byte(t)
	b, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(b, m)
	if err != nil {
		return nil, err
	}
	if len(b) > MaxFrameSize {
		return nil, malformed(t, "encoded frame larger than 65536 bytes")
	}
	return b, nil
}

// MustEncodeMessage is EncodeMessage for messages the caller built itself,
// whose encoding cannot fail (valid UTF-8 strings, bounded sizes).
func MustEncodeMessage(t PayloadType, m proto.Message) []byte {
	b, err := EncodeMessage(t, m)
	if err != nil {
		panic(err)
	}
	return b
}

// DecodeMessage decodes the protobuf payload of type t into a fresh message
// of the matching Go type (*d2mpb.ClientHello for TypeClientHello, …).
func DecodeMessage(t PayloadType, payload []byte) (proto.Message, error) {
	m := newMessage(t)
	if m == nil {
		return nil, malformed(t, "not a protobuf payload type")
	}
	if err := proto.Unmarshal(payload, m); err != nil {
		return nil, malformed(t, "invalid protobuf")
	}
	return m, nil
}

func decodeAs[M proto.Message](t PayloadType, payload []byte) (M, error) {
	m, err := DecodeMessage(t, payload)
	if err != nil {
		var zero M
		return zero, err
	}
	return m.(M), nil
}

// DecodeClientHello decodes a ClientHello payload. It checks only the wire
// form; the server checks the fields in the order of §18 row 11.
func DecodeClientHello(payload []byte) (*d2mpb.ClientHello, error) {
	return decodeAs[*d2mpb.ClientHello](TypeClientHello, payload)
}

// DecodeServerHello decodes a ServerHello payload (device side) and checks
// the 32-byte ESK and challenge, as every client does (§4.2).
func DecodeServerHello(payload []byte) (*d2mpb.ServerHello, error) {
	m, err := decodeAs[*d2mpb.ServerHello](TypeServerHello, payload)
	if err != nil {
		return nil, err
	}
	if len(m.GetEsk()) != 32 || len(m.GetChallenge()) != 32 {
		return nil, malformed(TypeServerHello, "esk and challenge must be 32 bytes")
	}
	return m, nil
}

// DecodeServerInfo decodes a ServerInfo payload (device side).
func DecodeServerInfo(payload []byte) (*d2mpb.ServerInfo, error) {
	return decodeAs[*d2mpb.ServerInfo](TypeServerInfo, payload)
}

// DecodeDevicesInfo decodes a DevicesInfo payload (device side).
func DecodeDevicesInfo(payload []byte) (*d2mpb.DevicesInfo, error) {
	return decodeAs[*d2mpb.DevicesInfo](TypeDevicesInfo, payload)
}

// DecodeDropDevice decodes a DropDevice payload.
func DecodeDropDevice(payload []byte) (*d2mpb.DropDevice, error) {
	return decodeAs[*d2mpb.DropDevice](TypeDropDevice, payload)
}

// DecodeDropDeviceAck decodes a DropDeviceAck payload (device side).
func DecodeDropDeviceAck(payload []byte) (*d2mpb.DropDeviceAck, error) {
	return decodeAs[*d2mpb.DropDeviceAck](TypeDropDeviceAck, payload)
}

// DecodeSetSharedDeviceData decodes a SetSharedDeviceData payload.
func DecodeSetSharedDeviceData(payload []byte) (*d2mpb.SetSharedDeviceData, error) {
	return decodeAs[*d2mpb.SetSharedDeviceData](TypeSetSharedDeviceData, payload)
}

// DecodeBeginTransaction decodes a BeginTransaction payload.
func DecodeBeginTransaction(payload []byte) (*d2mpb.BeginTransaction, error) {
	return decodeAs[*d2mpb.BeginTransaction](TypeBeginTransaction, payload)
}

// DecodeTransactionRejected decodes a TransactionRejected payload (device side).
func DecodeTransactionRejected(payload []byte) (*d2mpb.TransactionRejected, error) {
	return decodeAs[*d2mpb.TransactionRejected](TypeTransactionRejected, payload)
}

// DecodeTransactionEnded decodes a TransactionEnded payload (device side).
func DecodeTransactionEnded(payload []byte) (*d2mpb.TransactionEnded, error) {
	return decodeAs[*d2mpb.TransactionEnded](TypeTransactionEnded, payload)
}

// DecodeEmpty checks the payload of a message without fields (GetDevicesInfo,
// CommitTransaction, …): it must be valid protobuf; unknown fields are
// tolerated as proto3 requires.
func DecodeEmpty(t PayloadType, payload []byte) error {
	_, err := DecodeMessage(t, payload)
	return err
}
