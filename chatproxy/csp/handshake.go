package csp

import (
	"bytes"
	"crypto/subtle"
	"encoding/binary"
	"fmt"

	"golang.org/x/crypto/nacl/box"
)

// ClientHello is the first client→server unit: TCK.public(32) ‖ CCK(16).
type ClientHello struct {
	TempPublicKey [KeySize]byte // TCK.public
	Cookie        Cookie        // CCK
}

// Marshal returns the 48-byte client-hello.
func (h *ClientHello) Marshal() []byte {
	out := make([]byte, 0, ClientHelloSize)
	out = append(out, h.TempPublicKey[:]...)
	return append(out, h.Cookie[:]...)
}

// ParseClientHello parses a 48-byte client-hello.
func ParseClientHello(p []byte) (ClientHello, error) {
	var h ClientHello
	if len(p) != ClientHelloSize {
		return h, wrongSize("client-hello", len(p), ClientHelloSize)
	}
	copy(h.TempPublicKey[:], p)
	copy(h.Cookie[:], p[KeySize:])
	return h, nil
}

// ServerHello is the content of the 80-byte server-hello:
// SCK(16) ‖ box(SK.secret, TCK.public; nonce SCK‖1)[TSK.public(32) ‖ CCK(16)].
type ServerHello struct {
	Cookie        Cookie        // SCK
	TempPublicKey [KeySize]byte // TSK.public
	ClientCookie  Cookie        // CCK, echoed so the client knows the box is fresh
}

// Seal returns the 80-byte server-hello, boxed from the server's permanent
// secret key to the client's temporary public key with nonce SCK‖1.
func (h *ServerHello) Seal(serverSecretKey, clientTempPublicKey *[KeySize]byte) []byte {
	plain := make([]byte, 0, KeySize+CookieSize)
	plain = append(plain, h.TempPublicKey[:]...)
	plain = append(plain, h.ClientCookie[:]...)
	n := Nonce(h.Cookie, ServerHelloSeq)
	out := make([]byte, CookieSize, ServerHelloSize)
	copy(out, h.Cookie[:])
	return box.Seal(out, plain, &n, clientTempPublicKey, serverSecretKey)
}

// OpenServerHello opens an 80-byte server-hello with the pinned server public
// key. It does not check the echoed cookie: see CheckCookies.
func OpenServerHello(p []byte, serverPublicKey, clientTempSecretKey *[KeySize]byte) (ServerHello, error) {
	var h ServerHello
	if len(p) != ServerHelloSize {
		return h, wrongSize("server-hello", len(p), ServerHelloSize)
	}
	copy(h.Cookie[:], p)
	n := Nonce(h.Cookie, ServerHelloSeq)
	plain, ok := box.Open(nil, p[CookieSize:], &n, serverPublicKey, clientTempSecretKey)
	if !ok {
		return h, fmt.Errorf("%w: server-hello (wrong server key?)", ErrDecrypt)
	}
	copy(h.TempPublicKey[:], plain)
	copy(h.ClientCookie[:], plain[KeySize:])
	return h, nil
}

// CheckCookies applies the clients' cookie rules to a server-hello: the
// server cookie must differ from the client's, and the echoed client cookie
// must be the one the client sent (§9.3).
func (h *ServerHello) CheckCookies(clientCookie Cookie) error {
	if h.Cookie == clientCookie {
		return malformed("server-hello", "server cookie equals client cookie")
	}
	if subtle.ConstantTimeCompare(h.ClientCookie[:], clientCookie[:]) != 1 {
		return malformed("server-hello", "echoed client cookie does not match")
	}
	return nil
}

// LoginData is the 128-byte plaintext of the login box:
// identity(8) ‖ extension-indicator-or-client-info(32) ‖ SCK(16) ‖
// 24 reserved ‖ vouch(32) ‖ 16 reserved.
type LoginData struct {
	Identity Identity
	// HasExtensions says the 32-byte field is the extension indicator
	// (ExtensionMagic ‖ u16-le ExtensionsBoxLength) and an extensions box
	// follows the login box. Otherwise the field is a zero-padded legacy
	// client-info string.
	HasExtensions bool
	// ExtensionsBoxLength is the length of the encrypted extensions box,
	// tag included.
	ExtensionsBoxLength uint16
	LegacyClientInfo    string
	ServerCookie        Cookie // SCK echoed: proves the login is for this connection
	Vouch               [32]byte
}

