package reflection

import "testing"

// TestPagesPerCommitFlat measures bbolt pages written per commit (bbolt's
// TxStats write count: one per page or overflow run, plus the meta page)
// for batches of K durable reflections, each to a different group of 3
// slots (fan-out 2, 100-byte envelopes), so a batch reaches 2K slots. The
// log layout writes the records at the right edge of one tree: pages grow
// with the bytes appended (about 180 bytes per reflection), not with the
// slots reached. Schema 1 wrote at least one queue leaf and one qmeta leaf
// per slot reached.
//
//	go test -run TestPagesPerCommitFlat -v ./reflection/
func TestPagesPerCommitFlat(t *testing.T) {
	db := openAt(t, dbPath(t), Options{})
	const groups = 1000
	var reqs []*request
	for i := range groups {
		g := GroupID{byte(i >> 8), byte(i), 7}
		for d := 1; d <= 3; d++ {
			reqs = append(reqs, &request{op: opPutSlot, g: g, d: DeviceID(d), slot: Slot{DeviceID: DeviceID(d)}})
		}
	}
	if err := db.commitDirect(reqs...); err != nil {
		t.Fatal(err)
	}
	env := make([]byte, benchEnvelope)
	next := 0
	for _, k := range []int{1, 10, 100, 1000} {
		const rounds = 5
		before := db.bolt.Stats()
		for range rounds {
			batch := make([]*request, k)
			for i := range batch {
				g := GroupID{byte(next >> 8), byte(next), 7}
				next = (next + 1) % groups
				batch[i] = &request{op: opAppend, g: g, d: 1, app: AppendRequest{Group: g, Sender: 1, Envelope: env}}
			}
			if err := db.commitDirect(batch...); err != nil {
				t.Fatal(err)
			}
			for _, r := range batch {
				if len(r.result.Delivered) != 2 {
					t.Fatalf("delivered %v", r.result.Delivered)
				}
			}
		}
		after := db.bolt.Stats()
		d := after.Sub(&before)
		perCommit := float64(d.TxStats.GetWrite()) / rounds
		dataPages := float64(k) * float64(logHeaderLen+32+benchEnvelope) / 4096
		t.Logf("batch %4d reflections (%4d slots reached): %6.1f pages/commit, %.3f pages/reflection", k, 2*k,
			perCommit, perCommit/float64(k))
		// Bound: the log pages the records need (at the fill percent, plus
		// splits), the branch path, the root and meta pages.
		if limit := 2*dataPages + 8; perCommit > limit {
			t.Fatalf("batch %d: %.1f pages per commit, want ≤ %.1f", k, perCommit, limit)
		}
	}
}
