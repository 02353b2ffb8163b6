package reflection

import (
	"fmt"
	"testing"
)

func BenchmarkZZProbe(b *testing.B) {
	for _, writers := range []int{1, 100, 1000} {
		b.Run(fmt.Sprint(writers), func(b *testing.B) {
			var commits, batchSum int
			db := openAt(b, dbPath(b), Options{})
			
			_ = commits
			_ = batchSum
			groups := benchGroups(b, db, writers, 4)
			env := make([]byte, benchEnvelope)
			s0 := db.bolt.Stats()
			runWriters(b, writers, func(w int) {
				g := groups[w]
				res, _ := SyncAppend(func(done func(AppendResult, error)) { db.Append(AppendRequest{Group: g, Sender: 1, Envelope: env}, done) })
				for _, d := range res.Delivered {
					db.Ack(g, d.DeviceID, d.Seq, nil)
				}
			})
			s1 := db.bolt.Stats()
			d := s1.Sub(&s0)
			b.ReportMetric(float64(d.TxStats.GetWrite())/float64(b.N), "pagewrites/msg")
			b.ReportMetric(float64(d.TxStats.GetWrite())/float64(d.TxN), "writes/tx")
			b.ReportMetric(float64(d.TxN), "tx")
		})
	}
}
