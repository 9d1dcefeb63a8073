//! `hs-main compress` on a database Synapse wrote (with Synapse stopped): its
//! state tables shrink, every group keeps its state, and nothing else changes:
//! no table of ours is added, so Synapse reads the result as it is. On SQLite
//! and PostgreSQL.

use serde_json::Value;
use std::collections::BTreeSet;
use storage_core::testing::TestDb;
use storage_core::with_conn;
use storage_state::{StateFilter, StateGroupAccess, StateMap};

storage_core::engine_tests!(compresses_a_synapse_database);

const ROOM: &str = "!synapse:test";

/// Synapse's state tables and its schema version table, as its schema makes them.
const SYNAPSE_STATE_SCHEMA: &str = "
CREATE TABLE state_groups (id BIGINT PRIMARY KEY, room_id TEXT NOT NULL, event_id TEXT NOT NULL);
CREATE INDEX state_groups_room_id_idx ON state_groups (room_id);
CREATE TABLE state_groups_state (state_group BIGINT NOT NULL, room_id TEXT NOT NULL, type TEXT NOT NULL,
    state_key TEXT NOT NULL, event_id TEXT NOT NULL);
CREATE INDEX state_groups_state_type_idx ON state_groups_state (state_group, type, state_key);
CREATE TABLE state_group_edges (state_group BIGINT NOT NULL, prev_state_group BIGINT NOT NULL);
CREATE UNIQUE INDEX state_group_edges_unique_idx ON state_group_edges (state_group, prev_state_group);
CREATE INDEX state_group_edges_prev_idx ON state_group_edges (prev_state_group);
CREATE TABLE event_to_state_groups (event_id TEXT NOT NULL, state_group BIGINT NOT NULL, UNIQUE (event_id));
CREATE TABLE schema_version (Lock CHAR(1) NOT NULL DEFAULT 'X' UNIQUE, version INTEGER NOT NULL,
    upgraded BOOL NOT NULL, CHECK (Lock='X'));
INSERT INTO schema_version (version, upgraded) VALUES (73, false);
";

/// 300 groups as Synapse writes them: a member joins in each, a snapshot
/// every 100 groups, deltas on the group before otherwise.
fn fill(t: &TestDb) {
    let mut sql = String::from(SYNAPSE_STATE_SCHEMA);
    let mut members: Vec<(String, String)> = Vec::new();
    for g in 1..=300i64 {
        let user = format!("@u{g}:test");
        let event = format!("$join{g}");
        members.push((user.clone(), event.clone()));
        sql += &format!("INSERT INTO state_groups VALUES ({g}, '{ROOM}', '{event}');\n");
        sql += &format!("INSERT INTO event_to_state_groups VALUES ('{event}', {g});\n");
        let rows: &[(String, String)] = if g % 100 == 1 {
            &members
        } else {
            sql += &format!("INSERT INTO state_group_edges VALUES ({g}, {});\n", g - 1);
            &members[members.len() - 1..]
        };
        for (user, event) in rows {
            sql += &format!(
                "INSERT INTO state_groups_state VALUES ({g}, '{ROOM}', 'm.room.member', '{user}', '{event}');\n"
            );
        }
    }
    t.raw_connection().batch_execute(&sql).unwrap();
}

fn tables(t: &TestDb) -> BTreeSet<String> {
    #[derive(diesel::QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        name: String,
    }
    let sql = if t.engine() == "postgres" {
        "SELECT tablename AS name FROM pg_tables WHERE schemaname = 'public'"
    } else {
        "SELECT name FROM sqlite_master WHERE type = 'table'"
    };
    use diesel::RunQueryDsl;
    let names: Vec<Name> =
        with_conn!(&mut t.raw_connection(), |c| diesel::sql_query(sql).load(c)).unwrap();
    names.into_iter().map(|n| n.name).collect()
}

fn states(t: &TestDb) -> Vec<StateMap> {
    let store = e2e_tests::cold_state_store(t);
    let groups: Vec<i64> = (1..=300).collect();
    let mut states = store
        .get_state_for_groups(&groups, &StateFilter::all())
        .unwrap();
    groups.iter().map(|g| states.remove(g).unwrap()).collect()
}

fn compresses_a_synapse_database(t: &TestDb) {
    fill(t);
    let before = states(t);
    let tables_before = tables(t);
    let stdout = e2e_tests::hs_main_ok(t.url(), &["compress", "--json"]);
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    let room = &summary["rooms"][0];
    assert_eq!(room["outcome"], "compressed", "{summary:#}");
    // 297 one-row deltas and snapshots of 1, 101 and 201 rows before.
    assert_eq!(room["rows_before"], 600, "{summary:#}");
    assert!(room["rows_after"].as_u64().unwrap() < 600, "{summary:#}");
    assert_eq!(states(t), before, "{}", t.engine());
    assert_eq!(
        tables(t),
        tables_before,
        "nothing but the state tables' rows changed"
    );
}
