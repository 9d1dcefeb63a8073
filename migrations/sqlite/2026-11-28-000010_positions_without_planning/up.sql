-- take_stream_positions is PostgreSQL's; SQLite takes its stream positions
-- in the writer. Kept so that both engines carry the same versions.
SELECT 1;
