-- Schema 1 of the PostgreSQL store. Ids are stored as they are on the wire
-- (a group id is 32 bytes, a device id a 64-bit integer stored as bigint
-- with the same bits). "shard" is the group id's first byte, kept as a
-- column so a node can read and fence exactly the shards it owns.

-- One row per shard: the epoch of its current owner (the etcd owner key's
-- revision in cluster mode) and a commit counter that every commit batch
-- bumps with "WHERE shard = $1 AND epoch = $2", which is the fence.
CREATE TABLE d2m_shards (
    shard   integer PRIMARY KEY,
    epoch   bigint  NOT NULL,
    owner   text    NOT NULL DEFAULT '',
    commits bigint  NOT NULL DEFAULT 0
);

CREATE TABLE d2m_slots (
    group_id           bytea    NOT NULL,
    device_id          bigint   NOT NULL,
    shard              integer  NOT NULL,
    device_info        bytea    NOT NULL,
    policy             smallint NOT NULL,
    created_at         bigint   NOT NULL,
    connected_since    bigint   NOT NULL,
    last_disconnect_at bigint   NOT NULL,
    counter            bigint   NOT NULL, -- last Seq handed out
    PRIMARY KEY (group_id, device_id)
);
CREATE INDEX d2m_slots_shard ON d2m_slots (shard, group_id);

CREATE TABLE d2m_tombstones (
    group_id  bytea    NOT NULL,
    device_id bigint   NOT NULL,
    shard     integer  NOT NULL,
    reason    smallint NOT NULL,
    at        bigint   NOT NULL,
    PRIMARY KEY (group_id, device_id)
);
CREATE INDEX d2m_tombstones_shard ON d2m_tombstones (shard, at);

CREATE TABLE d2m_groups (
    group_id    bytea   PRIMARY KEY,
    shard       integer NOT NULL,
    shared_data bytea   NOT NULL
);
CREATE INDEX d2m_groups_shard ON d2m_groups (shard, group_id);

-- One row per stored copy of a reflection: the envelope is repeated for
-- each recipient slot (two or three in a typical group), which keeps an ack
-- a single-row delete and the schema free of reference counts.
CREATE TABLE d2m_queue (
    group_id  bytea  NOT NULL,
    device_id bigint NOT NULL,
    seq       bigint NOT NULL,
    ts        bigint NOT NULL,
    envelope  bytea  NOT NULL,
    PRIMARY KEY (group_id, device_id, seq)
);

-- Reflections a transaction holder sent, kept back until its transaction
-- ends (docs/protocol.md §10, §18 row 3).
CREATE TABLE d2m_held (
    group_id bytea  NOT NULL,
    sender   bigint NOT NULL,
    pos      bigint NOT NULL,
    shard    integer NOT NULL,
    ts       bigint NOT NULL,
    envelope bytea  NOT NULL,
    PRIMARY KEY (group_id, sender, pos)
);
CREATE INDEX d2m_held_shard ON d2m_held (shard);

INSERT INTO d2m_shards (shard, epoch) SELECT s, 0 FROM generate_series(0, 255) AS s;
