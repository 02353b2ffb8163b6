package reflection

import (
	"bufio"
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"slices"
)

// Shard stream, version 1: the state of one shard (every group whose id
// starts with the shard byte) as ExportShard writes it and ImportShard
// reads it.
//
//	header:  magic "D2MSHARD" ‖ version u8 ‖ shard u8
//	records: kind u8 ‖ length u32 ‖ payload, in this order of kinds:
//	  slot   group[32] ‖ device u64 ‖ counter u64 ‖ policy u8 ‖ created i64 ‖
//	         connected since i64 ‖ last disconnect i64 ‖ device info
//	  tomb   group[32] ‖ device u64 ‖ reason u8 ‖ at i64
//	  shared group[32] ‖ data (non-empty)
//	  held   group[32] ‖ sender u64 ‖ timestamp u64 ‖ envelope (submission order)
//	  entry  a log record (codec.go) whose recipients are only the slots of
//	         the stream that have not acked it, in log order
//	trailer: kind 0 ‖ length u32 = 32 ‖ SHA-256 of every byte before it
//
// counter is the slot's last Seq handed out, ephemeral ones included, so
// the importing store continues the slot's Reflected ids exactly. Entries
// keep their Seq and timestamp; their lsn is the importing store's. The
// trailer makes a truncated or altered stream fail as a whole before
// anything is written.
const (
	shardMagic         = "D2MSHARD"
	shardStreamVersion = 1
	shardHeaderLen     = len(shardMagic) + 2
	shardRecHeaderLen  = 1 + 4

	shardRecEnd    = 0
	shardRecSlot   = 1
	shardRecTomb   = 2
	shardRecShared = 3
	shardRecHeld   = 4
	shardRecEntry  = 5

	shardSlotLen = 32 + 8 + 8 + 1 + 8 + 8 + 8
	shardTombLen = 32 + 8 + 1 + 8
	shardHeldLen = 32 + 8 + 8
)

// ShardStats describes what an ExportShard, ImportShard or DropShard
// moved or removed, for logs and metrics.
type ShardStats struct {
	Groups  int   // groups with any state in the shard
	Slots   int   // device slots
	Entries int   // queued copies: unacked entries summed over the slots
	Bytes   int64 // stream bytes (export, import); queued envelope bytes (drop)
}

// shardImage is a decoded, validated shard stream.
type shardImage struct {
	shard   byte
	slots   []imgSlot
	tombs   []imgTomb
	shared  []imgShared
	held    []imgHeld
	entries []imgEntry
	stats   ShardStats
}

type imgSlot struct {
	g       GroupID
	slot    Slot
	counter uint64
}

type imgTomb struct {
	g    GroupID
	tomb Tombstone
}

type imgShared struct {
	g    GroupID
	data []byte
}

type imgHeld struct {
	g        GroupID
	sender   DeviceID
	ts       uint64
	envelope []byte
}

type imgEntry struct {
	g        GroupID
	sender   DeviceID
	ts       uint64
	to       []Delivery
	envelope []byte
}

// shardWriter writes a shard stream and counts and hashes it on the way.
type shardWriter struct {
	bw  *bufio.Writer
	h   hash.Hash
	n   int64
	hdr [shardRecHeaderLen]byte
}

func newShardWriter(w io.Writer, shard byte) (*shardWriter, error) {
	sw := &shardWriter{bw: bufio.NewWriterSize(w, 64<<10), h: sha256.New()}
	return sw, sw.raw([]byte(shardMagic), []byte{shardStreamVersion, shard})
}

func (sw *shardWriter) raw(parts ...[]byte) error {
	for _, p := range parts {
		sw.h.Write(p)
		n, err := sw.bw.Write(p)
		sw.n += int64(n)
		if err != nil {
			return err
		}
	}
	return nil
}

func (sw *shardWriter) record(kind byte, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if uint64(n) > 1<<32-1 {
		return fmt.Errorf("reflection: shard record of %d bytes", n)
	}
	sw.hdr[0] = kind
	binary.BigEndian.PutUint32(sw.hdr[1:], uint32(n))
	return sw.raw(append([][]byte{sw.hdr[:]}, parts...)...)
}

func (sw *shardWriter) slot(g GroupID, s Slot, counter uint64) error {
	b := make([]byte, shardSlotLen)
	copy(b, g[:])
	binary.BigEndian.PutUint64(b[32:], uint64(s.DeviceID))
	binary.BigEndian.PutUint64(b[40:], counter)
	b[48] = byte(s.Policy)
	binary.BigEndian.PutUint64(b[49:], uint64(s.CreatedAt))
	binary.BigEndian.PutUint64(b[57:], uint64(s.ConnectedSince))
	binary.BigEndian.PutUint64(b[65:], uint64(s.LastDisconnectAt))
	return sw.record(shardRecSlot, b, s.DeviceInfo)
}

