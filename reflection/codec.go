package reflection

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Records are fixed binary layouts with a version byte where the record may
// grow; decoders reject wrong lengths instead of guessing, so Check can
// report corruption and reads fail loudly.

// Slot record, version 2: version u8 ‖ policy u8 ‖ created i64 ‖ connected
// since i64 ‖ last disconnect i64 ‖ born u64 ‖ device info. born is the
// first log position the slot can be a recipient at: a log entry for the
// same device id at an earlier position belongs to an earlier incarnation
// (dropped, then created again) and is never delivered to this one.
const (
	slotRecordVersion = 2
	slotHeaderLen     = 1 + 1 + 8 + 8 + 8 + 8
)

func encodeSlot(s Slot, born uint64) []byte {
	b := make([]byte, slotHeaderLen+len(s.DeviceInfo))
	b[0] = slotRecordVersion
	b[1] = byte(s.Policy)
	binary.BigEndian.PutUint64(b[2:], uint64(s.CreatedAt))
	binary.BigEndian.PutUint64(b[10:], uint64(s.ConnectedSince))
	binary.BigEndian.PutUint64(b[18:], uint64(s.LastDisconnectAt))
	binary.BigEndian.PutUint64(b[26:], born)
	copy(b[slotHeaderLen:], s.DeviceInfo)
	return b
}

// decodeSlot decodes a slots/ entry; it copies the device info, so the
// result outlives the transaction.
func decodeSlot(k, v []byte) (GroupID, Slot, uint64, error) {
	if len(k) != 40 {
		return GroupID{}, Slot{}, 0, fmt.Errorf("reflection: slot key of %d bytes", len(k))
	}
	g := GroupID(k[:32])
	if len(v) < slotHeaderLen || v[0] != slotRecordVersion {
		return g, Slot{}, 0, fmt.Errorf("reflection: slot %d: corrupt record (%d bytes)", beUint64(k[32:]), len(v))
	}
	s := Slot{
		DeviceID:         DeviceID(beUint64(k[32:])),
		Policy:           ExpirationPolicy(v[1]),
		CreatedAt:        int64(beUint64(v[2:])),
		ConnectedSince:   int64(beUint64(v[10:])),
		LastDisconnectAt: int64(beUint64(v[18:])),
	}
	if len(v) > slotHeaderLen {
		s.DeviceInfo = append([]byte(nil), v[slotHeaderLen:]...)
	}
	return g, s, beUint64(v[26:]), nil
}

const tombstoneLen = 1 + 8

func encodeTombstone(t Tombstone) []byte {
	b := make([]byte, tombstoneLen)
	b[0] = byte(t.Reason)
	binary.BigEndian.PutUint64(b[1:], uint64(t.At))
	return b
}

// decodeTombstone takes the device id from the last 8 bytes of k (both the
// schema-1 key, device, and the schema-2 key, group ‖ device).
func decodeTombstone(k, v []byte) (Tombstone, error) {
	if (len(k) != 8 && len(k) != 40) || len(v) != tombstoneLen {
		return Tombstone{}, fmt.Errorf("reflection: corrupt tombstone (key %d, value %d bytes)", len(k), len(v))
	}
	return Tombstone{
		DeviceID: DeviceID(beUint64(k[len(k)-8:])),
		Reason:   TombstoneReason(v[0]),
		At:       int64(beUint64(v[1:])),
	}, nil
}

// Held values: timestamp u64 ‖ envelope.
const entryHeaderLen = 8

func encodeEntry(ts uint64, envelope []byte) []byte {
	b := make([]byte, entryHeaderLen+len(envelope))
	binary.BigEndian.PutUint64(b, ts)
	copy(b[entryHeaderLen:], envelope)
	return b
}

// Log record, version 1: version u8 ‖ timestamp u64 ‖ group [32] ‖ sender
// u64 ‖ n u16 ‖ n × (device u64 ‖ seq u64) ‖ envelope. The group and sender
// make the log self-describing (Check, a later export of one shard); the
// envelope is stored once however many recipients there are.
const (
	logRecordVersion = 1
	logHeaderLen     = 1 + 8 + 32 + 8 + 2
	maxRecipients    = 1<<16 - 1
)

