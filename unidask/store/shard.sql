-- A shard's own table, beside schema.sql's (the merged database has none): a task's rows packed,
-- its matrices in id order as BLOBs of about a MiB each (shard.BLOCK_BYTES), each keyed by the id
-- of its first row: a row per matrix costs SQLite a cell, a key and a record each, and one BLOB
-- of a whole task costs it copies of the task in fresh memory. Rows with meta (circuits) stay in
-- unitaries, a row per matrix.
CREATE TABLE IF NOT EXISTS blocks (
    id   INTEGER PRIMARY KEY,   -- the id of the block's first row; its rows are id, id + 1, ...
    dim  INTEGER NOT NULL,
    data BLOB NOT NULL          -- row-major matrices, raw little-endian bytes of meta.dtype
);
