package lazyfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// rig is a backing directory, its mount point and the current mount.
type rig struct {
	t                *testing.T
	backing, mntPath string
	fs               *FS
}

func newRig(t *testing.T) *rig {
	r := &rig{t: t, backing: t.TempDir(), mntPath: t.TempDir()}
	r.fs = MountT(t, r.backing, r.mntPath)
	return r
}

// cutAndRemount cuts power, closes the files the test had open (as the
// end of a process would), unmounts and mounts the backing directory
// again.
func (r *rig) cutAndRemount(open ...*os.File) {
	r.t.Helper()
	r.fs.Cut()
	for _, f := range open {
		f.Close() // EIO: nothing is flushed
	}
	if err := r.fs.Unmount(); err != nil {
		r.t.Fatal(err)
	}
	r.fs = MountT(r.t, r.backing, r.mntPath)
}

// expectContent checks the file through the mount: size, read(2) and,
// with mmap, a shared read-only mapping (how bbolt reads).
func (r *rig) expectContent(name string, want []byte, mmap bool) {
	r.t.Helper()
	p := filepath.Join(r.mntPath, name)
	got, err := os.ReadFile(p)
	if err != nil {
		r.t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		r.t.Fatalf("%s: read %d bytes %s, want %d bytes %s", name, len(got), summary(got), len(want), summary(want))
	}
	fi, err := os.Stat(p)
	if err != nil {
		r.t.Fatal(err)
	}
	if fi.Size() != int64(len(want)) {
		r.t.Fatalf("%s: stat size %d, want %d", name, fi.Size(), len(want))
	}
	if !mmap || len(want) == 0 {
		return
	}
	// The mmap is read in a child process: a page fault on the mount
	// cannot be served by the process that takes it (the fault blocks
	// the Go runtime's stop-the-world, which stops the FUSE server).
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), mmapHelperEnv+"="+p)
	cmd.Stderr = os.Stderr
	m, err := cmd.Output()
	if err != nil {
		r.t.Fatalf("mmap reader: %v", err)
	}
	if !bytes.Equal(m, want) {
		r.t.Fatalf("%s: mmap shows %s, want %s", name, summary(m), summary(want))
	}
}

// mmapHelperEnv makes the test binary print the file it names as a shared
// read-only mapping shows it (how bbolt reads), and exit.
const mmapHelperEnv = "LAZYFS_TEST_MMAP_READ"

