package integration

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"d2m-mediator/integration/internal/lazyfs"
)

// TestPowerCut is the crash loop with power cuts instead of SIGKILLs: a
// SIGKILL leaves the page cache, so only a power cut shows a missing
// fsync. The server's data directory is a lazyfs mount (FUSE, in this
// test process) over a backing directory, the "disk": written data stays
// in memory until its file is fsynced. Each cut, at a random moment under
// reflect load:
//  1. freezes the server (SIGSTOP, then waits until every thread is
//     stopped), so it does nothing after the cut;
//  2. cuts power: every unsynced byte is discarded and the mount refuses
//     all further operations;
//  3. kills the server (SIGKILL) and unmounts;
//  4. runs `mediator db check` on the disk as the cut left it;
//  5. mounts the disk again (a fresh mount reads only synced data).
//
// Then the server restarts on the new mount and runCrashLoop's assertions
// apply: every acked reflection is delivered, in order, ids never go
// backwards, slots are intact, and the final `db check` passes.
// POWERCUT_ITERATIONS cuts (5 by default, 2 with -short; `make crashtest`
// runs 50). It needs FUSE: it skips where /dev/fuse or the privilege to
// mount is missing (and fails under CI, where .ci/run provides them).
func TestPowerCut(t *testing.T) {
	iterations := envIterations("POWERCUT_ITERATIONS", 5, 2)
	disk, mnt := t.TempDir(), t.TempDir()
	fs := lazyfs.MountT(t, disk, mnt)
	s := startServerAt(t, mnt)
	// Runs before the first mount's cleanup: the server must be gone
	// before the mount it uses, whichever that is by then.
	t.Cleanup(func() {
		s.kill()
		if err := fs.Unmount(); err != nil {
			t.Error(err)
		}
	})
	discarded := 0
	runCrashLoop(t, s, iterations, "power cuts", func() {
		s.freeze()
		n := fs.Cut()
		s.kill()
		discarded += n
		t.Logf("power cut: %d unsynced blocks discarded", n)
		if err := fs.Unmount(); err != nil {
			t.Fatal(err)
		}
		dbCheck(t, disk)
		var err error
		if fs, err = lazyfs.Mount(disk, mnt); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("the power cuts discarded %d unsynced 4 KiB blocks", discarded)
	if _, err := os.Stat(filepath.Join(disk, "mediator.db")); err != nil {
		t.Errorf("the database is not on the disk: %v", err)
	}
}

// freeze stops the server with SIGSTOP and waits until every thread of it
// is stopped: from then on it issues no system call. (A thread inside a
// FUSE request stops once the request is answered.)
func (s *server) freeze() {
	s.t.Helper()
	pid := s.cmd.Process.Pid
	if err := s.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		s.t.Fatalf("SIGSTOP: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !allThreadsStopped(pid) {
		if time.Now().After(deadline) {
			s.t.Fatalf("server %d not stopped 10 s after SIGSTOP", pid)
		}
		time.Sleep(time.Millisecond)
	}
}

// allThreadsStopped reports whether every thread of process pid is
// stopped (or gone), from /proc/PID/task/*/stat.
func allThreadsStopped(pid int) bool {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return true
	}
	for _, task := range tasks {
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
		if err != nil {
			continue // the thread ended
		}
		// "tid (comm) S …": the state follows the last ')'.
		i := bytes.LastIndexByte(stat, ')')
		if i < 0 || i+2 >= len(stat) {
			return false
		}
		switch stat[i+2] {
		case 'T', 't', 'Z', 'X':
		default:
			return false
		}
	}
	return true
}
