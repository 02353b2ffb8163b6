package main

// `mediator db …`: a hot backup through the admin API, and the offline
// check and compaction of the database file (server stopped).

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"d2m-mediator/reflection"
	"d2m-mediator/reflection/pgstore"
)

const dbUsage = `usage:
  mediator db backup [flags] FILE        hot backup of the running server's database
  mediator db check [FILE | --data DIR]  consistency check of a backup FILE or <DIR>/mediator.db (server stopped)
  mediator db compact [--data DIR]       rewrite <DIR>/mediator.db without free pages (server stopped)`

// dbCommand runs `mediator db …`; globals are the flags given before `db`.
func dbCommand(ctx context.Context, args, globals []string) error {
	if len(args) == 0 {
		return errors.New(dbUsage)
	}
	rest := append(globals, args[1:]...)
	switch args[0] {
	case "backup":
		return dbBackup(ctx, rest)
	case "check":
		return dbCheck(rest)
	case "compact":
		return dbCompact(rest)
	case "help", "-h", "-help", "--help":
		fmt.Fprintln(stdout, dbUsage)
		return nil
	}
	return fmt.Errorf("unknown command \"db %s\"\n%s", args[0], dbUsage)
}

// dbBackup streams GET /api/v1/backup into a temporary file beside FILE,
// checks that the copy is complete and sound, and only then renames it to
// FILE, so FILE is never a partial database.
func dbBackup(ctx context.Context, args []string) error {
	fs := newCommandFlags("db backup", "FILE",
		"Writes a consistent copy of the running server's database to FILE (one read\n"+
			"transaction on the server; devices keep working). The copy is checked like\n"+
			"`mediator db check` before it is renamed into place.")
	o := addAdminFlags(fs)
	force := fs.Bool("force", false, "replace FILE if it exists (command line only, never from the environment)")
	pos, err := parseCommandFlags(fs, args, 1)
	if err != nil {
		return err
	}
	file := pos[0]
	dir := filepath.Dir(file)
	// Checked before anything is fetched, and named: the copy is written
	// to a temporary file in dir, whose name would only confuse.
	if st, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("backup: directory %s does not exist: create it first", dir)
	} else if err != nil {
		return fmt.Errorf("backup: %w", err)
	} else if !st.IsDir() {
		return fmt.Errorf("backup: %s is not a directory", dir)
	}
	if st, err := os.Stat(file); err == nil && st.IsDir() {
		return fmt.Errorf("backup: %s is a directory: give the backup's file name", file)
	} else if err == nil && !*force {
		return fmt.Errorf("%s exists: remove it or pass --force", file)
	}
	c, err := o.client()
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(file)+".partial-*")
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return fmt.Errorf("backup: cannot create a file in %s: %w", dir, err)
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	resp, err := c.do(ctx, "GET", "/api/v1/backup")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	n, err := io.Copy(tmp, resp.Body)
	if err != nil {
		return fmt.Errorf("backup: the transfer broke off after %d bytes: %w", n, err)
	}
	if want := resp.Trailer.Get("X-Backup-Bytes"); want != strconv.FormatInt(n, 10) {
		return fmt.Errorf("backup: got %d bytes, the server announced %q: the copy is incomplete", n, want)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	if err := reflection.Check(tmp.Name()); err != nil {
		return fmt.Errorf("backup: the copy does not pass the check:\n%v", err)
	}
	if err := os.Rename(tmp.Name(), file); err != nil {
		return fmt.Errorf("backup: %w", err)
	}
	done = true
	syncDir(filepath.Dir(file))
	if o.json {
		return printJSON(map[string]any{"file": file, "bytes": n, "checked": true})
	}
	fmt.Fprintf(stdout, "wrote %d bytes (%s) to %s; the copy passed the check\n", n, fmtBytes(n), file)
	return nil
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

func printJSON(v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = stdout.Write(append(b, '\n'))
	return err
}

// offlineFlags parses the flags of check and compact and returns the
// database path: FILE if the command takes one and it is given (a directory
// means <DIR>/mediator.db), else <--data>/mediator.db.
func offlineFlags(name, args, help string, argv []string) (string, bool, error) {
	fs := newCommandFlags(name, args, help)
	data := fs.String("data", "./data", "data `directory` of the stopped server (the database is <DIR>/mediator.db)")
	jsonOut := fs.Bool("json", false, "print the result as JSON")
	pos, err := parseInterspersed(fs, argv)
	if err != nil {
		return "", false, err
	}
	dataGiven := false
	fs.Visit(func(f *flag.Flag) { dataGiven = dataGiven || f.Name == "data" })
	if err := applyEnv(fs); err != nil {
		return "", false, err
	}
	maxArgs := len(strings.Fields(args))
	if len(pos) > maxArgs {
		fs.Usage()
		return "", false, fmt.Errorf("%s: want at most %d argument(s), got %d", name, maxArgs, len(pos))
	}
	path := filepath.Join(*data, "mediator.db")
	if len(pos) == 1 {
		if dataGiven {
			return "", false, fmt.Errorf("%s: give FILE or --data, not both", name)
		}
		path = pos[0]
		if pgstore.IsDSN(path) {
			// A PostgreSQL store: no file to look for (db check).
			return path, *jsonOut, nil
		}
		if st, err := os.Stat(path); err == nil && st.IsDir() {
			path = filepath.Join(path, "mediator.db")
		}
	}
	if _, err := os.Stat(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			if len(pos) == 1 {
				return "", false, fmt.Errorf("no database at %s", path)
			}
			return "", false, fmt.Errorf("no database at %s (set --data or MEDIATOR_DATA)", path)
		}
		return "", false, err
	}
	return path, *jsonOut, nil
}

