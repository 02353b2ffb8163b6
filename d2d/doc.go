// Package d2d owns the device side of device-to-device crypto: deriving the
// device-group keys from the device group key (docs/protocol.md §14), sealing and
// opening the nonce‖secretbox blobs the mediator carries without reading,
// answering the handshake challenge (§6.1), and building realistic d2d
// envelopes (§15) for tests and device tools.
//
// The mediator must never import this package: the server cannot decrypt
// anything and only learns a group's public device_group_id.
package d2d
