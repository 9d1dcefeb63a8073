//! How far the online compression job of a server got in each room
//! (`state_compress_progress`, a table of ours: never on a Synapse database),
//! so that a restart goes on where the last pass stopped instead of going
//! over every room again.

use crate::schema::state_compress_progress;
use crate::types::StateGroup;
use diesel::prelude::*;
use diesel::upsert::excluded;
use std::collections::HashMap;
use storage_core::{with_conn, Database, Result};

/// The highest group of each room that a finished pass covered.
pub fn load_progress(db: &Database) -> Result<HashMap<String, StateGroup>> {
    db.run_read("compress_load_progress", |txn| {
        let rows: Vec<(String, i64)> = with_conn!(txn.conn(), |c| {
            state_compress_progress::table
                .select((
                    state_compress_progress::room_id,
                    state_compress_progress::state_group,
                ))
                .load(c)
        })?;
        Ok(rows.into_iter().collect())
    })
}

/// Records that the groups of `room_id` up to `group` have been compressed.
pub fn record_progress(db: &Database, room_id: &str, group: StateGroup) -> Result<()> {
    db.run_interaction("compress_record_progress", |txn| {
        with_conn!(txn.conn(), |c| diesel::insert_into(
            state_compress_progress::table
        )
        .values((
            state_compress_progress::room_id.eq(room_id),
            state_compress_progress::state_group.eq(group),
        ))
        .on_conflict(state_compress_progress::room_id)
        .do_update()
        .set(
            state_compress_progress::state_group.eq(excluded(state_compress_progress::state_group))
        )
        .execute(c))?;
        Ok(())
    })
}
