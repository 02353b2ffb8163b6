package mediator

import (
	"crypto/tls"
	"errors"
	"fmt"
	"time"
)

// Config configures a Server. The zero value of every field means its
// default (see withDefaults); cmd/mediator fills it from flags and env.
type Config struct {
	// ChatServer is the upstream host:port template; "{group}" is replaced
	// by the device's server group. Empty means: no chat server, Proxy is
	// refused with 4001.
	ChatServer string

	MaxDeviceSlots       int           // slots per group, the device itself included (5)
	MaxTransactionTTL    time.Duration // cap and default of BeginTransaction.ttl (600s)
	VolatileSlotGrace    time.Duration // VOLATILE slot removed this long after disconnect (5m)
	PersistentSlotExpiry time.Duration // PERSISTENT slot removed after this long offline (180 days)
	TombstoneTTL         time.Duration // dropped-slot tombstones kept this long (30 days, §18 row 7)
	HandshakeTimeout     time.Duration // from upgrade to ClientHello verified (20s)
	IdleTimeout          time.Duration // no inbound frame for this long → 4013 (90s)
	WriteTimeout         time.Duration // one socket write; slower devices are closed (10s)
	EarlyProxyLimit      int           // Proxy bytes buffered before auth (64 KiB), then 4010
	DeliveryWindow       int           // Reflected in flight (unacked) per device (256)
	ReflectWindow        int           // Reflects awaiting their ReflectAck per device (128)
	MaxHandshakes        int           // handshakes in flight; more wait AdmissionWait, then 503 (1024)
	AdmissionWait        time.Duration // how long an upgrade waits for a handshake slot (2s; <0: no wait)
	MaxConnections       int           // open device connections; more are answered 503 (100000)
	ShutdownSpread       time.Duration // 1001 closes spread over this window on shutdown (2s)

	// Placement, in cluster mode, says which shards this node serves and
	// whether it may still ack for them; nil serves every shard.
	Placement Placement
	// NodeID names this node in forwarded requests (ForwardedHeader).
	NodeID string
	// NodeTLS is the client TLS configuration for forwarding a device to
	// an owner whose listener serves TLS (Route.TLS): the roots its
	// certificate is verified against (nil RootCAs: the system roots).
	// ServerName is set per forward from the owner's address. Nil: the
	// defaults.
	NodeTLS *tls.Config
}

// Defaults of Config, shared with the command line (cmd/mediator) so that
// a flag's documented default and the server's are one value. The
// protocol's decisions behind them: docs/protocol.md §18 rows 9 and 7.
const (
	DefaultMaxDeviceSlots       = 5
	DefaultMaxTransactionTTL    = 600 * time.Second
	DefaultVolatileSlotGrace    = 5 * time.Minute
	DefaultPersistentSlotExpiry = 180 * 24 * time.Hour
	DefaultTombstoneTTL         = 30 * 24 * time.Hour
	DefaultHandshakeTimeout     = 20 * time.Second
	DefaultIdleTimeout          = 90 * time.Second
	DefaultWriteTimeout         = 10 * time.Second
	DefaultEarlyProxyLimit      = 64 * 1024
	DefaultDeliveryWindow       = 256
	DefaultReflectWindow        = 128
	DefaultMaxHandshakes        = 1024
	DefaultAdmissionWait        = 2 * time.Second
	DefaultMaxConnections       = 100000
	DefaultShutdownSpread       = 2 * time.Second
)

func (c Config) withDefaults() Config {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	defInt := func(i *int, v int) {
		if *i == 0 {
			*i = v
		}
	}
	defInt(&c.MaxDeviceSlots, DefaultMaxDeviceSlots)
	def(&c.MaxTransactionTTL, DefaultMaxTransactionTTL)
	def(&c.VolatileSlotGrace, DefaultVolatileSlotGrace)
	def(&c.PersistentSlotExpiry, DefaultPersistentSlotExpiry)
	def(&c.TombstoneTTL, DefaultTombstoneTTL)
	def(&c.HandshakeTimeout, DefaultHandshakeTimeout)
	def(&c.IdleTimeout, DefaultIdleTimeout)
	def(&c.WriteTimeout, DefaultWriteTimeout)
	defInt(&c.EarlyProxyLimit, DefaultEarlyProxyLimit)
	defInt(&c.DeliveryWindow, DefaultDeliveryWindow)
	defInt(&c.ReflectWindow, DefaultReflectWindow)
	defInt(&c.MaxHandshakes, DefaultMaxHandshakes)
	def(&c.AdmissionWait, DefaultAdmissionWait)
	defInt(&c.MaxConnections, DefaultMaxConnections)
	def(&c.ShutdownSpread, DefaultShutdownSpread)
	return c
}

// Validate reports the first unusable setting.
func (c Config) Validate() error {
	c = c.withDefaults()
	switch {
	case c.MaxDeviceSlots < 1 || c.MaxDeviceSlots > 1000:
		return errors.New("max device slots must be within 1..1000")
	case c.MaxTransactionTTL < time.Second:
		return errors.New("max transaction ttl must be at least 1s")
	case c.VolatileSlotGrace < 0 || c.PersistentSlotExpiry < 0:
		return errors.New("slot expiry durations must not be negative")
	case c.HandshakeTimeout < 0 || c.IdleTimeout < 0 || c.WriteTimeout < 0:
		return errors.New("timeouts must not be negative")
	case c.DeliveryWindow < 1 || c.ReflectWindow < 1:
		return errors.New("windows must be positive")
	}
	return nil
}

func (c Config) String() string {
	return fmt.Sprintf("slots=%d ttl=%v volatile-grace=%v persistent-expiry=%v handshake=%v idle=%v",
		c.MaxDeviceSlots, c.MaxTransactionTTL, c.VolatileSlotGrace, c.PersistentSlotExpiry, c.HandshakeTimeout, c.IdleTimeout)
}
