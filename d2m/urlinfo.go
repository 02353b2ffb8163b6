package d2m

import (
	"encoding/hex"
	"fmt"
	"strings"

	"google.golang.org/protobuf/proto"

	"d2m-mediator/proto/d2mpb"
)

// DeviceGroupID is DGPK.public, the only name the mediator knows a group by.
type DeviceGroupID [32]byte

// String returns the lowercase hex of the id.
func (g DeviceGroupID) String() string { return hex.EncodeToString(g[:]) }

// Short returns the first 8 hex digits, for logs.
func (g DeviceGroupID) Short() string { return hex.EncodeToString(g[:4]) }

// ClientURLInfo is what a device tells the server in the WebSocket path.
type ClientURLInfo struct {
	DeviceGroupID DeviceGroupID
	ServerGroup   string // selects the upstream chat server
}

// ErrBadURL is matched by every ParseClientURLPath error; the server answers
// it with HTTP 400 before the upgrade (§18 row 5).
var ErrBadURL = fmt.Errorf("d2m: invalid client url info")

type urlError struct{ reason string }

func (e *urlError) Error() string        { return "d2m: invalid client url info: " + e.reason }
func (e *urlError) Is(target error) bool { return target == ErrBadURL }

// ParseClientURLPath parses the ClientUrlInfo from a WebSocket URL path
// (§2): the last non-empty segment is its hex encoding (either case);
// earlier segments, such as the group prefix, and doubled slashes are
// ignored. device_group_id must be 32 bytes; the server group comes from
// field 3, else from the seed's numeric field 2 formatted %x (§18 row 10),
// and must match ^[0-9a-zA-Z]+$.
func ParseClientURLPath(path string) (ClientURLInfo, error) {
	seg := strings.TrimRight(path, "/")
	if i := strings.LastIndexByte(seg, '/'); i >= 0 {
		seg = seg[i+1:]
	}
	if seg == "" {
		return ClientURLInfo{}, &urlError{"empty path"}
	}
	if len(seg) > 2*1024 {
		return ClientURLInfo{}, &urlError{"path segment too long"}
	}
	raw, err := hex.DecodeString(seg)
	if err != nil {
		return ClientURLInfo{}, &urlError{"not hex"}
	}
	return DecodeClientURLInfo(raw)
}

// DecodeClientURLInfo validates the protobuf bytes of a ClientUrlInfo.
func DecodeClientURLInfo(raw []byte) (ClientURLInfo, error) {
	var m d2mpb.ClientUrlInfo
	if err := proto.Unmarshal(raw, &m); err != nil {
		return ClientURLInfo{}, &urlError{"invalid protobuf"}
	}
	if len(m.GetDeviceGroupId()) != 32 {
		return ClientURLInfo{}, &urlError{"device_group_id is not 32 bytes"}
	}
	var info ClientURLInfo
	copy(info.DeviceGroupID[:], m.GetDeviceGroupId())
	info.ServerGroup = m.GetServerGroup()
	if info.ServerGroup == "" && m.GetLegacyServerGroup() != 0 {
		info.ServerGroup = fmt.Sprintf("%x", m.GetLegacyServerGroup())
	}
	if !validServerGroup(info.ServerGroup) {
		return ClientURLInfo{}, &urlError{"server_group must match ^[0-9a-zA-Z]+$"}
	}
	return info, nil
}

func validServerGroup(s string) bool {
	if s == "" || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
			return false
		}
	}
	return true
}

// EncodeClientURLInfo returns the lowercase hex path segment for info.
func EncodeClientURLInfo(info ClientURLInfo) string {
	b, err := proto.Marshal(&d2mpb.ClientUrlInfo{
		DeviceGroupId: info.DeviceGroupID[:],
		ServerGroup:   info.ServerGroup,
	})
	if err != nil {
		panic(err) // only invalid UTF-8 can fail, and callers pass [0-9a-zA-Z]
	}
	return hex.EncodeToString(b)
}

// ClientURLPath returns the production-style path
// /{first byte of the group id as hex}/{hex ClientUrlInfo} (§2).
func ClientURLPath(info ClientURLInfo) string {
	return "/" + hex.EncodeToString(info.DeviceGroupID[:1]) + "/" + EncodeClientURLInfo(info)
}
