package pgstore

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Migrations are the numbered files in migrations/, applied in order at
// Open, each in its own transaction together with the row that records
// it. A small runner instead of a migration library: the whole job is
// "apply the files not yet recorded", about fifty lines, and a library
// (golang-migrate, goose) would bring its own driver stack and CLI into
// the server binary for that.
//
// Two nodes starting together: the INSERT of the version row comes first
// in the transaction, so the second node waits on the first's row lock
// and then fails with a unique violation, which counts as "applied by
// someone else" (PostgreSQL DDL is transactional, so nothing half-done
// stays behind).

//go:embed migrations/*.sql
var migrationFiles embed.FS

// SchemaVersion is the version the migrations of this build reach.
var SchemaVersion = func() int {
	ms, err := migrations()
	if err != nil {
		panic(err)
	}
	return ms[len(ms)-1].version
}()

type migration struct {
	version int
	name    string
	sql     string
}

func migrations() ([]migration, error) {
	names, err := fs.Glob(migrationFiles, "migrations/*.sql")
	if err != nil {
		return nil, err
	}
	var out []migration
	for _, n := range names {
		base := strings.TrimPrefix(n, "migrations/")
		v, err := strconv.Atoi(strings.SplitN(base, "_", 2)[0])
		if err != nil {
			return nil, fmt.Errorf("migration %s: name must start with its number", base)
		}
		b, err := migrationFiles.ReadFile(n)
		if err != nil {
			return nil, err
		}
		out = append(out, migration{version: v, name: base, sql: string(b)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].version < out[j].version })
	for i, m := range out {
		if m.version != i+1 {
			return nil, fmt.Errorf("migration %s: expected number %d", m.name, i+1)
		}
	}
	return out, nil
}

const createMigrationsTable = `CREATE TABLE IF NOT EXISTS d2m_schema_migrations (
    version    integer PRIMARY KEY,
    name       text    NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)`

// currentVersion returns the highest applied migration (0: none).
func currentVersion(ctx context.Context, q interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}) (int, error) {
	var v *int
	if err := q.QueryRow(ctx, `SELECT max(version) FROM d2m_schema_migrations`).Scan(&v); err != nil {
		return 0, err
	}
	if v == nil {
		return 0, nil
	}
	return *v, nil
}

// migrate applies every migration not yet recorded and returns the
// versions it applied.
func migrate(ctx context.Context, pool *pgxpool.Pool) ([]int, error) {
	ms, err := migrations()
	if err != nil {
		return nil, err
	}
	if _, err := pool.Exec(ctx, createMigrationsTable); err != nil {
		return nil, fmt.Errorf("creating d2m_schema_migrations: %w", err)
	}
	have, err := currentVersion(ctx, pool)
	if err != nil {
		return nil, fmt.Errorf("reading the schema version: %w", err)
	}
	if have > len(ms) {
		return nil, fmt.Errorf("the database has schema version %d, this build knows only up to %d: run a newer mediator", have, len(ms))
	}
	var applied []int
	for _, m := range ms[have:] {
		err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `INSERT INTO d2m_schema_migrations (version, name) VALUES ($1, $2)`, m.version, m.name); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, m.sql)
			return err
		})
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "23505" { // unique_violation: another node applied it
			continue
		}
		if err != nil {
			return applied, fmt.Errorf("migration %s: %w", m.name, err)
		}
		applied = append(applied, m.version)
	}
	return applied, nil
}
