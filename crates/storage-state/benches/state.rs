//! `cargo xtask bench state`: a full-state read of the group at the end of a
//! 99-hop delta chain in a room with 10,000 members, through the store with cold
//! and warm caches, next to the bare SQL statement that computes the same state,
//! on SQLite and (when `HS_TEST_POSTGRES_URL` is set) PostgreSQL.

use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::{with_conn, Conn, StoreConfig};
use storage_state::{key, StateFilter, StateGroupStore, StateMap, StateStore};

const MEMBERS: usize = 10_000;
const HOPS: usize = 99;

#[derive(QueryableByName)]
#[allow(dead_code)]
struct Row {
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = Text)]
    state_key: String,
    #[diesel(sql_type = Text)]
    event_id: String,
}

/// The state of `group` in one statement, as a hand-written reader would ask for
/// it: Synapse's DISTINCT ON query on PostgreSQL; on SQLite, which has no
/// DISTINCT ON, a GROUP BY whose bare columns come from the row with the highest
/// group (a documented SQLite guarantee).
fn bare_sql(engine: &str) -> &'static str {
    if engine == "postgres" {
        "WITH RECURSIVE chain(state_group) AS ( \
             VALUES ($1::bigint) \
             UNION ALL \
             SELECT e.prev_state_group FROM state_group_edges e JOIN chain c ON e.state_group = c.state_group) \
         SELECT DISTINCT ON (type, state_key) type AS event_type, state_key, event_id \
         FROM state_groups_state WHERE state_group IN (SELECT state_group FROM chain) \
         ORDER BY type, state_key, state_group DESC"
    } else {
        "WITH RECURSIVE chain(state_group) AS ( \
             VALUES ($1) \
             UNION ALL \
             SELECT e.prev_state_group FROM state_group_edges e JOIN chain c ON e.state_group = c.state_group) \
         SELECT type AS event_type, state_key, event_id, MAX(state_group) AS g \
         FROM state_groups_state WHERE state_group IN (SELECT state_group FROM chain) \
         GROUP BY type, state_key"
    }
}

fn build(store: &StateStore) -> (i64, StateMap) {
    let mut state = StateMap::new();
    state.insert(key("m.room.create", ""), "$create".into());
    state.insert(key("m.room.power_levels", ""), "$pl".into());
    state.insert(key("m.room.join_rules", ""), "$jr".into());
    state.insert(key("m.room.name", ""), "$name".into());
    for m in 0..MEMBERS {
        state.insert(
            key("m.room.member", &format!("@user{m}:bench")),
            format!("$join{m}"),
        );
    }
    let room = "!bench:bench";
    let mut group = store
        .store_state_group("$create", room, None, None, Some(&state))
        .expect("snapshot");
    for hop in 0..HOPS {
        let event = format!("$hop{hop}");
        let mut delta = StateMap::new();
        delta.insert(
            key(
                "m.room.member",
                &format!("@user{}:bench", hop * 37 % MEMBERS),
            ),
            event.clone(),
        );
        state.extend(delta.clone());
        group = store
            .store_state_group(&event, room, Some(group), Some(&delta), None)
            .expect("delta");
    }
    let delta = store
        .get_state_group_delta(group)
        .expect("delta")
        .expect("the last group is a delta");
    assert!(delta.1.len() == 1);
    (group, state)
}

fn time(iterations: usize, mut f: impl FnMut()) -> (Duration, Duration) {
    f(); // warm the database's own page cache
    let mut samples: Vec<Duration> = (0..iterations)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    samples.sort();
    (samples[samples.len() / 2], samples[samples.len() * 9 / 10])
}

fn ms(d: Duration) -> String {
    format!("{:8.3} ms", d.as_secs_f64() * 1e3)
}

fn run(t: &TestDb) {
    let store = StateStore::new(t.open(), &StoreConfig::default()).expect("store");
    let (group, expected) = build(&store);
    let mut raw: Conn = t.raw_connection();
    let sql = bare_sql(t.engine());
    let (bare, bare_p90) = time(30, || {
        let rows: Vec<Row> = with_conn!(&mut raw, |c| diesel::sql_query(sql)
            .bind::<BigInt, _>(group)
            .load(c))
        .expect("bare SQL");
        assert_eq!(rows.len(), expected.len());
    });
    let all = StateFilter::all();
    let (cold, cold_p90) = time(30, || {
        let fresh =
            StateStore::new(store.database().clone(), &StoreConfig::default()).expect("store");
        let got = fresh
            .get_state_for_groups(&[group], &all)
            .expect("cold read");
        assert_eq!(got[&group].len(), expected.len());
    });
    let warm_store =
        StateStore::new(store.database().clone(), &StoreConfig::default()).expect("store");
    warm_store
        .get_state_for_groups(&[group], &all)
        .expect("warming");
    let (warm, warm_p90) = time(200, || {
        let got = warm_store
            .get_state_for_groups(&[group], &all)
            .expect("warm read");
        assert_eq!(got[&group].len(), expected.len());
    });
    let narrow = StateFilter::from_types([
        ("m.room.member", Some("@user5:bench")),
        ("m.room.name", Some("")),
    ]);
    let (narrow_cold, narrow_p90) = time(30, || {
        let fresh =
            StateStore::new(store.database().clone(), &StoreConfig::default()).expect("store");
        let got = fresh
            .get_state_for_groups(&[group], &narrow)
            .expect("narrow read");
        assert_eq!(got[&group].len(), 2);
    });
    // The member changed by the newest delta: the per-hop walk stops at once.
    let newest = format!("@user{}:bench", (HOPS - 1) * 37 % MEMBERS);
    let recent = StateFilter::from_types([("m.room.member", Some(newest.as_str()))]);
    let (recent_cold, recent_p90) = time(30, || {
        let fresh =
            StateStore::new(store.database().clone(), &StoreConfig::default()).expect("store");
        let got = fresh
            .get_state_for_groups(&[group], &recent)
            .expect("recent read");
        assert_eq!(got[&group].len(), 1);
    });
    let ratio = |d: Duration| d.as_secs_f64() / bare.as_secs_f64();
    let e = t.engine();
    println!(
        "{e:<9} bare SQL statement          median {} p90 {}",
        ms(bare),
        ms(bare_p90)
    );
    println!(
        "{e:<9} store, cold cache           median {} p90 {}  {:5.2}x bare",
        ms(cold),
        ms(cold_p90),
        ratio(cold)
    );
    println!(
        "{e:<9} store, warm cache           median {} p90 {}  {:5.2}x bare",
        ms(warm),
        ms(warm_p90),
        ratio(warm)
    );
    println!(
        "{e:<9} store, cold, 2-slot filter  median {} p90 {}  {:5.2}x bare",
        ms(narrow_cold),
        ms(narrow_p90),
        ratio(narrow_cold)
    );
    println!(
        "{e:<9} store, cold, newest slot    median {} p90 {}  {:5.2}x bare",
        ms(recent_cold),
        ms(recent_p90),
        ratio(recent_cold)
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    println!(
        "state read: group at the end of a {HOPS}-hop delta chain, {MEMBERS} members, full state unless noted"
    );
    run(&TestDb::sqlite());
    match TestDb::postgres() {
        Some(db) => run(&db),
        None => println!(
            "postgres  skipped: HS_TEST_POSTGRES_URL not set (use `cargo xtask bench state`)"
        ),
    }
}