func (sw *shardWriter) tomb(g GroupID, t Tombstone) error {
	b := make([]byte, shardTombLen)
	copy(b, g[:])
	binary.BigEndian.PutUint64(b[32:], uint64(t.DeviceID))
	b[40] = byte(t.Reason)
	binary.BigEndian.PutUint64(b[41:], uint64(t.At))
	return sw.record(shardRecTomb, b)
}

func (sw *shardWriter) shared(g GroupID, data []byte) error {
	return sw.record(shardRecShared, g[:], data)
}

func (sw *shardWriter) held(g GroupID, sender DeviceID, ts uint64, envelope []byte) error {
	b := make([]byte, shardHeldLen)
	copy(b, g[:])
	binary.BigEndian.PutUint64(b[32:], uint64(sender))
	binary.BigEndian.PutUint64(b[40:], ts)
	return sw.record(shardRecHeld, b, envelope)
}

func (sw *shardWriter) entry(rec []byte) error { return sw.record(shardRecEntry, rec) }

// finish writes the trailer and flushes.
func (sw *shardWriter) finish() error {
	sw.hdr[0] = shardRecEnd
	binary.BigEndian.PutUint32(sw.hdr[1:], sha256.Size)
	if err := sw.raw(sw.hdr[:]); err != nil {
		return err
	}
	sum := sw.h.Sum(nil)
	n, err := sw.bw.Write(sum)
	sw.n += int64(n)
	if err != nil {
		return err
	}
	return sw.bw.Flush()
}

// ErrBadShardStream wraps every reason ImportShard refuses a stream.
var ErrBadShardStream = errors.New("reflection: bad shard stream")

func badStream(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrBadShardStream}, a...)...)
}

