package mediator

import (
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
	PersistentSlotExpiry time.Duration // PERSISTENT slot removed after this long offline (4320h)
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
}

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
	defInt(&c.MaxDeviceSlots, 5)
	def(&c.MaxTransactionTTL, 600*time.Second)
	def(&c.VolatileSlotGrace, 5*time.Minute)
	def(&c.PersistentSlotExpiry, 4320*time.Hour)
	def(&c.TombstoneTTL, 30*24*time.Hour)
	def(&c.HandshakeTimeout, 20*time.Second)
	def(&c.IdleTimeout, 90*time.Second)
	def(&c.WriteTimeout, 10*time.Second)
	defInt(&c.EarlyProxyLimit, 64*1024)
	defInt(&c.DeliveryWindow, 256)
	defInt(&c.ReflectWindow, 128)
	defInt(&c.MaxHandshakes, 1024)
	def(&c.AdmissionWait, 2*time.Second)
	defInt(&c.MaxConnections, 100000)
	def(&c.ShutdownSpread, 2*time.Second)
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
