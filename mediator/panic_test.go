package mediator_test

import (
	"path/filepath"
	"testing"
	"time"

	"d2m-mediator/d2d"
	"d2m-mediator/d2m"
	"d2m-mediator/d2m/d2mclient"
	"d2m-mediator/mediator"
	"d2m-mediator/mediator/mediatortest"
	"d2m-mediator/reflection"
)

// panicStore panics when the handshake loads one particular group: a bug
// on the connection's own goroutine, outside net/http's recovery.
type panicStore struct {
	reflection.Store
	bad reflection.GroupID
}

func (s *panicStore) Group(g reflection.GroupID) (reflection.GroupState, error) {
	if g == s.bad {
		panic("injected bug")
	}
	return s.Store.Group(g)
}

// TestPanicClosesOnlyThatConnection: a panic while serving one device
// closes it with 1011 and gives back its handshake slot; the process and
// every other device keep going, and no goroutine is left behind (TestMain).
func TestPanicClosesOnlyThatConnection(t *testing.T) {
	db, err := reflection.Open(filepath.Join(t.TempDir(), "mediator.db"), reflection.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	badKeys := newKeys()
	bad := reflection.GroupID(badKeys.DeviceGroupID())
	srv := mediatortest.NewServer(t, mediator.Config{MaxHandshakes: 1, AdmissionWait: -1},
		mediatortest.WithStore(&panicStore{Store: db, bad: bad}))
	for i := 0; i < 3; i++ { // with one handshake slot, a leaked slot would 503 the next
		c, err := d2mclient.Dial(tctx(t, 5*time.Second), d2mclient.Config{URL: srv.URL, Keys: badKeys, DeviceID: 1})
		if err == nil {
			c.CloseNow()
			t.Fatal("handshake succeeded through a panic")
		}
		if c == nil || c.CloseCode(tctx(t, 5*time.Second)) != int(d2m.CloseInternalError) {
			t.Fatalf("attempt %d: %v, want a 1011 close", i, err)
		}
	}
	good, _ := readyDevice(t, srv.URL, d2d.DeriveKeys(d2d.NewDeviceGroupKey()), 1)
	good.Close()
}
