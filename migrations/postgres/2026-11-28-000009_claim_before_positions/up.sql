-- What a batch statement that commits on its own calls first, before it
-- writes anything: the main-process claim proven inside the server, as
-- take_stream_positions_claimed does (the claim's row held FOR SHARE until
-- the statement commits, an error, which writes nothing, when its epoch is
-- not `epoch`; a NULL `epoch` checks nothing), but without the stream
-- positions lock: the statement writes its rows that need no position, then
-- takes its positions with take_stream_positions, so that the lock is held
-- only for the rows that need them and the commit.
CREATE FUNCTION prove_main_process_claim(epoch bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    held bigint;
BEGIN
    SELECT c.epoch INTO held FROM main_process_claim c WHERE c.id = 1 FOR SHARE;
    IF prove_main_process_claim.epoch IS NOT NULL
        AND held IS DISTINCT FROM prove_main_process_claim.epoch THEN
        RAISE EXCEPTION 'main-process claim epoch % is not % (another main process claimed the database)',
            coalesce(held::text, 'missing'), prove_main_process_claim.epoch;
    END IF;
    RETURN true;
END
$$;
