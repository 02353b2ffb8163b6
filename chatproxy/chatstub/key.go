package chatstub

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/crypto/nacl/box"
)

// LoadOrCreateKey returns the long-term secret key (SK) stored at path,
// creating the file with a fresh key on first start: directory mode 0700,
// file mode 0600, content the key as 64 hex digits and a newline. A file
// holding the 32 raw key bytes is accepted too.
//
// Creation writes a temporary file and links it into place, so a crash never
// leaves a half-written key and two processes starting at once end up with
// the same key.
func LoadOrCreateKey(path string) (*[32]byte, error) {
	key, err := loadKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return key, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("chatstub: key directory: %w", err)
	}
	_, sec, err := box.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("chatstub: generate key: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".chatstub-key-*")
	if err != nil {
		return nil, fmt.Errorf("chatstub: create key file: %w", err)
	}
	defer os.Remove(tmp.Name())
	// CreateTemp already uses 0600; Chmod makes it explicit and independent
	// of that detail.
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("chatstub: key file mode: %w", err)
	}
	if _, err := tmp.WriteString(hex.EncodeToString(sec[:]) + "\n"); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("chatstub: write key file: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("chatstub: sync key file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("chatstub: write key file: %w", err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return loadKey(path) // another process won the race
		}
		return nil, fmt.Errorf("chatstub: install key file: %w", err)
	}
	return sec, nil
}

func loadKey(path string) (*[32]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("chatstub: read key file: %w", err)
	}
	var key [32]byte
	switch trimmed := bytes.TrimSpace(b); {
	case len(trimmed) == 64:
		if _, err := hex.Decode(key[:], trimmed); err != nil {
			return nil, fmt.Errorf("chatstub: key file %s: %w", path, err)
		}
	case len(b) == 32:
		copy(key[:], b)
	default:
		return nil, fmt.Errorf("chatstub: key file %s: %d bytes, want 64 hex digits or 32 raw bytes", path, len(b))
	}
	return &key, nil
}
