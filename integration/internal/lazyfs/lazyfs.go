// Package lazyfs is a FUSE filesystem for power-cut tests (after LazyFS):
// a passthrough to a backing directory that keeps every file's written
// data in memory until that file is fsynced, and on Cut throws away
// everything not yet synced, as a power failure does to the page cache
// and a disk's volatile write cache.
//
// What it owns: the unsynced state of every file below the mount point
// (data and size), and the promise that after Cut nothing more reaches
// the backing directory.
//
// The model, enough for bbolt (open, pwrite, fdatasync, mmap reads,
// flock, ftruncate or writes past the end to grow):
//   - a write goes to an in-memory overlay of the file (4 KiB blocks);
//     reads, including the kernel's reads behind mmap page faults, see the
//     overlay over the backing file;
//   - truncate (ftruncate, O_TRUNC) changes only the in-memory size;
//   - fsync or fdatasync of a file writes its overlay and size to the
//     backing file and fsyncs that; close does not;
//   - namespace changes (create, link, rename, unlink, mkdir, mode and
//     times) go to the backing directory at once, as a journaling
//     filesystem commits them soon; fsync of a directory is accepted;
//   - Cut discards every overlay; from then on every operation fails with
//     EIO and nothing is written to the backing directory again.
//
// The kernel's page cache for the mount cannot hide a cut: file data is
// written through to this process (no writeback cache), and after a cut
// the mount goes away with its cache; a new mount of the same backing
// directory reads only what was synced.
package lazyfs

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// blockSize is the overlay's unit; bbolt writes whole 4 KiB pages.
const blockSize = 4096

// ErrUnavailable wraps mount failures that mean FUSE cannot be used here
// (no /dev/fuse, no privilege to mount, no fusermount), as opposed to a bug.
var ErrUnavailable = errors.New("lazyfs: FUSE unavailable")

// FS is one mount of a backing directory.
type FS struct {
	backing    string
	mountPoint string
	server     *fuse.Server
	unmounted  bool // Unmount has succeeded (one caller at a time)

	// gate is held shared by every operation that changes the backing
	// directory (an fsync's writes, creates, renames, …) for its whole
	// duration, and exclusively by Cut: an fsync that began before the
	// cut completes (as one that reached the disk before power failed),
	// and none starts after it.
	gate sync.RWMutex
	cut  atomic.Bool

	mu    sync.Mutex           // guards files
	files map[uint64]*fileData // by backing inode number: survives the kernel forgetting a node
}

