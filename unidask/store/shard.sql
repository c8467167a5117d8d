-- A shard's own table, beside schema.sql's (the merged database has none): a task's rows packed,
-- its matrices in id order as one BLOB, written in one insert (a row per matrix costs SQLite a
-- cell, a key and a record each). Rows with meta (circuits) stay in unitaries, a row per matrix.
CREATE TABLE IF NOT EXISTS blocks (
    task INTEGER PRIMARY KEY,
    dim  INTEGER NOT NULL,
    data BLOB NOT NULL          -- tasks.count row-major matrices, raw little-endian bytes of meta.dtype
);