// offlineErr explains the usual failure: the server still has the file.
func offlineErr(path string, err error) error {
	if errors.Is(err, reflection.ErrLocked) {
		return fmt.Errorf("database %s is locked by another process: is the server running? Stop it first (for a copy while it runs, use `mediator db backup FILE`)", path)
	}
	return err
}

func dbCheck(args []string) error {
	path, jsonOut, err := offlineFlags("db check", "[FILE]",
		"Checks a database file: bbolt's page-level check, then every slot, log\n"+
			"entry, cursor and counter. FILE is a backup (or any copy) of the database;\n"+
			"without it the stopped server's <--data>/mediator.db is checked. Log entries\n"+
			"no device needs any more are normal after a crash (the next start reclaims\n"+
			"them), a problem after a clean stop. closed_cleanly in --json output (and\n"+
			"\"not closed cleanly\" in the text) says the file was not left by a clean\n"+
			"stop: a hot backup, a running server's file or a crash; the next start\n"+
			"recovers it. That is not a problem: ok is the verdict. FILE may\n"+
			"also be the postgres:// DSN of a PostgreSQL store (checked live, in one\n"+
			"read-only snapshot). Exits non-zero if it finds a problem.", args)
	if err != nil {
		return err
	}
	if pgstore.IsDSN(path) {
		return dbCheckPG(path, jsonOut)
	}
	res, err := reflection.CheckReport(path)
	if errors.Is(err, reflection.ErrLocked) {
		return offlineErr(path, err)
	}
	var problems []string
	if err != nil {
		problems = strings.Split(err.Error(), "\n")
	}
	if jsonOut {
		// closed_cleanly, not "clean": false is normal for a hot
		// backup and says nothing about the file's soundness (ok does).
		if err := printJSON(map[string]any{"path": path, "ok": err == nil, "problems": append([]string{}, problems...),
			"schema": res.Schema, "closed_cleanly": res.Clean, "slots": res.Slots, "log_entries": res.LogEntries,
			"reclaimable": res.Reclaimable}); err != nil {
			return err
		}
	} else if err == nil {
		how := "closed cleanly"
		if !res.Clean {
			how = "not closed cleanly: a hot backup, a running server's file or a crash; the next start recovers it"
		}
		fmt.Fprintf(stdout, "ok: %s is consistent (schema %d, %d slots, %d queued log entries, %d reclaimable at the next start; %s)\n",
			path, res.Schema, res.Slots, res.LogEntries, res.Reclaimable, how)
	} else {
		for _, p := range problems {
			fmt.Fprintln(stdout, p)
		}
	}
	if err != nil {
		return fmt.Errorf("%s: the check found %d problem(s)", path, len(problems))
	}
	return nil
}

func dbCompact(args []string) error {
	path, jsonOut, err := offlineFlags("db compact", "",
		"Rewrites the stopped server's database without free pages (bbolt never\n"+
			"shrinks its file) and replaces it atomically. Needs free disk space for the\n"+
			"live data. It reports the file's length, the disk space it takes and the\n"+
			"data in it, before and after.", args)
	if err != nil {
		return err
	}
	res, err := reflection.Compact(path)
	if err != nil {
		return offlineErr(path, err)
	}
	b, a := res.Before, res.After
	if jsonOut {
		return printJSON(map[string]any{"path": path,
			"bytes_before": b.FileBytes, "bytes_after": a.FileBytes,
			"disk_bytes_before": b.DiskBytes, "disk_bytes_after": a.DiskBytes,
			"data_bytes_before": b.DataBytes, "data_bytes_after": a.DataBytes})
	}
	fmt.Fprintf(stdout, "compacted %s\n", path)
	tw := newTable(stdout)
	fmt.Fprintf(tw, "\tbefore\tafter\n")
	fmt.Fprintf(tw, "file length\t%s\t%s\n", fmtBytes(b.FileBytes), fmtBytes(a.FileBytes))
	fmt.Fprintf(tw, "on disk\t%s\t%s\n", fmtBytes(b.DiskBytes), fmtBytes(a.DiskBytes))
	fmt.Fprintf(tw, "data\t%s\t%s\n", fmtBytes(b.DataBytes), fmtBytes(a.DataBytes))
	tw.Flush()
	switch {
	case a.DiskBytes < b.DiskBytes:
		fmt.Fprintf(stdout, "freed %s of disk space\n", fmtBytes(b.DiskBytes-a.DiskBytes))
	default:
		fmt.Fprintln(stdout, "freed no disk space: the file had no free pages worth dropping")
	}
	return nil
}

// dbCheckPG checks a PostgreSQL store.
func dbCheckPG(dsn string, jsonOut bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	res, err := pgstore.Check(ctx, dsn)
	shown := redactDSN(dsn)
	var problems []string
	if err != nil {
		problems = strings.Split(err.Error(), "\n")
	}
	if jsonOut {
		if err := printJSON(map[string]any{"store": shown, "ok": err == nil, "problems": append([]string{}, problems...),
			"schema": res.Schema, "slots": res.Slots, "queue_entries": res.Entries, "held": res.Held,
			"tombstones": res.Tombstones, "claimed_shards": res.OwnedShards}); err != nil {
			return err
		}
	} else if err == nil {
		fmt.Fprintf(stdout, "ok: %s is consistent (schema %d, %d slots, %d queued entries, %d held, %d tombstones, %d shards claimed)\n",
			shown, res.Schema, res.Slots, res.Entries, res.Held, res.Tombstones, res.OwnedShards)
	} else {
		for _, p := range problems {
			fmt.Fprintln(stdout, p)
		}
	}
	if err != nil {
		return fmt.Errorf("%s: the check found %d problem(s)", shown, len(problems))
	}
	return nil
}
