package cluster

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"d2m-mediator/d2m"
	"d2m-mediator/internal/faultproxy"
	"d2m-mediator/proto/d2mpb"
)

// TestFaultDeviceLink: a device reaches its node through a fault proxy,
// another device of its group directly. The link is cut three ways:
// blackholed (a half-open socket: the device vanished without a FIN),
// half-closed by the device (FIN upward) and half-closed toward it. Each
// time the node frees the connection on its own (within the idle timeout
// and the 5 s close handshake for the blackhole, at once for a FIN), and
// the device's slot and queue are untouched: the reflections its group
// stored meanwhile wait for it, and it gets them all, in order with
// consecutive ids, when it comes back directly.
func TestFaultDeviceLink(t *testing.T) {
	nodes := startFaultCluster(t, faultOpts{}, "f1", "f2")
	n := nodes[0]
	k := groupsOwnedBy(t, n, 1)[0]
	dp := startProxyT(t, n.d.DeviceAddr.String())
	viaProxy := "ws://" + dp.Addr()
	before := mediatorGoroutines()
	for _, fault := range []struct {
		name  string
		apply func()
		bound time.Duration
	}{
		{"blackhole", func() { dp.Blackhole(true) }, faultIdle + 6*time.Second},
		{"device half-closes", func() { dp.HalfClose(faultproxy.Up, true) }, time.Second},
		{"half-closed toward the device", func() { dp.HalfClose(faultproxy.Down, true) }, faultIdle + 6*time.Second},
	} {
		// Device 2 reflects directly (dialled anew each round: it idles
		// past the idle timeout while the node frees device 1).
		b, err := dialDevice(t, n.d.DeviceURL, k, 2)
		if err != nil {
			t.Fatal(err)
		}
		recvType(t, b, d2m.TypeReflectionQueueDry)
		a, err := dialDevice(t, viaProxy, k, 1)
		if err != nil {
			t.Fatal(err)
		}
		recvType(t, a, d2m.TypeReflectionQueueDry)
		open := openConns(n.mediatorNode)
		cut := time.Now()
		fault.apply()
		var envs []string
		for i := range 20 {
			env := fmt.Sprintf("%s-%02d", strings.ReplaceAll(fault.name, " ", "-"), i)
			if _, err := b.Reflect(context.Background(), []byte(env), 0); err != nil {
				t.Fatal(err)
			}
			recvType(t, b, d2m.TypeReflectAck)
			envs = append(envs, env)
		}
		waitUntil(t, fault.bound+2*time.Second, fault.name+": the node to free the device's connection", func() bool { return openConns(n.mediatorNode) < open })
		freed := time.Since(cut)
		t.Logf("(d)(e) %s: the node freed the device's connection %v after the fault (bound %v)", fault.name, freed.Round(time.Millisecond), fault.bound)
		if freed > fault.bound {
			t.Errorf("%s: the connection was freed %v after the fault, want within %v", fault.name, freed, fault.bound)
		}
		a.CloseNow()
		b.CloseNow()
		dp.Heal()
		// Back directly: the slot exists and holds everything.
		c, err := dialDevice(t, n.d.DeviceURL, k, 1)
		if err != nil {
			t.Fatal(err)
		}
		if st, q := c.ServerInfo.DeviceSlotState, c.ServerInfo.ReflectionQueueLength; st != d2mpb.DeviceSlotState_EXISTING || q != uint32(len(envs)) {
			t.Fatalf("%s: back with slot %v and %d queued, want EXISTING and %d", fault.name, st, q, len(envs))
		}
		c.Close()
		sameStrings(t, fault.name+": the queue after the fault", drainQueue(t, n.d.DeviceURL, k, 1), envs)
	}
	checkNothingLeft(t, before, nodes, dp)
}
