package pgstore

import (
	"cmp"
	"slices"

	"github.com/jackc/pgx/v5"

	"d2m-mediator/reflection"
)

// The statements of one commit batch. Each takes whole columns as arrays
// and unnests them, so a batch costs a fixed number of statements however
// many reflections it carries, all sent in one pipeline (pgx.Batch) and
// run in one implicit transaction.
const (
	// The fence: bump every shard's commit counter where its epoch is
	// still ours. If any shard's is not, the division by zero aborts the
	// whole transaction (one statement, no round trip to decide). The
	// row locks it takes also make a concurrent claim by the next owner
	// wait until this commit is over, so no batch can commit under an
	// epoch that was already replaced.
	sqlFence = `WITH f AS (
	UPDATE d2m_shards AS s SET commits = s.commits + 1
	FROM unnest($1::int4[], $2::int8[]) AS c(shard, epoch)
	WHERE s.shard = c.shard AND s.epoch = c.epoch
	RETURNING 1)
SELECT 1 / CASE WHEN (SELECT count(*) FROM f) = $3 THEN 1 ELSE 0 END`

	// Acked rows go, and each slot's counter column is raised to the
	// largest seq deleted: a slot's counter is the larger of its column
	// and its queue rows' seqs (appends write only rows), so it must not
	// shrink when the rows go.
	sqlAckDelete = `WITH del AS (
	DELETE FROM d2m_queue AS q USING unnest($1::bytea[], $2::int8[], $3::int8[]) AS c(g, d, s)
	WHERE q.group_id = c.g AND q.device_id = c.d AND q.seq = c.s
	RETURNING q.group_id, q.device_id, q.seq)
UPDATE d2m_slots AS s SET counter = m.mx
FROM (SELECT group_id, device_id, max(seq) AS mx FROM del GROUP BY group_id, device_id) AS m
WHERE s.group_id = m.group_id AND s.device_id = m.device_id AND s.counter < m.mx`
	sqlQueueReset = `DELETE FROM d2m_queue AS q USING unnest($1::bytea[], $2::int8[]) AS c(g, d)
WHERE q.group_id = c.g AND q.device_id = c.d`
	sqlSlotDelete = `DELETE FROM d2m_slots AS s USING unnest($1::bytea[], $2::int8[]) AS c(g, d)
WHERE s.group_id = c.g AND s.device_id = c.d`
	sqlSlotUpsert = `INSERT INTO d2m_slots (group_id, device_id, shard, device_info, policy, created_at, connected_since, last_disconnect_at, counter)
SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int4[], $4::bytea[], $5::int2[], $6::int8[], $7::int8[], $8::int8[], $9::int8[])
ON CONFLICT (group_id, device_id) DO UPDATE SET device_info = excluded.device_info, policy = excluded.policy,
	created_at = excluded.created_at, connected_since = excluded.connected_since,
	last_disconnect_at = excluded.last_disconnect_at, counter = excluded.counter`
	sqlCounters = `UPDATE d2m_slots AS s SET counter = c.n FROM unnest($1::bytea[], $2::int8[], $3::int8[]) AS c(g, d, n)
WHERE s.group_id = c.g AND s.device_id = c.d`
	sqlQueueInsert = `INSERT INTO d2m_queue (group_id, device_id, seq, ts, envelope)
SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::int8[], $5::bytea[])`
	sqlTombDelete = `DELETE FROM d2m_tombstones AS t USING unnest($1::bytea[], $2::int8[]) AS c(g, d)
WHERE t.group_id = c.g AND t.device_id = c.d`
	sqlTombUpsert = `INSERT INTO d2m_tombstones (group_id, device_id, shard, reason, at)
SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int4[], $4::int2[], $5::int8[])
ON CONFLICT (group_id, device_id) DO UPDATE SET reason = excluded.reason, at = excluded.at`
	sqlSharedUpsert = `INSERT INTO d2m_groups (group_id, shard, shared_data)
SELECT * FROM unnest($1::bytea[], $2::int4[], $3::bytea[])
ON CONFLICT (group_id) DO UPDATE SET shared_data = excluded.shared_data`
	sqlSharedDelete = `DELETE FROM d2m_groups WHERE group_id = ANY($1::bytea[])`
	sqlHeldInsert   = `INSERT INTO d2m_held (group_id, sender, pos, shard, ts, envelope)
SELECT * FROM unnest($1::bytea[], $2::int8[], $3::int8[], $4::int4[], $5::int8[], $6::bytea[])`
	sqlHeldDelete = `DELETE FROM d2m_held AS h USING unnest($1::bytea[], $2::int8[], $3::int8[]) AS c(g, d, upto)
WHERE h.group_id = c.g AND h.sender = c.d AND h.pos <= c.upto`
	sqlPrune = `DELETE FROM d2m_tombstones WHERE at < $1 AND shard = ANY($2::int4[])`
)

