-- What a batch statement that commits on its own calls to take its stream
-- positions: no BEGIN and no COMMIT around it, so the write is one round
-- trip. As take_stream_positions, and first the main-process claim proven
-- inside the server, where it still stops the write: the claim's row held
-- FOR SHARE until the statement commits (a newcomer's raise of the epoch
-- waits for it), and an error, which writes nothing, when its epoch is not
-- `epoch` (a newcomer raised it first). A NULL `epoch` checks nothing.
CREATE FUNCTION take_stream_positions_claimed(seq regclass, k bigint, epoch bigint)
RETURNS TABLE (n bigint, id bigint) LANGUAGE plpgsql AS $$
DECLARE
    held bigint;
BEGIN
    SELECT c.epoch INTO held FROM main_process_claim c WHERE c.id = 1 FOR SHARE;
    IF take_stream_positions_claimed.epoch IS NOT NULL
        AND held IS DISTINCT FROM take_stream_positions_claimed.epoch THEN
        RAISE EXCEPTION 'main-process claim epoch % is not % (another main process claimed the database)',
            coalesce(held::text, 'missing'), take_stream_positions_claimed.epoch;
    END IF;
    LOCK TABLE stream_positions_lock IN EXCLUSIVE MODE;
    RETURN QUERY SELECT g.i, nextval(seq) FROM generate_series(1, k) AS g(i);
END
$$;
