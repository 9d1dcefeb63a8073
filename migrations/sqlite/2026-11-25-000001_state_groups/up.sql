-- State groups, laid out exactly as Synapse lays them out (glossary: docs/glossary.md).
-- SQLite has no sequence: ids come from an in-process counter seeded from MAX(id).

CREATE TABLE state_groups (
    id BIGINT PRIMARY KEY,
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL
);
CREATE INDEX state_groups_room_id_idx ON state_groups (room_id);

-- For a group with an edge: the delta against its prev group; otherwise its full state.
CREATE TABLE state_groups_state (
    state_group BIGINT NOT NULL,
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    event_id TEXT NOT NULL
);
CREATE INDEX state_groups_state_type_idx ON state_groups_state (state_group, type, state_key);

CREATE TABLE state_group_edges (
    state_group BIGINT NOT NULL,
    prev_state_group BIGINT NOT NULL
);
CREATE UNIQUE INDEX state_group_edges_unique_idx ON state_group_edges (state_group, prev_state_group);
CREATE INDEX state_group_edges_prev_idx ON state_group_edges (prev_state_group);

-- The state *after* each (non-outlier) event.
CREATE TABLE event_to_state_groups (
    event_id TEXT NOT NULL,
    state_group BIGINT NOT NULL,
    UNIQUE (event_id)
);
CREATE INDEX event_to_state_groups_sg_index ON event_to_state_groups (state_group);

CREATE TABLE current_state_events (
    event_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    membership TEXT,
    UNIQUE (event_id),
    UNIQUE (room_id, type, state_key)
);
CREATE INDEX current_state_events_member_index ON current_state_events (state_key) WHERE type = 'm.room.member';