// Mount mounts a lazy view of backing on mountPoint (both directories
// must exist; backing must be on one filesystem). As root it mounts
// with mount(2) directly, otherwise through fusermount.
func Mount(backing, mountPoint string) (*FS, error) {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	backing, err := filepath.Abs(backing)
	if err != nil {
		return nil, err
	}
	lfs := &FS{backing: backing, mountPoint: mountPoint, files: map[uint64]*fileData{}}
	loopback, err := fs.NewLoopbackRoot(backing)
	if err != nil {
		return nil, err
	}
	rootNode := &node{LoopbackNode: loopback.(*fs.LoopbackNode), lfs: lfs}
	server, err := fs.Mount(mountPoint, rootNode, &fs.Options{
		MountOptions: fuse.MountOptions{
			FsName:        "lazyfs:" + backing,
			Name:          "lazyfs",
			DirectMount:   os.Geteuid() == 0,
			DisableXAttrs: true,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("%w: mount %s: %v", ErrUnavailable, mountPoint, err)
	}
	lfs.server = server
	return lfs, nil
}

// Cut simulates a power failure: every byte not fsynced is gone, and from
// now on every operation on the mount fails with EIO without touching the
// backing directory. It waits for fsyncs in progress to finish. It
// returns how many unsynced blocks (4 KiB) it discarded.
func (f *FS) Cut() (discarded int) {
	f.gate.Lock()
	f.cut.Store(true)
	f.gate.Unlock()
	f.mu.Lock()
	files := f.files
	f.files = nil
	f.mu.Unlock()
	for _, d := range files {
		d.mu.Lock()
		discarded += len(d.blocks)
		d.blocks = nil
		d.mu.Unlock()
	}
	return discarded
}

// Unmount unmounts the filesystem and waits for its server to end. If a
// process still holds a file open there it detaches the mount, waits up
// to 10 s for the files to close and otherwise fails. Unmounting without Cut keeps
// unsynced data nowhere: it is lost too, as after a cut.
func (f *FS) Unmount() error {
	if f.unmounted {
		return nil
	}
	f.cut.Store(true)
	if err := f.server.Unmount(); err != nil {
		if err2 := syscall.Unmount(f.mountPoint, syscall.MNT_DETACH); err2 != nil {
			return fmt.Errorf("lazyfs: unmount %s: %v; lazy unmount: %v", f.mountPoint, err, err2)
		}
		done := make(chan struct{})
		go func() { f.server.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			return fmt.Errorf("lazyfs: %s detached but still busy: a process holds a file open there", f.mountPoint)
		}
	}
	f.unmounted = true
	return nil
}

// beginWrite admits an operation that changes the backing directory;
// the caller must call f.gate.RUnlock when it is done.
func (f *FS) beginWrite() syscall.Errno {
	f.gate.RLock()
	if f.cut.Load() {
		f.gate.RUnlock()
		return syscall.EIO
	}
	return 0
}

// data returns the unsynced state of the backing file with inode ino and
// current size size, creating it if it has none.
func (f *FS) data(ino uint64, size int64) (*fileData, syscall.Errno) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.files == nil {
		return nil, syscall.EIO
	}
	d := f.files[ino]
	if d == nil {
		d = &fileData{lfs: f, size: size, floor: size}
		f.files[ino] = d
	}
	return d, 0
}

// lookupData returns the unsynced state of ino, or nil if it has none.
func (f *FS) lookupData(ino uint64) *fileData {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.files[ino]
}

// forget detaches the state of the backing file at path when its last
// name goes away (unlink, or rename over it): open handles keep the
// orphan, and a new file that gets the inode number starts clean.
func (f *FS) forget(path string) {
	var st syscall.Stat_t
	if err := syscall.Lstat(path, &st); err != nil || st.Nlink > 1 {
		return
	}
	f.mu.Lock()
	delete(f.files, st.Ino)
	f.mu.Unlock()
}

// fileData is one file's contents as the mount sees them: blocks written
// since the last fsync over the backing file's bytes.
type fileData struct {
	lfs *FS

	mu   sync.Mutex
	size int64 // logical size
	// floor is the lowest size since the last fsync: backing bytes at or
	// past it were truncated away (or never existed) and read as zeros
	// unless a block covers them.
	floor  int64
	blocks map[int64][]byte // block index → blockSize bytes; bytes past size are zero
}

// readAt fills p from offset off through the backing fd; it returns the
// bytes read (short at the end of the file).
func (d *fileData) readAt(fd int, p []byte, off int64) (int, syscall.Errno) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lfs.cut.Load() {
		return 0, syscall.EIO
	}
	if off >= d.size {
		return 0, 0
	}
	p = p[:min(int64(len(p)), d.size-off)]
	for done := 0; done < len(p); {
		pos := off + int64(done)
		b, in := pos/blockSize, int(pos%blockSize)
		n := min(blockSize-in, len(p)-done)
		if blk, ok := d.blocks[b]; ok {
			copy(p[done:done+n], blk[in:in+n])
		} else if err := d.readBacking(fd, p[done:done+n], pos); err != 0 {
			return 0, err
		}
		done += n
	}
	return len(p), 0
}

// readBacking fills p with the backing file's bytes at off, zeros at and
// past floor.
func (d *fileData) readBacking(fd int, p []byte, off int64) syscall.Errno {
	clear(p)
	if off >= d.floor {
		return 0
	}
	want := p[:min(int64(len(p)), d.floor-off)]
	for len(want) > 0 {
		n, err := syscall.Pread(fd, want, off)
		if err != nil {
			return fs.ToErrno(err)
		}
		if n == 0 {
			break
		}
		want, off = want[n:], off+int64(n)
	}
	return 0
}

// block returns block b for writing, filled with the file's current bytes.
func (d *fileData) block(fd int, b int64) ([]byte, syscall.Errno) {
	if blk, ok := d.blocks[b]; ok {
		return blk, 0
	}
	blk := make([]byte, blockSize)
	if start := b * blockSize; start < d.size {
		if err := d.readBacking(fd, blk[:min(blockSize, d.size-start)], start); err != 0 {
			return nil, err
		}
	}
	if d.blocks == nil {
		d.blocks = map[int64][]byte{}
	}
	d.blocks[b] = blk
	return blk, 0
}

