// Command chatstub runs the stand-in chat server from package
// chatproxy/chatstub on its own, for development and tests. It is not a real
// chat server: it keeps messages in memory only, has no identity directory
// (so it does not verify vouches) and sends no push notifications.
//
// It owns flags, logging setup and signal handling only; everything it runs
// lives in chatstub, where tests can reach it.
package main
