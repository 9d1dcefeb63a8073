-- Back to version 000010: the lock's table and the three functions as they were.
CREATE TABLE stream_positions_lock ();

CREATE FUNCTION take_stream_positions(seq regclass, k bigint)
RETURNS TABLE (n bigint, id bigint) LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE stream_positions_lock IN EXCLUSIVE MODE;
    FOR i IN 1..k LOOP
        n := i;
        id := nextval(seq);
        RETURN NEXT;
    END LOOP;
END
$$;

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
