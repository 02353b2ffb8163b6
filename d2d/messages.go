package d2d

import (
	"fmt"

	"d2m-mediator/proto/d2dpb"

	"google.golang.org/protobuf/proto"
)

// SealEnvelope encrypts env under DGRK for a Reflect payload.
func (k *Keys) SealEnvelope(env *d2dpb.Envelope) ([]byte, error) {
	return sealProto(&k.DGRK, env, "envelope")
}

// OpenEnvelope decrypts a Reflected payload under DGRK.
func (k *Keys) OpenEnvelope(blob []byte) (*d2dpb.Envelope, error) {
	return openProto(&k.DGRK, blob, new(d2dpb.Envelope), "envelope")
}

// SealDeviceInfo encrypts info under DGDIK (ClientHello.encrypted_device_info).
func (k *Keys) SealDeviceInfo(info *d2dpb.DeviceInfo) ([]byte, error) {
	return sealProto(&k.DGDIK, info, "device info")
}

// OpenDeviceInfo decrypts a device info blob under DGDIK.
func (k *Keys) OpenDeviceInfo(blob []byte) (*d2dpb.DeviceInfo, error) {
	return openProto(&k.DGDIK, blob, new(d2dpb.DeviceInfo), "device info")
}

// SealSharedDeviceData encrypts data under DGSDDK.
func (k *Keys) SealSharedDeviceData(data *d2dpb.SharedDeviceData) ([]byte, error) {
	return sealProto(&k.DGSDDK, data, "shared device data")
}

// OpenSharedDeviceData decrypts a shared device data blob under DGSDDK.
func (k *Keys) OpenSharedDeviceData(blob []byte) (*d2dpb.SharedDeviceData, error) {
	return openProto(&k.DGSDDK, blob, new(d2dpb.SharedDeviceData), "shared device data")
}

// SealTransactionScope encrypts scope under DGTSK
// (BeginTransaction.encrypted_scope).
func (k *Keys) SealTransactionScope(scope *d2dpb.TransactionScope) ([]byte, error) {
	return sealProto(&k.DGTSK, scope, "transaction scope")
}

// OpenTransactionScope decrypts a transaction scope blob under DGTSK.
func (k *Keys) OpenTransactionScope(blob []byte) (*d2dpb.TransactionScope, error) {
	return openProto(&k.DGTSK, blob, new(d2dpb.TransactionScope), "transaction scope")
}

func sealProto(key *[32]byte, m proto.Message, what string) ([]byte, error) {
	b, err := proto.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("d2d: marshal %s: %w", what, err)
	}
	return Seal(key, b), nil
}

// openProto decrypts blob into m and returns it.
func openProto[M proto.Message](key *[32]byte, blob []byte, m M, what string) (M, error) {
	var zero M
	b, err := Open(key, blob)
	if err != nil {
		return zero, fmt.Errorf("d2d: open %s: %w", what, err)
	}
	if err := proto.Unmarshal(b, m); err != nil {
		return zero, fmt.Errorf("d2d: unmarshal %s: %w", what, err)
	}
	return m, nil
}