func TestMain(m *testing.M) {
	if p := os.Getenv(mmapHelperEnv); p != "" {
		if err := printMapped(p); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func printMapped(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	m, err := syscall.Mmap(int(f.Fd()), 0, int(fi.Size()), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap: %w", err)
	}
	defer syscall.Munmap(m)
	_, err = os.Stdout.Write(m)
	return err
}

// summary shows runs of equal bytes: "4106×'a' 4×'b' …".
func summary(b []byte) string {
	var out []string
	for i := 0; i < len(b) && len(out) < 20; {
		j := i
		for j < len(b) && b[j] == b[i] {
			j++
		}
		out = append(out, fmt.Sprintf("%d×%q", j-i, b[i]))
		i = j
	}
	return "[" + strings.Join(out, " ") + "]"
}

func fill(c byte, n int) []byte { return bytes.Repeat([]byte{c}, n) }

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// TestPowerCutLosesUnsyncedKeepsSynced is the filesystem's own contract,
// for the ways bbolt changes its file: a pwrite into existing data, a
// write past the end, an ftruncate that grows the file (then a write into
// the new space), a shrink and regrow, and a new file. Each change is
// visible through read(2), stat and mmap while mounted; after a power cut
// it is gone unless the file was fsynced (or fdatasynced) first, and then
// it is all there.
func TestPowerCutLosesUnsyncedKeepsSynced(t *testing.T) {
	base := fill('a', 2*blockSize)
	cases := []struct {
		name   string
		change func(fd int) error
		want   []byte // content after the change
	}{
		{"pwrite into existing data", func(fd int) error {
			_, err := syscall.Pwrite(fd, []byte("bbbb"), blockSize+10)
			return err
		}, cat(fill('a', blockSize+10), []byte("bbbb"), fill('a', blockSize-14))},
		{"write past the end", func(fd int) error {
			_, err := syscall.Pwrite(fd, []byte("xyz"), 3*blockSize+100)
			return err
		}, cat(base, fill(0, blockSize+100), []byte("xyz"))},
		{"ftruncate to grow, then pwrite", func(fd int) error {
			if err := syscall.Ftruncate(fd, 4*blockSize); err != nil {
				return err
			}
			_, err := syscall.Pwrite(fd, fill('c', blockSize), 3*blockSize)
			return err
		}, cat(base, fill(0, blockSize), fill('c', blockSize))},
		{"shrink, then grow", func(fd int) error {
			if err := syscall.Ftruncate(fd, 100); err != nil {
				return err
			}
			return syscall.Ftruncate(fd, 3*blockSize)
		}, cat(fill('a', 100), fill(0, 3*blockSize-100))},
	}
	for _, c := range cases {
		for _, sync := range []string{"none", "fsync", "fdatasync"} {
			t.Run(c.name+"/"+sync, func(t *testing.T) {
				r := newRig(t)
				// The starting content is on the disk.
				if err := os.WriteFile(filepath.Join(r.backing, "db"), base, 0o600); err != nil {
					t.Fatal(err)
				}
				f, err := os.OpenFile(filepath.Join(r.mntPath, "db"), os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				if err := c.change(int(f.Fd())); err != nil {
					t.Fatal(err)
				}
				r.expectContent("db", c.want, sync == "none") // unsynced data, mapped
				switch sync {
				case "fsync":
					err = syscall.Fsync(int(f.Fd()))
				case "fdatasync":
					err = syscall.Fdatasync(int(f.Fd()))
				}
				if err != nil {
					t.Fatal(err)
				}
				r.cutAndRemount(f)
				if sync == "none" {
					r.expectContent("db", base, false)
				} else {
					r.expectContent("db", c.want, false)
				}
			})
		}
	}
}

// TestPowerCutNewFile: a created file survives a cut (namespace changes
// are durable at once) but its unsynced data does not.
func TestPowerCutNewFile(t *testing.T) {
	r := newRig(t)
	for _, name := range []string{"synced", "unsynced"} {
		f, err := os.Create(filepath.Join(r.mntPath, name))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Write(fill('n', 3*blockSize+1)); err != nil {
			t.Fatal(err)
		}
		if name == "synced" {
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
	}
	r.expectContent("unsynced", fill('n', 3*blockSize+1), true) // after close, before the cut
	r.cutAndRemount()
	r.expectContent("synced", fill('n', 3*blockSize+1), false)
	r.expectContent("unsynced", nil, false)
}

// TestPowerCutNothingAfter: after the cut every operation fails and
// nothing more reaches the disk, not even an fsync.
func TestPowerCutNothingAfter(t *testing.T) {
	r := newRig(t)
	if err := os.WriteFile(filepath.Join(r.backing, "db"), fill('a', blockSize), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(r.mntPath, "db"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(fill('b', 10), 0); err != nil {
		t.Fatal(err)
	}
	r.fs.Cut()
	if _, err := f.WriteAt(fill('c', 10), 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("write after the cut: %v, want EIO", err)
	}
	if err := f.Sync(); !errors.Is(err, syscall.EIO) {
		t.Errorf("fsync after the cut: %v, want EIO", err)
	}
	if err := os.WriteFile(filepath.Join(r.mntPath, "new"), nil, 0o600); !errors.Is(err, syscall.EIO) {
		t.Errorf("create after the cut: %v, want EIO", err)
	}
	f.Close()
	if err := r.fs.Unmount(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(r.backing, "db"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, fill('a', blockSize)) {
		t.Errorf("disk after the cut: %s", summary(got))
	}
	if _, err := os.Stat(filepath.Join(r.backing, "new")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("file created after the cut: %v", err)
	}
}
