CREATE OR REPLACE FUNCTION take_stream_positions(seq regclass, k bigint)
RETURNS TABLE (n bigint, id bigint) LANGUAGE plpgsql AS $$
BEGIN
    LOCK TABLE stream_positions_lock IN EXCLUSIVE MODE;
    RETURN QUERY SELECT g.i, nextval(seq) FROM generate_series(1, k) AS g(i);
END
$$;