func (d *fileData) writeAt(fd int, p []byte, off int64) (int, syscall.Errno) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lfs.cut.Load() {
		return 0, syscall.EIO
	}
	for done := 0; done < len(p); {
		pos := off + int64(done)
		b, in := pos/blockSize, int(pos%blockSize)
		blk, err := d.block(fd, b)
		if err != 0 {
			return done, err
		}
		done += copy(blk[in:], p[done:])
	}
	d.size = max(d.size, off+int64(len(p)))
	return len(p), 0
}

func (d *fileData) truncate(fd int, size int64) syscall.Errno {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lfs.cut.Load() {
		return syscall.EIO
	}
	if size < d.size {
		for b := range d.blocks {
			if b*blockSize >= size {
				delete(d.blocks, b)
			}
		}
		if in := size % blockSize; in != 0 {
			// Bytes past the new size must read as zeros if the file
			// grows again; the boundary block is materialised from the
			// backing file while floor still covers it.
			blk, err := d.block(fd, size/blockSize)
			if err != 0 {
				return err
			}
			clear(blk[in:])
		}
		d.floor = min(d.floor, size)
	}
	d.size = size
	return 0
}

// sync makes the file's bytes and size durable in the backing file
// through fd (opened read-write on it), then forgets the overlay.
func (d *fileData) sync(fd int) syscall.Errno {
	if err := d.lfs.beginWrite(); err != 0 {
		return err
	}
	defer d.lfs.gate.RUnlock()
	// The file's lock is held over the backing I/O so that no write
	// slips between the copy and forgetting the overlay.
	d.mu.Lock()
	defer d.mu.Unlock()
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return fs.ToErrno(err)
	}
	if st.Size > d.floor {
		if err := syscall.Ftruncate(fd, d.floor); err != nil {
			return fs.ToErrno(err)
		}
	}
	for _, b := range slices.Sorted(maps.Keys(d.blocks)) {
		start := b * blockSize
		blk := d.blocks[b][:min(blockSize, max(0, d.size-start))]
		for len(blk) > 0 {
			n, err := syscall.Pwrite(fd, blk, start)
			if err != nil {
				return fs.ToErrno(err)
			}
			blk, start = blk[n:], start+int64(n)
		}
	}
	if err := syscall.Ftruncate(fd, d.size); err != nil {
		return fs.ToErrno(err)
	}
	if err := syscall.Fsync(fd); err != nil {
		return fs.ToErrno(err)
	}
	d.blocks = nil
	d.floor = d.size
	return 0
}

// handle is an open file: a read-write descriptor of the backing file
// (whatever the open flags; the kernel checked the access mode) and the
// file's unsynced state.
type handle struct {
	fd   int
	data *fileData
}

// node is a file or directory of the mount: the loopback node for the
// namespace, with file data and size routed through fileData.
type node struct {
	*fs.LoopbackNode
	lfs *FS
}

// WrapChild makes every node the loopback creates (lookup, create, mkdir,
// …) a lazy one.
func (n *node) WrapChild(ctx context.Context, ops fs.InodeEmbedder) fs.InodeEmbedder {
	return &node{LoopbackNode: ops.(*fs.LoopbackNode), lfs: n.lfs}
}

var (
	_ fs.NodeOpener      = (*node)(nil)
	_ fs.NodeCreater     = (*node)(nil)
	_ fs.NodeReader      = (*node)(nil)
	_ fs.NodeWriter      = (*node)(nil)
	_ fs.NodeFsyncer     = (*node)(nil)
	_ fs.NodeFlusher     = (*node)(nil)
	_ fs.NodeReleaser    = (*node)(nil)
	_ fs.NodeGetattrer   = (*node)(nil)
	_ fs.NodeSetattrer   = (*node)(nil)
	_ fs.NodeLookuper    = (*node)(nil)
	_ fs.NodeAllocater   = (*node)(nil)
	_ fs.NodeWrapChilder = (*node)(nil)
)

func (n *node) path() string {
	return filepath.Join(n.lfs.backing, n.Path(n.Root()))
}

