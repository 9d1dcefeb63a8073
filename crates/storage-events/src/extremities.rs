//! Forward extremities: the events of a room that nothing points to yet.

use crate::types::EventToPersist;
use std::collections::{BTreeSet, HashSet};

/// The room's forward extremities once `batch` is stored, given the current ones
/// and which of the batch's events stored events already name as a prev event
/// (they arrived late; something newer already points at them).
///
/// Outliers and rejected events never become extremities, and a new event that
/// is one is removed by a later event of the batch naming it, as Synapse does.
pub fn new_forward_extremities(
    current: &[String],
    batch: &[EventToPersist],
    referenced_by_stored: &HashSet<String>,
) -> Vec<String> {
    let candidates = batch.iter().filter(|e| !e.outlier && e.rejected.is_none());
    let mut result: BTreeSet<String> = current.iter().cloned().collect();
    result.extend(
        candidates
            .clone()
            .filter(|e| !referenced_by_stored.contains(&e.event_id))
            .map(|e| e.event_id.clone()),
    );
    for e in candidates {
        for prev in &e.prev_events {
            result.remove(prev);
        }
    }
    result.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, prevs: &[&str]) -> EventToPersist {
        crate::testing::event("!r", id, prevs, Some(1))
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn linear_chain_leaves_its_tip() {
        let batch = [ev("$b", &["$a"]), ev("$c", &["$b"])];
        assert_eq!(
            new_forward_extremities(&ids(&["$a"]), &batch, &HashSet::new()),
            ids(&["$c"])
        );
    }

    #[test]
    fn fork_and_merge() {
        let fork = [ev("$b", &["$a"]), ev("$c", &["$a"])];
        assert_eq!(
            new_forward_extremities(&ids(&["$a"]), &fork, &HashSet::new()),
            ids(&["$b", "$c"])
        );
        let merge = [ev("$d", &["$b", "$c"])];
        assert_eq!(
            new_forward_extremities(&ids(&["$b", "$c"]), &merge, &HashSet::new()),
            ids(&["$d"])
        );
    }

    #[test]
    fn outliers_rejected_and_late_events_are_not_extremities() {
        let mut outlier = ev("$o", &["$a"]);
        outlier.outlier = true;
        let mut rejected = ev("$r", &["$a"]);
        rejected.rejected = Some("not allowed".into());
        let late = ev("$late", &["$a"]);
        let batch = [outlier, rejected, late];
        let referenced: HashSet<String> = ["$late".to_string()].into();
        // Neither the outlier, the rejected event, nor the late one (a stored
        // event already points at it) becomes an extremity.
        assert_eq!(
            new_forward_extremities(&ids(&["$z"]), &batch, &referenced),
            ids(&["$z"])
        );
    }
}
