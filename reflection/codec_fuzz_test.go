package reflection

import (
	"bytes"
	"testing"
)

// FuzzDecoders: every record decoder rejects malformed input without
// panicking, and what decodes re-encodes to the same bytes.
func FuzzDecoders(f *testing.F) {
	g := gid(5)
	f.Add(encodeLog(7, g, 1, []Delivery{{2, 3}, {4, 5}}, []byte("env")), slotKey(g, 9))
	f.Add(encodeCursors([]slotCursor{{d: 1, counter: 9, acked: 3, above: []seqRange{{5, 6}, {8, 8}}}}), u64key(1))
	f.Add(encodeSlot(Slot{DeviceID: 9, DeviceInfo: []byte("i"), Policy: Persistent}, 4), slotKey(g, 9))
	f.Add(encodeTombstone(Tombstone{Reason: Dropped, At: 5}), slotKey(g, 1))
	f.Add([]byte{}, []byte{})
	f.Fuzz(func(t *testing.T, v, k []byte) {
		if r, err := decodeLog(v); err == nil {
			to := make([]Delivery, r.n)
			for i := range to {
				d, seq := r.recipient(i)
				to[i] = Delivery{DeviceID: d, Seq: seq}
			}
			if got := encodeLog(r.ts, r.group, r.sender, to, r.envelope); !bytes.Equal(got, v) {
				t.Fatalf("log record does not round-trip")
			}
		}
		if cs, err := decodeCursors(v); err == nil {
			if got := encodeCursors(cs); !bytes.Equal(got, v) {
				t.Fatalf("cursor record does not round-trip")
			}
		}
		if g, s, born, err := decodeSlot(k, v); err == nil {
			if got := encodeSlot(s, born); !bytes.Equal(got, v) || !bytes.Equal(slotKey(g, s.DeviceID), k) {
				t.Fatalf("slot record does not round-trip")
			}
		}
		if tb, err := decodeTombstone(k, v); err == nil {
			if got := encodeTombstone(tb); !bytes.Equal(got, v) {
				t.Fatalf("tombstone does not round-trip")
			}
		}
		_, _ = decodeSlotV1(k, v)
	})
}
