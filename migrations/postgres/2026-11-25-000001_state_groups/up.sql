-- State groups, laid out exactly as Synapse lays them out (glossary: docs/glossary.md).

CREATE TABLE state_groups (
    id BIGINT NOT NULL,
    room_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    CONSTRAINT state_groups_pkey PRIMARY KEY (id)
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
-- About 50 rows per group: keeps the planner on the index (Synapse state delta 61).
ALTER TABLE state_groups_state ALTER COLUMN state_group SET (n_distinct = -0.02);

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
    CONSTRAINT event_to_state_groups_event_id_key UNIQUE (event_id)
);
CREATE INDEX event_to_state_groups_sg_index ON event_to_state_groups (state_group);

CREATE TABLE current_state_events (
    event_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    membership TEXT,
    CONSTRAINT current_state_events_event_id_key UNIQUE (event_id),
    CONSTRAINT current_state_events_room_id_type_state_key_key UNIQUE (room_id, type, state_key)
);
CREATE INDEX current_state_events_member_index ON current_state_events (state_key) WHERE type = 'm.room.member';

-- Any number of processes allocate state group ids from this sequence. It starts
-- past any group already present, so it never hands out an existing id (Synapse
-- state delta 47); start-up checks it again (Database::sync_sequence).
CREATE SEQUENCE state_group_id_seq START WITH 1 INCREMENT BY 1 NO MINVALUE NO MAXVALUE CACHE 1;
SELECT setval('state_group_id_seq', (SELECT COALESCE(MAX(id), 0) + 1 FROM state_groups), false);
