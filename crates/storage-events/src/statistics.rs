//! The query planner's statistics of the tables a batch write grows, brought
//! up to date by a bulk load (`hs-main import`) as those tables grow.

use crate::store::EventsStore;
use storage_core::{Result, ResultExt};

/// Every table a batch writes rows to: its own and those of the state groups
/// it stores in the same transaction.
pub const TABLES_A_BATCH_GROWS: &[&str] = &[
    "events",
    "event_json",
    "event_edges",
    "event_auth",
    "event_forward_extremities",
    "rejections",
    "rooms",
    "event_to_state_groups",
    "current_state_events",
    "cache_invalidations",
    "state_groups",
    "state_group_edges",
    "state_groups_state",
];

/// When a bulk load refreshes the statistics: after its first
/// `FIRST_REFRESH` events, then each time the count it has written doubles, so
/// a load of `n` events refreshes them about log2(n / 1,000) times, each
/// costing a sample of every table, not a scan.
pub const FIRST_REFRESH: u64 = 1_000;

/// Counts a bulk load's written events and says when to refresh.
#[derive(Debug)]
pub struct RefreshSchedule {
    next: u64,
}

impl Default for RefreshSchedule {
    fn default() -> Self {
        RefreshSchedule {
            next: FIRST_REFRESH,
        }
    }
}

impl RefreshSchedule {
    /// Whether the load, having written `written` events in all, should
    /// refresh now; each threshold passed answers `true` once.
    pub fn due(&mut self, written: u64) -> bool {
        if written < self.next {
            return false;
        }
        while self.next <= written {
            self.next *= 2;
        }
        true
    }
}

impl EventsStore {
    /// Refreshes the planner's statistics of [`TABLES_A_BATCH_GROWS`]. An
    /// import into a new PostgreSQL database needs it: autovacuum never gets
    /// to `events` while the writer holds it locked, and the stored-events
    /// check, planned for an empty table, went on scanning the whole table
    /// for every batch (the persist bench's PostgreSQL import ran at 0.2x
    /// its floor, and at 0.6-0.8x with these refreshes).
    pub fn refresh_statistics(&self) -> Result<()> {
        let started = std::time::Instant::now();
        self.db
            .refresh_statistics(TABLES_A_BATCH_GROWS)
            .context("refreshing the planner's statistics of the events tables")?;
        log::debug!(
            "refreshed the planner's statistics of the events tables in {} ms",
            started.elapsed().as_millis()
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refreshes_at_each_doubling_once() {
        let mut s = RefreshSchedule::default();
        let due: Vec<u64> = (0..=9_000).step_by(500).filter(|&w| s.due(w)).collect();
        assert_eq!(due, vec![1_000, 2_000, 4_000, 8_000]);
        // A batch that jumps several thresholds refreshes once.
        let mut s = RefreshSchedule::default();
        assert!(s.due(5_000));
        assert!(!s.due(7_999));
        assert!(s.due(8_000));
    }
}
