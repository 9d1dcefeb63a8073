//! The invariants every write must leave the database in, checked from the
//! rows themselves: what the end of every write-path test asserts, and what
//! `hs-main inspect --check` reports on an operator's database.
//!
//! - every event's room exists and has a create event;
//! - every current-state row names a stored event of that room;
//! - every event that is not an outlier has a state group of its room;
//! - every state group edge names an older, stored prev group (reads end a
//!   chain at any other edge, so a group read through it lacks the rows
//!   below; Synapse's schema allows a group two prev groups, which is fine);
//! - no prev event is missing, unless the event citing it is an outlier;
//! - the forward extremities are exactly the accepted (neither outlier nor
//!   rejected) events that no accepted event names as a prev event, which is
//!   Synapse's rule (`_get_events_which_are_prevs`);
//! - the id sequences are ahead of their tables.
//!
//! Each check is one anti-join over tables of this crate and of storage-state.
//! They are written as SQL text, in this one place, because they are
//! correlated `NOT EXISTS` subqueries across both crates' schemas, which
//! diesel's DSL cannot say without joinable declarations the stores do not
//! otherwise need; the statements are plain SQL that both engines run.

use crate::store::EVENTS_STREAM_SEQUENCE;
use diesel::sql_types::Text;
use diesel::{QueryableByName, RunQueryDsl};
use storage_core::{with_conn, Database, Result, Transaction};
use storage_state::STATE_GROUP_SEQUENCE;

/// How many offending rows each violated invariant names.
const SAMPLE: i64 = 5;

/// One invariant that does not hold, with a few of the rows that break it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The invariant, in words.
    pub invariant: &'static str,
    /// The first offending rows, rendered.
    pub examples: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.invariant, self.examples.join(", "))
    }
}

#[derive(QueryableByName)]
struct Pair {
    #[diesel(sql_type = Text)]
    a: String,
    #[diesel(sql_type = Text)]
    b: String,
}

/// (invariant, statement returning columns `a` and `b` for offending rows).
const CHECKS: &[(&str, &str)] = &[
    (
        "every event's room exists",
        "SELECT e.room_id AS a, e.event_id AS b FROM events e \
         WHERE NOT EXISTS (SELECT 1 FROM rooms r WHERE r.room_id = e.room_id)",
    ),
    (
        "every room has a create event",
        "SELECT r.room_id AS a, '' AS b FROM rooms r \
         WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.room_id = r.room_id \
           AND e.type = 'm.room.create' AND e.state_key = '')",
    ),
    (
        "every current-state row names a stored event of its room",
        "SELECT c.room_id AS a, c.event_id AS b FROM current_state_events c \
         WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = c.event_id \
           AND e.room_id = c.room_id)",
    ),
    (
        "every event that is not an outlier has a state group of its room",
        "SELECT e.room_id AS a, e.event_id AS b FROM events e \
         WHERE NOT e.outlier AND NOT EXISTS (SELECT 1 FROM event_to_state_groups s \
           JOIN state_groups g ON g.id = s.state_group \
           WHERE s.event_id = e.event_id AND g.room_id = e.room_id)",
    ),
    (
        "every state group edge names an older, stored prev group",
        "SELECT CAST(e.state_group AS TEXT) AS a, CAST(e.prev_state_group AS TEXT) AS b \
         FROM state_group_edges e \
         WHERE e.prev_state_group >= e.state_group \
           OR NOT EXISTS (SELECT 1 FROM state_groups g WHERE g.id = e.prev_state_group)",
    ),
    (
        "no prev event is missing (unless the event citing it is an outlier)",
        "SELECT ed.event_id AS a, ed.prev_event_id AS b FROM event_edges ed \
         JOIN events e ON e.event_id = ed.event_id \
         WHERE NOT e.outlier AND NOT EXISTS \
           (SELECT 1 FROM events p WHERE p.event_id = ed.prev_event_id)",
    ),
    (
        "every prev event is in the room of the event citing it",
        "SELECT ed.event_id AS a, ed.prev_event_id AS b FROM event_edges ed \
         JOIN events e ON e.event_id = ed.event_id \
         JOIN events p ON p.event_id = ed.prev_event_id \
         WHERE p.room_id <> e.room_id",
    ),
    (
        "every forward extremity is an accepted event of its room with no accepted child",
        "SELECT f.room_id AS a, f.event_id AS b FROM event_forward_extremities f \
         WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = f.event_id \
             AND e.room_id = f.room_id AND NOT e.outlier AND e.rejection_reason IS NULL) \
           OR EXISTS (SELECT 1 FROM event_edges ed JOIN events c ON c.event_id = ed.event_id \
             WHERE ed.prev_event_id = f.event_id AND NOT c.outlier \
             AND c.rejection_reason IS NULL)",
    ),
    (
        "every accepted event with no accepted child is a forward extremity",
        "SELECT e.room_id AS a, e.event_id AS b FROM events e \
         WHERE NOT e.outlier AND e.rejection_reason IS NULL \
           AND NOT EXISTS (SELECT 1 FROM event_edges ed JOIN events c ON c.event_id = ed.event_id \
             WHERE ed.prev_event_id = e.event_id AND NOT c.outlier \
             AND c.rejection_reason IS NULL) \
           AND NOT EXISTS (SELECT 1 FROM event_forward_extremities f \
             WHERE f.event_id = e.event_id AND f.room_id = e.room_id)",
    ),
];

/// Every invariant that does not hold on `db`, read in one snapshot; empty
/// when the database is consistent.
pub fn check_invariants(db: &Database) -> Result<Vec<Violation>> {
    db.run_read("check_invariants", check_invariants_txn)
}

fn check_invariants_txn(txn: &mut Transaction<'_>) -> Result<Vec<Violation>> {
    let mut found = Vec::new();
    for (invariant, sql) in CHECKS {
        let statement = format!("{sql} ORDER BY a, b LIMIT {SAMPLE}");
        let rows: Vec<Pair> = with_conn!(txn.conn(), |c| diesel::sql_query(&statement).load(c))?;
        if !rows.is_empty() {
            found.push(Violation {
                invariant,
                examples: rows
                    .into_iter()
                    .map(|r| {
                        if r.b.is_empty() {
                            r.a
                        } else {
                            format!("{} {}", r.a, r.b)
                        }
                    })
                    .collect(),
            });
        }
    }
    for sequence in [&STATE_GROUP_SEQUENCE, &EVENTS_STREAM_SEQUENCE] {
        let health = txn.inspect_sequence(sequence)?;
        if health.is_behind() {
            found.push(Violation {
                invariant: "every id sequence is ahead of its table",
                examples: vec![format!(
                    "{} handed out up to {} but {} holds id {}",
                    health.sequence,
                    health.handed_out.unwrap_or_default(),
                    sequence.table,
                    health.max_id
                )],
            });
        }
    }
    Ok(found)
}
