package main

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode"

	"d2m-mediator/chatproxy/csp"
	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/proto/d2dpb"
	"d2m-mediator/proto/d2mpb"

	"google.golang.org/protobuf/proto"
)

const help = `commands:
  send ID TEXT           reflect an outgoing message, wait for its ReflectAck, send it to identity ID
  devices                list the group's devices (GetDevicesInfo, device info decrypted)
  drop DEVICE            drop a device of the group (id as printed, 0x-hex or dec:N) and wait for DropDeviceAck
  begin [SCOPE] [TTL]    begin a transaction (scope default DROP_DEVICE, ttl seconds, 0 = server max)
  commit                 commit the transaction
  shared VERSION         set the shared device data (d2d protocol version)
  status                 this device's id, group, leader and chat-server state
  help                   this text
  quit                   close the connection and exit (also: end of input, Ctrl-C)`

// command runs one input line and reports whether it was quit.
func (d *device) command(line string) (quit bool) {
	fields := strings.Fields(line)
	if len(fields) == 0 {
		return false
	}
	var err error
	switch cmd, args := strings.ToLower(fields[0]), fields[1:]; cmd {
	case "quit", "exit":
		return true
	case "help", "?":
		d.out.block(help)
	case "send":
		err = d.cmdSend(line, args)
	case "devices":
		err = d.cmdDevices()
	case "drop":
		err = d.cmdDrop(args)
	case "begin":
		err = d.cmdBegin(args)
	case "commit":
		err = d.cmdCommit()
	case "shared":
		err = d.cmdShared(args)
	case "status":
		d.cmdStatus()
	default:
		err = fmt.Errorf("unknown command %q (type help)", cmd)
	}
	if err != nil {
		d.out.printf("%s: %v", fields[0], err)
	}
	return false
}

// cmdSend reflects the outgoing message first and sends it through the chat
// server only once the mediator stored it (the order the apps use).
func (d *device) cmdSend(line string, args []string) error {
	if len(args) < 2 {
		return errors.New("usage: send ID TEXT")
	}
	to := strings.ToUpper(args[0])
	if _, err := csp.ParseIdentity(to); err != nil {
		return err
	}
	body := []byte(afterFields(line, 2)) // the text, inner spaces kept
	var b [8]byte
	rand.Read(b[:])
	msgID := binary.LittleEndian.Uint64(b[:])

	ack, err := d.reflect(d2d.NewOutgoingMessageEnvelope(d.id, to, msgID, body))
	if err != nil {
		return fmt.Errorf("reflect: %w", err)
	}
	cl := d.cspClient()
	if cl == nil {
		d.out.printf("reflected outgoing message to %s id %s (stored %s); no chat-server session, not sent",
			to, fmtMsgID(msgID), fmtMillis(ack.Timestamp))
		return nil
	}
	if err := cl.SendMessage(to, msgID, body); err != nil {
		return err
	}
	d.out.printf("sent message to %s id %s (reflected, stored %s): %q", to, fmtMsgID(msgID), fmtMillis(ack.Timestamp), body)
	return nil
}

func (d *device) cmdDevices() error {
	_, err := d.request(waitKey{d2m.TypeDevicesInfo, 0}, d2m.TypeGetDevicesInfo, &d2mpb.GetDevicesInfo{})
	return err
}

func (d *device) cmdDrop(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: drop DEVICE")
	}
	id, err := parseDeviceID(args[0])
	if err != nil {
		return err
	}
	if id == d.id {
		d.out.printf("dropping this device: the mediator acks, then closes with 4113")
	}
	_, err = d.request(waitKey{d2m.TypeDropDeviceAck, id}, d2m.TypeDropDevice, &d2mpb.DropDevice{DeviceId: id})
	return err
}

