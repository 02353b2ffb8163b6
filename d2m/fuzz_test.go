package d2m

import (
	"bytes"
	"errors"
	"testing"
)

// Fuzz targets: no decoder may panic, every error must be ErrMalformed (or
// ErrBadURL), and a valid decode must round-trip.

func FuzzDecodeContainer(f *testing.F) {
	f.Add([]byte{0x20, 0, 0, 0})
	f.Add(EncodeReflect(0, 1, []byte("env")))
	f.Add(EncodeReflected(1, 2, 3, []byte("env")))
	f.Add([]byte{0x11, 1, 2, 3, 0x08, 0x00})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, frame []byte) {
		typ, payload, err := DecodeContainer(frame)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		if !bytes.Equal(EncodeRaw(typ, payload)[HeaderSize:], frame[HeaderSize:]) {
			t.Fatal("payload changed")
		}
		if newMessage(typ) != nil { // a protobuf payload
			if _, err := DecodeMessage(typ, payload); err != nil && !errors.Is(err, ErrMalformed) {
				t.Fatalf("untyped error %v", err)
			}
		}
	})
}

func FuzzDecodeReflect(f *testing.F) {
	f.Add(EncodeReflect(0, 0, nil)[HeaderSize:])
	f.Add(EncodeReflect(FlagEphemeral, 0xffffffff, []byte("envelope"))[HeaderSize:])
	f.Add([]byte{0x0a, 0, 0, 0, 1, 0, 0, 0, 9, 9, 7})
	f.Add([]byte{0x07, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, payload []byte) {
		r, err := DecodeReflect(payload)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		again, err := DecodeReflect(EncodeReflect(r.Flags, r.ID, r.Envelope)[HeaderSize:])
		if err != nil || again.ID != r.ID || again.Flags != r.Flags || !bytes.Equal(again.Envelope, r.Envelope) {
			t.Fatalf("round trip: %+v %v", again, err)
		}
	})
}

func FuzzDecodeReflected(f *testing.F) {
	f.Add(EncodeReflected(0, 0, 0, nil)[HeaderSize:])
	f.Add(EncodeReflected(1, 5, 6, []byte("x"))[HeaderSize:])
	f.Fuzz(func(t *testing.T, payload []byte) {
		r, err := DecodeReflected(payload)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		again, err := DecodeReflected(EncodeReflected(r.Flags, r.ID, r.Timestamp, r.Envelope)[HeaderSize:])
		if err != nil || again.ID != r.ID || again.Timestamp != r.Timestamp || !bytes.Equal(again.Envelope, r.Envelope) {
			t.Fatalf("round trip: %+v %v", again, err)
		}
	})
}

func FuzzDecodeAcks(f *testing.F) {
	f.Add(EncodeReflectAck(1, 2)[HeaderSize:])
	f.Add(EncodeReflectedAck(3)[HeaderSize:])
	f.Add([]byte{8, 0, 0, 0, 1, 0, 0, 0})
	f.Fuzz(func(t *testing.T, payload []byte) {
		if a, err := DecodeReflectAck(payload); err == nil {
			if b, _ := DecodeReflectAck(EncodeReflectAck(a.ID, a.Timestamp)[HeaderSize:]); b != a {
				t.Fatal("ReflectAck round trip")
			}
		} else if !errors.Is(err, ErrMalformed) {
			t.Fatal(err)
		}
		if id, err := DecodeReflectedAck(payload); err == nil {
			if id2, _ := DecodeReflectedAck(EncodeReflectedAck(id)[HeaderSize:]); id2 != id {
				t.Fatal("ReflectedAck round trip")
			}
		} else if !errors.Is(err, ErrMalformed) {
			t.Fatal(err)
		}
	})
}

func FuzzParseClientURLPath(f *testing.F) {
	f.Add("/e7/" + vectorSegment)
	f.Add("/" + vectorSegment)
	f.Add("//")
	f.Add("/e7/0a20")
	f.Fuzz(func(t *testing.T, path string) {
		info, err := ParseClientURLPath(path)
		if err != nil {
			if !errors.Is(err, ErrBadURL) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		again, err := ParseClientURLPath(ClientURLPath(info))
		if err != nil || again != info {
			t.Fatalf("round trip %+v %v", again, err)
		}
	})
}
