package chatproxy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"strconv"
	"testing"

	"d2m-mediator/chatproxy/csp"
)

// testUnits builds a valid server→client unit sequence: server-hello,
// login-ack, then one frame per box length. Unit contents are distinct
// so that a unit cut at the wrong place cannot compare equal.
func testUnits(boxLens ...int) [][]byte {
	units := [][]byte{
		fill(make([]byte, ServerHelloSize), 1),
		fill(make([]byte, LoginAckSize), 2),
	}
	for i, n := range boxLens {
		u := make([]byte, FrameLengthSize+n)
		binary.LittleEndian.PutUint16(u, uint16(n))
		fill(u[FrameLengthSize:], byte(3+i))
		units = append(units, u)
	}
	return units
}

func fill(b []byte, seed byte) []byte {
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// chunkReader returns its chunks one per Read call (or less, if p is
// shorter), the way TCP may deliver a stream.
type chunkReader struct{ chunks [][]byte }

func (r *chunkReader) Read(p []byte) (int, error) {
	for len(r.chunks) > 0 && len(r.chunks[0]) == 0 {
		r.chunks = r.chunks[1:]
	}
	if len(r.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.chunks[0])
	r.chunks[0] = r.chunks[0][n:]
	return n, nil
}

// splitAt cuts stream into chunks whose sizes come from sizes (cycled; each
// size byte s means s+1 bytes, so every chunk is non-empty).
func splitAt(stream, sizes []byte) [][]byte {
	if len(sizes) == 0 {
		return [][]byte{stream}
	}
	var chunks [][]byte
	for i := 0; len(stream) > 0; i++ {
		n := min(int(sizes[i%len(sizes)])+1, len(stream))
		chunks = append(chunks, stream[:n])
		stream = stream[n:]
	}
	return chunks
}

// expectUnits reads from f until an error and checks the units and that the
// stream ended cleanly (ErrClosed wrapping io.EOF).
func expectUnits(t testing.TB, f *Reframer, want [][]byte) {
	t.Helper()
	for i, w := range want {
		got, err := f.Next()
		if err != nil {
			t.Fatalf("unit %d: %v", i, err)
		}
		if !bytes.Equal(got, w) {
			t.Fatalf("unit %d: got %d bytes %x…, want %d bytes %x…", i, len(got), head(got), len(w), head(w))
		}
	}
	_, err := f.Next()
	if !errors.Is(err, ErrClosed) || !errors.Is(err, io.EOF) {
		t.Fatalf("after last unit: got %v, want ErrClosed wrapping io.EOF", err)
	}
}

func head(b []byte) []byte { return b[:min(len(b), 8)] }

func TestReframerChunkings(t *testing.T) {
	units := testUnits(0, 1, 16, 100, MaxFrameBoxSize, 255, 256, 4095)
	stream := bytes.Join(units, nil)
	cases := map[string][][]byte{
		"one read":      {stream},
		"1-byte reads":  splitAt(stream, []byte{0}),
		"3-byte reads":  splitAt(stream, []byte{2}),
		"odd reads":     splitAt(stream, []byte{78, 1, 30, 0, 0, 200, 254}),
		"unit per read": units,
	}
	for name, chunks := range cases {
		t.Run(name, func(t *testing.T) {
			for _, bufSize := range []int{16, 0, 1 << 16} {
				expectUnits(t, NewReframer(&chunkReader{chunks: clone(chunks)}, bufSize), units)
			}
		})
	}
}

func clone(chunks [][]byte) [][]byte {
	out := make([][]byte, len(chunks))
	copy(out, chunks)
	return out
}

func TestReframerFrameTooLarge(t *testing.T) {
	units := testUnits(10)
	bad := []byte{0x01, 0x20} // 8193, little-endian
	stream := append(bytes.Join(units, nil), bad...)
	stream = append(stream, make([]byte, 9000)...)
	f := NewReframer(bytes.NewReader(stream), 0)
	for range units {
		if _, err := f.Next(); err != nil {
			t.Fatal(err)
		}
	}
	_, err := f.Next()
	if !errors.Is(err, ErrFrameTooLarge) {
		t.Fatalf("got %v, want ErrFrameTooLarge", err)
	}
	if _, err2 := f.Next(); err2 != err {
		t.Fatalf("error not sticky: %v then %v", err, err2)
	}
}

func TestReframerPartialTail(t *testing.T) {
	units := testUnits(3)
	stream := bytes.Join(units, nil)
	for _, c := range []struct {
		name     string
		complete int // units that must come out before the error
		stream   []byte
	}{
		{"partial server-hello", 0, stream[:40]},
		{"partial login-ack", 1, stream[:ServerHelloSize+5]},
		{"half prefix", 3, append(bytes.Clone(stream), 0x05)},
		{"prefix only", 3, append(bytes.Clone(stream), 0x05, 0x00)},
		{"partial box", 3, append(bytes.Clone(stream), 0x05, 0x00, 1, 2)},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := NewReframer(&chunkReader{chunks: splitAt(c.stream, []byte{6})}, 0)
			for i, w := range units[:c.complete] {
				got, err := f.Next()
				if err != nil || !bytes.Equal(got, w) {
					t.Fatalf("unit %d: %x, %v", i, head(got), err)
				}
			}
			_, err := f.Next()
			if !errors.Is(err, ErrClosed) || !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("got %v, want ErrClosed wrapping io.ErrUnexpectedEOF", err)
			}
		})
	}
}

