package d2m

import "encoding/binary"

// Reflect is a device's request to store an envelope for every other device
// of its group (§5.2). Envelope aliases the decoded frame.
type Reflect struct {
	Flags    uint16
	ID       uint32 // opaque; echoed in the ReflectAck, not unique (§5.2)
	Envelope []byte
}

// Ephemeral reports the online-only flag (§18 row 4).
func (r *Reflect) Ephemeral() bool { return r.Flags&FlagEphemeral != 0 }

// DecodeReflect parses a Reflect payload. HL is read from the first byte and
// must satisfy 8 ≤ HL ≤ len: newer clients may send longer headers, so the
// envelope starts at HL, never at a fixed 8 (§5.2). An envelope that could
// not be re-emitted in a Reflected (> 65516 bytes) is rejected (§5.6).
// It does not allocate.
func DecodeReflect(payload []byte) (Reflect, error) {
	if len(payload) < MinReflectHeaderLen {
		return Reflect{}, malformed(TypeReflect, "shorter than 8 bytes")
	}
	hl := int(payload[0])
	if hl < MinReflectHeaderLen {
		return Reflect{}, malformed(TypeReflect, "header length below 8")
	}
	if hl > len(payload) {
		return Reflect{}, malformed(TypeReflect, "header length beyond payload")
	}
	env := payload[hl:]
	if len(env) > MaxEnvelopeSize {
		return Reflect{}, malformed(TypeReflect, "envelope larger than 65516 bytes")
	}
	return Reflect{
		Flags:    binary.LittleEndian.Uint16(payload[2:4]),
		ID:       binary.LittleEndian.Uint32(payload[4:8]),
		Envelope: env,
	}, nil
}

// EncodeReflect returns a complete Reflect frame with HL 8 (device side).
func EncodeReflect(flags uint16, id uint32, envelope []byte) []byte {
	b := make([]byte, HeaderSize+8+len(envelope))
	b[0] = byte(TypeReflect)
	b[4] = 8
	binary.LittleEndian.PutUint16(b[6:8], flags)
	binary.LittleEndian.PutUint32(b[8:12], id)
	copy(b[12:], envelope)
	return b
}

// ReflectAck confirms a Reflect once its envelope is stored (§5.3).
type ReflectAck struct {
	ID        uint32
	Timestamp uint64 // unix ms, when stored
}

// EncodeReflectAck returns a complete 20-byte ReflectAck frame.
func EncodeReflectAck(id uint32, timestamp uint64) []byte {
	b := make([]byte, HeaderSize+ReflectAckSize)
	b[0] = byte(TypeReflectAck)
	binary.LittleEndian.PutUint32(b[8:12], id)
	binary.LittleEndian.PutUint64(b[12:20], timestamp)
	return b
}

// DecodeReflectAck parses a ReflectAck payload; longer payloads are accepted
// for extension, as libthreema does (§5.3).
func DecodeReflectAck(payload []byte) (ReflectAck, error) {
	if len(payload) < ReflectAckSize {
		return ReflectAck{}, malformed(TypeReflectAck, "shorter than 16 bytes")
	}
	return ReflectAck{
		ID:        binary.LittleEndian.Uint32(payload[4:8]),
		Timestamp: binary.LittleEndian.Uint64(payload[8:16]),
	}, nil
}

// Reflected delivers one queue entry to a device (§5.4).
type Reflected struct {
	Flags     uint16
	ID        uint32 // per device slot, may wrap
	Timestamp uint64 // unix ms, when stored
	Envelope  []byte
}

// EncodeReflected returns a complete Reflected frame, always with HL 16
// (Android throws on anything else; the desktop reads the envelope at the
// fixed offset 16). One allocation.
func EncodeReflected(flags uint16, id uint32, timestamp uint64, envelope []byte) []byte {
	b := make([]byte, HeaderSize+ReflectedHeaderLen+len(envelope))
	b[0] = byte(TypeReflected)
	b[4] = ReflectedHeaderLen
	binary.LittleEndian.PutUint16(b[6:8], flags)
	binary.LittleEndian.PutUint32(b[8:12], id)
	binary.LittleEndian.PutUint64(b[12:20], timestamp)
	copy(b[20:], envelope)
	return b
}

// DecodeReflected parses a Reflected payload (device side). Like libthreema
// it requires HL ≥ 16 and takes the envelope from HL.
func DecodeReflected(payload []byte) (Reflected, error) {
	if len(payload) < ReflectedHeaderLen {
		return Reflected{}, malformed(TypeReflected, "shorter than 16 bytes")
	}
	hl := int(payload[0])
	if hl < ReflectedHeaderLen || hl > len(payload) {
		return Reflected{}, malformed(TypeReflected, "bad header length")
	}
	return Reflected{
		Flags:     binary.LittleEndian.Uint16(payload[2:4]),
		ID:        binary.LittleEndian.Uint32(payload[4:8]),
		Timestamp: binary.LittleEndian.Uint64(payload[8:16]),
		Envelope:  payload[hl:],
	}, nil
}

// Ephemeral reports the online-only flag.
func (r *Reflected) Ephemeral() bool { return r.Flags&FlagEphemeral != 0 }

// DecodeReflectedAck returns the acknowledged Reflected id. The first four
// bytes are ignored: iOS sends 08 00 00 00 there (§5.5).
func DecodeReflectedAck(payload []byte) (uint32, error) {
	if len(payload) < ReflectedAckSize {
		return 0, malformed(TypeReflectedAck, "shorter than 8 bytes")
	}
	return binary.LittleEndian.Uint32(payload[4:8]), nil
}

// EncodeReflectedAck returns a complete ReflectedAck frame (device side).
func EncodeReflectedAck(id uint32) []byte {
	b := make([]byte, HeaderSize+ReflectedAckSize)
	b[0] = byte(TypeReflectedAck)
	binary.LittleEndian.PutUint32(b[8:12], id)
	return b
}
