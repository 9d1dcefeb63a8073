//! The state tables, typed. Names and columns are Synapse's.
//!
//! diesel needs a primary key per table; tables without one in Synapse
//! (`state_groups_state`, `state_group_edges`) declare the columns that identify a
//! row in practice. Nothing relies on those keys being enforced.

diesel::table! {
    state_groups (id) {
        id -> BigInt,
        room_id -> Text,
        event_id -> Text,
    }
}

diesel::table! {
    state_groups_state (state_group, type_, state_key) {
        state_group -> BigInt,
        room_id -> Text,
        #[sql_name = "type"]
        type_ -> Text,
        state_key -> Text,
        event_id -> Text,
    }
}

diesel::table! {
    state_group_edges (state_group, prev_state_group) {
        state_group -> BigInt,
        prev_state_group -> BigInt,
    }
}

diesel::table! {
    event_to_state_groups (event_id) {
        event_id -> Text,
        state_group -> BigInt,
    }
}

diesel::table! {
    current_state_events (event_id) {
        event_id -> Text,
        room_id -> Text,
        #[sql_name = "type"]
        type_ -> Text,
        state_key -> Text,
        membership -> Nullable<Text>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    state_groups,
    state_groups_state,
    state_group_edges,
    event_to_state_groups,
    current_state_events,
);

diesel::table! {
    /// Ours, not Synapse's: how far the online compression job got per room.
    state_compress_progress (room_id) {
        room_id -> Text,
        state_group -> BigInt,
    }
}
