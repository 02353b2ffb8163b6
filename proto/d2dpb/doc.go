// Package d2dpb holds the generated Go code for d2d.proto, the messages
// devices encrypt for each other. The mediator never imports it; device-side
// tools do. Edit d2d.proto and run `make proto`.
package d2dpb
