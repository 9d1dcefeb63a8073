-- take_stream_positions as before (the stream positions lock, then `k` new
-- ids of `seq`, ascending, numbered 1..k), its ids taken in a loop rather
-- than by a query: PL/pgSQL planned that query afresh on every call, its
-- custom plan for the `k` given (one row) always cheaper than the generic
-- one (a thousand rows), and every write of a message calls it. Measured on
-- PostgreSQL 15 (pgbench -M prepared, one client, `SELECT * FROM
-- take_stream_positions('s'::regclass, 1)`, 20,000 calls, the server's CPU
-- a call, three alternated pairs): 69/86/68 us before, 48/64/49 us after.
CREATE OR REPLACE FUNCTION take_stream_positions(seq regclass, k bigint)
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
