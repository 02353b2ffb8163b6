package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"d2m-mediator/mediator/adminapi"
)

// newTokenHint is the shell line the errors below suggest for creating a
// token file: 32 random bytes as hex, mode 0600, with nothing but
// coreutils.
const newTokenHint = "(umask 077; od -An -vtx1 -N32 /dev/urandom | tr -d ' \\n' > FILE)"

// serveToken returns the admin API's bearer token for serve.
//
// A token file named by --admin-token-file (or MEDIATOR_ADMIN_TOKEN_FILE)
// is never created: it is the operator's file, the same on every node of
// a cluster, and a typo in its path must not silently give one node a token
// of its own. Without the flag a single node generates <data>/admin.token
// on first start, as it always did. Either way the file must hold one token
// and be readable by its owner only.
func serveToken(path string, explicit bool) (string, error) {
	if !explicit {
		if _, err := os.Stat(path); errors.Is(err, fs.ErrNotExist) {
			return adminapi.LoadOrCreateToken(path)
		}
	}
	return readTokenFile(path)
}

// readTokenFile checks and reads an existing token file.
func readTokenFile(path string) (string, error) {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("admin token file %s does not exist: create it once with %s and give every node of a cluster the same file", path, newTokenHint)
	}
	if err != nil {
		return "", fmt.Errorf("admin token file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("admin token file %s is not a regular file (%v)", path, fi.Mode().Type())
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 && !systemdCredential(path) {
		return "", fmt.Errorf("admin token file %s is readable or writable by group or others (mode %04o): the token opens the admin API; chmod 0600 %s", path, perm, path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("admin token file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("admin token file %s is empty: write a token into it with %s", path, newTokenHint)
	}
	if strings.IndexFunc(tok, func(r rune) bool { return r <= ' ' || r > '~' }) >= 0 {
		return "", fmt.Errorf("admin token file %s does not hold a token (one line of printable characters without spaces)", path)
	}
	return tok, nil
}

// systemdCredential reports whether path is in the directory where systemd
// put the service's credentials (LoadCredential=). systemd makes those
// copies read-only and readable by the service's user alone; on a tmpfs it
// does that with an ACL, which shows in the mode as group bits, so the
// mode check does not apply there.
func systemdCredential(path string) bool {
	dir := os.Getenv("CREDENTIALS_DIRECTORY")
	if dir == "" {
		return false
	}
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../") && rel != "."
}
