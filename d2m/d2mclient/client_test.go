package d2mclient

import (
	"testing"

	"d2m-mediator/d2m"
	"d2m-mediator/proto/d2mpb"
)

func TestMessageDecode(t *testing.T) {
	frame := d2m.EncodeReflected(0, 3, 4, []byte("e"))
	v, err := Message{Type: d2m.TypeReflected, Payload: frame[4:]}.Decode()
	if r, ok := v.(d2m.Reflected); err != nil || !ok || r.ID != 3 {
		t.Fatalf("%v %v", v, err)
	}
	frame = d2m.MustEncodeMessage(d2m.TypeDropDeviceAck, &d2mpb.DropDeviceAck{DeviceId: 9})
	v, err = Message{Type: d2m.TypeDropDeviceAck, Payload: frame[4:]}.Decode()
	if a, ok := v.(*d2mpb.DropDeviceAck); err != nil || !ok || a.DeviceId != 9 {
		t.Fatalf("%v %v", v, err)
	}
	if _, err := (Message{Type: 0x99}).Decode(); err == nil {
		t.Fatal("unknown type decoded")
	}
}
