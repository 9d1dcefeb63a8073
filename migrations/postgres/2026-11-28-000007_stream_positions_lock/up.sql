-- Stream positions follow commit order: a writer takes its positions while
-- it holds this table locked, and holds it until it commits, so that a
-- reader never sees a position before every lower one is committed. A table
-- of its own (never written) rather than `events`: writers do everything
-- that needs no position before they take the lock, so that batches of
-- different rooms overlap, and autovacuum of `events` is never held off.
CREATE TABLE stream_positions_lock ();

-- `k` new ids of `seq`, ascending, numbered 1..k, taken once the lock is
-- held: what a statement calls to take its positions under the lock (LOCK
-- takes no snapshot, and the statement reads nothing that the writer it
-- waited for wrote).
CREATE FUNCTION take_stream_positions(seq regclass, k bigint)
RETURNS TABLE (n bigint, id bigint) LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE stream_positions_lock IN EXCLUSIVE MODE;
    RETURN QUERY SELECT g.i, nextval(seq) FROM generate_series(1, k) AS g(i);
END
$$;
