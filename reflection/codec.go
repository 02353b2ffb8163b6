package reflection

import (
	"encoding/binary"
	"fmt"
)

// Records are fixed binary layouts with a version byte where the record may
// grow; decoders reject wrong lengths instead of guessing, so Check can
// report corruption and reads fail loudly.

const slotRecordVersion = 1
const slotHeaderLen = 1 + 1 + 8 + 8 + 8

func encodeSlot(s Slot) []byte {
	b := make([]byte, slotHeaderLen+len(s.DeviceInfo))
	b[0] = slotRecordVersion
	b[1] = byte(s.Policy)
	binary.BigEndian.PutUint64(b[2:], uint64(s.CreatedAt))
	binary.BigEndian.PutUint64(b[10:], uint64(s.ConnectedSince))
	binary.BigEndian.PutUint64(b[18:], uint64(s.LastDisconnectAt))
	copy(b[slotHeaderLen:], s.DeviceInfo)
	return b
}

// decodeSlot copies the device info, so the result outlives the transaction.
func decodeSlot(k, v []byte) (Slot, error) {
	if len(k) != 8 {
		return Slot{}, fmt.Errorf("reflection: slot key of %d bytes", len(k))
	}
	if len(v) < slotHeaderLen || v[0] != slotRecordVersion {
		return Slot{}, fmt.Errorf("reflection: slot %d: corrupt record (%d bytes)", binary.BigEndian.Uint64(k), len(v))
	}
	s := Slot{
		DeviceID:         DeviceID(binary.BigEndian.Uint64(k)),
		Policy:           ExpirationPolicy(v[1]),
		CreatedAt:        int64(binary.BigEndian.Uint64(v[2:])),
		ConnectedSince:   int64(binary.BigEndian.Uint64(v[10:])),
		LastDisconnectAt: int64(binary.BigEndian.Uint64(v[18:])),
	}
	if len(v) > slotHeaderLen {
		s.DeviceInfo = append([]byte(nil), v[slotHeaderLen:]...)
	}
	return s, nil
}

// queueMeta is the persisted and in-memory state of one slot's queue.
type queueMeta struct {
	incarnation uint64 // names the queue bucket
	lastSeq     uint64 // last Seq handed out; 0 = none yet
	length      uint64
	bytes       uint64
}

const queueMetaLen = 32

func (m queueMeta) encode() []byte {
	b := make([]byte, queueMetaLen)
	binary.BigEndian.PutUint64(b, m.incarnation)
	binary.BigEndian.PutUint64(b[8:], m.lastSeq)
	binary.BigEndian.PutUint64(b[16:], m.length)
	binary.BigEndian.PutUint64(b[24:], m.bytes)
	return b
}

func decodeQueueMeta(v []byte) (queueMeta, error) {
	if len(v) != queueMetaLen {
		return queueMeta{}, fmt.Errorf("reflection: corrupt queue meta (%d bytes)", len(v))
	}
	return queueMeta{
		incarnation: binary.BigEndian.Uint64(v),
		lastSeq:     binary.BigEndian.Uint64(v[8:]),
		length:      binary.BigEndian.Uint64(v[16:]),
		bytes:       binary.BigEndian.Uint64(v[24:]),
	}, nil
}

const tombstoneLen = 1 + 8

func encodeTombstone(t Tombstone) []byte {
	b := make([]byte, tombstoneLen)
	b[0] = byte(t.Reason)
	binary.BigEndian.PutUint64(b[1:], uint64(t.At))
	return b
}

func decodeTombstone(k, v []byte) (Tombstone, error) {
	if len(k) != 8 || len(v) != tombstoneLen {
		return Tombstone{}, fmt.Errorf("reflection: corrupt tombstone (key %d, value %d bytes)", len(k), len(v))
	}
	return Tombstone{
		DeviceID: DeviceID(binary.BigEndian.Uint64(k)),
		Reason:   TombstoneReason(v[0]),
		At:       int64(binary.BigEndian.Uint64(v[1:])),
	}, nil
}

// Queue and held values: timestamp u64 ‖ envelope.
const entryHeaderLen = 8

func encodeEntry(ts uint64, envelope []byte) []byte {
	b := make([]byte, entryHeaderLen+len(envelope))
	binary.BigEndian.PutUint64(b, ts)
	copy(b[entryHeaderLen:], envelope)
	return b
}

func decodeEntry(k, v []byte) (Entry, error) {
	if len(k) != 8 || len(v) < entryHeaderLen {
		return Entry{}, fmt.Errorf("reflection: corrupt queue entry (key %d, value %d bytes)", len(k), len(v))
	}
	return Entry{
		Seq:       binary.BigEndian.Uint64(k),
		Timestamp: binary.BigEndian.Uint64(v),
		Envelope:  append([]byte{}, v[entryHeaderLen:]...),
	}, nil
}
