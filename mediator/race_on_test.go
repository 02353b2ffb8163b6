//go:build race

package mediator_test

const raceEnabled = true
