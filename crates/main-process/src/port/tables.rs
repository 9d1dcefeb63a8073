//! The tables a port copies, each copied in batches of whole values of its
//! leading key column, in key order: a batch holds every row whose leading key
//! lies in `(after, upto]`, so a batch boundary never splits rows that share a
//! key, and the last key copied is all that is needed to resume.

use diesel::prelude::*;
use storage_core::{with_conn, Conn, Result};

/// One table's copier.
pub trait PortTable {
    const NAME: &'static str;
    type Key: Clone + ToString + std::str::FromStr;
    type Row;
    /// Up to `limit` distinct leading keys after `after`, ascending.
    fn next_keys(src: &mut Conn, after: Option<&Self::Key>, limit: i64) -> Result<Vec<Self::Key>>;
    /// The rows with leading key in `(after, upto]`.
    fn load(src: &mut Conn, after: Option<&Self::Key>, upto: &Self::Key) -> Result<Vec<Self::Row>>;
    /// Plain batched INSERTs of `rows`.
    fn insert(dst: &mut Conn, rows: &[Self::Row]) -> Result<()>;
    fn count(conn: &mut Conn) -> Result<i64>;
    /// The highest leading key, as text (part of a source's fingerprint).
    fn max_key(conn: &mut Conn) -> Result<Option<String>>;
    /// Deletes every row (a `--restart` of a port); returns how many.
    fn clear(dst: &mut Conn) -> Result<usize>;

    /// Copies the rows with leading key in `(after, upto]` from `src` to `dst`;
    /// returns how many.
    fn copy(
        src: &mut Conn,
        dst: &mut Conn,
        after: Option<&Self::Key>,
        upto: &Self::Key,
    ) -> Result<usize> {
        let rows = Self::load(src, after, upto)?;
        Self::insert(dst, &rows)?;
        Ok(rows.len())
    }
}

/// Rows per INSERT statement.
const INSERT_CHUNK: usize = 500;

macro_rules! port_table {
    ($ty:ident, $name:literal, $schema:path, $lead:ident: $key:ty, { $($col:ident: $col_ty:ty),+ $(,)? }) => {
        #[derive(Debug)]
        pub struct $ty;

        const _: () = {
            use $schema as t;

            #[derive(Debug, Queryable, Insertable)]
            #[diesel(table_name = t)]
            #[diesel(treat_none_as_default_value = false)]
            pub struct Row {
                $($col: $col_ty),+
            }

            impl PortTable for $ty {
                const NAME: &'static str = $name;
                type Key = $key;
                type Row = Row;

                fn next_keys(src: &mut Conn, after: Option<&$key>, limit: i64) -> Result<Vec<$key>> {
                    Ok(with_conn!(src, |c| {
                        let mut q = t::table.select(t::$lead).distinct().order(t::$lead).limit(limit).into_boxed();
                        if let Some(after) = after {
                            q = q.filter(t::$lead.gt(after.clone()));
                        }
                        q.load::<$key>(c)
                    })?)
                }

                fn load(src: &mut Conn, after: Option<&$key>, upto: &$key) -> Result<Vec<Row>> {
                    Ok(with_conn!(src, |c| {
                        let mut q = t::table
                            .select(($(t::$col),+))
                            .filter(t::$lead.le(upto.clone()))
                            .into_boxed();
                        if let Some(after) = after {
                            q = q.filter(t::$lead.gt(after.clone()));
                        }
                        q.load::<Row>(c)
                    })?)
                }

                fn insert(dst: &mut Conn, rows: &[Row]) -> Result<()> {
                    for chunk in rows.chunks(INSERT_CHUNK) {
                        with_conn!(&mut *dst, |c| diesel::insert_into(t::table).values(chunk).execute(c))?;
                    }
                    Ok(())
                }

                fn count(conn: &mut Conn) -> Result<i64> {
                    Ok(with_conn!(conn, |c| t::table.count().get_result::<i64>(c))?)
                }

                fn max_key(conn: &mut Conn) -> Result<Option<String>> {
                    let max: Option<$key> = with_conn!(conn, |c| t::table
                        .select(diesel::dsl::max(t::$lead))
                        .first(c))?;
                    Ok(max.map(|k| k.to_string()))
                }

                fn clear(dst: &mut Conn) -> Result<usize> {
                    Ok(with_conn!(dst, |c| diesel::delete(t::table).execute(c))?)
                }
            }
        };
    };
}

port_table!(Rooms, "rooms", storage_events::schema::rooms, room_id: String, {
    room_id: String,
    is_public: Option<bool>,
    creator: Option<String>,
    room_version: Option<String>,
    has_auth_chain_index: Option<bool>,
});

port_table!(Events, "events", storage_events::schema::events, stream_ordering: i64, {
    stream_ordering: i64,
    topological_ordering: i64,
    event_id: String,
    type_: String,
    room_id: String,
    processed: bool,
    outlier: bool,
    depth: i64,
    origin_server_ts: Option<i64>,
    received_ts: Option<i64>,
    sender: Option<String>,
    contains_url: Option<bool>,
    instance_name: Option<String>,
    state_key: Option<String>,
    rejection_reason: Option<String>,
});

port_table!(EventJson, "event_json", storage_events::schema::event_json, event_id: String, {
    event_id: String,
    room_id: String,
    internal_metadata: String,
    json: String,
    format_version: Option<i32>,
});

port_table!(EventEdges, "event_edges", storage_events::schema::event_edges, event_id: String, {
    event_id: String,
    prev_event_id: String,
    room_id: Option<String>,
    is_state: bool,
});

port_table!(EventAuth, "event_auth", storage_events::schema::event_auth, event_id: String, {
    event_id: String,
    auth_id: String,
    room_id: String,
});

port_table!(ForwardExtremities, "event_forward_extremities", storage_events::schema::event_forward_extremities, event_id: String, {
    event_id: String,
    room_id: String,
});

port_table!(Rejections, "rejections", storage_events::schema::rejections, event_id: String, {
    event_id: String,
    reason: String,
    last_check: String,
});

port_table!(StateGroups, "state_groups", storage_state::schema::state_groups, id: i64, {
    id: i64,
    room_id: String,
    event_id: String,
});

port_table!(StateGroupEdges, "state_group_edges", storage_state::schema::state_group_edges, state_group: i64, {
    state_group: i64,
    prev_state_group: i64,
});

port_table!(StateGroupsState, "state_groups_state", storage_state::schema::state_groups_state, state_group: i64, {
    state_group: i64,
    room_id: String,
    type_: String,
    state_key: String,
    event_id: String,
});

port_table!(EventToStateGroups, "event_to_state_groups", storage_state::schema::event_to_state_groups, event_id: String, {
    event_id: String,
    state_group: i64,
});

port_table!(CurrentStateEvents, "current_state_events", storage_state::schema::current_state_events, event_id: String, {
    event_id: String,
    room_id: String,
    type_: String,
    state_key: String,
    membership: Option<String>,
});
