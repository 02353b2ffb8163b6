package mediator

import (
	"regexp"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// metrics are the server's Prometheus series. Labels are states, outcomes,
// codes and reasons, never group or device ids (unbounded cardinality).
type metrics struct {
	reg *prometheus.Registry

	connections      *prometheus.GaugeVec   // by state: handshake, authenticated
	handshakes       *prometheus.CounterVec // by outcome
	closes           *prometheus.CounterVec // close codes sent, by code
	timeouts         *prometheus.CounterVec // 4013 closes, by phase: handshake, idle
	forwards         *prometheus.CounterVec // upgrades for shards owned elsewhere, by outcome
	forwardedBytes   *prometheus.CounterVec // bytes copied for forwarded connections, by direction
	fenceRefusals    prometheus.Counter
	writesRefused    prometheus.Counter
	reflects         *prometheus.CounterVec // by kind: durable, ephemeral
	reflectedSent    prometheus.Counter
	reflectedAcked   prometheus.Counter
	framesIn         prometheus.Counter
	framesOut        prometheus.Counter
	commitBatch      prometheus.Histogram
	commitLatency    prometheus.Histogram
	commitErrors     prometheus.Counter
	lockHold         prometheus.Histogram
	upstreams        *prometheus.CounterVec // by event: opened, dial_failed
	upstreamBytes    *prometheus.CounterVec // by direction
	ephemeralDrops   *prometheus.CounterVec // by reason: offline, backlog
	slowConsumers    prometheus.Counter
	queueLimitDrops  prometheus.Counter
	leaderPromotions prometheus.Counter
	queueDepth       prometheus.Histogram // sampled by the janitor
	queueAge         prometheus.Histogram // oldest entry age, sampled by the janitor

	// The stages of a durable Reflect, from its frame being read to its
	// ReflectAck being written (reflectstages.go).
	stageSubmit, stageWait, stageCommit, stageWrite, stageTotal prometheus.Observer
}

// Stage label values of mediator_reflect_stage_seconds.
const (
	stageSubmit = "submit" // frame read → handed to the store (admission, group lock)
	stageWait   = "wait"   // handed to the store → its commit started (the batch before it)
	stageCommit = "commit" // commit started → durable (write and fsync)
	stageWrite  = "write"  // durable → ReflectAck written to the socket
	stageTotal  = "total"  // frame read → ReflectAck written
)

func newMetrics() *metrics {
	reg := prometheus.NewRegistry()
	f := func(c prometheus.Collector) { reg.MustRegister(c) }
	m := &metrics{reg: reg}
	m.connections = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mediator_connections", Help: "Open device connections by state."}, []string{"state"})
	m.handshakes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mediator_handshakes_total", Help: "Device handshakes by outcome."}, []string{"outcome"})
	m.closes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mediator_close_codes_total", Help: "Connections ended, by the close code the server sent."}, []string{"code"})
	m.timeouts = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mediator_timeouts_total", Help: "Connections closed with 4013, by phase: handshake (no verified ClientHello in time) or idle (no inbound frame in time)."}, []string{"phase"})
	m.reflects = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mediator_reflects_total", Help: "Reflect messages received, by kind."}, []string{"kind"})
	m.reflectedSent = prometheus.NewCounter(prometheus.CounterOpts{Name: "mediator_reflected_sent_total", Help: "Reflected messages written to devices."})
	m.reflectedAcked = prometheus.NewCounter(prometheus.CounterOpts{Name: "mediator_reflected_acked_total", Help: "ReflectedAck messages that removed a queue entry."})
	m.framesIn = prometheus.NewCounter(prometheus.CounterOpts{Name: "mediator_frames_in_total", Help: "WebSocket frames read from devices."})
	m.framesOut = prometheus.NewCounter(prometheus.CounterOpts{Name: "mediator_frames_out_total", Help: "WebSocket frames written to devices."})
	m.commitBatch = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mediator_commit_batch_size", Help: "Storage requests per group commit.", Buckets: prometheus.ExponentialBuckets(1, 2, 13)})
	m.commitLatency = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mediator_commit_seconds", Help: "Duration of one group commit (bbolt Update incl. fsync).", Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16)})
	m.commitErrors = prometheus.NewCounter(prometheus.CounterOpts{Name: "mediator_commit_errors_total", Help: "Failed group commits."})
	m.lockHold = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mediator_transaction_hold_seconds", Help: "How long transaction locks were held.", Buckets: prometheus.ExponentialBuckets(0.001, 4, 10)})
	m.upstreams = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mediator_upstream_connections_total", Help: "Chat-server connections, by event."}, []string{"event"})
	m.upstreamBytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mediator_upstream_bytes_total", Help: "Proxied CSP bytes, by direction."}, []string{"direction"})
	m.ephemeralDrops = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mediator_ephemeral_drops_total", Help: "Ephemeral reflections not delivered, by reason."}, []string{"reason"})
	m.slowConsumers = prometheus.NewCounter(prometheus.CounterOpts{Name: "mediator_slow_consumers_total", Help: "Devices closed because their outbound queue was full."})
	m.queueLimitDrops = prometheus.NewCounter(prometheus.CounterOpts{Name: "mediator_queue_limit_drops_total", Help: "Slots dropped because their reflection queue overflowed (4114)."})
	m.leaderPromotions = prometheus.NewCounter(prometheus.CounterOpts{Name: "mediator_leader_promotions_total", Help: "RolePromotedToLeader messages sent."})
	m.queueDepth = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mediator_queue_depth", Help: "Reflection queue lengths per slot, sampled periodically.", Buckets: prometheus.ExponentialBuckets(1, 4, 9)})
	m.queueAge = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mediator_queue_oldest_age_seconds", Help: "Age of the oldest queued reflection per non-empty slot, sampled periodically.", Buckets: prometheus.ExponentialBuckets(1, 4, 12)})
	m.forwards = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mediator_cluster_forwards_total", Help: "Device upgrades for a shard another node owns, by outcome: forwarded, unavailable (503), dial_failed, loop_refused; settle_wait counts upgrades that waited for a settling route first; owner_silent and device_silent count forwards ended because that side sent nothing for the idle timeout + 1 s."}, []string{"outcome"})
	m.forwardedBytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mediator_cluster_forwarded_bytes_total", Help: "Bytes copied for forwarded device connections, by direction."}, []string{"direction"})
	m.writesRefused = prometheus.NewCounter(prometheus.CounterOpts{Name: "mediator_cluster_writes_refused_total", Help: "Group writes refused because the shard was no longer served here at the epoch the group's state was loaded under (moved away or lost); the device was closed with 1001 and redoes them on the new owner."})
	m.fenceRefusals = prometheus.NewCounter(prometheus.CounterOpts{Name: "mediator_cluster_fence_refusals_total", Help: "ReflectAcks withheld because the node could no longer be sure it owns the shard."})
	stages := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "mediator_reflect_stage_seconds",
		Help:    "Where a durable Reflect's ReflectAck latency goes, by stage: submit (frame read until handed to the store), wait (until its commit started), commit (until durable), write (until the ReflectAck was written to the socket), total (frame read until the ReflectAck was written).",
		Buckets: prometheus.ExponentialBuckets(0.00001, 2, 18), // 10 µs … 1.3 s
	}, []string{"stage"})
	m.stageSubmit = stages.WithLabelValues(stageSubmit)
	m.stageWait = stages.WithLabelValues(stageWait)
	m.stageCommit = stages.WithLabelValues(stageCommit)
	m.stageWrite = stages.WithLabelValues(stageWrite)
	m.stageTotal = stages.WithLabelValues(stageTotal)
	f(stages)
	for _, c := range []prometheus.Collector{m.connections, m.handshakes, m.closes, m.timeouts, m.forwards, m.forwardedBytes, m.fenceRefusals, m.writesRefused, m.reflects, m.reflectedSent, m.reflectedAcked,
		m.framesIn, m.framesOut, m.commitBatch, m.commitLatency, m.commitErrors, m.lockHold, m.upstreams, m.upstreamBytes,
		m.ephemeralDrops, m.slowConsumers, m.queueLimitDrops, m.leaderPromotions, m.queueDepth, m.queueAge,
		collectors.NewGoCollector(collectors.WithGoCollectorRuntimeMetrics(
			// Goroutines started (a writer goroutine per send round that
			// finds none running) and how long runnable goroutines waited
			// for a CPU: the scheduling part of the ReflectAck stages.
			collectors.GoRuntimeMetricsRule{Matcher: regexp.MustCompile(`^/sched/(goroutines-created|latencies):`)},
		)), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{})} {
		f(c)
	}
	// Touch label values so the series exist from the start.
	m.connections.WithLabelValues("handshake")
	m.connections.WithLabelValues("authenticated")
	m.reflects.WithLabelValues("durable")
	m.reflects.WithLabelValues("ephemeral")
	m.handshakes.WithLabelValues("ok")
	m.timeouts.WithLabelValues("handshake")
	m.timeouts.WithLabelValues("idle")
	m.upstreamBytes.WithLabelValues("to_device")
	m.upstreamBytes.WithLabelValues("to_chat_server")
	m.upstreams.WithLabelValues("opened")
	m.upstreams.WithLabelValues("dial_failed")
	m.ephemeralDrops.WithLabelValues("offline")
	m.ephemeralDrops.WithLabelValues("backlog")
	return m
}

func (m *metrics) registerServerGauges(s *Server) {
	busy, _ := s.store.(interface{ CommitterBusy() time.Duration })
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "mediator_committer_busy_seconds_total", Help: "Time the store's committer spent committing and completing writes (not waiting for work); its rate is the committer's busy fraction. 0 for a store that does not measure it."}, func() float64 {
		if busy == nil {
			return 0
		}
		return busy.CommitterBusy().Seconds()
	}))
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "mediator_groups_loaded", Help: "Device groups with in-memory state."}, func() float64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		return float64(len(s.groups))
	}))
}

func (m *metrics) observeCommit(batch int, took time.Duration, err error) {
	m.commitBatch.Observe(float64(batch))
	m.commitLatency.Observe(took.Seconds())
	if err != nil {
		m.commitErrors.Inc()
	}
}
