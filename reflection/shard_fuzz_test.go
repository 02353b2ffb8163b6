package reflection

import (
	"bytes"
	"crypto/sha256"
	"testing"
)

func seedShardImage() *shardImage {
	g, h := sgid(testShard, 1), sgid(testShard, 2)
	return &shardImage{
		shard: testShard,
		slots: []imgSlot{
			{g: g, slot: Slot{DeviceID: 1, DeviceInfo: []byte("i"), Policy: Persistent, CreatedAt: 5}, counter: 9},
			{g: g, slot: Slot{DeviceID: 2, ConnectedSince: 7}, counter: 4},
		},
		tombs:   []imgTomb{{g: h, tomb: Tombstone{DeviceID: 3, Reason: Dropped, At: 8}}},
		shared:  []imgShared{{g: h, data: []byte("s")}},
		held:    []imgHeld{{g: g, sender: 1, ts: 6, envelope: []byte("held")}},
		entries: []imgEntry{{g: g, sender: 2, ts: 3, to: []Delivery{{1, 7}, {2, 4}}, envelope: []byte("env")}},
	}
}

// FuzzShardStream: decodeShard rejects malformed streams without panicking,
// and a stream it accepts re-encodes to the same bytes. Each input is also
// tried with its trailer replaced by the right checksum, so the fuzzer
// gets past the checksum to the records.
func FuzzShardStream(f *testing.F) {
	var seed bytes.Buffer
	if err := encodeShard(&seed, seedShardImage()); err != nil {
		f.Fatal(err)
	}
	f.Add(seed.Bytes())
	f.Add(seed.Bytes()[:len(seed.Bytes())-40])
	f.Add([]byte(shardMagic))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		check := func(b []byte) {
			if len(b) <= shardHeaderLen {
				_, _ = decodeShard(b, testShard)
				return
			}
			img, err := decodeShard(b, b[shardHeaderLen-1])
			if err != nil {
				return
			}
			var out bytes.Buffer
			if err := encodeShard(&out, img); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out.Bytes(), b) {
				t.Fatalf("shard stream does not round-trip")
			}
		}
		check(b)
		if len(b) >= sha256.Size {
			fixed := bytes.Clone(b)
			body := len(fixed) - sha256.Size
			sum := sha256.Sum256(fixed[:body])
			copy(fixed[body:], sum[:])
			check(fixed)
		}
	})
}

func TestShardStreamSeedDecodes(t *testing.T) {
	var b bytes.Buffer
	if err := encodeShard(&b, seedShardImage()); err != nil {
		t.Fatal(err)
	}
	img, err := decodeShard(b.Bytes(), testShard)
	if err != nil {
		t.Fatal(err)
	}
	if img.stats != (ShardStats{Groups: 2, Slots: 2, Entries: 2, Bytes: int64(b.Len())}) {
		t.Fatalf("stats %+v", img.stats)
	}
	// Record-level checks behind a valid checksum.
	bad := []*shardImage{}
	for _, mut := range []func(*shardImage){
		func(i *shardImage) { i.slots[1].counter = 3 },                      // seq above counter
		func(i *shardImage) { i.entries[0].to[1].DeviceID = 5 },             // unknown slot
		func(i *shardImage) { i.entries[0].to[1] = i.entries[0].to[0] },     // slot twice
		func(i *shardImage) { i.slots[1] = i.slots[0] },                     // slot twice
		func(i *shardImage) { i.tombs[0].g[0]++ },                           // other shard
		func(i *shardImage) { i.entries[0].g = sgid(testShard, 9) },         // group without slots
		func(i *shardImage) { i.entries = append(i.entries, i.entries[0]) }, // seqs not ascending
	} {
		img := seedShardImage()
		mut(img)
		bad = append(bad, img)
	}
	for i, img := range bad {
		var b bytes.Buffer
		if err := encodeShard(&b, img); err != nil {
			t.Fatal(err)
		}
		if _, err := decodeShard(b.Bytes(), testShard); err == nil {
			t.Fatalf("mutation %d accepted", i)
		}
	}
}
