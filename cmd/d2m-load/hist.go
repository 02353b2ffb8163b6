package main

import (
	"math"
	"math/bits"
	"sync/atomic"
	"time"
)

// hist is a lock-free latency histogram with log-linear buckets: values
// below 128 ns are exact, above that every power of two is split into 64
// buckets, so a reported quantile is within 1.6 % of the true value. Record
// may be called from any number of goroutines.
type hist struct {
	name   string
	setup  bool // a setup-phase histogram: in the table, not in the plot
	counts [histBuckets]atomic.Uint64
	n      atomic.Uint64
	sum    atomic.Uint64 // ns
	max    atomic.Int64  // ns
}

const (
	histSub     = 64
	histBuckets = 2*histSub + 40*histSub // up to 2^46 ns ≈ 19 h
)

func newHist(name string) *hist { return &hist{name: name} }

// newSetupHist is a histogram of the setup phase (reported, not plotted).
func newSetupHist(name string) *hist { return &hist{name: name, setup: true} }

func bucketOf(v uint64) int {
	if v < 2*histSub {
		return int(v)
	}
	e := bits.Len64(v) - 7 // v>>e is in [64, 127]
	i := 2*histSub + (e-1)*histSub + int(v>>uint(e)) - histSub
	if i >= histBuckets {
		return histBuckets - 1
	}
	return i
}

// bucketRange returns the smallest value of bucket i and the bucket width.
func bucketRange(i int) (lo, width uint64) {
	if i < 2*histSub {
		return uint64(i), 1
	}
	j := i - 2*histSub
	e := uint(j/histSub + 1)
	m := uint64(j%histSub + histSub)
	return m << e, 1 << e
}

func (h *hist) Record(d time.Duration) {
	if d < 0 {
		d = 0
	}
	v := uint64(d)
	h.counts[bucketOf(v)].Add(1)
	h.n.Add(1)
	h.sum.Add(v)
	for {
		m := h.max.Load()
		if int64(v) <= m || h.max.CompareAndSwap(m, int64(v)) {
			break
		}
	}
}

func (h *hist) Count() uint64 { return h.n.Load() }

// Quantile returns the value below which a fraction q of the samples lie
// (bucket midpoint, capped at the exact maximum).
func (h *hist) Quantile(q float64) time.Duration {
	n := h.n.Load()
	if n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(n)))
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for i := range h.counts {
		seen += h.counts[i].Load()
		if seen >= rank {
			lo, w := bucketRange(i)
			v := time.Duration(lo + w/2)
			if m := time.Duration(h.max.Load()); v > m {
				v = m
			}
			return v
		}
	}
	return time.Duration(h.max.Load())
}

// latencySummary is the JSON form of a histogram, in milliseconds.
type latencySummary struct {
	Count  uint64  `json:"count"`
	MeanMs float64 `json:"mean_ms"`
	P50Ms  float64 `json:"p50_ms"`
	P90Ms  float64 `json:"p90_ms"`
	P99Ms  float64 `json:"p99_ms"`
	P999Ms float64 `json:"p999_ms"`
	MaxMs  float64 `json:"max_ms"`
}

func ms(d time.Duration) float64 { return math.Round(float64(d)/1e3) / 1e3 }

func (h *hist) Summary() latencySummary {
	n := h.n.Load()
	s := latencySummary{Count: n}
	if n == 0 {
		return s
	}
	s.MeanMs = ms(time.Duration(h.sum.Load() / n))
	s.P50Ms = ms(h.Quantile(0.50))
	s.P90Ms = ms(h.Quantile(0.90))
	s.P99Ms = ms(h.Quantile(0.99))
	s.P999Ms = ms(h.Quantile(0.999))
	s.MaxMs = ms(time.Duration(h.max.Load()))
	return s
}

// cdf returns (latency in ms, fraction of samples ≤ latency) at every
// non-empty bucket's upper edge.
func (h *hist) cdf() (xs, ys []float64) {
	n := h.n.Load()
	if n == 0 {
		return nil, nil
	}
	var seen uint64
	for i := range h.counts {
		c := h.counts[i].Load()
		if c == 0 {
			continue
		}
		seen += c
		lo, w := bucketRange(i)
		x := float64(lo+w) / 1e6
		xs = append(xs, x)
		ys = append(ys, float64(seen)/float64(n))
	}
	return xs, ys
}
