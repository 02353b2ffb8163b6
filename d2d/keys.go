package d2d

import (
	"crypto/ecdh"
	"crypto/rand"
	"encoding/hex"
	"fmt"

	"d2m-mediator/d2d/blake2b"
)

// DeviceGroupKey is the 32-byte secret (DGK) that all devices of a group
// share and from which every other group key is derived.
type DeviceGroupKey [32]byte

// NewDeviceGroupKey returns a random device group key.
func NewDeviceGroupKey() DeviceGroupKey {
	var k DeviceGroupKey
	rand.Read(k[:]) // never fails since Go 1.24
	return k
}

// ParseDeviceGroupKey parses a device group key from 64 hex digits.
func ParseDeviceGroupKey(s string) (DeviceGroupKey, error) {
	var k DeviceGroupKey
	b, err := hex.DecodeString(s)
	if err != nil {
		return k, fmt.Errorf("d2d: parse device group key: %w", err)
	}
	if len(b) != len(k) {
		return k, fmt.Errorf("d2d: parse device group key: %d bytes, want %d", len(b), len(k))
	}
	copy(k[:], b)
	return k, nil
}

// Hex returns the key as 64 lowercase hex digits. It is a method with an
// explicit name rather than String so that the secret does not end up in
// logs through %v by accident.
func (k DeviceGroupKey) Hex() string { return hex.EncodeToString(k[:]) }

// KeyPair is an X25519 key pair.
type KeyPair struct {
	Secret [32]byte
	Public [32]byte
}

// Keys holds the keys derived from a device group key (docs/protocol.md §14).
type Keys struct {
	// DGPK is the path key pair. DGPK.Public is the device_group_id the
	// mediator knows the group by; DGPK.Secret answers its challenge.
	DGPK KeyPair
	// DGRK encrypts d2d.Envelope in Reflect/Reflected.
	DGRK [32]byte
	// DGDIK encrypts d2d.DeviceInfo.
	DGDIK [32]byte
	// DGSDDK encrypts d2d.SharedDeviceData.
	DGSDDK [32]byte
	// DGTSK encrypts d2d.TransactionScope.
	DGTSK [32]byte

	// pathKey is DGPK.Secret as a crypto/ecdh key, made once by DeriveKeys:
	// building it computes the public key, as costly as the exchange.
	pathKey *ecdh.PrivateKey
}

// personal is the BLAKE2b personalization of all device-group keys.
const personal = "3ma-mdev"

// DeriveKeys derives all device-group keys from dgk: each is
// BLAKE2b(out=32, key=DGK, salt=S, personal="3ma-mdev", input=empty) with
// the salts "p", "r", "di", "sdd" and "ts".
func DeriveKeys(dgk DeviceGroupKey) Keys {
	var k Keys
	k.DGPK.Secret = derive(dgk, "p")
	k.pathKey, _ = ecdh.X25519().NewPrivateKey(k.DGPK.Secret[:]) // 32 bytes: cannot fail
	copy(k.DGPK.Public[:], k.pathKey.PublicKey().Bytes())
	k.DGRK = derive(dgk, "r")
	k.DGDIK = derive(dgk, "di")
	k.DGSDDK = derive(dgk, "sdd")
	k.DGTSK = derive(dgk, "ts")
	return k
}

func derive(dgk DeviceGroupKey, salt string) [32]byte {
	out, err := blake2b.Sum256(dgk[:], []byte(salt), []byte(personal), nil)
	if err != nil {
		// Unreachable: key, salt and personal have fixed, valid sizes.
		panic(err)
	}
	return out
}

// DeviceGroupID returns the group's public identity, DGPK.Public.
func (k *Keys) DeviceGroupID() [32]byte { return k.DGPK.Public }
