package pgtest

import (
	"os"
	"strings"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	code := m.Run()
	StopShared()
	os.Exit(code)
}

// TestShared gets the same cluster twice and a database of its own each
// time.
func TestShared(t *testing.T) {
	t.Parallel()
	c := Shared(t)
	if c != Shared(t) || c.Standby == nil {
		t.Fatal("Shared returned another cluster or one without standby")
	}
	a, b := c.NewDatabase(t), c.NewDatabase(t)
	if a == b {
		t.Fatalf("NewDatabase twice gave %s", a)
	}
	c.WaitSync(t)
}

// TestClusterStandbyRestart starts a primary with a synchronous standby,
// writes through a database of its own, crashes and restarts the standby
// and checks that the primary waits for it again.
func TestClusterStandbyRestart(t *testing.T) {
	t.Parallel()
	begin := time.Now()
	c := Start(t, Options{Standby: true})
	t.Logf("cluster with standby started in %v", time.Since(begin))

	if c.Primary.Port() == c.Standby.Port() || c.Primary.PID() == 0 || c.Standby.PID() == 0 {
		t.Fatalf("primary port %d pid %d, standby port %d pid %d", c.Primary.Port(), c.Primary.PID(), c.Standby.Port(), c.Standby.PID())
	}
	dsn := c.NewDatabase(t)
	prefix := "postgres://postgres@127.0.0.1:"
	if !strings.HasPrefix(dsn, prefix) || !strings.HasSuffix(dsn, "?sslmode=disable") {
		t.Fatalf("DSN %q", dsn)
	}
	db := strings.TrimSuffix(dsn[strings.LastIndex(dsn, "/")+1:], "?sslmode=disable")

	if got := query(t, c.Primary, "postgres", "SHOW synchronous_standby_names"); !strings.Contains(got, standbyName) {
		t.Fatalf("synchronous_standby_names = %q, want it to name %s", got, standbyName)
	}
	if got := query(t, c.Primary, "postgres", "SHOW synchronous_commit"); got != "on" {
		t.Fatalf("synchronous_commit = %q", got)
	}
	// The shipped deploy/postgres files are what the servers run.
	if got := query(t, c.Standby, "postgres", "SHOW synchronous_standby_names"); got != "" {
		t.Fatalf("standby: synchronous_standby_names = %q, want '' (deploy/postgres/standby.conf)", got)
	}
	if got := query(t, c.Primary, "postgres", "SHOW wal_receiver_status_interval"); got != "1s" {
		t.Fatalf("wal_receiver_status_interval = %q, want 1s (deploy/postgres/primary.conf)", got)
	}
	syncState := "SELECT application_name || ' ' || sync_state FROM pg_stat_replication"
	if got := query(t, c.Primary, "postgres", syncState); got != standbyName+" sync" {
		t.Fatalf("pg_stat_replication: %q", got)
	}

	// A committed row is on the standby: the primary waited for its flush,
	// and replay follows.
	query(t, c.Primary, db, "CREATE TABLE m (id int PRIMARY KEY)")
	query(t, c.Primary, db, "INSERT INTO m VALUES (1)")
	waitQuery(t, c.Standby, db, "SELECT count(*) FROM m", "1")

	pid := c.Standby.PID()
	c.Standby.Kill(t)
	if c.Standby.PID() != 0 {
		t.Fatalf("PID %d after Kill", c.Standby.PID())
	}
	// Without the standby a commit waits for it, and completes once the
	// standby is back.
	inserted := make(chan error, 1)
	go func() {
		_, err := c.Primary.psql(db, "INSERT INTO m VALUES (2)")
		inserted <- err
	}()
	waitQuery(t, c.Primary, "postgres", "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'", "1")
	select {
	case err := <-inserted:
		t.Fatalf("commit returned (%v) while the standby was down", err)
	default:
	}
	c.Standby.Start(t)
	if c.Standby.PID() == pid || c.Standby.PID() == 0 {
		t.Fatalf("PID %d after restart, was %d", c.Standby.PID(), pid)
	}
	c.WaitSync(t)
	if err := <-inserted; err != nil {
		t.Fatalf("commit waiting for the standby: %v", err)
	}
	query(t, c.Primary, db, "INSERT INTO m VALUES (3)")
	waitQuery(t, c.Standby, db, "SELECT count(*) FROM m", "3")

	c.Primary.Stop(t)
	if _, err := c.Primary.psql("postgres", "SELECT 1"); err == nil {
		t.Fatal("primary answers after Stop")
	}
}

// TestPromote promotes the standby of a cluster without its primary and
// writes to it.
func TestPromote(t *testing.T) {
	t.Parallel()
	c := Start(t, Options{Standby: true})
	dsn := c.NewDatabase(t)
	db := dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")]
	query(t, c.Primary, db, "CREATE TABLE m (id int)")
	query(t, c.Primary, db, "INSERT INTO m VALUES (1)")
	c.Primary.Kill(t)
	c.Promote(t)
	query(t, c.Standby, db, "INSERT INTO m VALUES (2)")
	if got := query(t, c.Standby, db, "SELECT count(*) FROM m"); got != "2" {
		t.Fatalf("count after promote = %s, want 2", got)
	}
}

// TestNoStandby starts a lone primary: commits wait for nobody.
func TestNoStandby(t *testing.T) {
	t.Parallel()
	c := Start(t, Options{})
	if c.Standby != nil {
		t.Fatal("standby without Options.Standby")
	}
	if got := query(t, c.Primary, "postgres", "SHOW synchronous_standby_names"); got != "" {
		t.Fatalf("synchronous_standby_names = %q", got)
	}
	dsn := c.NewDatabase(t)
	db := dsn[strings.LastIndex(dsn, "/")+1 : strings.Index(dsn, "?")]
	query(t, c.Primary, db, "CREATE TABLE m (id int)")
}

func TestDatabaseName(t *testing.T) {
	a, b := databaseName("TestX/sub-Test ü"), databaseName(strings.Repeat("A", 100))
	if a == b || len(b) > 63 {
		t.Fatalf("%q %q", a, b)
	}
	for _, r := range a + b {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_') {
			t.Fatalf("rune %q in %q", r, a+b)
		}
	}
}

func query(t *testing.T, s *Server, db, sql string) string {
	t.Helper()
	out, err := s.psql(db, sql)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// waitQuery polls a query on s until it returns want: replay on a standby
// trails the flush the primary waited for, so until then the query may
// also fail (the database itself may not be replayed yet).
func waitQuery(t *testing.T, s *Server, db, sql, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, err := s.psql(db, sql)
		if err == nil && got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s on %s = %q (%v), want %q", sql, s.name, got, err, want)
		}
		time.Sleep(pollInterval)
	}
}
