//! The events tables, typed. Names and columns are Synapse's.

diesel::table! {
    events (stream_ordering) {
        stream_ordering -> BigInt,
        topological_ordering -> BigInt,
        event_id -> Text,
        #[sql_name = "type"]
        type_ -> Text,
        room_id -> Text,
        processed -> Bool,
        outlier -> Bool,
        depth -> BigInt,
        origin_server_ts -> Nullable<BigInt>,
        received_ts -> Nullable<BigInt>,
        sender -> Nullable<Text>,
        contains_url -> Nullable<Bool>,
        instance_name -> Nullable<Text>,
        state_key -> Nullable<Text>,
        rejection_reason -> Nullable<Text>,
    }
}

diesel::table! {
    event_json (event_id) {
        event_id -> Text,
        room_id -> Text,
        internal_metadata -> Text,
        json -> Text,
        format_version -> Nullable<Integer>,
    }
}

diesel::table! {
    event_edges (event_id, prev_event_id) {
        event_id -> Text,
        prev_event_id -> Text,
        room_id -> Nullable<Text>,
        is_state -> Bool,
    }
}

diesel::table! {
    event_auth (event_id, auth_id) {
        event_id -> Text,
        auth_id -> Text,
        room_id -> Text,
    }
}

diesel::table! {
    event_forward_extremities (event_id, room_id) {
        event_id -> Text,
        room_id -> Text,
    }
}

diesel::table! {
    rooms (room_id) {
        room_id -> Text,
        is_public -> Nullable<Bool>,
        creator -> Nullable<Text>,
        room_version -> Nullable<Text>,
        has_auth_chain_index -> Nullable<Bool>,
    }
}

diesel::table! {
    rejections (event_id) {
        event_id -> Text,
        reason -> Text,
        last_check -> Text,
    }
}

diesel::table! {
    cache_invalidations (stream_ordering, cache_name, cache_key) {
        stream_ordering -> BigInt,
        cache_name -> Text,
        cache_key -> Text,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    events,
    event_json,
    event_edges,
    event_auth,
    event_forward_extremities,
    rooms,
    rejections,
);