// open opens the backing file at path read-write and attaches its state.
func (n *node) open(path string, flags uint32) (*handle, syscall.Errno) {
	fd, err := syscall.Open(path, syscall.O_RDWR|syscall.O_CLOEXEC|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		syscall.Close(fd)
		return nil, fs.ToErrno(err)
	}
	d, errno := n.lfs.data(st.Ino, st.Size)
	if errno == 0 && flags&syscall.O_TRUNC != 0 {
		errno = d.truncate(fd, 0)
	}
	if errno != 0 {
		syscall.Close(fd)
		return nil, errno
	}
	return &handle{fd: fd, data: d}, 0
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if n.lfs.cut.Load() {
		return nil, 0, syscall.EIO
	}
	h, errno := n.open(n.path(), flags)
	if errno != 0 {
		return nil, 0, errno
	}
	// No FOPEN_KEEP_CACHE, no FOPEN_DIRECT_IO: mmap works, and the page
	// cache is dropped at every open.
	return h, 0, 0
}

func (n *node) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	if err := n.lfs.beginWrite(); err != 0 {
		return nil, nil, 0, err
	}
	defer n.lfs.gate.RUnlock()
	// The loopback creates the backing file (a namespace change, durable
	// at once) and the node; its descriptor is replaced by a lazy handle.
	ch, lf, _, errno := n.LoopbackNode.Create(ctx, name, flags&^(syscall.O_TRUNC|syscall.O_APPEND), mode, out)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	if r, ok := lf.(fs.FileReleaser); ok {
		r.Release(ctx)
	}
	h, errno := n.open(filepath.Join(n.path(), name), flags)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	h.data.mu.Lock()
	out.Size = uint64(h.data.size)
	h.data.mu.Unlock()
	return ch, h, 0, 0
}

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if n.lfs.cut.Load() {
		return nil, syscall.EIO
	}
	ch, errno := n.LoopbackNode.Lookup(ctx, name, out)
	if errno == 0 {
		n.lfs.fixAttr(out.Ino, &out.Attr)
	}
	return ch, errno
}

// fixAttr replaces the backing file's size in a by the logical one.
func (f *FS) fixAttr(ino uint64, a *fuse.Attr) {
	if d := f.lookupData(ino); d != nil {
		d.mu.Lock()
		a.Size = uint64(d.size)
		d.mu.Unlock()
		a.Blocks = (a.Size + 511) / 512
	}
}

func (n *node) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if n.lfs.cut.Load() {
		return syscall.EIO
	}
	if h, ok := f.(*handle); ok {
		var st syscall.Stat_t
		if err := syscall.Fstat(h.fd, &st); err != nil {
			return fs.ToErrno(err)
		}
		out.FromStat(&st)
		h.data.mu.Lock()
		out.Size = uint64(h.data.size)
		h.data.mu.Unlock()
		out.Blocks = (out.Size + 511) / 512
		return 0
	}
	if errno := n.LoopbackNode.Getattr(ctx, nil, out); errno != 0 {
		return errno
	}
	n.lfs.fixAttr(out.Ino, &out.Attr)
	return 0
}

func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if err := n.lfs.beginWrite(); err != 0 {
		return err
	}
	defer n.lfs.gate.RUnlock()
	if size, ok := in.GetSize(); ok {
		h, _ := f.(*handle)
		if h == nil {
			var errno syscall.Errno
			if h, errno = n.open(n.path(), 0); errno != 0 {
				return errno
			}
			defer syscall.Close(h.fd)
		}
		if errno := h.data.truncate(h.fd, int64(size)); errno != 0 {
			return errno
		}
		in.Valid &^= fuse.FATTR_SIZE
	}
	if errno := n.LoopbackNode.Setattr(ctx, nil, in, out); errno != 0 {
		return errno
	}
	n.lfs.fixAttr(out.Ino, &out.Attr)
	return 0
}

func (n *node) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h, ok := f.(*handle)
	if !ok {
		return nil, syscall.EBADF
	}
	nr, errno := h.data.readAt(h.fd, dest, off)
	if errno != 0 {
		return nil, errno
	}
	return fuse.ReadResultData(dest[:nr]), 0
}

