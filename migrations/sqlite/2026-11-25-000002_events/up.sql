-- Events, with Synapse's table and column names (glossary: docs/glossary.md).

-- stream_ordering is the event's position in the stream: strictly increasing in
-- commit order (an INTEGER PRIMARY KEY, the rowid, as in Synapse's SQLite schema).
CREATE TABLE events (
    stream_ordering INTEGER PRIMARY KEY,
    topological_ordering BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    type TEXT NOT NULL,
    room_id TEXT NOT NULL,
    processed BOOL NOT NULL DEFAULT 1,
    outlier BOOL NOT NULL,
    depth BIGINT NOT NULL DEFAULT 0,
    origin_server_ts BIGINT,
    received_ts BIGINT,
    sender TEXT,
    contains_url BOOLEAN,
    instance_name TEXT,
    state_key TEXT DEFAULT NULL,
    rejection_reason TEXT DEFAULT NULL,
    UNIQUE (event_id)
);
CREATE INDEX events_order_room ON events (room_id, topological_ordering, stream_ordering);
CREATE INDEX events_room_stream ON events (room_id, stream_ordering);

-- The PDU as received, in the federation format.
CREATE TABLE event_json (
    event_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    internal_metadata TEXT NOT NULL,
    json TEXT NOT NULL,
    format_version INTEGER,
    UNIQUE (event_id)
);
CREATE INDEX event_json_room_id ON event_json (room_id);

CREATE TABLE event_edges (
    event_id TEXT NOT NULL,
    prev_event_id TEXT NOT NULL,
    room_id TEXT,
    is_state BOOL NOT NULL DEFAULT 0,
    UNIQUE (event_id, prev_event_id)
);
CREATE INDEX ev_edges_prev_id ON event_edges (prev_event_id);

CREATE TABLE event_auth (
    event_id TEXT NOT NULL,
    auth_id TEXT NOT NULL,
    room_id TEXT NOT NULL
);
CREATE INDEX evauth_edges_id ON event_auth (event_id);

CREATE TABLE event_forward_extremities (
    event_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    UNIQUE (event_id, room_id)
);
CREATE INDEX ev_extrem_room ON event_forward_extremities (room_id);

CREATE TABLE rooms (
    room_id TEXT NOT NULL,
    is_public BOOL,
    creator TEXT,
    room_version TEXT,
    has_auth_chain_index BOOLEAN,
    UNIQUE (room_id)
);

CREATE TABLE rejections (
    event_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    last_check TEXT NOT NULL,
    UNIQUE (event_id)
);
