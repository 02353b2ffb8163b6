package blake2b

import (
	"bytes"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"testing"

	xblake2b "golang.org/x/crypto/blake2b"
)

// pattern returns n bytes (i*mul+7) mod 256, the input the Python vectors
// below were computed from.
func pattern(n, mul int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*mul + 7)
	}
	return b
}

func mustHex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestMatchesXCrypto checks that with empty salt and personal the parameter
// block reduces to plain (keyed) BLAKE2b, across block boundaries.
func TestMatchesXCrypto(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	lengths := []int{0, 1, 63, 64, 127, 128, 129, 255, 256, 257, 1000, 4096}
	for _, n := range lengths {
		for range 40 {
			key := make([]byte, rng.IntN(MaxKeySize+1))
			fill(rng, key)
			msg := make([]byte, n)
			fill(rng, msg)
			size := 1 + rng.IntN(Size)
			if rng.IntN(2) == 0 {
				size = Size256
			}

			want := xSum(t, size, key, msg)
			h, err := New(size, key, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			h.Write(msg)
			if got := h.Sum(nil); !bytes.Equal(got, want) {
				t.Fatalf("size=%d key=%d msg=%d: got %x, want %x", size, len(key), n, got, want)
			}
			if size == Size256 {
				got, err := Sum256(key, nil, nil, msg)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got[:], want) {
					t.Fatalf("Sum256 key=%d msg=%d: got %x, want %x", len(key), n, got, want)
				}
			}
		}
	}
}

func fill(rng *rand.Rand, b []byte) {
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
}

func xSum(t *testing.T, size int, key, msg []byte) []byte {
	t.Helper()
	h, err := xblake2b.New(size, key)
	if err != nil {
		t.Fatal(err)
	}
	h.Write(msg)
	return h.Sum(nil)
}

// TestVectors holds digests computed independently with Python's
// hashlib.blake2b(msg, digest_size, key, salt, person); msg is
// pattern(msgLen, 1).
func TestVectors(t *testing.T) {
	tests := []struct {
		name           string
		size           int
		key            []byte
		salt, personal []byte
		msgLen         int
		want           string
	}{
		{"empty", 32, nil, nil, nil, 0,
			"0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8"},
		{"vouch shape", 32, pattern(64, 3), []byte("v2"), []byte("3ma-csp"), 48,
			"1f96a3d107ddf90539fe10412fc0168ea34c5f2f4b2fd0ab353187738364d0f5"},
		{"vouch key empty input", 32, pattern(32, 5), []byte("v2"), []byte("3ma-csp"), 0,
			"b467d84da5c59bff088f0c34e2e481a8b184b2e1035b7fd2a79d94b5fb724e94"},
		{"full salt and personal unkeyed", 64, nil, pattern(16, 11), pattern(16, 13), 129,
			"5882f41247438d786078a499697e99a00bc8e3b1e6d3ba4907feb5bda0045d90398f6f43a9a920dc33f7c3b0e718e3c2074d90418e66efa6acd6f8fe7c7168af"},
		{"one block salt only", 32, pattern(1, 1), pattern(16, 11), nil, 128,
			"420d19f7d0c74834e879e476fe014cb17405e3a1098bd7d9091dbf2ccaaee300"},
		{"odd size personal only", 20, pattern(17, 1), nil, pattern(16, 13), 1000,
			"5aba398ba869fe6d055792bee9c17678a6e1f17a"},
		{"max key short params", 64, pattern(64, 17), []byte("salt"), []byte("person"), 255,
			"c3159158442710c1ee1287b604f380a96b743023e4a8cfd1ec894135cec274a8de84ebc37041915718bd650e3b24e297fd79bcfba30256a9b7674d3893697d84"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := New(tt.size, tt.key, tt.salt, tt.personal)
			if err != nil {
				t.Fatal(err)
			}
			h.Write(pattern(tt.msgLen, 1))
			if got := hex.EncodeToString(h.Sum(nil)); got != tt.want {
				t.Errorf("got %s, want %s", got, tt.want)
			}
		})
	}
}