// Offsets into login-data.
const (
	loginIdentityOff = 0
	loginIndicatorOf = loginIdentityOff + IdentitySize // 8
	loginCookieOff   = loginIndicatorOf + legacyInfoSize
	loginVouchOff    = loginCookieOff + CookieSize + 24 // after reserved1
)

// Marshal returns the 128-byte login-data; reserved bytes are zero.
func (d *LoginData) Marshal() ([]byte, error) {
	out := make([]byte, LoginDataSize)
	copy(out[loginIdentityOff:], d.Identity[:])
	if d.HasExtensions {
		copy(out[loginIndicatorOf:], ExtensionMagic)
		binary.LittleEndian.PutUint16(out[loginIndicatorOf+extensionMagicSz:], d.ExtensionsBoxLength)
	} else {
		if len(d.LegacyClientInfo) > legacyInfoSize {
			return nil, malformed("login-data", "legacy client-info of %d bytes exceeds %d", len(d.LegacyClientInfo), legacyInfoSize)
		}
		copy(out[loginIndicatorOf:], d.LegacyClientInfo)
	}
	copy(out[loginCookieOff:], d.ServerCookie[:])
	copy(out[loginVouchOff:], d.Vouch[:])
	return out, nil
}

// ParseLoginData parses 128 bytes of login-data. Reserved bytes are ignored.
func ParseLoginData(p []byte) (LoginData, error) {
	var d LoginData
	if len(p) != LoginDataSize {
		return d, wrongSize("login-data", len(p), LoginDataSize)
	}
	copy(d.Identity[:], p[loginIdentityOff:])
	field := p[loginIndicatorOf : loginIndicatorOf+legacyInfoSize]
	if string(field[:extensionMagicSz]) == ExtensionMagic {
		d.HasExtensions = true
		d.ExtensionsBoxLength = binary.LittleEndian.Uint16(field[extensionMagicSz:])
		if d.ExtensionsBoxLength < BoxOverhead {
			return d, malformed("login-data", "extensions box length %d is shorter than the %d-byte tag", d.ExtensionsBoxLength, BoxOverhead)
		}
	} else {
		info := bytes.TrimRight(field, "\x00")
		if err := validUTF8("login-data client-info", info); err != nil {
			return d, err
		}
		d.LegacyClientInfo = string(info)
	}
	copy(d.ServerCookie[:], p[loginCookieOff:])
	copy(d.Vouch[:], p[loginVouchOff:])
	return d, nil
}

// ExtensionType is the type byte of one login extension (§9.3).
type ExtensionType uint8

// Login extension types.
const (
	ExtClientInfo            ExtensionType = 0x00 // UTF-8 string
	ExtCSPDeviceID           ExtensionType = 0x01 // u64-le, random per device (§8.1)
	ExtMessagePayloadVersion ExtensionType = 0x02 // u8; Android sends a bitmask 0x03 (§16)
	ExtDeviceCookie          ExtensionType = 0x03 // 16 bytes
)

// Extension is one login extension of a type this package does not decode.
type Extension struct {
	Type    ExtensionType
	Payload []byte
}

// Extensions is the plaintext of the extensions box: type u8 ‖ length u16-le
// ‖ payload, back to back. Has* fields tell which optional ones are present.
type Extensions struct {
	ClientInfo               string
	HasClientInfo            bool
	CSPDeviceID              uint64
	HasCSPDeviceID           bool
	MessagePayloadVersion    uint8
	HasMessagePayloadVersion bool
	DeviceCookie             Cookie
	HasDeviceCookie          bool
	Unknown                  []Extension // kept in order of appearance
}

