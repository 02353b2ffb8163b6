package reflection

import "encoding/binary"

// Bucket layout (schema version 1). All integers are big-endian so bbolt's
// byte order is numeric order.
//
//	meta/
//	    "schema"                      → u32 schema version
//	groups/
//	    <group id, 32 B>/
//	        slots/<device u64>        → slot record (codec.go)
//	        tombs/<device u64>        → reason u8 ‖ at i64
//	        held/<sender u64 ‖ n u64> → timestamp u64 ‖ envelope (n = held bucket sequence)
//	        "shared"                  → shared device data (plain key)
//	qmeta/
//	    <group ‖ device>              → queue meta: incarnation, last seq, length, bytes (4 × u64)
//	queues/                           (bucket sequence = last queue incarnation)
//	    <group ‖ device ‖ incarnation>/
//	        <seq u64>                 → timestamp u64 ‖ envelope
//	trash/
//	    <queue bucket name>           → empty; queues of removed slots, deleted in chunks
//
// Queue buckets live outside the group so that dropping a slot only moves
// the name to trash/ in the dropping transaction; the committer deletes the
// keys later, DeleteChunk per commit, so a 25,000-entry queue never sits in
// one transaction (Matrix's device_inbox lesson, measurements.md §1.2). The
// incarnation in the name gives a re-created slot with the same device id a
// fresh bucket while the old one may still be in the trash.
//
// Queue meta is one root bucket rather than part of each group: every
// reflection updates the meta of its recipients, and in a per-group bucket
// that dirtied one page per active group per commit. Measured with 1000
// groups reflecting at once, the root bucket writes fewer pages per message
// (see bench_test.go). Slots, which change rarely, stay in the group.
const schemaVersion = 1

var (
	bucketMeta   = []byte("meta")
	bucketGroups = []byte("groups")
	bucketQueues = []byte("queues")
	bucketQMeta  = []byte("qmeta")
	bucketTrash  = []byte("trash")

	keySchema = []byte("schema")

	bucketSlots = []byte("slots")
	bucketTombs = []byte("tombs")
	bucketHeld  = []byte("held")
	keyShared   = []byte("shared")
)

// queueFillPercent: queue buckets are append-only at the tail (acks delete
// at the head), so pages are filled almost completely instead of split in
// half; measured: 241 MiB instead of 451 MiB for the same data (§3.3).
const queueFillPercent = 0.9

const queueNameLen = 32 + 8 + 8

func queueName(g GroupID, d DeviceID, incarnation uint64) []byte {
	b := make([]byte, queueNameLen)
	copy(b, g[:])
	binary.BigEndian.PutUint64(b[32:], uint64(d))
	binary.BigEndian.PutUint64(b[40:], incarnation)
	return b
}

func qmetaKey(g GroupID, d DeviceID) []byte {
	b := make([]byte, 40)
	copy(b, g[:])
	binary.BigEndian.PutUint64(b[32:], uint64(d))
	return b
}

func u64key(v uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	return b
}

func deviceKey(d DeviceID) []byte { return u64key(uint64(d)) }

func heldKey(sender DeviceID, n uint64) []byte {
	b := make([]byte, 16)
	binary.BigEndian.PutUint64(b, uint64(sender))
	binary.BigEndian.PutUint64(b[8:], n)
	return b
}

func beUint64(b []byte) uint64 { return binary.BigEndian.Uint64(b) }

func u32bytes(v uint32) []byte {
	b := make([]byte, 4)
	binary.BigEndian.PutUint32(b, v)
	return b
}

func beUint32(b []byte) uint32 { return binary.BigEndian.Uint32(b) }
