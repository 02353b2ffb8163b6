package main

import (
	"errors"
	"flag"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"
)

// mixedOptions are the flags of the mixed (production-shape) scenario.
type mixedOptions struct {
	groupMixFlag    string
	groupMix        []float64 // weight of group size i+1
	ramp            float64   // device setups per second, all shards together
	echoInterval    time.Duration
	echoJitter      time.Duration
	reflectInterval time.Duration
	reflectSizeFlag string
	reflectMin      int
	reflectMax      int
	txInterval      time.Duration
	reportInterval  time.Duration
	slo             time.Duration
	serverGroupFlag string
	serverGroups    []string
	chatPIDFlag     string
	chatPIDs        []int
	shardFlag       string
	shard, shards   int
	runID           string
	startAt         int64 // unix seconds; 0 = when the ramp is done
	drain           time.Duration
}

// maxGroupSize is the largest group --group-mix may ask for: the server's
// default device slots per group (mediator.DefaultMaxDeviceSlots).
const maxGroupSize = 5

func (m *mixedOptions) register(fs *flag.FlagSet) {
	fs.StringVar(&m.groupMixFlag, "group-mix", "1:0.2,2:0.5,3:0.3", "mixed: group `sizes` and their shares, size:weight,… (sizes 1–5)")
	fs.Float64Var(&m.ramp, "ramp", 1000, "mixed: device setups (connect, authenticate, CSP login) per second, all shards together: a `rate` that spreads the start so admission control is not hit with a handshake storm")
	fs.DurationVar(&m.echoInterval, "echo-interval", 10*time.Second, "mixed: CSP echo-request every this long per device plus a random 0..--echo-jitter (Desktop 10 s, Android/iOS 15 s); 0 = no echoes (then only reflects and transactions keep a device within the server's idle timeout, 90 s)")
	fs.DurationVar(&m.echoJitter, "echo-jitter", 5*time.Second, "mixed: random extra gap between echoes, uniform")
	fs.DurationVar(&m.reflectInterval, "reflect-interval", time.Minute, "mixed: mean gap between one device's reflects (each gap uniform in 0.5–1.5×); 0 = no reflects")
	fs.StringVar(&m.reflectSizeFlag, "reflect-size", "100-2048", "mixed: envelope `bytes`, min-max, uniform (at least 12: a send timestamp)")
	fs.DurationVar(&m.txInterval, "tx-interval", 5*time.Minute, "mixed: mean gap between one group's transactions (begin, one reflect, commit; first device of the group; gaps uniform in 0.5–1.5×); 0 = none")
	fs.DurationVar(&m.reportInterval, "report-interval", time.Minute, "mixed: report server, tool and latency figures this often")
	fs.DurationVar(&m.slo, "slo", 10*time.Millisecond, "mixed: the p99 bound of ReflectAck and echo round trip for \"devices per core\"")
	fs.StringVar(&m.serverGroupFlag, "server-groups", "7f", "mixed: server `groups` (ClientUrlInfo.server_group, [0-9a-zA-Z]+), comma-separated, given to device groups in turn: the mediator's --chat-server template puts them into the upstream address, e.g. 127.0.2.{group}:5222 with --server-groups 1,2,3,4")
	fs.StringVar(&m.chatPIDFlag, "chat-pid", "", "mixed: `PID`s of the chat server process(es), comma-separated: their CPU and RSS are reported beside the server's (not counted as the mediator's)")
	fs.StringVar(&m.shardFlag, "shard", "0/1", "mixed: run share `i/n` of the groups (groups g with g mod n = i), --ramp/n of the setups; all shards need the same --devices, --group-mix and --run-id")
	fs.StringVar(&m.runID, "run-id", "", "mixed: names this run's identities (default random); shards of one run share it")
	fs.Int64Var(&m.startAt, "start-at", 0, "mixed: start the measured phase at this unix `time` (seconds) if the ramp is done by then, so shards' report intervals line up; 0 = right after the ramp")
	fs.DurationVar(&m.drain, "drain", 10*time.Second, "mixed: after the measured phase, wait up to this long for outstanding answers")
}

