//go:build race

package integration

// raceEnabled builds the server binary with the race detector too, so races
// inside the server under end-to-end traffic fail the suite.
const raceEnabled = true
