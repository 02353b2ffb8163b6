package reflection

import "encoding/binary"

// Bucket layout (schema version 2). All integers are big-endian so bbolt's
// byte order is numeric order. Every key of a group's data starts with the
// 32-byte group id, so one group, and one shard (the groups whose id starts
// with the same byte), is a contiguous key range in each bucket.
//
//	meta/
//	    "schema"                         → u32 schema version
//	    "clean"                          → present iff the last Close left no
//	                                       unreclaimed log entry (Check)
//	    "migrating"                      → present while a schema-1 file is
//	                                       being migrated (migrate.go)
//	    "shardgen" ‖ shard u8            → i64 generation of the shard's copy
//	                                       (cluster mode, ShardStore); absent = 0
//	slots/<group ‖ device>               → slot record (codec.go), incl. the log
//	                                       position at the slot's creation
//	tombs/<group ‖ device>               → reason u8 ‖ at i64
//	shared/<group>                       → shared device data
//	held/<group ‖ sender ‖ n>            → timestamp u64 ‖ envelope
//	                                       (n = bucket sequence: submission order)
//	cursors/<group>                      → cursor record: per slot its counter
//	                                       (last Seq handed out), its ack
//	                                       watermark and its acks above it
//	log/<lsn u64>                        → log record: one durable reflection,
//	                                       its recipients [(device, seq)...] and
//	                                       the envelope, stored once
//	                                       (bucket sequence = last lsn assigned)
//
// Why this shape (measured, see BENCHMARKS.md "Reflection store v2"): a
// batch of appends only adds keys at the right edge of log/, so a commit
// dirties a few pages however many slots it reaches; schema 1 had a queue
// bucket and a meta key per slot and dirtied a leaf page per recipient
// slot. Per-slot queues exist only in memory and are rebuilt at Open by one
// scan of log/ against cursors/ (db.go). A log entry is deleted when no
// slot needs it any more (every recipient acked, or was dropped or purged).
const schemaVersion = 2

var (
	bucketMeta    = []byte("meta")
	bucketSlots   = []byte("slots")
	bucketTombs   = []byte("tombs")
	bucketShared  = []byte("shared")
	bucketHeld    = []byte("held")
	bucketCursors = []byte("cursors")
	bucketLog     = []byte("log")

	keySchema    = []byte("schema")
	keyClean     = []byte("clean")
	keyMigrating = []byte("migrating")
	keyShardGen  = []byte("shardgen")
)

func shardGenKey(shard byte) []byte { return append(append([]byte(nil), keyShardGen...), shard) }

// rootBuckets are the buckets of schema 2, created at Open.
var rootBuckets = [][]byte{bucketMeta, bucketSlots, bucketTombs, bucketShared, bucketHeld, bucketCursors, bucketLog}

// logFillPercent: log/ is append-only at the right edge (reclaiming deletes
// mostly at the left), so pages are filled almost completely instead of
// split in half.
const logFillPercent = 0.95

// slotKey is group ‖ device: the key of slots/ and tombs/.
func slotKey(g GroupID, d DeviceID) []byte {
	b := make([]byte, 40)
	copy(b, g[:])
	binary.BigEndian.PutUint64(b[32:], uint64(d))
	return b
}

func heldKey(g GroupID, sender DeviceID, n uint64) []byte {
	b := make([]byte, 48)
	copy(b, g[:])
	binary.BigEndian.PutUint64(b[32:], uint64(sender))
	binary.BigEndian.PutUint64(b[40:], n)
	return b
}

func u64key(v uint64) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, v)
	return b
}

func beUint64(b []byte) uint64 { return binary.BigEndian.Uint64(b) }

func u32bytes(v uint32) []byte {
	b := make([]byte, 4)
	binary.BigEndian.PutUint32(b, v)
	return b
}

func beUint32(b []byte) uint32 { return binary.BigEndian.Uint32(b) }

// nextPrefix returns the smallest key greater than every key starting with
// p (p must not be all 0xff).
func nextPrefix(p []byte) []byte {
	b := append([]byte(nil), p...)
	for i := len(b) - 1; i >= 0; i-- {
		b[i]++
		if b[i] != 0 {
			return b
		}
	}
	return nil
}
