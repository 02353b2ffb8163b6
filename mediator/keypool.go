package mediator

import (
	"crypto/rand"
	"sync"

	"d2m-mediator/d2m"
)

// keyPool holds ephemeral X25519 server keys (ESK, docs/protocol.md §6.1) made
// ahead of time by one background goroutine, so that a handshake does not
// wait for a scalar multiplication on the accept path. Every key is used
// for exactly one connection; when the pool is empty (a burst larger than
// it), get makes one on the spot.
type keyPool struct {
	keys chan *d2m.EphemeralKey
	done chan struct{}
	once sync.Once
}

// keyPoolSize covers a burst of handshakes between refills; each key costs
// 64 bytes.
const keyPoolSize = 256

func newKeyPool(size int) *keyPool {
	return &keyPool{keys: make(chan *d2m.EphemeralKey, size), done: make(chan struct{})}
}

// fill keeps the pool full until stop.
func (p *keyPool) fill() {
	for {
		k, err := d2m.NewEphemeralKey(rand.Reader)
		if err != nil {
			// crypto/rand does not fail on Linux; get reports it if it ever does.
			return
		}
		select {
		case p.keys <- k:
		case <-p.done:
			return
		}
	}
}

func (p *keyPool) get() (*d2m.EphemeralKey, error) {
	select {
	case k := <-p.keys:
		return k, nil
	default:
		return d2m.NewEphemeralKey(rand.Reader)
	}
}

func (p *keyPool) stop() { p.once.Do(func() { close(p.done) }) }
