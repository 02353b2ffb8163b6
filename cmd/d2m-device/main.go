// Command d2m-device is a device simulator for trying the mediator by hand.
// It connects one device of a device group to a mediator, logs in to the chat
// server through the mediator's proxy, behaves like a real client (acks the
// reflection backlog, answers and sends CSP echoes, unblocks and reflects
// incoming messages once it is leader) and reads commands from stdin:
//
//	send ID TEXT     reflect an outgoing message, then send it to identity ID
//	devices          list the group's devices (decrypted device info)
//	drop ID          drop a device of the group
//	begin [SCOPE]    begin a transaction (default scope DROP_DEVICE)
//	commit           commit the transaction
//	shared VERSION   set the shared device data
//	status           show this device's state
//	help, quit
//
// Everything it receives is printed decrypted, one event per line. It exits
// with status 0 after quit (or end of input) and 1 when the connection ends
// otherwise.
package main

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"d2m-mediator/chatproxy/cspclient"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/proto/d2dpb"
	"d2m-mediator/proto/d2mpb"
)

func main() {
	if err := run(); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "d2m-device:", err)
		os.Exit(1)
	}
}

const usage = `Usage: d2m-device [flags]

Simulates one device of a Threema-style device group against a mediator.
Start the first device of a new group with --new; it prints the device group
key and identity key to give to the other devices of the same user:

  d2m-device --new --identity ALICE001 --chat-server-key HEX
  d2m-device --key HEX --identity ALICE001 --identity-key HEX --chat-server-key HEX

The chat server key is the public_key of the mediator's log line "no
--chat-server given: started the local stand-in chat server". Type help once
connected for the commands.

Flags:
`

// options are the parsed command-line flags.
type options struct {
	url         string
	serverGroup string
	keys        d2d.Keys
	deviceID    uint64
	label       string
	platform    d2dpb.DeviceInfo_Platform
	existing    bool
	volatile    bool
	dropLRU     bool
	noCSP       bool
	identity    cspclient.Identity
	chatKey     [32]byte
}

func run() error {
	o, err := parseFlags(os.Args[1:])
	if err != nil {
		return err
	}
	return runDevice(o, os.Stdin, newPrinter(os.Stdout))
}

func parseFlags(args []string) (*options, error) {
	fs := flag.NewFlagSet("d2m-device", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), usage)
		fs.PrintDefaults()
	}
	url := fs.String("url", "ws://127.0.0.1:8765", "mediator base `URL`")
	key := fs.String("key", "", "device group key, 64 hex digits (all devices of a user share it)")
	newGroup := fs.Bool("new", false, "create a new device group key (and identity key, identity) and print them")
	device := fs.String("device", "", "mediator device `ID` as printed (0x and 16 hex digits), 0x-hex or dec:N; random if empty")
	identity := fs.String("identity", "", "Threema identity, 8 characters of 0-9 A-Z *; random with --new")
	identityKey := fs.String("identity-key", "", "identity secret key, 64 hex digits; generated with --new")
	chatKey := fs.String("chat-server-key", "", "chat server public key, 64 hex digits (the stand-in's public_key)")
	noCSP := fs.Bool("no-csp", false, "d2m only: no chat-server login through the proxy")
	serverGroup := fs.String("server-group", "7f", "server group sent in the URL (selects the chat server)")
	label := fs.String("label", "", "device label in the device info (default \"d2m-device <id>\")")
	platform := fs.String("platform", "desktop", "platform in the device info: android, ios, desktop, web")
	existing := fs.Bool("existing", false, "expect an existing device slot (the mediator closes with 4115 otherwise)")
	volatile := fs.Bool("volatile", false, "VOLATILE slot (removed shortly after disconnect) instead of PERSISTENT")
	dropLRU := fs.Bool("drop-least-recent", false, "when the group is full, drop the least recently used device instead of failing with 4111")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q (commands are read from stdin)", fs.Args())
	}
	o := &options{url: *url, serverGroup: *serverGroup, existing: *existing,
		volatile: *volatile, dropLRU: *dropLRU, noCSP: *noCSP}
	var announce []string

	// Device group.
	switch {
	case *newGroup && *key != "":
		return nil, errors.New("--new and --key exclude each other")
	case *newGroup:
		dgk := d2d.NewDeviceGroupKey()
		*key = dgk.Hex()
		announce = append(announce, "new device group key: "+*key)
	case *key == "":
		return nil, errors.New("--key HEX or --new is required")
	}
	dgk, err := d2d.ParseDeviceGroupKey(*key)
	if err != nil {
		return nil, fmt.Errorf("--key: %w", err)
	}
	o.keys = d2d.DeriveKeys(dgk)

	// Device.
	if *device == "" {
		o.deviceID = randomDeviceID()
	} else if o.deviceID, err = parseDeviceID(*device); err != nil {
		return nil, fmt.Errorf("--device: %w", err)
	}
	o.label = *label
	if o.label == "" {
		o.label = fmt.Sprintf("d2m-device %s", fmtID(o.deviceID))
	}
	p, ok := d2dpb.DeviceInfo_Platform_value[strings.ToUpper(*platform)]
	if !ok {
		return nil, fmt.Errorf("--platform %q: want android, ios, desktop or web", *platform)
	}
	o.platform = d2dpb.DeviceInfo_Platform(p)

	// Chat server.
	if !o.noCSP {
		if *chatKey == "" {
			return nil, errors.New("--chat-server-key HEX is required (or --no-csp for a d2m-only device)")
		}
		if o.chatKey, err = parseKey(*chatKey); err != nil {
			return nil, fmt.Errorf("--chat-server-key: %w", err)
		}
		if o.identity, announce, err = parseIdentity(*identity, *identityKey, *newGroup, announce); err != nil {
			return nil, err
		}
		*identity = o.identity.ID
		*identityKey = hex.EncodeToString(o.identity.SecretKey[:])
	}
	if *newGroup {
		hint := "another device of this user: d2m-device --key " + *key
		if !o.noCSP {
			hint += " --identity " + *identity + " --identity-key " + *identityKey + " --chat-server-key " + *chatKey
		} else {
			hint += " --no-csp"
		}
		if *url != "ws://127.0.0.1:8765" {
			hint += " --url " + *url
		}
		announce = append(announce, hint)
	}
	for _, l := range announce {
		fmt.Println(l)
	}
	return o, nil
}

