// Package blake2b implements BLAKE2b (RFC 7693) with the full parameter
// block: digest length, key, salt and personalization.
//
// It exists because golang.org/x/crypto/blake2b exposes no salt or
// personal parameter, while the Threema protocols need both: device-group
// key derivation (docs/protocol.md §14, personal "3ma-mdev") and the CSP vouch
// key (§9.3, salt "v2", personal "3ma-csp"). It owns nothing else; use
// golang.org/x/crypto/blake2b when salt and personal are empty.
package blake2b
