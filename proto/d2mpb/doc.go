// Package d2mpb holds the generated Go code for d2m.proto, the protobuf
// messages of the device-to-mediator protocol. It contains no hand-written
// logic: edit d2m.proto and run `make proto`.
package d2mpb
