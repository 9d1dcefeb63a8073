-- PostgreSQL's writers take their stream positions under a lock table of
-- their own; SQLite has one writer at a time, and takes its positions from
-- memory under it. The table is kept on both engines alike.
CREATE TABLE stream_positions_lock (unused INTEGER);