// parseIdentity returns the CSP identity from the flags; with --new it
// generates whatever is missing and appends what it made to announce.
func parseIdentity(id, key string, generate bool, announce []string) (cspclient.Identity, []string, error) {
	if id == "" {
		if !generate {
			return cspclient.Identity{}, nil, errors.New("--identity is required (or --new to make one up)")
		}
		id = randomIdentity()
		announce = append(announce, "new identity: "+id)
	}
	if key == "" {
		if !generate {
			return cspclient.Identity{}, nil, errors.New("--identity-key HEX is required (or --new to generate one)")
		}
		ident, err := cspclient.NewIdentity(id)
		if err != nil {
			return ident, nil, fmt.Errorf("--identity: %w", err)
		}
		return ident, append(announce, "new identity secret key: "+hex.EncodeToString(ident.SecretKey[:])), nil
	}
	sk, err := parseKey(key)
	if err != nil {
		return cspclient.Identity{}, nil, fmt.Errorf("--identity-key: %w", err)
	}
	ident, err := cspclient.IdentityFromSecret(id, sk)
	if err != nil {
		return ident, nil, fmt.Errorf("--identity: %w", err)
	}
	return ident, announce, nil
}

func parseKey(s string) ([32]byte, error) {
	var k [32]byte
	b, err := hex.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return k, err
	}
	if len(b) != 32 {
		return k, fmt.Errorf("want 32 bytes (64 hex digits), got %d bytes", len(b))
	}
	copy(k[:], b)
	return k, nil
}

// parseDeviceID reads an id in d2m.ParseDeviceID's forms (as printed,
// 0x-hex, or dec:N). Zero is refused: the protocol uses random non-zero ids.
func parseDeviceID(s string) (uint64, error) {
	id, err := d2m.ParseDeviceID(s)
	if err == nil && id == 0 {
		err = errors.New("device id 0 is not allowed")
	}
	return id, err
}

func randomDeviceID() uint64 {
	var b [8]byte
	rand.Read(b[:])
	return binary.LittleEndian.Uint64(b[:]) | 1
}

func randomIdentity() string {
	const alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
	b := make([]byte, 8)
	rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// fmtID formats a device id the way the mediator CLI and README do.
func fmtID(id uint64) string { return d2m.FormatDeviceID(id) }

// slotPolicies returns the ClientHello slot policies the flags select.
func (o *options) slotPolicies() (d2mpb.ClientHello_DeviceSlotsExhaustedPolicy, d2mpb.DeviceSlotExpirationPolicy) {
	ex, exp := d2mpb.ClientHello_REJECT, d2mpb.DeviceSlotExpirationPolicy_PERSISTENT
	if o.dropLRU {
		ex = d2mpb.ClientHello_DROP_LEAST_RECENT
	}
	if o.volatile {
		exp = d2mpb.DeviceSlotExpirationPolicy_VOLATILE
	}
	return ex, exp
}
