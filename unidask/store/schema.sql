-- Every table of a unidask database, shard or merged, named once. Bump SCHEMA_VERSION in
-- shard.py on any change.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS unitaries (
    id   INTEGER PRIMARY KEY,   -- task * task_size + idx; the rowid, so lookups by id are direct
                                -- (task and idx are derived from it, not stored: every column
                                -- costs on the write path and in the merge)
    dim  INTEGER NOT NULL,
    data BLOB NOT NULL,         -- row-major matrix, raw little-endian bytes of meta.dtype
    meta TEXT                   -- JSON (e.g. the circuit) or NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    task     INTEGER PRIMARY KEY,
    seed     TEXT NOT NULL,     -- "ROOT/TASK": SeedSequence(ROOT, spawn_key=(TASK,))
    count    INTEGER NOT NULL,
    node     TEXT NOT NULL,
    worker   TEXT NOT NULL,
    started  REAL NOT NULL,     -- unix time
    finished REAL NOT NULL,
    checksum TEXT NOT NULL      -- XXH3-128 of the task's data and meta, in id order
);
