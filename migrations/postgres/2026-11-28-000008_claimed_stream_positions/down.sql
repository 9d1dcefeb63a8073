DROP FUNCTION take_stream_positions_claimed(regclass, bigint, bigint);