func (n *node) Write(ctx context.Context, f fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	h, ok := f.(*handle)
	if !ok {
		return 0, syscall.EBADF
	}
	nw, errno := h.data.writeAt(h.fd, data, off)
	return uint32(nw), errno
}

// Fsync serves fsync and fdatasync of a file (both make data and size
// durable) and of a directory (whose changes already are).
func (n *node) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	if h, ok := f.(*handle); ok {
		return h.data.sync(h.fd)
	}
	if n.lfs.cut.Load() {
		return syscall.EIO
	}
	return 0
}

// Flush (close) makes nothing durable.
func (n *node) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno {
	if n.lfs.cut.Load() {
		return syscall.EIO
	}
	return 0
}

func (n *node) Release(ctx context.Context, f fs.FileHandle) syscall.Errno {
	if h, ok := f.(*handle); ok {
		return fs.ToErrno(syscall.Close(h.fd))
	}
	if r, ok := f.(fs.FileReleaser); ok {
		return r.Release(ctx)
	}
	return 0
}

// Allocate (fallocate) is not modelled.
func (n *node) Allocate(ctx context.Context, f fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	return syscall.EOPNOTSUPP
}

// The namespace operations below pass through to the backing directory
// (durable at once), but not after a cut.

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	if err := n.lfs.beginWrite(); err != 0 {
		return err
	}
	defer n.lfs.gate.RUnlock()
	n.lfs.forget(filepath.Join(n.path(), name))
	return n.LoopbackNode.Unlink(ctx, name)
}

func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	if err := n.lfs.beginWrite(); err != 0 {
		return err
	}
	defer n.lfs.gate.RUnlock()
	if p, ok := newParent.(*node); ok && flags&unix.RENAME_EXCHANGE == 0 {
		n.lfs.forget(filepath.Join(p.path(), newName))
	}
	return n.LoopbackNode.Rename(ctx, name, newParent, newName, flags)
}

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if err := n.lfs.beginWrite(); err != 0 {
		return nil, err
	}
	defer n.lfs.gate.RUnlock()
	return n.LoopbackNode.Mkdir(ctx, name, mode, out)
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	if err := n.lfs.beginWrite(); err != 0 {
		return err
	}
	defer n.lfs.gate.RUnlock()
	return n.LoopbackNode.Rmdir(ctx, name)
}

func (n *node) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if err := n.lfs.beginWrite(); err != 0 {
		return nil, err
	}
	defer n.lfs.gate.RUnlock()
	ch, errno := n.LoopbackNode.Link(ctx, target, name, out)
	if errno == 0 {
		n.lfs.fixAttr(out.Ino, &out.Attr)
	}
	return ch, errno
}

func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if err := n.lfs.beginWrite(); err != 0 {
		return nil, err
	}
	defer n.lfs.gate.RUnlock()
	return n.LoopbackNode.Symlink(ctx, target, name, out)
}

// Mknod, copy_file_range and extended attributes are not modelled.

func (n *node) Mknod(ctx context.Context, name string, mode, rdev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EOPNOTSUPP
}

func (n *node) CopyFileRange(ctx context.Context, fhIn fs.FileHandle, offIn uint64, out *fs.Inode, fhOut fs.FileHandle,
	offOut, length, flags uint64) (uint32, syscall.Errno) {
	return 0, syscall.EOPNOTSUPP
}

func (n *node) Setxattr(ctx context.Context, attr string, data []byte, flags uint32) syscall.Errno {
	return syscall.EOPNOTSUPP
}

func (n *node) Removexattr(ctx context.Context, attr string) syscall.Errno {
	return syscall.EOPNOTSUPP
}

// MountT mounts backing on mountPoint for a test and unmounts it at the
// end (if the test has not). Where FUSE cannot be used it skips the test saying what is
// missing, except under CI (CI set in the environment), where .ci/run
// has provided it and a skip would hide a broken setup: there it fails.
func MountT(t testing.TB, backing, mountPoint string) *FS {
	t.Helper()
	f, err := Mount(backing, mountPoint)
	if errors.Is(err, ErrUnavailable) {
		msg := fmt.Sprintf("power-cut tests need FUSE (/dev/fuse, and root for mount(2) or fusermount3 from Debian's fuse3): %v", err)
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Unmount(); err != nil {
			t.Error(err)
		}
	})
	return f
}