// Marshal encodes the present extensions: client-info, csp-device-id,
// message-payload-version, device-cookie, then Unknown in order.
func (e *Extensions) Marshal() ([]byte, error) {
	var out []byte
	add := func(t ExtensionType, payload []byte) error {
		if len(payload) > 0xffff {
			return malformed("extensions", "extension 0x%02x of %d bytes exceeds 65535", uint8(t), len(payload))
		}
		out = append(out, byte(t))
		out = binary.LittleEndian.AppendUint16(out, uint16(len(payload)))
		out = append(out, payload...)
		return nil
	}
	if e.HasClientInfo {
		if err := add(ExtClientInfo, []byte(e.ClientInfo)); err != nil {
			return nil, err
		}
	}
	if e.HasCSPDeviceID {
		add(ExtCSPDeviceID, binary.LittleEndian.AppendUint64(nil, e.CSPDeviceID))
	}
	if e.HasMessagePayloadVersion {
		add(ExtMessagePayloadVersion, []byte{e.MessagePayloadVersion})
	}
	if e.HasDeviceCookie {
		add(ExtDeviceCookie, e.DeviceCookie[:])
	}
	for _, u := range e.Unknown {
		if err := add(u.Type, u.Payload); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// ParseExtensions parses the plaintext of the extensions box. A known
// extension with the wrong payload size, a known extension given twice, or a
// truncated entry is malformed; unknown types are kept in Unknown.
func ParseExtensions(p []byte) (Extensions, error) {
	var e Extensions
	for len(p) > 0 {
		if len(p) < ExtensionHeader {
			return e, malformed("extensions", "%d trailing bytes, shorter than an extension header", len(p))
		}
		t := ExtensionType(p[0])
		n := int(binary.LittleEndian.Uint16(p[1:]))
		p = p[ExtensionHeader:]
		if n > len(p) {
			return e, malformed("extensions", "extension 0x%02x claims %d bytes, %d left", uint8(t), n, len(p))
		}
		payload := p[:n]
		p = p[n:]
		dup := func(has *bool) error {
			if *has {
				return malformed("extensions", "extension 0x%02x given twice", uint8(t))
			}
			*has = true
			return nil
		}
		size := func(want int) error {
			if n != want {
				return malformed("extensions", "extension 0x%02x has %d bytes, want %d", uint8(t), n, want)
			}
			return nil
		}
		var err error
		switch t {
		case ExtClientInfo:
			if err = dup(&e.HasClientInfo); err == nil {
				err = validUTF8("client-info extension", payload)
				e.ClientInfo = string(payload)
			}
		case ExtCSPDeviceID:
			if err = dup(&e.HasCSPDeviceID); err == nil {
				if err = size(8); err == nil {
					e.CSPDeviceID = binary.LittleEndian.Uint64(payload)
				}
			}
		case ExtMessagePayloadVersion:
			if err = dup(&e.HasMessagePayloadVersion); err == nil {
				if err = size(1); err == nil {
					e.MessagePayloadVersion = payload[0]
				}
			}
		case ExtDeviceCookie:
			if err = dup(&e.HasDeviceCookie); err == nil {
				if err = size(CookieSize); err == nil {
					copy(e.DeviceCookie[:], payload)
				}
			}
		default:
			e.Unknown = append(e.Unknown, Extension{Type: t, Payload: payload})
		}
		if err != nil {
			return e, err
		}
	}
	return e, nil
}

// SealLoginAck returns the 32-byte login-ack, boxed with the session's next
// send nonce (SCK‖2 when the server-hello used SCK‖1).
func SealLoginAck(s *Session) []byte {
	return s.Seal(make([]byte, LoginAckDataSize))
}

// OpenLoginAck checks a 32-byte login-ack with the session's next receive
// nonce (SCK‖2). Its 16 reserved plaintext bytes are ignored (§18 row 13).
func OpenLoginAck(s *Session, p []byte) error {
	if len(p) != LoginAckSize {
		return wrongSize("login-ack", len(p), LoginAckSize)
	}
	if _, err := s.Open(p); err != nil {
		return fmt.Errorf("login-ack: %w", err)
	}
	return nil
}