func TestReframerOneAllocPerUnit(t *testing.T) {
	r := newLoopReader(100)
	f := NewReframer(r, 0)
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := f.Next(); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 1 {
		t.Fatalf("%v allocations per unit, want 1", allocs)
	}
}

// loopReader yields a server-hello and login-ack, then the same frame
// forever, without allocating.
type loopReader struct {
	hello []byte
	frame []byte
	off   int
}

func newLoopReader(boxLen int) *loopReader {
	u := testUnits(boxLen)
	return &loopReader{hello: bytes.Join(u[:2], nil), frame: u[2]}
}

func (r *loopReader) Read(p []byte) (int, error) {
	if len(r.hello) > 0 {
		n := copy(p, r.hello)
		r.hello = r.hello[n:]
		return n, nil
	}
	total := 0
	for len(p) > 0 {
		n := copy(p, r.frame[r.off:])
		p = p[n:]
		total += n
		r.off = (r.off + n) % len(r.frame)
	}
	return total, nil
}

func BenchmarkReframer(b *testing.B) {
	for _, size := range []int{64, 1024, MaxFrameBoxSize} {
		b.Run(strconv.Itoa(size)+"B", func(b *testing.B) {
			f := NewReframer(newLoopReader(size), 0)
			// Skip the handshake units so every iteration is one frame.
			f.Next()
			f.Next()
			b.SetBytes(int64(FrameLengthSize + size))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := f.Next(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// FuzzReframer builds a valid unit sequence from lens (two bytes per frame
// length, reduced to 0..MaxFrameBoxSize), splits it at the points given by
// cuts, and asserts that exactly the same units come out.
func FuzzReframer(f *testing.F) {
	f.Add([]byte{}, []byte{})
	f.Add([]byte{10, 0, 0, 0, 0, 32}, []byte{0})
	f.Add([]byte{0xff, 0xff, 1, 0}, []byte{79, 31, 1, 0, 200})
	f.Add([]byte{0, 0x20, 5, 0, 0, 0}, []byte{255, 3})
	f.Fuzz(func(t *testing.T, lens, cuts []byte) {
		var boxLens []int
		for i := 0; i+1 < len(lens) && len(boxLens) < 64; i += 2 {
			boxLens = append(boxLens, int(binary.LittleEndian.Uint16(lens[i:]))%(MaxFrameBoxSize+1))
		}
		units := testUnits(boxLens...)
		stream := bytes.Join(units, nil)
		bufSize := 16
		if len(cuts) > 0 {
			bufSize += int(cuts[0]) * 64
		}
		expectUnits(t, NewReframer(&chunkReader{chunks: splitAt(stream, cuts)}, bufSize), units)
	})
}

// FuzzReframerGarbage feeds arbitrary bytes: Next must never panic, every
// unit it returns must have a legal size, and it must end with ErrClosed or
// ErrFrameTooLarge without returning more bytes than it was given.
func FuzzReframerGarbage(f *testing.F) {
	f.Add(bytes.Join(testUnits(4, 0), nil), []byte{1})
	f.Add(append(bytes.Join(testUnits(), nil), 0xff, 0xff), []byte{})
	f.Add([]byte{1, 2, 3}, []byte{0})
	f.Fuzz(func(t *testing.T, data, cuts []byte) {
		fr := NewReframer(&chunkReader{chunks: splitAt(data, cuts)}, 16)
		total := 0
		for i := 0; ; i++ {
			u, err := fr.Next()
			if err != nil {
				if !errors.Is(err, ErrClosed) && !errors.Is(err, ErrFrameTooLarge) {
					t.Fatalf("unexpected error %v", err)
				}
				break
			}
			total += len(u)
			switch {
			case i == 0 && len(u) != ServerHelloSize, i == 1 && len(u) != LoginAckSize:
				t.Fatalf("unit %d has %d bytes", i, len(u))
			case i >= 2 && (len(u) < FrameLengthSize || int(binary.LittleEndian.Uint16(u)) != len(u)-FrameLengthSize || len(u) > MaxUnitSize):
				t.Fatalf("frame %d malformed: %d bytes, prefix %x", i, len(u), head(u))
			}
		}
		if total > len(data) {
			t.Fatalf("returned %d bytes from %d", total, len(data))
		}
	})
}

func TestAddress(t *testing.T) {
	for _, c := range []struct{ tmpl, group, want string }{
		{"g-{group}.0.threema.ch:5222", "4a", "g-4a.0.threema.ch:5222"},
		{"127.0.0.1:5222", "4a", "127.0.0.1:5222"},
		{"{group}-{group}:1", "x", "x-x:1"},
	} {
		if got := Address(c.tmpl, c.group); got != c.want {
			t.Errorf("Address(%q, %q) = %q, want %q", c.tmpl, c.group, got, c.want)
		}
	}
}

// The re-framer counts bytes with its own constants so that the mediator's
// hot path does not link the CSP crypto; they must agree with package csp.
func TestSizesMatchCSP(t *testing.T) {
	for name, c := range map[string][2]int{
		"server-hello": {ServerHelloSize, csp.ServerHelloSize},
		"login-ack":    {LoginAckSize, csp.LoginAckSize},
		"length":       {FrameLengthSize, csp.FrameLengthSize},
		"max box":      {MaxFrameBoxSize, csp.MaxBoxSize},
		"max unit":     {MaxUnitSize, csp.MaxFrameSize},
	} {
		if c[0] != c[1] {
			t.Errorf("%s: chatproxy %d, csp %d", name, c[0], c[1])
		}
	}
}