// check parses and validates the mixed flags.
func (m *mixedOptions) check(o *options) error {
	var err error
	if m.groupMix, err = parseGroupMix(m.groupMixFlag); err != nil {
		return fmt.Errorf("--group-mix: %w", err)
	}
	if m.reflectMin, m.reflectMax, err = parseRange(m.reflectSizeFlag); err != nil {
		return fmt.Errorf("--reflect-size: %w", err)
	}
	if m.reflectMin < 12 || m.reflectMax > 64*1024 {
		return errors.New("--reflect-size must be within 12..65536")
	}
	for _, g := range strings.Split(m.serverGroupFlag, ",") {
		if !validServerGroup(g) {
			return fmt.Errorf("--server-groups: %q is not a server group ([0-9a-zA-Z]+, at most 64)", g)
		}
		m.serverGroups = append(m.serverGroups, g)
	}
	if m.chatPIDFlag != "" {
		for _, s := range strings.Split(m.chatPIDFlag, ",") {
			pid, err := strconv.Atoi(strings.TrimSpace(s))
			if err != nil || pid <= 0 {
				return fmt.Errorf("--chat-pid: %q is not a PID", s)
			}
			m.chatPIDs = append(m.chatPIDs, pid)
		}
	}
	i, n, ok := strings.Cut(m.shardFlag, "/")
	m.shard, err = strconv.Atoi(i)
	if err == nil {
		m.shards, err = strconv.Atoi(n)
	}
	if !ok || err != nil || m.shards < 1 || m.shard < 0 || m.shard >= m.shards {
		return fmt.Errorf("--shard %q: want i/n with 0 ≤ i < n", m.shardFlag)
	}
	if m.runID == "" {
		m.runID = fmt.Sprintf("%08x", rand.Uint32())
	}
	switch {
	case m.ramp <= 0:
		return errors.New("--ramp must be positive")
	case m.echoInterval < 0 || m.echoJitter < 0 || m.reflectInterval < 0 || m.txInterval < 0:
		return errors.New("--echo-interval, --echo-jitter, --reflect-interval and --tx-interval must not be negative")
	case m.echoInterval > 0 && m.echoInterval < 10*time.Millisecond,
		m.reflectInterval > 0 && m.reflectInterval < 10*time.Millisecond,
		m.txInterval > 0 && m.txInterval < 10*time.Millisecond:
		return errors.New("--echo-interval, --reflect-interval and --tx-interval must be at least 10ms (or 0)")
	case m.reportInterval < 100*time.Millisecond:
		return errors.New("--report-interval must be at least 100ms")
	case m.slo <= 0:
		return errors.New("--slo must be positive")
	case m.drain < 0 || m.drain > time.Minute:
		return errors.New("--drain must be within 0..1m")
	case m.shareOf(o.devices) == 0:
		return fmt.Errorf("shard %s of %d devices has no group", m.shardFlag, o.devices)
	}
	return nil
}

// validServerGroup mirrors the server's check of ClientUrlInfo.server_group.
func validServerGroup(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for _, c := range []byte(s) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
			return false
		}
	}
	return true
}

// parseGroupMix parses "1:0.2,2:0.5,3:0.3" into weights by size.
func parseGroupMix(s string) ([]float64, error) {
	w := make([]float64, maxGroupSize)
	total := 0.0
	for _, part := range strings.Split(s, ",") {
		ks, vs, ok := strings.Cut(strings.TrimSpace(part), ":")
		size, err1 := strconv.Atoi(ks)
		v, err2 := strconv.ParseFloat(vs, 64)
		if !ok || err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%q: want size:weight", part)
		}
		if size < 1 || size > maxGroupSize {
			return nil, fmt.Errorf("group size %d: want 1..%d (the server's default device slots)", size, maxGroupSize)
		}
		if v < 0 {
			return nil, fmt.Errorf("weight %v is negative", v)
		}
		w[size-1] += v
		total += v
	}
	if total <= 0 {
		return nil, errors.New("the weights sum to 0")
	}
	for i := range w {
		w[i] /= total
	}
	return w, nil
}

// parseRange parses "min-max" (or a single number).
func parseRange(s string) (int, int, error) {
	a, b, ok := strings.Cut(s, "-")
	if !ok {
		b = a
	}
	lo, err1 := strconv.Atoi(strings.TrimSpace(a))
	hi, err2 := strconv.Atoi(strings.TrimSpace(b))
	if err1 != nil || err2 != nil || lo > hi {
		return 0, 0, fmt.Errorf("%q: want min-max", s)
	}
	return lo, hi, nil
}

// planGroups cuts n devices into groups whose sizes follow mix. The plan
// depends only on n and mix (a fixed seed), so every shard of a run sees
// the same groups; the last group may be cut short.
func planGroups(n int, mix []float64) []int {
	rng := rand.New(rand.NewPCG(21, 1))
	var sizes []int
	for total := 0; total < n; {
		x, size := rng.Float64(), len(mix)
		for i, acc := 0, 0.0; i < len(mix); i++ {
			if acc += mix[i]; x < acc && mix[i] > 0 {
				size = i + 1
				break
			}
		}
		for mix[size-1] == 0 { // float rounding at the top end
			size--
		}
		size = min(size, n-total)
		sizes = append(sizes, size)
		total += size
	}
	return sizes
}

// shareOf returns how many of n devices this shard runs.
func (m *mixedOptions) shareOf(n int) int {
	if m.groupMix == nil {
		return n // before check; an upper bound for the descriptor check
	}
	share := 0
	for g, size := range planGroups(n, m.groupMix) {
		if g%m.shards == m.shard {
			share += size
		}
	}
	return share
}

// identityPrefix is two letters from the run id: identities are
// prefix + the group index in six digits, the same in every shard.
func (m *mixedOptions) identityPrefix() string {
	h := fnv.New32a()
	h.Write([]byte(m.runID))
	v := h.Sum32()
	return string([]byte{byte('A' + v%26), byte('A' + v/26%26)})
}

// timeLimit is the watchdog for a mixed run: the ramp at a third of its
// target rate, the wait for --start-at, the measured phase, the drain and
// the teardown.
func (m *mixedOptions) timeLimit(o *options) time.Duration {
	ramp := time.Duration(float64(o.devices) / m.ramp * 3 * float64(time.Second))
	limit := max(ramp+time.Minute, setupTimeout) + o.duration + m.drain + teardownGrace
	if m.startAt > 0 {
		limit += max(0, time.Until(time.Unix(m.startAt, 0)))
	}
	return limit
}