func encodeLog(ts uint64, g GroupID, sender DeviceID, to []Delivery, envelope []byte) []byte {
	b := make([]byte, logHeaderLen+16*len(to)+len(envelope))
	b[0] = logRecordVersion
	binary.BigEndian.PutUint64(b[1:], ts)
	copy(b[9:], g[:])
	binary.BigEndian.PutUint64(b[41:], uint64(sender))
	binary.BigEndian.PutUint16(b[49:], uint16(len(to)))
	p := b[logHeaderLen:]
	for _, d := range to {
		binary.BigEndian.PutUint64(p, uint64(d.DeviceID))
		binary.BigEndian.PutUint64(p[8:], d.Seq)
		p = p[16:]
	}
	copy(p, envelope)
	return b
}

// logRecord is a decoded view into a log value; nothing is copied.
type logRecord struct {
	ts       uint64
	group    GroupID
	sender   DeviceID
	n        int
	rcpt     []byte // n × (device ‖ seq)
	envelope []byte
}

var errCorruptLog = errors.New("reflection: corrupt log record")

func decodeLog(v []byte) (logRecord, error) {
	if len(v) < logHeaderLen || v[0] != logRecordVersion {
		return logRecord{}, errCorruptLog
	}
	n := int(binary.BigEndian.Uint16(v[49:]))
	if len(v) < logHeaderLen+16*n {
		return logRecord{}, errCorruptLog
	}
	return logRecord{
		ts:       beUint64(v[1:]),
		group:    GroupID(v[9:41]),
		sender:   DeviceID(beUint64(v[41:])),
		n:        n,
		rcpt:     v[logHeaderLen : logHeaderLen+16*n],
		envelope: v[logHeaderLen+16*n:],
	}, nil
}

func (r logRecord) recipient(i int) (DeviceID, uint64) {
	return DeviceID(beUint64(r.rcpt[16*i:])), beUint64(r.rcpt[16*i+8:])
}

// Cursor record, version 1: version u8 ‖ n u16 ‖ n × slot cursor, sorted by
// device id, where a slot cursor is device u64 ‖ counter u64 ‖ watermark
// u64 ‖ k u32 ‖ k × (lo u64 ‖ hi u64). counter is the last Seq handed out
// (a lower bound: appends do not rewrite cursors, so Open takes the maximum
// with the log); every entry of the slot with Seq ≤ watermark or within one
// of the ranges is acked. A range covers a run of acked entries with no
// unacked one in between, so in-order acks above an old unacked entry
// (a long backlog) cost one range, not one seq each. Acks are persisted lazily (committer.go), so after a crash a
// cursor may be behind: that only re-delivers.
const cursorRecordVersion = 1

type slotCursor struct {
	d       DeviceID
	counter uint64
	acked   uint64     // watermark
	above   []seqRange // acked runs above the watermark, ascending
}

func encodeCursors(cs []slotCursor) []byte {
	n := 3
	for _, c := range cs {
		n += 28 + 16*len(c.above)
	}
	b := make([]byte, n)
	b[0] = cursorRecordVersion
	binary.BigEndian.PutUint16(b[1:], uint16(len(cs)))
	p := b[3:]
	for _, c := range cs {
		binary.BigEndian.PutUint64(p, uint64(c.d))
		binary.BigEndian.PutUint64(p[8:], c.counter)
		binary.BigEndian.PutUint64(p[16:], c.acked)
		binary.BigEndian.PutUint32(p[24:], uint32(len(c.above)))
		p = p[28:]
		for _, r := range c.above {
			binary.BigEndian.PutUint64(p, r.lo)
			binary.BigEndian.PutUint64(p[8:], r.hi)
			p = p[16:]
		}
	}
	return b
}

func decodeCursors(v []byte) ([]slotCursor, error) {
	bad := errors.New("reflection: corrupt cursor record")
	if len(v) < 3 || v[0] != cursorRecordVersion {
		return nil, bad
	}
	n := int(binary.BigEndian.Uint16(v[1:]))
	p := v[3:]
	out := make([]slotCursor, 0, n)
	for range n {
		if len(p) < 28 {
			return nil, bad
		}
		c := slotCursor{d: DeviceID(beUint64(p)), counter: beUint64(p[8:]), acked: beUint64(p[16:])}
		k := int(binary.BigEndian.Uint32(p[24:]))
		p = p[28:]
		if k > len(p)/16 {
			return nil, bad
		}
		if k > 0 {
			c.above = make([]seqRange, k)
			for i := range c.above {
				c.above[i] = seqRange{beUint64(p[16*i:]), beUint64(p[16*i+8:])}
			}
		}
		p = p[16*k:]
		out = append(out, c)
	}
	if len(p) != 0 {
		return nil, bad
	}
	return out, nil
}
