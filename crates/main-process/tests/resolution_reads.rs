//! State resolution reads its events in a few queries, not one per event: a
//! room of 40 joined members forks, each fork makes 5 members leave, and the
//! context of an event merging the forks (fresh caches) must resolve to both
//! forks' leaves over everyone else's joins, asking storage for events a
//! handful of times (one per level of the auth DAG, plus the prev events),
//! where fetching them one at a time asks over 40 times. On SQLite and
//! PostgreSQL.

use event_context::ruma::RoomVersionId;
use event_context::{ContextBuilder, Pdu, PendingEvents};
use serde_json::json;
use storage_core::testing::TestDb;
use storage_core::StoreConfig;
use storage_events::EventsStore;
use storage_state::{StateFilter, StateGroupAccess};

storage_core::engine_tests!(resolution_reads_events_in_a_few_queries);

const ROOM: &str = "!forked:example.org";
const MEMBERS: usize = 40;
const LEAVES_PER_FORK: usize = 5;
/// Queries allowed: 3 are made today (the two prev events, then the states'
/// events, which hold their own auth events here), plus room for a few more
/// levels; fetched one at a time it takes over 40.
const MOST_READS: u64 = 6;

/// An event of the room (version 10) as a JSON line, with its id.
fn event(
    sender: &str,
    kind: &str,
    state_key: Option<&str>,
    content: serde_json::Value,
    prev: &[&str],
    auth: &[&str],
    depth: usize,
) -> (String, String) {
    let mut e = json!({
        "room_id": ROOM, "sender": sender, "type": kind, "content": content,
        "prev_events": prev, "auth_events": auth, "depth": depth,
        "origin_server_ts": 1_700_000_000_000u64 + depth as u64, "origin": "example.org",
        "hashes": {"sha256": "aGFzaA"}, "signatures": {"example.org": {"ed25519:1": "c2ln"}},
    });
    if let Some(k) = state_key {
        e["state_key"] = json!(k);
    }
    let line = e.to_string();
    let id = Pdu::from_json(&line, Some(&RoomVersionId::V10))
        .expect("test events parse")
        .event_id
        .to_string();
    (line, id)
}

fn user(i: usize) -> String {
    format!("@user{i}:example.org")
}

fn resolution_reads_events_in_a_few_queries(t: &TestDb) {
    let mut lines = Vec::new();
    let mut push = |(line, id): (String, String)| {
        lines.push(line);
        id
    };
    let admin = user(0);
    let create = push(event(
        &admin,
        "m.room.create",
        Some(""),
        json!({"creator": admin, "room_version": "10"}),
        &[],
        &[],
        1,
    ));
    let admin_join = push(event(
        &admin,
        "m.room.member",
        Some(&admin),
        json!({"membership": "join"}),
        &[&create],
        &[&create],
        2,
    ));
    let pl = push(event(
        &admin,
        "m.room.power_levels",
        Some(""),
        json!({"users": {&admin: 100}}),
        &[&admin_join],
        &[&create, &admin_join],
        3,
    ));
    let jr = push(event(
        &admin,
        "m.room.join_rules",
        Some(""),
        json!({"join_rule": "public"}),
        &[&pl],
        &[&create, &pl, &admin_join],
        4,
    ));
    let mut depth = 4;
    let mut prev = jr.clone();
    let mut joins = vec![admin_join.clone()];
    for i in 1..MEMBERS {
        depth += 1;
        let u = user(i);
        prev = push(event(
            &u,
            "m.room.member",
            Some(&u),
            json!({"membership": "join"}),
            &[&prev],
            &[&create, &pl, &jr],
            depth,
        ));
        joins.push(prev.clone());
    }
    let fork = prev;
    let mut tips = Vec::new();
    let mut leaves = Vec::new();
    for f in 0..2 {
        let mut prev = fork.clone();
        for i in 0..LEAVES_PER_FORK {
            let m = 1 + f * LEAVES_PER_FORK + i;
            let u = user(m);
            prev = push(event(
                &u,
                "m.room.member",
                Some(&u),
                json!({"membership": "leave"}),
                &[&prev],
                &[&create, &pl, &joins[m]],
                depth + 1 + i,
            ));
            leaves.push((u, prev.clone()));
        }
        tips.push(prev);
    }
    let (merge, _) = event(
        &admin,
        "m.room.message",
        None,
        json!({"body": "merge", "msgtype": "m.text"}),
        &[&tips[0], &tips[1]],
        &[&create, &pl, &admin_join],
        depth + LEAVES_PER_FORK + 1,
    );

    let dir = tempfile_dir(t);
    let file = dir.join("room.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").expect("room file");
    main_process::import_cmd::run(t.url(), &[file]).expect("import");
    let _ = std::fs::remove_dir_all(&dir);

    let config = StoreConfig::default();
    let builder = ContextBuilder::new(EventsStore::new(t.open(), &config).unwrap(), &config);
    let pdu = Pdu::from_json(&merge, Some(&RoomVersionId::V10)).unwrap();
    let context = builder
        .compute_event_context(&pdu, false, &PendingEvents::default())
        .unwrap();
    let before = context.state_group_before.expect("a resolved group");
    let state = builder
        .state()
        .get_state_for_groups(&[before], &StateFilter::all())
        .unwrap()
        .remove(&before)
        .unwrap();
    assert_eq!(
        state.len(),
        3 + MEMBERS,
        "{}: the resolved state",
        t.engine()
    );
    for (u, leave) in &leaves {
        let slot = storage_state::Slot("m.room.member", u);
        assert_eq!(
            state.get(&slot).map(|e| &**e),
            Some(leave.as_str()),
            "{}: {u}",
            t.engine()
        );
    }
    let reads = builder.event_reads();
    assert!(
        reads <= MOST_READS,
        "{}: resolving over {} state events asked storage for events {reads} times (at most {MOST_READS} wanted)",
        t.engine(),
        state.len()
    );
}

/// A fresh folder for the room file.
fn tempfile_dir(t: &TestDb) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hs-resolution-reads-{}-{}",
        std::process::id(),
        t.engine()
    ));
    std::fs::create_dir_all(&dir).expect("temporary folder");
    dir
}
