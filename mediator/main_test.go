package mediator_test

import (
	"fmt"
	"os"
	"testing"
	"time"

	"d2m-mediator/mediator/mediatortest"
)

// TestMain fails the package if any server goroutine outlives the tests:
// every server a test starts is shut down by its cleanup, and Shutdown
// waits for every goroutine it started.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if err := mediatortest.CheckNoServerGoroutines(5 * time.Second); err != nil {
			fmt.Fprintln(os.Stderr, "goroutine leak:", err)
			code = 1
		}
	}
	os.Exit(code)
}
