package pgstore

import (
	"testing"

	"d2m-mediator/reflection"
)

// putSlots creates the slots of devices ids in g, failing the test on an
// error.
func putSlots(t testing.TB, s *Store, g reflection.GroupID, ids ...reflection.DeviceID) {
	t.Helper()
	for _, d := range ids {
		if err := reflection.Sync(func(done func(error)) { s.PutSlot(g, reflection.Slot{DeviceID: d, CreatedAt: 1}, done) }); err != nil {
			t.Fatal(err)
		}
	}
}

// appendEnvelope appends env from device 1 of g and waits for the outcome.
func appendEnvelope(s *Store, g reflection.GroupID, env string) error {
	_, err := reflection.SyncAppend(func(done func(reflection.AppendResult, error)) {
		s.Append(reflection.AppendRequest{Group: g, Sender: 1, Envelope: []byte(env)}, done)
	})
	return err
}
