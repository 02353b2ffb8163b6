package integration

import (
	"d2m-mediator/d2d"
	"d2m-mediator/proto/d2dpb"
)

func incomingEnvelope(sender uint64, from string, id uint64, body []byte) *d2dpb.Envelope {
	return d2d.NewIncomingMessageEnvelope(sender, from, id, body, 0)
}

func outgoingEnvelope(sender uint64, to string, id uint64, body []byte) *d2dpb.Envelope {
	return d2d.NewOutgoingMessageEnvelope(sender, to, id, body)
}
