package reflection

import (
	"bufio"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const helperEnv = "REFLECTION_CRASH_HELPER_DB"

// TestHelperProcess is the child of TestSIGKILLDurability, not a test: it
// appends (and acks) in a loop and prints each result only after its done
// fired with nil, i.e. after the commit was durable. The parent kills it
// with SIGKILL at a random moment.
func TestHelperProcess(t *testing.T) {
	path := os.Getenv(helperEnv)
	if path == "" {
		t.Skip("helper process for TestSIGKILLDurability")
	}
	db, err := Open(path, Options{})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(2)
	}
	g := gid(50)
	putSlots(t, db, g, 1, 2, 3)
	fmt.Println("ready")
	// Each line goes out in one write(2) of < PIPE_BUF bytes, so a kill
	// cannot tear it; the parent ignores a final line without newline.
	say := func(format string, a ...any) { _, _ = io.WriteString(os.Stdout, fmt.Sprintf(format, a...)) }
	for w := range 8 {
		go func() {
			for i := 0; ; i++ {
				env := []byte(fmt.Sprintf("w%d-%d", w, i))
				res, err := SyncAppend(func(done func(AppendResult, error)) {
					db.Append(AppendRequest{Group: g, Sender: 1, Envelope: env}, func(res AppendResult, err error) {
						if err == nil {
							say("append %d %d %s\n", res.Delivered[0].Seq, res.Delivered[1].Seq, env)
						}
						done(res, err)
					})
				})
				if err != nil {
					say("error %v\n", err)
					os.Exit(3)
				}
				if seq := res.Delivered[1].Seq; seq%2 == 0 { // slot 3 acks every other entry
					say("acking %d\n", seq)
					db.Ack(g, 3, seq, func(err error) {
						if err == nil {
							say("ack %d\n", seq)
						}
					})
				}
			}
		}()
	}
	select {}
}

func TestSIGKILLDurability(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns a child process")
	}
	path := dbPath(t)
	for round := range 3 {
		appended, acked, acking := runAndKill(t, path, 50+rand.IntN(2000))
		if len(appended) == 0 {
			t.Fatalf("round %d: child printed nothing", round)
		}
		if err := Check(path); err != nil {
			t.Fatalf("round %d: Check after SIGKILL: %v", round, err)
		}
		db, err := Open(path, Options{})
		if err != nil {
			t.Fatal(err)
		}
		g := gid(50)
		q2 := map[uint64]string{}
		for _, e := range readAll(t, db, g, 2) {
			q2[e.Seq] = string(e.Envelope)
		}
		q3 := map[uint64]string{}
		for _, e := range readAll(t, db, g, 3) {
			q3[e.Seq] = string(e.Envelope)
		}
		for _, a := range appended {
			if q2[a.seq2] != a.env {
				t.Fatalf("round %d: acknowledged append %q (slot 2 seq %d) lost: found %q", round, a.env, a.seq2, q2[a.seq2])
			}
			// Slot 3 acks even seqs; an ack may be durable without its line
			// having been printed, so only odd seqs must still be there.
			if a.seq3%2 == 1 && q3[a.seq3] != a.env {
				t.Fatalf("round %d: acknowledged append %q (slot 3 seq %d) lost", round, a.env, a.seq3)
			}
		}
		for seq := range acked {
			if _, ok := q3[seq]; ok {
				t.Fatalf("round %d: acked entry %d still in slot 3's queue", round, seq)
			}
		}
		// Acks are written lazily: the ones not yet flushed are delivered
		// again, at most one flush window (AckFlushAcks) plus the flush
		// being committed at the kill.
		redelivered := 0
		for seq := range acking {
			if _, ok := q3[seq]; ok {
				redelivered++
			}
		}
		if redelivered > 2*DefaultAckFlushAcks {
			t.Fatalf("round %d: %d acked entries re-delivered, bound %d", round, redelivered, 2*DefaultAckFlushAcks)
		}
		t.Logf("round %d: %d of %d submitted acks lost by the kill (re-delivered), %d confirmed durable",
			round, redelivered, len(acking), len(acked))
		// The rebuilt index matches the queue contents.
		st2, _ := db.QueueStats(g, 2)
		st3, _ := db.QueueStats(g, 3)
		if st2.Length != len(q2) || st3.Length != len(q3) {
			t.Fatalf("round %d: index %d/%d, queues hold %d/%d", round, st2.Length, st3.Length, len(q2), len(q3))
		}
		t.Logf("round %d: %d appends and %d acks confirmed before SIGKILL; slot 2 holds %d entries after restart",
			round, len(appended), len(acked), len(q2))
		if err := db.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

type confirmedAppend struct {
	seq2, seq3 uint64
	env        string
}

// runAndKill starts the helper on path, SIGKILLs it once it has confirmed
// killAfter appends, and returns everything it confirmed.
func runAndKill(t *testing.T, path string, killAfter int) ([]confirmedAppend, map[uint64]bool, map[uint64]bool) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+path)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var appended []confirmedAppend
	acked, acking := map[uint64]bool{}, map[uint64]bool{}
	r := bufio.NewReader(out)
	killed := false
	timeout := time.AfterFunc(60*time.Second, func() { _ = cmd.Process.Kill() })
	defer timeout.Stop()
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			break // EOF after the kill; a torn final fragment has no '\n' and is ignored
		}
		f := strings.Fields(line)
		switch {
		case len(f) == 4 && f[0] == "append":
			s2, _ := strconv.ParseUint(f[1], 10, 64)
			s3, _ := strconv.ParseUint(f[2], 10, 64)
			appended = append(appended, confirmedAppend{s2, s3, f[3]})
		case len(f) == 2 && f[0] == "ack":
			s, _ := strconv.ParseUint(f[1], 10, 64)
			acked[s] = true
		case len(f) == 2 && f[0] == "acking":
			s, _ := strconv.ParseUint(f[1], 10, 64)
			acking[s] = true
		case len(f) == 1 && f[0] == "ready":
		default:
			t.Fatalf("child: %q", line)
		}
		if !killed && len(appended) >= killAfter {
			if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			killed = true
		}
	}
	_ = cmd.Wait()
	if !killed {
		t.Fatalf("child exited before the kill: %v", cmd.ProcessState)
	}
	return appended, acked, acking
}
