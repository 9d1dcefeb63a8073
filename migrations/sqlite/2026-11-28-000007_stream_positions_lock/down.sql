DROP TABLE stream_positions_lock;
