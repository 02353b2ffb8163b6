package d2m

import "fmt"

// CloseCode is a WebSocket close code of the protocol (§13). Clients
// reconnect automatically after 1xxx and 40xx and wait for the user after
// 41xx, so choosing the code decides what the device does next.
type CloseCode uint16

// Close codes the server sends.
const (
	CloseNormal              CloseCode = 1000
	CloseGoingAway           CloseCode = 1001 // server shutdown or restart
	CloseMessageTooBig       CloseCode = 1009
	CloseInternalError       CloseCode = 1011 // e.g. a failed storage commit
	CloseUpstreamClosed      CloseCode = 4000 // chat server connection closed
	CloseUpstreamUnreachable CloseCode = 4001 // chat server connection could not be established
	CloseUpstreamError       CloseCode = 4009 // relay-side failure (e.g. oversize CSP frame)
	CloseProtocolError       CloseCode = 4010
	CloseTransactionTTL      CloseCode = 4011
	CloseUnknownAck          CloseCode = 4012 // ReflectedAck for an id not in flight
	CloseIdleTimeout         CloseCode = 4013
	CloseUnsupportedVersion  CloseCode = 4110
	CloseDeviceLimit         CloseCode = 4111
	CloseDuplicate           CloseCode = 4112 // sent to the older connection
	CloseDropped             CloseCode = 4113
	CloseQueueLimit          CloseCode = 4114
	CloseSlotStateMismatch   CloseCode = 4115
)

var closeNames = map[CloseCode]string{
	CloseNormal: "normal", CloseGoingAway: "server shutting down",
	CloseMessageTooBig: "message too big", CloseInternalError: "internal error",
	CloseUpstreamClosed: "chat server connection closed", CloseUpstreamUnreachable: "chat server unreachable",
	CloseUpstreamError: "chat server relay error", CloseProtocolError: "protocol error",
	CloseTransactionTTL: "transaction ttl reached", CloseUnknownAck: "unknown message acked",
	CloseIdleTimeout: "client idle timeout", CloseUnsupportedVersion: "unsupported protocol version",
	CloseDeviceLimit: "device limit reached", CloseDuplicate: "duplicate connection",
	CloseDropped: "dropped by other device", CloseQueueLimit: "reflection queue limit reached",
	CloseSlotStateMismatch: "device slot state mismatch",
}

// String returns the fixed reason text sent with the code (at most 125
// bytes, never dynamic).
func (c CloseCode) String() string {
	if n, ok := closeNames[c]; ok {
		return n
	}
	return fmt.Sprintf("close %d", uint16(c))
}

// Reconnects reports whether clients reconnect on their own after this code
// (Android: code < 4100 || code ≥ 4200).
func (c CloseCode) Reconnects() bool { return c < 4100 || c >= 4200 }

// CloseError is an error that ends a connection with a protocol close code.
// Handlers return it; the connection's single close path sends the code.
type CloseError struct {
	Code CloseCode
	Err  error // cause, for logs; may be nil
}

func (e *CloseError) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("close %d (%v): %v", uint16(e.Code), e.Code, e.Err)
	}
	return fmt.Sprintf("close %d (%v)", uint16(e.Code), e.Code)
}

func (e *CloseError) Unwrap() error { return e.Err }

// Close returns a *CloseError with code and cause.
func Close(code CloseCode, cause error) error { return &CloseError{Code: code, Err: cause} }
