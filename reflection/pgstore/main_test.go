package pgstore

import (
	"os"
	"testing"

	"d2m-mediator/internal/pgtest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	pgtest.StopShared()
	os.Exit(code)
}
