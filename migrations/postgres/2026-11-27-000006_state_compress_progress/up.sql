-- The online compression job of `hs-main serve` records here, after each room
-- it has compressed, the highest state group of that room the pass covered,
-- so that a restarted server goes on with the rooms that have new groups
-- instead of starting over with every room.
CREATE TABLE state_compress_progress (
    room_id TEXT NOT NULL PRIMARY KEY,
    state_group BIGINT NOT NULL
);
