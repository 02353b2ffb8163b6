// Package integration holds end-to-end tests: they build the real
// cmd/mediator binary, run it on loopback with a temporary bbolt file and
// the in-process stand-in chat server (or a scripted TCP upstream), drive it
// with real device clients over real WebSockets, kill it with SIGKILL and
// restart it, and assert bytes, ids, orders and close codes.
package integration
