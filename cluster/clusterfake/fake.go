// Package clusterfake is an in-memory stand-in for the mediator's side of
// a planned shard move: cluster.Hooks that keep each shard's data as bytes
// with a generation and record every call, and a cluster.Transport that
// hands an export to the recipient node in the same process. The control
// plane tests of integration/cluster use it to drive cluster.Node without
// a mediator; the mediator's own moves (mediator/daemon) are tested with
// real processes. The server never imports it.
package clusterfake

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"d2m-mediator/cluster"
)

// Hooks is one node's fake store of shard data plus a log of the hook
// calls ("drain 2a", "export 2a", "import 2a", "resume 2a").
type Hooks struct {
	mu    sync.Mutex
	data  map[cluster.Shard][]byte
	gens  map[cluster.Shard]int64
	calls []string
	// Block, if set for a shard, is waited on in Drain: a test holds a
	// move in the draining state with it.
	block map[cluster.Shard]chan struct{}
	// Fail makes the named hook ("drain", "export", "import") fail for a
	// shard.
	fail map[string]cluster.Shard
}

// NewHooks returns empty fake hooks.
func NewHooks() *Hooks {
	return &Hooks{data: make(map[cluster.Shard][]byte), gens: make(map[cluster.Shard]int64),
		block: make(map[cluster.Shard]chan struct{}), fail: make(map[string]cluster.Shard)}
}

// Put sets the data a shard holds on this node.
func (h *Hooks) Put(s cluster.Shard, data []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.data[s] = bytes.Clone(data)
}

// Data returns the data a shard holds on this node.
func (h *Hooks) Data(s cluster.Shard) ([]byte, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, ok := h.data[s]
	return bytes.Clone(d), ok
}

// Calls returns the hook calls so far.
func (h *Hooks) Calls() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.calls...)
}

// Block makes Drain of s wait until the returned function is called.
func (h *Hooks) Block(s cluster.Shard) (release func()) {
	ch := make(chan struct{})
	h.mu.Lock()
	h.block[s] = ch
	h.mu.Unlock()
	var once sync.Once
	return func() { once.Do(func() { close(ch) }) }
}

// Fail makes hook ("drain", "export" or "import") fail for s.
func (h *Hooks) Fail(hook string, s cluster.Shard) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.fail[hook] = s
}

func (h *Hooks) record(hook string, s cluster.Shard) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls = append(h.calls, hook+" "+s.String())
	if f, ok := h.fail[hook]; ok && f == s {
		return fmt.Errorf("clusterfake: %s %s fails", hook, s)
	}
	return nil
}

// Drain implements cluster.Hooks.
func (h *Hooks) Drain(ctx context.Context, s cluster.Shard) error {
	if err := h.record("drain", s); err != nil {
		return err
	}
	h.mu.Lock()
	ch := h.block[s]
	h.mu.Unlock()
	if ch != nil {
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Export implements cluster.Hooks.
func (h *Hooks) Export(ctx context.Context, s cluster.Shard) (io.ReadCloser, error) {
	if err := h.record("export", s); err != nil {
		return nil, err
	}
	d, _ := h.Data(s)
	return io.NopCloser(bytes.NewReader(d)), nil
}

// Import implements cluster.Hooks: it replaces the shard's data.
func (h *Hooks) Import(ctx context.Context, s cluster.Shard, gen int64, r io.Reader) error {
	if err := h.record("import", s); err != nil {
		return err
	}
	d, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.data[s], h.gens[s] = d, gen
	return nil
}

// Drop implements cluster.Hooks: it deletes a copy of generation ≤ gen.
func (h *Hooks) Drop(ctx context.Context, s cluster.Shard, gen int64) error {
	if err := h.record("drop", s); err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.gens[s] <= gen {
		delete(h.data, s)
	}
	return nil
}

// Reset implements cluster.Hooks.
func (h *Hooks) Reset(ctx context.Context, s cluster.Shard, gen int64) error {
	if err := h.record("reset", s); err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.data, s)
	h.gens[s] = gen
	return nil
}

// Settle implements cluster.Hooks.
func (h *Hooks) Settle(ctx context.Context, shards ...cluster.Shard) error {
	for _, s := range shards {
		if err := h.record("settle", s); err != nil {
			return err
		}
	}
	return nil
}

// Generation implements cluster.Hooks.
func (h *Hooks) Generation(s cluster.Shard) (int64, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, has := h.data[s]
	return h.gens[s], has
}

// Transport hands exports to nodes registered in the same process.
type Transport struct {
	mu    sync.Mutex
	nodes map[string]*cluster.Node
}

// NewTransport returns a transport with no nodes.
func NewTransport() *Transport { return &Transport{nodes: make(map[string]*cluster.Node)} }

// Add registers a node as a recipient.
func (t *Transport) Add(n *cluster.Node) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.nodes[n.ID()] = n
}

// Remove unregisters a node: sends to it fail as to a dead process.
func (t *Transport) Remove(id string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.nodes, id)
}

// Send implements cluster.Transport.
func (t *Transport) Send(ctx context.Context, to cluster.Member, mi cluster.MoveInfo, data io.Reader) error {
	t.mu.Lock()
	n := t.nodes[to.ID]
	t.mu.Unlock()
	if n == nil {
		return errors.New("clusterfake: no route to " + to.ID)
	}
	return n.Receive(ctx, mi, data)
}