// buildSQL turns the batch's final overlay into statements. The fence
// always comes first; then acks (they name entries committed earlier),
// queue and slot removals before the rows that replace them, inserts,
// tombstones, shared data and held reflections.
func buildSQL(bt *batchTx, batch []*request, af *ackFlush, epochs map[byte]int64) *pgx.Batch {
	b := &pgx.Batch{}
	shards := make([]int32, 0, len(epochs))
	for sh := range epochs {
		shards = append(shards, int32(sh))
	}
	slices.Sort(shards) // one lock order for every node
	eps := make([]int64, len(shards))
	for i, sh := range shards {
		eps[i] = epochs[byte(sh)]
	}
	b.Queue(sqlFence, shards, eps, int64(len(shards)))

	if af != nil && len(af.acks) > 0 {
		var g [][]byte
		var d, q []int64
		for _, a := range af.acks {
			g, d, q = append(g, a.g[:]), append(d, i64(a.d)), append(q, int64(a.seq))
		}
		b.Queue(sqlAckDelete, g, d, q)
	}
	for _, r := range batch {
		if r.op == opPruneTombstones && r.err == nil {
			b.Queue(sqlPrune, r.olderThan, shards)
		}
	}
	if bt == nil {
		return b
	}

	refs := make([]slotRef, 0, len(bt.slots))
	for k := range bt.slots {
		refs = append(refs, k)
	}
	slices.SortFunc(refs, func(a, b slotRef) int {
		if c := slices.Compare(a.g[:], b.g[:]); c != 0 {
			return c
		}
		return cmp.Compare(a.d, b.d)
	})
	var (
		resetG, delG, upG, ctrG, insG          [][]byte
		resetD, delD, upD, ctrD, ctrN, insD    []int64
		upShard                                []int32
		upInfo, insEnv                         [][]byte
		upPolicy                               []int16
		upCreated, upConn, upDisc, upCtr, insS []int64
		insTS                                  []int64
	)
	for _, k := range refs {
		bs := bt.slots[k]
		if bs.reset {
			resetG, resetD = append(resetG, k.g[:]), append(resetD, i64(k.d))
		}
		if !bs.present {
			if bs.removed {
				delG, delD = append(delG, k.g[:]), append(delD, i64(k.d))
			}
			continue
		}
		if bs.record != nil {
			r := bs.record
			upG, upD, upShard = append(upG, k.g[:]), append(upD, i64(k.d)), append(upShard, int32(k.g[0]))
			upInfo, upPolicy = append(upInfo, nonNil(r.DeviceInfo)), append(upPolicy, int16(r.Policy))
			upCreated, upConn, upDisc = append(upCreated, r.CreatedAt), append(upConn, r.ConnectedSince), append(upDisc, r.LastDisconnectAt)
			upCtr = append(upCtr, int64(bs.counter))
		} else if bs.dirty {
			ctrG, ctrD, ctrN = append(ctrG, k.g[:]), append(ctrD, i64(k.d)), append(ctrN, int64(bs.counter))
		}
		for _, e := range bs.appended {
			insG, insD, insS = append(insG, k.g[:]), append(insD, i64(k.d)), append(insS, int64(e.seq))
			insTS, insEnv = append(insTS, int64(e.ts)), append(insEnv, nonNil(e.env))
		}
	}
	if len(resetG) > 0 {
		b.Queue(sqlQueueReset, resetG, resetD)
	}
	if len(delG) > 0 {
		b.Queue(sqlSlotDelete, delG, delD)
	}
	if len(upG) > 0 {
		b.Queue(sqlSlotUpsert, upG, upD, upShard, upInfo, upPolicy, upCreated, upConn, upDisc, upCtr)
	}
	if len(ctrG) > 0 {
		b.Queue(sqlCounters, ctrG, ctrD, ctrN)
	}
	if len(insG) > 0 {
		b.Queue(sqlQueueInsert, insG, insD, insS, insTS, insEnv)
	}

	var tdG, tuG [][]byte
	var tdD, tuD, tuAt []int64
	var tuShard []int32
	var tuReason []int16
	for k, t := range bt.tombs {
		if t == nil {
			tdG, tdD = append(tdG, k.g[:]), append(tdD, i64(k.d))
		} else {
			tuG, tuD, tuShard = append(tuG, k.g[:]), append(tuD, i64(k.d)), append(tuShard, int32(k.g[0]))
			tuReason, tuAt = append(tuReason, int16(t.Reason)), append(tuAt, t.At)
		}
	}
	if len(tdG) > 0 {
		b.Queue(sqlTombDelete, tdG, tdD)
	}
	if len(tuG) > 0 {
		b.Queue(sqlTombUpsert, tuG, tuD, tuShard, tuReason, tuAt)
	}

	var suG, sdG, suData [][]byte
	var suShard []int32
	for g, data := range bt.shared {
		if len(data) == 0 {
			sdG = append(sdG, g[:])
		} else {
			suG, suShard, suData = append(suG, g[:]), append(suShard, int32(g[0])), append(suData, data)
		}
	}
	if len(sdG) > 0 {
		b.Queue(sqlSharedDelete, sdG)
	}
	if len(suG) > 0 {
		b.Queue(sqlSharedUpsert, suG, suShard, suData)
	}

	if len(bt.heldIns) > 0 {
		var g, env [][]byte
		var d, pos, ts []int64
		var sh []int32
		for _, h := range bt.heldIns {
			g, d, pos, sh = append(g, h.g[:]), append(d, i64(h.sender)), append(pos, h.pos), append(sh, int32(h.g[0]))
			ts, env = append(ts, int64(h.ts)), append(env, nonNil(h.env))
		}
		b.Queue(sqlHeldInsert, g, d, pos, sh, ts, env)
	}
	if len(bt.heldDone) > 0 {
		var g [][]byte
		var d, upto []int64
		for k, p := range bt.heldDone {
			g, d, upto = append(g, k.g[:]), append(d, i64(k.d)), append(upto, p)
		}
		b.Queue(sqlHeldDelete, g, d, upto)
	}
	return b
}

// nonNil: a nil []byte would be sent as NULL into a NOT NULL column.
func nonNil(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

var _ = reflection.Slot{}
