DROP FUNCTION take_stream_positions(regclass, bigint);
DROP TABLE stream_positions_lock;
