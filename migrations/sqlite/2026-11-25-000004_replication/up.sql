-- Cache invalidations for replica workers, written by the main process in the
-- same transaction as the change, at the stream position of that transaction.
-- A worker applies the rows up to the position it reports.
CREATE TABLE cache_invalidations (
    stream_ordering BIGINT NOT NULL,
    cache_name TEXT NOT NULL,
    cache_key TEXT NOT NULL
);
CREATE INDEX cache_invalidations_stream ON cache_invalidations (stream_ordering);