// decodeShard checks and decodes a whole shard stream for shard. It keeps
// references into b. Beyond the framing it checks what the import relies
// on: every group belongs to the shard, no slot, tombstone or shared data
// appears twice, and every entry's recipients are slots of the stream
// (listed before it), each at most once, with Seqs ascending per slot and
// within the slot's counter.
func decodeShard(b []byte, shard byte) (*shardImage, error) {
	if len(b) < shardHeaderLen+shardRecHeaderLen+sha256.Size {
		return nil, badStream("%d bytes, too short", len(b))
	}
	if string(b[:len(shardMagic)]) != shardMagic {
		return nil, badStream("no shard stream header")
	}
	if v := b[len(shardMagic)]; v != shardStreamVersion {
		return nil, badStream("version %d, want %d", v, shardStreamVersion)
	}
	if s := b[len(shardMagic)+1]; s != shard {
		return nil, badStream("stream is for shard %02x, not %02x", s, shard)
	}
	body := len(b) - sha256.Size
	if sum := sha256.Sum256(b[:body]); !bytes.Equal(sum[:], b[body:]) {
		return nil, badStream("checksum mismatch (truncated or corrupted)")
	}
	img := &shardImage{shard: shard}
	type slotState struct {
		counter, last uint64
		entry         int // 1 + index of the last entry naming the slot
	}
	slots := make(map[slotRef]*slotState)
	tombs := make(map[slotRef]bool)
	shared := make(map[GroupID]bool)
	groups := make(map[GroupID]bool)
	group := func(p []byte) (GroupID, error) {
		g := GroupID(p[:32])
		if g[0] != shard {
			return g, badStream("group %s is not in shard %02x", g, shard)
		}
		groups[g] = true
		return g, nil
	}
	p := b[shardHeaderLen:body]
	last := byte(shardRecSlot)
	for {
		if len(p) < shardRecHeaderLen {
			return nil, badStream("truncated record header")
		}
		kind := p[0]
		n := binary.BigEndian.Uint32(p[1:])
		p = p[shardRecHeaderLen:]
		if kind == shardRecEnd {
			if n != sha256.Size || len(p) != 0 {
				return nil, badStream("malformed trailer")
			}
			break
		}
		if uint64(n) > uint64(len(p)) {
			return nil, badStream("record of %d bytes, %d left", n, len(p))
		}
		if kind < last || kind > shardRecEntry {
			return nil, badStream("record kind %d out of order", kind)
		}
		last = kind
		v := p[:n]
		p = p[n:]
		switch kind {
		case shardRecSlot:
			if len(v) < shardSlotLen {
				return nil, badStream("slot record of %d bytes", len(v))
			}
			g, err := group(v)
			if err != nil {
				return nil, err
			}
			s := Slot{
				DeviceID:         DeviceID(beUint64(v[32:])),
				Policy:           ExpirationPolicy(v[48]),
				CreatedAt:        int64(beUint64(v[49:])),
				ConnectedSince:   int64(beUint64(v[57:])),
				LastDisconnectAt: int64(beUint64(v[65:])),
			}
			if len(v) > shardSlotLen {
				s.DeviceInfo = v[shardSlotLen:]
			}
			k := slotRef{g, s.DeviceID}
			if slots[k] != nil {
				return nil, badStream("group %s: slot %d twice", g, s.DeviceID)
			}
			counter := beUint64(v[40:])
			slots[k] = &slotState{counter: counter}
			img.slots = append(img.slots, imgSlot{g: g, slot: s, counter: counter})
		case shardRecTomb:
			if len(v) != shardTombLen {
				return nil, badStream("tombstone record of %d bytes", len(v))
			}
			g, err := group(v)
			if err != nil {
				return nil, err
			}
			t := Tombstone{DeviceID: DeviceID(beUint64(v[32:])), Reason: TombstoneReason(v[40]), At: int64(beUint64(v[41:]))}
			k := slotRef{g, t.DeviceID}
			if tombs[k] {
				return nil, badStream("group %s: tombstone %d twice", g, t.DeviceID)
			}
			tombs[k] = true
			img.tombs = append(img.tombs, imgTomb{g: g, tomb: t})
		case shardRecShared:
			if len(v) <= 32 {
				return nil, badStream("shared data record of %d bytes", len(v))
			}
			g, err := group(v)
			if err != nil {
				return nil, err
			}
			if shared[g] {
				return nil, badStream("group %s: shared data twice", g)
			}
			shared[g] = true
			img.shared = append(img.shared, imgShared{g: g, data: v[32:]})
		case shardRecHeld:
			if len(v) < shardHeldLen {
				return nil, badStream("held record of %d bytes", len(v))
			}
			g, err := group(v)
			if err != nil {
				return nil, err
			}
			img.held = append(img.held, imgHeld{g: g, sender: DeviceID(beUint64(v[32:])), ts: beUint64(v[40:]), envelope: v[shardHeldLen:]})
		case shardRecEntry:
			r, err := decodeLog(v)
			if err != nil {
				return nil, badStream("entry: %v", err)
			}
			if r.group[0] != shard {
				return nil, badStream("entry of group %s is not in shard %02x", r.group, shard)
			}
			if r.n == 0 {
				return nil, badStream("group %s: entry without recipients", r.group)
			}
			e := imgEntry{g: r.group, sender: r.sender, ts: r.ts, envelope: r.envelope, to: make([]Delivery, r.n)}
			for i := range r.n {
				d, seq := r.recipient(i)
				st := slots[slotRef{r.group, d}]
				if st == nil {
					return nil, badStream("group %s: entry for unknown slot %d", r.group, d)
				}
				if st.entry == len(img.entries)+1 {
					return nil, badStream("group %s: entry names slot %d twice", r.group, d)
				}
				st.entry = len(img.entries) + 1
				if seq <= st.last || seq > st.counter {
					return nil, badStream("group %s: slot %d: seq %d after %d or above counter %d", r.group, d, seq, st.last, st.counter)
				}
				st.last = seq
				e.to[i] = Delivery{DeviceID: d, Seq: seq}
			}
			img.entries = append(img.entries, e)
			img.stats.Entries += r.n
		}
	}
	img.stats.Groups = len(groups)
	img.stats.Slots = len(img.slots)
	img.stats.Bytes = int64(len(b))
	return img, nil
}

// encodeShard writes img as a stream (tests, fuzzing: decode ∘ encode).
func encodeShard(w io.Writer, img *shardImage) error {
	sw, err := newShardWriter(w, img.shard)
	if err != nil {
		return err
	}
	for _, s := range img.slots {
		if err := sw.slot(s.g, s.slot, s.counter); err != nil {
			return err
		}
	}
	for _, t := range img.tombs {
		if err := sw.tomb(t.g, t.tomb); err != nil {
			return err
		}
	}
	for _, s := range img.shared {
		if err := sw.shared(s.g, s.data); err != nil {
			return err
		}
	}
	for _, h := range img.held {
		if err := sw.held(h.g, h.sender, h.ts, h.envelope); err != nil {
			return err
		}
	}
	for _, e := range img.entries {
		if err := sw.entry(encodeLog(e.ts, e.g, e.sender, e.to, e.envelope)); err != nil {
			return err
		}
	}
	return sw.finish()
}

// sortDeliveries orders one entry's recipients by device id.
func sortDeliveries(to []Delivery) {
	slices.SortFunc(to, func(a, b Delivery) int { return cmp.Compare(a.DeviceID, b.DeviceID) })
}
