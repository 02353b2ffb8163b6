package mediator

import (
	"bytes"
	"encoding/binary"
	"testing"
)

func serverFrame(opcode byte, payload int) []byte {
	b := []byte{0x80 | opcode}
	switch {
	case payload < 126:
		b = append(b, byte(payload))
	case payload < 1<<16:
		b = append(b, 126, 0, 0)
		binary.BigEndian.PutUint16(b[2:], uint16(payload))
	default:
		b = append(b, 127, 0, 0, 0, 0, 0, 0, 0, 0)
		binary.BigEndian.PutUint64(b[2:], uint64(payload))
	}
	return append(b, bytes.Repeat([]byte{'x'}, payload)...)
}

// The tracker knows where the owner's frames end however the stream is
// cut into reads: it is at a boundary exactly after each whole frame, and
// never inside the response head or a frame.
func TestWSTrackerBoundaries(t *testing.T) {
	head := []byte("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
	frames := [][]byte{serverFrame(2, 10), serverFrame(2, 300), serverFrame(2, 70000), serverFrame(2, 0), serverFrame(8, 2)}
	stream := append([]byte(nil), head...)
	ends := map[int]bool{len(head): true} // right after the 101: no frame begun
	for _, f := range frames {
		stream = append(stream, f...)
		ends[len(stream)] = true
	}
	for _, chunk := range []int{1, 2, 3, 7, 125, 4096, len(stream)} {
		var w wsTracker
		for i := 0; i < len(stream); i += chunk {
			j := min(i+chunk, len(stream))
			w.feed(stream[i:j])
			if got, want := w.atBoundary(), ends[j]; got != want {
				t.Fatalf("reads of %d: after byte %d at boundary %v, want %v", chunk, j, got, want)
			}
		}
		if !w.closeSeen {
			t.Fatalf("reads of %d: the close frame not seen", chunk)
		}
	}
	// An answer that is not a 101 is never written into.
	var w wsTracker
	w.feed([]byte("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"))
	if w.atBoundary() {
		t.Fatal("at a boundary after a 503")
	}
}

func TestCloseFrame(t *testing.T) {
	f := closeFrame(1001, forwardLostReason)
	if f[0] != 0x88 || int(f[1]) != len(f)-2 || binary.BigEndian.Uint16(f[2:]) != 1001 || string(f[4:]) != forwardLostReason {
		t.Fatalf("close frame % x", f)
	}
}
