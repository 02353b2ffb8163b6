package reflection

import (
	"fmt"
	"time"

	"go.etcd.io/bbolt"
)

// collectTrash deletes up to DeleteChunk keys of queues in trash/ in one
// transaction, removing a queue bucket (and its trash entry) once it is
// empty. The committer calls it between batches, so a dropped 25,000-entry
// queue costs other groups at most one chunk's commit of extra latency
// instead of one huge transaction. It runs again after a restart because
// the trash list is on disk.
func (db *DB) collectTrash() error {
	db.commitMu.Lock()
	defer db.commitMu.Unlock()
	start := time.Now()
	more := false
	err := db.bolt.Update(func(tx *bbolt.Tx) error {
		trash := tx.Bucket(bucketTrash)
		queues := tx.Bucket(bucketQueues)
		budget := db.opts.DeleteChunk
		var names [][]byte
		c := trash.Cursor()
		for k, _ := c.First(); k != nil && len(names) < budget; k, _ = c.Next() {
			names = append(names, append([]byte(nil), k...))
		}
		for _, name := range names {
			if budget == 0 {
				more = true
				break
			}
			if qb := queues.Bucket(name); qb != nil {
				keys := make([][]byte, 0, min(budget, 1024))
				qc := qb.Cursor()
				for k, _ := qc.First(); k != nil && len(keys) < budget; k, _ = qc.Next() {
					keys = append(keys, append([]byte(nil), k...))
				}
				for _, k := range keys {
					if err := qb.Delete(k); err != nil {
						return fmt.Errorf("reflection: trash: delete key: %w", err)
					}
				}
				budget -= len(keys)
				if k, _ := qb.Cursor().First(); k != nil {
					more = true
					break
				}
				if err := queues.DeleteBucket(name); err != nil {
					return fmt.Errorf("reflection: trash: delete queue bucket: %w", err)
				}
			}
			if err := trash.Delete(name); err != nil {
				return fmt.Errorf("reflection: trash: delete entry: %w", err)
			}
		}
		if !more {
			more = len(names) == db.opts.DeleteChunk // the name scan itself hit the budget
		}
		return db.runTestHook(0)
	})
	if err != nil {
		err = fmt.Errorf("reflection: collect trash: %w", err)
		db.log.Error().Err(err).Msg("reflection: deleting dropped queues failed")
	} else {
		db.setTrashPending(more)
	}
	if db.opts.OnCommit != nil {
		db.opts.OnCommit(0, time.Since(start), err)
	}
	return err
}

func (db *DB) setTrashPending(v bool) { db.trashPending.Store(v) }
