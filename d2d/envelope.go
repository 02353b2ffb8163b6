package d2d

import (
	"crypto/rand"
	mrand "math/rand/v2"
	"time"

	"d2m-mediator/proto/d2dpb"
)

// MessageTypeText is the CSP end-to-end type of a text message, used as the
// type of the messages the builders create.
const MessageTypeText = 0x01

// maxPadding bounds the random envelope padding. Padding only hides the
// length of the ciphertext, so its bytes are zero and only its length is
// random.
const maxPadding = 32

func padding() []byte { return make([]byte, mrand.IntN(maxPadding+1)) }

// newEnvelope returns an envelope with the fields every envelope carries:
// random padding, the sender's device id and protocol version V0_3 (what
// Android sends, docs/protocol.md §15).
func newEnvelope(senderDeviceID uint64) *d2dpb.Envelope {
	return &d2dpb.Envelope{
		Padding:         padding(),
		DeviceId:        senderDeviceID,
		ProtocolVersion: d2dpb.ProtocolVersion_V0_3,
	}
}

func contact(identity string) *d2dpb.ConversationId {
	return &d2dpb.ConversationId{Id: &d2dpb.ConversationId_Contact{Contact: identity}}
}

// NewOutgoingMessageEnvelope returns the envelope a device reflects after
// sending a text message with body to the contact to, created now.
func NewOutgoingMessageEnvelope(senderDeviceID uint64, to string, messageID uint64, body []byte) *d2dpb.Envelope {
	env := newEnvelope(senderDeviceID)
	env.Content = &d2dpb.Envelope_OutgoingMessage{OutgoingMessage: &d2dpb.OutgoingMessage{
		Conversation: contact(to),
		MessageId:    messageID,
		CreatedAt:    uint64(time.Now().UnixMilli()),
		Type:         MessageTypeText,
		Body:         body,
	}}
	return env
}

// NewIncomingMessageEnvelope returns the envelope the leader reflects after
// receiving a text message from the contact from; createdAt is Unix ms. The
// CSP message nonce is random, as it would be on a real message.
func NewIncomingMessageEnvelope(senderDeviceID uint64, from string, messageID uint64, body []byte, createdAt uint64) *d2dpb.Envelope {
	nonce := make([]byte, NonceSize)
	rand.Read(nonce) // never fails since Go 1.24
	env := newEnvelope(senderDeviceID)
	env.Content = &d2dpb.Envelope_IncomingMessage{IncomingMessage: &d2dpb.IncomingMessage{
		SenderIdentity: from,
		MessageId:      messageID,
		CreatedAt:      createdAt,
		Type:           MessageTypeText,
		Body:           body,
		Nonce:          nonce,
	}}
	return env
}

// NewOutgoingMessageSentUpdate returns the envelope a device reflects when
// the chat server acknowledged message messageID to the contact to: the
// "simple realistic envelope" of docs/protocol.md §15, shaped like Android's
// Reflect.kt.
func NewOutgoingMessageSentUpdate(senderDeviceID uint64, to string, messageID uint64) *d2dpb.Envelope {
	env := newEnvelope(senderDeviceID)
	env.Content = &d2dpb.Envelope_OutgoingMessageUpdate{OutgoingMessageUpdate: &d2dpb.OutgoingMessageUpdate{
		Updates: []*d2dpb.OutgoingMessageUpdate_Update{{
			Conversation: contact(to),
			MessageId:    messageID,
			Update:       &d2dpb.OutgoingMessageUpdate_Update_Sent{Sent: &d2dpb.OutgoingMessageUpdate_Sent{}},
		}},
	}}
	return env
}

// NewDeviceInfo returns the device info a device sends, encrypted with
// SealDeviceInfo, in ClientHello.encrypted_device_info.
func NewDeviceInfo(platform d2dpb.DeviceInfo_Platform, platformDetails, appVersion, label string) *d2dpb.DeviceInfo {
	return &d2dpb.DeviceInfo{
		Padding:         padding(),
		Platform:        platform,
		PlatformDetails: platformDetails,
		AppVersion:      appVersion,
		Label:           label,
	}
}
