// Package d2m owns the device-to-mediator wire format: the 4-byte container
// (type, 3 reserved bytes), the binary Reflect/ReflectAck/Reflected/
// ReflectedAck structs, typed encode/decode of the protobuf payloads,
// ClientUrlInfo parsing from the WebSocket path, the close codes, the size
// limits and the server's half of the challenge check.
//
// It is pure: no goroutines, sockets, logging or storage. Every decoder
// takes untrusted bytes, returns a *DecodeError (matching ErrMalformed) for
// anything malformed and never panics; the fuzz targets in this package
// hold it to that. Section numbers in comments refer to docs/protocol.md.
//
// Protocol flow (§6, §7):
//
//	C: WebSocket upgrade GET /{prefix8}/{hex(ClientUrlInfo)}
//	S→C ServerHello  {version 0, esk, challenge}
//	C→S Proxy*       early CSP bytes, buffered by the server until auth
//	C→S ClientHello  {version, response, device id, policies, device info}
//	S→C ServerInfo   first message after ClientHello
//	S→C Reflected*   queued backlog, in order
//	S→C ReflectionQueueDry
//	S→C RolePromotedToLeader (only for the leader, never before RQD)
//	... Reflect/ReflectAck, Reflected/ReflectedAck, Proxy, device and
//	    transaction requests in any order
package d2m
