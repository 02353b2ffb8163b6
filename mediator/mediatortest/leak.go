package mediatortest

import (
	"bytes"
	"fmt"
	"runtime"
	"strings"
	"time"
)

// serverPackages are the packages whose goroutines belong to a server:
// none may outlive the servers a test binary started.
var serverPackages = []string{
	"d2m-mediator/mediator.",
	"d2m-mediator/mediator/daemon.",
	"d2m-mediator/reflection.",
	"d2m-mediator/chatproxy.",
	"d2m-mediator/chatproxy/chatstub.",
}

// CheckNoServerGoroutines waits up to timeout for every goroutine running
// server code to end, and returns their stacks if some do not. TestMain of
// a package that starts servers calls it after m.Run: by then every
// server has been shut down by its test's cleanup.
func CheckNoServerGoroutines(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		leaked := serverGoroutines()
		if len(leaked) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d server goroutines still running after every test ended:\n\n%s",
				len(leaked), strings.Join(leaked, "\n\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func serverGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for _, g := range bytes.Split(buf, []byte("\n\n")) {
		s := string(g)
		if strings.Contains(s, "mediatortest.CheckNoServerGoroutines") {
			continue
		}
		for _, p := range serverPackages {
			if strings.Contains(s, p) {
				out = append(out, s)
				break
			}
		}
	}
	return out
}
