package main

import (
	"bytes"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/proto/d2dpb"
	"d2m-mediator/proto/d2mpb"
)

const timeFormat = "2006-01-02 15:04:05"

// printer serializes output: every call writes whole lines, so events from
// the d2m reader, the CSP reader and commands never interleave mid-line.
type printer struct {
	mu sync.Mutex
	w  io.Writer
}

func newPrinter(w io.Writer) *printer { return &printer{w: w} }

func (p *printer) printf(format string, args ...any) {
	p.block(fmt.Sprintf(format, args...))
}

// block writes a multi-line text at once.
func (p *printer) block(s string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	io.WriteString(p.w, strings.TrimRight(s, "\n")+"\n")
}

func fmtMillis(ms uint64) string {
	return time.UnixMilli(int64(ms)).Format(timeFormat + ".000")
}

func fmtMsgID(id uint64) string { return fmt.Sprintf("%016x", id) }

// describeEnvelope summarizes a decrypted envelope on one line.
func describeEnvelope(env *d2dpb.Envelope) string {
	switch c := env.Content.(type) {
	case *d2dpb.Envelope_OutgoingMessage:
		m := c.OutgoingMessage
		return fmt.Sprintf("outgoing message to %s id %s%s: %s",
			conversation(m.GetConversation()), fmtMsgID(m.GetMessageId()), msgType(m.GetType()), text(m.GetBody()))
	case *d2dpb.Envelope_IncomingMessage:
		m := c.IncomingMessage
		return fmt.Sprintf("incoming message from %s id %s%s: %s",
			m.GetSenderIdentity(), fmtMsgID(m.GetMessageId()), msgType(m.GetType()), text(m.GetBody()))
	case *d2dpb.Envelope_OutgoingMessageUpdate:
		var parts []string
		for _, u := range c.OutgoingMessageUpdate.GetUpdates() {
			state := "updated"
			if u.GetSent() != nil {
				state = "sent"
			}
			parts = append(parts, fmt.Sprintf("message to %s id %s %s",
				conversation(u.GetConversation()), fmtMsgID(u.GetMessageId()), state))
		}
		return "outgoing message update: " + strings.Join(parts, ", ")
	case nil:
		return "envelope without content"
	default:
		// *d2dpb.Envelope_ContactSync → "envelope ContactSync", etc.
		name := strings.TrimPrefix(fmt.Sprintf("%T", c), "*d2dpb.Envelope_")
		return "envelope " + name
	}
}

func conversation(c *d2dpb.ConversationId) string {
	switch id := c.GetId().(type) {
	case *d2dpb.ConversationId_Contact:
		return id.Contact
	case *d2dpb.ConversationId_Group:
		return fmt.Sprintf("group %x", id.Group)
	case *d2dpb.ConversationId_DistributionList:
		return fmt.Sprintf("distribution list %x", id.DistributionList)
	}
	return "(no conversation)"
}

func msgType(t uint32) string {
	if t == d2d.MessageTypeText {
		return ""
	}
	return fmt.Sprintf(" (type 0x%02x)", t)
}

// text quotes a message body; the simulator sends text as the body.
func text(b []byte) string { return fmt.Sprintf("%q", b) }

// devicesTable renders DevicesInfo with the device info decrypted.
func (d *device) devicesTable(info *d2mpb.DevicesInfo) string {
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "%d device(s):\n", len(info.GetAugmentedDeviceInfo()))
	tw := tabwriter.NewWriter(&buf, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  DEVICE ID\tLABEL\tPLATFORM\tCONNECTION\tPOLICY\t")
	ids := make([]uint64, 0, len(info.GetAugmentedDeviceInfo()))
	for id := range info.GetAugmentedDeviceInfo() {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		a := info.GetAugmentedDeviceInfo()[id]
		label, platform := "(cannot decrypt)", "?"
		if di, err := d.o.keys.OpenDeviceInfo(a.GetEncryptedDeviceInfo()); err == nil {
			label, platform = di.GetLabel(), di.GetPlatform().String()
			if di.GetPlatformDetails() != "" {
				platform += " (" + di.GetPlatformDetails() + ")"
			}
		}
		var conn string
		switch s := a.GetConnectionState().(type) {
		case *d2mpb.DevicesInfo_AugmentedDeviceInfo_ConnectedSince:
			conn = "connected since " + fmtMillis(s.ConnectedSince)
		case *d2mpb.DevicesInfo_AugmentedDeviceInfo_LastDisconnectAt:
			conn = "disconnected at " + fmtMillis(s.LastDisconnectAt)
		default:
			conn = "?"
		}
		self := ""
		if id == d.id {
			self = "(this device)"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\n", fmtID(id), label, platform, conn, a.GetDeviceSlotExpirationPolicy(), self)
	}
	tw.Flush()
	lines := strings.Split(buf.String(), "\n")
	for i, l := range lines {
		lines[i] = strings.TrimRight(l, " ")
	}
	return strings.Join(lines, "\n")
}

// scopeName decrypts a transaction scope. iOS encrypts the bare scope
// byte instead of a TransactionScope message (docs/protocol.md §11).
func (d *device) scopeName(blob []byte) string {
	if len(blob) == 0 {
		return "none"
	}
	if s, err := d.o.keys.OpenTransactionScope(blob); err == nil {
		return s.GetScope().String()
	}
	if b, err := d2d.Open(&d.o.keys.DGTSK, blob); err == nil && len(b) == 1 {
		return d2dpb.TransactionScope_Scope(b[0]).String() + " (raw byte)"
	}
	return "(cannot decrypt)"
}

// describeClose explains a close code; negative means no close frame.
func describeClose(code int) string {
	if code < 0 {
		return "connection lost without a close frame"
	}
	cc := d2m.CloseCode(code)
	s := fmt.Sprintf("%d %s", code, cc)
	switch {
	case cc == d2m.CloseNormal:
	case cc.Reconnects():
		s += " (a real client reconnects on its own)"
	default:
		s += " (a real client waits for the user)"
	}
	switch cc {
	case d2m.CloseDropped, d2m.CloseQueueLimit:
		s += "; this device's slot is gone"
	case d2m.CloseSlotStateMismatch:
		s += "; drop --existing for a new slot, or the slot was dropped"
	case d2m.CloseDuplicate:
		s += "; another connection took this device id"
	}
	return s
}
