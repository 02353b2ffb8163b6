package integration

import (
	"regexp"
	"testing"
	"time"

	"d2m-mediator/d2m"
)

// TestIdleGroupsLeaveMemory: a group's in-memory state lives only while a
// device of it is connected, and is reloaded intact from disk afterwards.
func TestIdleGroupsLeaveMemory(t *testing.T) {
	s := startServer(t)
	loaded := func() string {
		_, body := s.adminGet("/metrics")
		m := regexp.MustCompile(`(?m)^mediator_groups_loaded (\S+)$`).FindSubmatch(body)
		if m == nil {
			t.Fatalf("no mediator_groups_loaded in /metrics")
		}
		return string(m[1])
	}
	var groups []*group
	for i := 0; i < 3; i++ {
		g := newGroup()
		groups = append(groups, g)
		a, _ := connectReady(t, s, g.config(s, 1))
		b, _ := connectReady(t, s, g.config(s, 2))
		b.Close()
		id, _ := a.Reflect(ctxT(t, time.Second), envelope(i), 0)
		expectAck(t, a, id)
		a.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for loaded() != "0" {
		if time.Now().After(deadline) {
			t.Fatalf("groups still loaded: %s", loaded())
		}
		time.Sleep(50 * time.Millisecond)
	}
	for i, g := range groups {
		_, backlog := connectReady(t, s, g.config(s, 2))
		if len(backlog) != 1 || string(backlog[0].Envelope) != string(envelope(i)) {
			t.Fatalf("group %d after eviction: %v", i, backlog)
		}
		info := devicesInfo(t, connect(t, s, g.config(s, 1)))
		if len(info) != 2 {
			t.Fatalf("group %d slots %v", i, keys(info))
		}
	}
	_ = d2m.TypeReflected
}