func (d *device) cmdBegin(args []string) error {
	scope := d2dpb.TransactionScope_DROP_DEVICE
	var ttl uint64
	if len(args) > 2 {
		return errors.New("usage: begin [SCOPE] [TTL]")
	}
	if len(args) > 0 {
		v, ok := d2dpb.TransactionScope_Scope_value[strings.ToUpper(args[0])]
		if !ok {
			n, err := strconv.ParseUint(args[0], 10, 8)
			if err != nil {
				return fmt.Errorf("unknown scope %q; scopes: %s", args[0], scopeNames())
			}
			v = int32(n)
		}
		scope = d2dpb.TransactionScope_Scope(v)
	}
	if len(args) > 1 {
		var err error
		if ttl, err = strconv.ParseUint(args[1], 10, 32); err != nil {
			return fmt.Errorf("ttl: %w", err)
		}
	}
	if d.lockHeld() {
		return errors.New("this device already holds the lock; commit first (the mediator closes with 4010 otherwise)")
	}
	blob, err := d.o.keys.SealTransactionScope(&d2dpb.TransactionScope{Scope: scope})
	if err != nil {
		return err
	}
	d.out.printf("beginning transaction (scope %s)", scope)
	_, err = d.request(waitKey{d2m.TypeBeginTransaction, 0}, d2m.TypeBeginTransaction,
		&d2mpb.BeginTransaction{EncryptedScope: blob, Ttl: uint32(ttl)})
	return err
}

func (d *device) cmdCommit() error {
	if !d.lockHeld() {
		return errors.New("this device holds no transaction lock (the mediator closes with 4010 otherwise)")
	}
	_, err := d.request(waitKey{d2m.TypeCommitTransaction, 0}, d2m.TypeCommitTransaction, &d2mpb.CommitTransaction{})
	return err
}

func (d *device) cmdShared(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: shared VERSION")
	}
	v, err := strconv.ParseUint(args[0], 10, 32)
	if err != nil {
		return err
	}
	blob, err := d.o.keys.SealSharedDeviceData(&d2dpb.SharedDeviceData{Version: uint32(v)})
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), replyTimeout)
	defer cancel()
	if err := d.c.SendMessage(ctx, d2m.TypeSetSharedDeviceData, &d2mpb.SetSharedDeviceData{EncryptedSharedDeviceData: blob}); err != nil {
		return err
	}
	d.out.printf("shared device data set (version %d); every later ServerInfo carries it", v)
	return nil
}

func (d *device) cmdStatus() {
	gid := d2m.DeviceGroupID(d.o.keys.DeviceGroupID())
	role := "not leader"
	if d.isLeader() {
		role = "leader"
	}
	if d.lockHeld() {
		role += ", holds the transaction lock"
	}
	chat := "no chat-server session"
	if cl := d.cspClient(); cl != nil {
		chat = fmt.Sprintf("logged in as %s (csp device id %s)", cl.Identity().ID, fmtID(cl.CSPDeviceID()))
	}
	d.out.printf("device %s (%q), group %s, %s, %s", fmtID(d.id), d.o.label, gid, role, chat)
}

// request sends a protobuf message of type t and waits for the reply k;
// the d2m reader prints the reply.
func (d *device) request(k waitKey, t d2m.PayloadType, m proto.Message) (d2mclient.Message, error) {
	ch := d.expect(k)
	ctx, cancel := context.WithTimeout(context.Background(), replyTimeout)
	err := d.c.SendMessage(ctx, t, m)
	cancel()
	if err != nil {
		d.take(k)
		return d2mclient.Message{}, err
	}
	return d.await(k, ch)
}

func (d *device) lockHeld() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.holdsLock
}

func scopeNames() string {
	names := make([]string, len(d2dpb.TransactionScope_Scope_name))
	for v, n := range d2dpb.TransactionScope_Scope_name {
		names[v] = n
	}
	return strings.Join(names, ", ")
}

// afterFields returns line without its first n fields, trimmed.
func afterFields(line string, n int) string {
	rest := strings.TrimSpace(line)
	for range n {
		i := strings.IndexFunc(rest, unicode.IsSpace)
		if i < 0 {
			return ""
		}
		rest = strings.TrimLeftFunc(rest[i:], unicode.IsSpace)
	}
	return rest
}
