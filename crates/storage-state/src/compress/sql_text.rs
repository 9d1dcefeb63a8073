//! The SQL of a chunk's rewrite as text, for `--sql FILE`: what an operator
//! can read, keep, or apply by hand. Plain SQL that both engines (and Synapse's
//! PostgreSQL) accept; values are quoted literals.

use super::apply::Change;
use super::packed::Interner;
use std::fmt::Write;

/// Rows per INSERT statement.
const ROWS_PER_INSERT: usize = 1_000;

/// A string literal: single quotes, doubled inside.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The statements that rewrite `chunk` in one transaction.
pub(crate) fn chunk_sql(interner: &Interner, room_id: &str, chunk: &[Change]) -> String {
    let ids = chunk
        .iter()
        .map(|c| c.old.id.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = String::from("BEGIN;\n");
    let _ = writeln!(
        sql,
        "DELETE FROM state_group_edges WHERE state_group IN ({ids});"
    );
    let _ = writeln!(
        sql,
        "DELETE FROM state_groups_state WHERE state_group IN ({ids});"
    );
    let edges: Vec<String> = chunk
        .iter()
        .filter_map(|c| c.new.prev.map(|p| format!("({}, {p})", c.old.id)))
        .collect();
    if !edges.is_empty() {
        let _ = writeln!(
            sql,
            "INSERT INTO state_group_edges (state_group, prev_state_group) VALUES {};",
            edges.join(", ")
        );
    }
    let room = quote(room_id);
    let rows: Vec<String> = chunk
        .iter()
        .flat_map(|c| {
            let room = &room;
            c.new.rows.iter().map(move |&(slot, event)| {
                let (t, k) = interner.slot_name(slot);
                format!(
                    "({}, {room}, {}, {}, {})",
                    c.old.id,
                    quote(t),
                    quote(k),
                    quote(interner.event_name(event))
                )
            })
        })
        .collect();
    for part in rows.chunks(ROWS_PER_INSERT) {
        let _ = writeln!(
            sql,
            "INSERT INTO state_groups_state (state_group, room_id, type, state_key, event_id) \
             VALUES\n  {};",
            part.join(",\n  ")
        );
    }
    sql.push_str("COMMIT;\n");
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_doubled() {
        assert_eq!(quote("it's"), "'it''s'");
        assert_eq!(quote(""), "''");
    }
}
