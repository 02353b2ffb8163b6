package reflection

import (
	"fmt"
	"testing"
)

// BenchmarkDiskPerQueuedEntry measures what a queued reflection costs on
// disk, for OPERATIONS.md's sizing: one group of two slots, 10,000
// reflections of the given envelope size queued for the offline one; data
// pages and file length divided by the entries, as the server left the
// file (live-*) and after `db compact` (compacted-*). The figures are
// sizes, not times.
//
//	go test -run '^$' -bench DiskPerQueuedEntry -benchtime 1x ./reflection/
func BenchmarkDiskPerQueuedEntry(b *testing.B) {
	const n = 10000
	for _, size := range []int{100, 1000, 8000} {
		b.Run(fmt.Sprintf("envelope=%dB", size), func(b *testing.B) {
			for range b.N {
				path := dbPath(b)
				db := openAt(b, path, Options{MaxQueueLength: 2 * n, MaxQueueBytes: 1 << 30})
				g := gid(7)
				putSlots(b, db, g, 1, 2)
				empty, err := usageOfOpen(db, path)
				if err != nil {
					b.Fatal(err)
				}
				fillQueue(b, db, g, 1, n, make([]byte, size))
				if err := db.Close(); err != nil {
					b.Fatal(err)
				}
				res, err := Compact(path)
				if err != nil {
					b.Fatal(err)
				}
				// As the running server left the file, then compacted.
				b.ReportMetric(float64(res.Before.DataBytes-empty.DataBytes)/n, "live-data-B/entry")
				b.ReportMetric(float64(res.Before.FileBytes)/n, "live-file-B/entry")
				b.ReportMetric(float64(res.After.DataBytes-empty.DataBytes)/n, "compacted-data-B/entry")
			}
		})
	}
}

// usageOfOpen measures the data pages of an open database.
func usageOfOpen(db *DB, path string) (FileUsage, error) {
	return fileUsage(path, db.bolt)
}
