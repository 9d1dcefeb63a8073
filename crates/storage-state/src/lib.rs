//! State groups: the room state at every event, stored as Synapse stores it.
//!
//! A state group is an immutable map (type, state_key) -> event id. Most groups
//! are stored as a delta against a prev group (an edge in `state_group_edges`
//! plus the changed rows); every so often, and always at the start of a chain, a
//! group is a full snapshot. Reads walk the chain down to the snapshot and keep
//! the newest value per slot. Two dictionary caches (members, everything else)
//! answer most reads without the database.

mod caches;
pub mod compress;
mod differences;
mod filter;
mod lookup;
pub mod purge;
mod read;
mod report;
pub mod schema;
mod sql;
mod store;
mod types;
mod unwritten;
mod write;

pub use caches::{Delta, StateCaches};
pub use differences::{
    of_states as differences_of_states, NoOrigins, SnapshotOrigin, SnapshotOrigins,
    StateDifferences, StoredOrigins,
};
pub use filter::StateFilter;
pub use lookup::{room_state, StateLookupError};
pub use purge::{highest_state_group, purge_unneeded_groups, PurgeReport};
pub use report::{state_report, unreferenced_groups, StateReport, UnreferencedGroups};
pub use store::{CacheKind, PendingGroupRows, StateGroupAccess, StateStore};
pub use types::{key, Slot, StateGroup, StateKey, StateMap, MAX_STATE_DELTA_HOPS, MEMBER};
pub use unwritten::PreparedStateGroup;
pub use write::{NewStateGroup, STATE_GROUP_SEQUENCE};

/// For `cargo xtask bench state`: the store's own statement for the state of
/// `group` under `filter`, every value of every row read in place (the texts
/// borrowed and checked, nothing allocated), nothing merged or kept; the
/// number of rows. What the store's read costs beyond it is the store's own
/// overhead.
#[doc(hidden)]
pub fn bare_chain_rows(
    db: &storage_core::Database,
    group: StateGroup,
    filter: &StateFilter,
) -> storage_core::Result<usize> {
    struct Count(usize);
    impl storage_core::RowVisitor for Count {
        fn visit<'a, DB: storage_core::RawBackend, R: diesel::row::Row<'a, DB>>(
            &mut self,
            row: storage_core::RawRow<'_, DB, R>,
        ) -> storage_core::Result<()> {
            std::hint::black_box((row.int(0)?, row.int(1)?));
            row.text_or_null(2, |t| std::hint::black_box(t.map(str::len)))?;
            for column in 3..5 {
                row.text(column, |t| std::hint::black_box(t.len()))?;
            }
            self.0 += 1;
            Ok(())
        }
    }
    db.run_read("bare_chain_rows", |txn| {
        let mut count = Count(0);
        let key_arms = sql::key_arms(txn.engine());
        let row_ids = sql::RowIds::new(txn.engine());
        sql::chain_rows_for(txn.conn(), &[group], filter, key_arms, &row_ids, &mut count)?;
        Ok(count.0)
    })
}