// TestDeviceGroupKeyVector reproduces the first official key derivation
// vector of docs/protocol.md §14 directly on the hash.
func TestDeviceGroupKeyVector(t *testing.T) {
	dgk := mustHex(t, "1b35ed7e1ba9993171fe4a7eed30c2831905c3a583616d61e93782da900bf8ba")
	for _, tt := range []struct{ salt, want string }{
		{"p", "60c0ed9098902c0b6093be4a819bf344900bc7473504ccdb61004b1b58aa2233"},
		{"r", "a4bf34ff67ed3b731a2aa6e023335f7eba6c914e877da3d15bff41d84f7f75f8"},
		{"di", "5953fb9775d8c23fae573e245534dac2c7aa16b62ea73b954ea4177d192e8c50"},
		{"sdd", "7a91ad36bc9537ccfd6fd76b23d7f5319e506e6a5294c988c9a75c8e34a3c9dd"},
		{"ts", "7c6b94affb171c564bfd375d50c4781d72ab2671ae4035ab4307dedce67ef30e"},
	} {
		got, err := Sum256(dgk, []byte(tt.salt), []byte("3ma-mdev"), nil)
		if err != nil {
			t.Fatal(err)
		}
		if hex.EncodeToString(got[:]) != tt.want {
			t.Errorf("salt %q: got %x, want %s", tt.salt, got, tt.want)
		}
	}
}

// TestZeroPadding checks that short salt/personal equal their explicit
// zero-padded 16-byte forms.
func TestZeroPadding(t *testing.T) {
	short, _ := Sum256([]byte("k"), []byte("v2"), []byte("3ma-csp"), []byte("m"))
	salt := make([]byte, SaltSize)
	copy(salt, "v2")
	personal := make([]byte, PersonalSize)
	copy(personal, "3ma-csp")
	padded, _ := Sum256([]byte("k"), salt, personal, []byte("m"))
	if short != padded {
		t.Errorf("short %x != padded %x", short, padded)
	}
}

func TestStreaming(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	msg := make([]byte, 1000)
	fill(rng, msg)
	want, _ := Sum256([]byte("key"), []byte("salt"), []byte("personal"), msg)

	h, _ := New(Size256, []byte("key"), []byte("salt"), []byte("personal"))
	for range 3 {
		h.Reset()
		for rest := msg; len(rest) > 0; {
			n := min(len(rest), rng.IntN(300))
			h.Write(rest[:n])
			rest = rest[n:]
		}
		// Sum must not disturb the state.
		first := h.Sum(nil)
		if got := h.Sum([]byte{0xff}); !bytes.Equal(first, want[:]) || !bytes.Equal(got[1:], want[:]) || got[0] != 0xff {
			t.Fatalf("got %x / %x, want %x", first, got, want)
		}
	}
	if h.Size() != Size256 || h.BlockSize() != BlockSize {
		t.Errorf("Size/BlockSize = %d/%d", h.Size(), h.BlockSize())
	}
}

func TestParameterErrors(t *testing.T) {
	long := make([]byte, 65)
	tests := []struct {
		size                int
		key, salt, personal []byte
		want                error
	}{
		{0, nil, nil, nil, ErrSize},
		{65, nil, nil, nil, ErrSize},
		{32, long, nil, nil, ErrKeySize},
		{32, nil, long[:17], nil, ErrSaltSize},
		{32, nil, nil, long[:17], ErrPersonalSize},
	}
	for _, tt := range tests {
		if _, err := New(tt.size, tt.key, tt.salt, tt.personal); !errors.Is(err, tt.want) {
			t.Errorf("New(%d, %d, %d, %d) = %v, want %v", tt.size, len(tt.key), len(tt.salt), len(tt.personal), err, tt.want)
		}
	}
	if _, err := Sum256(long, nil, nil, nil); !errors.Is(err, ErrKeySize) {
		t.Errorf("Sum256 long key: %v", err)
	}
	if _, err := New(Size, long[:64], long[:16], long[:16]); err != nil {
		t.Errorf("maximal parameters rejected: %v", err)
	}
}

// FuzzMatchesXCrypto compares keyed, unsalted digests with
// golang.org/x/crypto/blake2b on arbitrary keys and messages.
func FuzzMatchesXCrypto(f *testing.F) {
	f.Add([]byte{}, []byte{})
	f.Add([]byte("key"), pattern(129, 1))
	f.Fuzz(func(t *testing.T, key, msg []byte) {
		if len(key) > MaxKeySize {
			key = key[:MaxKeySize]
		}
		got, err := Sum256(key, nil, nil, msg)
		if err != nil {
			t.Fatal(err)
		}
		if want := xSum(t, Size256, key, msg); !bytes.Equal(got[:], want) {
			t.Fatalf("key %x msg %x: got %x, want %x", key, msg, got, want)
		}
	})
}
