package pgstore

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// CheckResult describes a checked database.
type CheckResult struct {
	Schema      int
	Slots       int64
	Entries     int64 // stored queue rows
	Held        int64
	Tombstones  int64
	OwnedShards int // shards with an epoch (claimed at least once)
}

// checks are the invariants Check verifies, each a query counting the rows
// that break it.
var checks = []struct{ what, sql string }{
	{"queue rows without their slot", `SELECT count(*) FROM d2m_queue q WHERE NOT EXISTS
		(SELECT 1 FROM d2m_slots s WHERE s.group_id = q.group_id AND s.device_id = q.device_id)`},
	{"queue rows with a seq below 1", `SELECT count(*) FROM d2m_queue WHERE seq < 1`},
	{"slots that also have a tombstone", `SELECT count(*) FROM d2m_slots s JOIN d2m_tombstones t
		ON s.group_id = t.group_id AND s.device_id = t.device_id`},
	{"rows whose shard is not their group id's first byte", `SELECT
		(SELECT count(*) FROM d2m_slots WHERE length(group_id) <> 32 OR shard <> get_byte(group_id, 0)) +
		(SELECT count(*) FROM d2m_tombstones WHERE length(group_id) <> 32 OR shard <> get_byte(group_id, 0)) +
		(SELECT count(*) FROM d2m_groups WHERE length(group_id) <> 32 OR shard <> get_byte(group_id, 0)) +
		(SELECT count(*) FROM d2m_held WHERE length(group_id) <> 32 OR shard <> get_byte(group_id, 0))`},
	{"shards missing from d2m_shards", `SELECT 256 - count(*) FROM d2m_shards WHERE shard BETWEEN 0 AND 255`},
}

// Check verifies the schema version and the invariants above on a live
// database (it only reads; safe while mediators run, though a write
// committed between two of its queries may show as a transient finding).
func Check(ctx context.Context, dsn string) (CheckResult, error) {
	var res CheckResult
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return res, fmt.Errorf("pgstore: check: %w", err)
	}
	defer conn.Close(ctx)
	// One snapshot for every query.
	tx, err := conn.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return res, fmt.Errorf("pgstore: check: %w", err)
	}
	defer tx.Rollback(ctx)
	if res.Schema, err = currentVersion(ctx, tx); err != nil {
		return res, fmt.Errorf("pgstore: check: reading the schema version (is this a mediator database?): %w", err)
	}
	if res.Schema != SchemaVersion {
		return res, fmt.Errorf("pgstore: check: schema version %d, this build expects %d (a mediator applies the migrations at start)", res.Schema, SchemaVersion)
	}
	err = tx.QueryRow(ctx, `SELECT (SELECT count(*) FROM d2m_slots), (SELECT count(*) FROM d2m_queue),
		(SELECT count(*) FROM d2m_held), (SELECT count(*) FROM d2m_tombstones),
		(SELECT count(*) FROM d2m_shards WHERE epoch > 0)`).Scan(&res.Slots, &res.Entries, &res.Held, &res.Tombstones, &res.OwnedShards)
	if err != nil {
		return res, fmt.Errorf("pgstore: check: %w", err)
	}
	var errs []error
	for _, c := range checks {
		var n int64
		if err := tx.QueryRow(ctx, c.sql).Scan(&n); err != nil {
			return res, fmt.Errorf("pgstore: check %s: %w", c.what, err)
		}
		if n != 0 {
			errs = append(errs, fmt.Errorf("%d %s", n, c.what))
		}
	}
	if len(errs) > 0 {
		return res, fmt.Errorf("pgstore: check: %w", errors.Join(errs...))
	}
	return res, nil
}
