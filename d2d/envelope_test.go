package d2d

import (
	"bytes"
	"testing"
	"time"

	"d2m-mediator/proto/d2dpb"
)

func TestNewOutgoingMessageEnvelope(t *testing.T) {
	before := uint64(time.Now().UnixMilli())
	env := NewOutgoingMessageEnvelope(7, "ECHOECHO", 42, []byte("hi"))
	checkCommon(t, env, 7)
	m := env.GetOutgoingMessage()
	if m.GetConversation().GetContact() != "ECHOECHO" || m.GetMessageId() != 42 ||
		m.GetType() != MessageTypeText || !bytes.Equal(m.GetBody(), []byte("hi")) ||
		m.GetCreatedAt() < before {
		t.Errorf("outgoing message = %v", m)
	}
}

func TestNewIncomingMessageEnvelope(t *testing.T) {
	env := NewIncomingMessageEnvelope(8, "ABCD1234", 43, []byte("yo"), 1700000000000)
	checkCommon(t, env, 8)
	m := env.GetIncomingMessage()
	if m.GetSenderIdentity() != "ABCD1234" || m.GetMessageId() != 43 || m.GetCreatedAt() != 1700000000000 ||
		m.GetType() != MessageTypeText || !bytes.Equal(m.GetBody(), []byte("yo")) || len(m.GetNonce()) != NonceSize {
		t.Errorf("incoming message = %v", m)
	}
}

func TestNewOutgoingMessageSentUpdate(t *testing.T) {
	env := NewOutgoingMessageSentUpdate(9, "ECHOECHO", 44)
	checkCommon(t, env, 9)
	u := env.GetOutgoingMessageUpdate().GetUpdates()
	if len(u) != 1 || u[0].GetConversation().GetContact() != "ECHOECHO" ||
		u[0].GetMessageId() != 44 || u[0].GetSent() == nil {
		t.Errorf("updates = %v", u)
	}
}

func checkCommon(t *testing.T, env *d2dpb.Envelope, deviceID uint64) {
	t.Helper()
	if env.GetDeviceId() != deviceID || env.GetProtocolVersion() != d2dpb.ProtocolVersion_V0_3 ||
		len(env.GetPadding()) > maxPadding {
		t.Errorf("envelope = %v", env)
	}
}

// TestPaddingVaries checks that padding lengths spread over 0..maxPadding,
// so envelope ciphertext lengths do not give the content away.
func TestPaddingVaries(t *testing.T) {
	seen := map[int]bool{}
	for range 1000 {
		seen[len(padding())] = true
	}
	if len(seen) < maxPadding/2 {
		t.Errorf("only %d distinct padding lengths", len(seen))
	}
	for n := range seen {
		if n < 0 || n > maxPadding {
			t.Errorf("padding length %d out of range", n)
		}
	}
}
