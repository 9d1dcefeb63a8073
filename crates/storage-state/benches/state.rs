//! `cargo xtask bench state`: state reads through the store next to the bare SQL
//! statements that fetch the same rows, on SQLite and (when `HS_TEST_POSTGRES_URL`
//! is set) PostgreSQL. Two rooms:
//!
//! - a 99-hop delta chain over 10,000 members, one member changed per hop;
//! - a room shaped like Matrix HQ (issue 14): a snapshot of 30,856 state events
//!   (30,661 members), 99 delta groups of 580 member changes above it, 88,269
//!   rows, 37,939 entries in the full state of the top group; on SQLite read
//!   again with each group's rows rewritten in a hash order (as Synapse wrote
//!   them) instead of the index's (as the store writes them).
//!
//! Memory is counted by a counting global allocator (`stats_alloc`) around
//! jemalloc, the allocator `hs-main` and `hs-worker` run on, so every figure
//! here includes two relaxed atomic additions per allocation.
//!
//! `HS_BENCH_KEEP=DIR` keeps the HQ room's SQLite file in DIR and prints the
//! command pair that times `hs-main state` on it against the sqlite3 shell
//! running the bare statement (`farm-bench`); `HS_BENCH_PROFILE` (see
//! [`profile`]) runs one kind of read for perf and callgrind.

use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, RunQueryDsl};
use stats_alloc::{Region, StatsAlloc};
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::{with_conn, Conn, StoreConfig};
use storage_state::{
    key, NewStateGroup, StateFilter, StateGroupAccess, StateMap, StateStore, MEMBER,
};

#[global_allocator]
static GLOBAL: StatsAlloc<tikv_jemallocator::Jemalloc> =
    StatsAlloc::new(tikv_jemallocator::Jemalloc);

const MEMBERS: usize = 10_000;
const HOPS: usize = 99;

/// The HQ-shaped room.
const HQ_ROOT_MEMBERS: usize = 30_661;
const HQ_ALIASES: usize = 189;
const HQ_DELTAS: usize = 99;
const HQ_CHANGES: usize = 580;
const HQ_ROWS: usize = 88_269;
const HQ_NEW_MEMBERS: usize = 7_083;
const HQ_TOP_ENTRIES: usize = 37_939;

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

#[derive(QueryableByName)]
#[allow(dead_code)]
struct ChainRow {
    #[diesel(sql_type = BigInt)]
    state_group: i64,
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = Text)]
    state_key: String,
    #[diesel(sql_type = Text)]
    event_id: String,
}

/// Every row on the chain of `$1`: the rows a reader must look at, as the
/// issue's "bare recursive SELECT" fetches them.
fn chain_rows_sql(engine: &str) -> &'static str {
    if engine == "postgres" {
        "WITH RECURSIVE chain(state_group) AS ( \
             VALUES ($1::bigint) \
             UNION ALL \
             SELECT e.prev_state_group FROM state_group_edges e JOIN chain c ON e.state_group = c.state_group) \
         SELECT s.state_group, s.type AS event_type, s.state_key, s.event_id \
         FROM chain c JOIN state_groups_state s ON s.state_group = c.state_group"
    } else {
        "WITH RECURSIVE chain(state_group) AS ( \
             VALUES ($1) \
             UNION ALL \
             SELECT e.prev_state_group FROM state_group_edges e JOIN chain c ON e.state_group = c.state_group) \
         SELECT s.state_group, s.type AS event_type, s.state_key, s.event_id \
         FROM chain c CROSS JOIN state_groups_state s WHERE s.state_group = c.state_group"
    }
}

/// The state of `group` in one statement, as a hand-written reader would ask for
/// it: Synapse's DISTINCT ON query on PostgreSQL; on SQLite, which has no
/// DISTINCT ON, a GROUP BY whose bare columns come from the row with the highest
/// group (a documented SQLite guarantee).
fn distinct_sql(engine: &str) -> &'static str {
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

fn build_chain(store: &StateStore) -> (i64, StateMap) {
    let mut state = StateMap::new();
    state.insert(key("m.room.create", ""), "$create".into());
    state.insert(key("m.room.power_levels", ""), "$pl".into());
    state.insert(key("m.room.join_rules", ""), "$jr".into());
    state.insert(key("m.room.name", ""), "$name".into());
    for m in 0..MEMBERS {
        state.insert(
            key(MEMBER, &format!("@user{m}:bench")),
            format!("$join{m}").into(),
        );
    }
    let room = "!bench:bench";
    let mut group = store
        .store_state_group(&NewStateGroup::snapshot("$create", room, &state))
        .expect("snapshot");
    for hop in 0..HOPS {
        let event = format!("$hop{hop}");
        let mut delta = StateMap::new();
        delta.insert(
            key(MEMBER, &format!("@user{}:bench", hop * 37 % MEMBERS)),
            event.as_str().into(),
        );
        state.extend(delta.clone());
        group = store
            .store_state_group(&NewStateGroup::delta(&event, room, group, &delta))
            .expect("delta");
    }
    let delta = store
        .get_state_group_delta(group)
        .expect("delta")
        .expect("the last group is a delta");
    assert!(delta.1.len() == 1);
    (group, state)
}

/// An event id of the length room versions 4 and later use ("$" and 43
/// characters of URL-safe base64).
fn event_id(n: usize) -> String {
    format!("${n:0>43}")
}

fn hq_user(n: usize) -> String {
    format!("@user{n}:server{}.example.org", n % 1_000)
}

const HQ_ROOM: &str = "!OGEhHVWSdvArJzumhm:matrix.org";

/// The HQ-shaped room: the snapshot, then 99 deltas of 580 member changes
/// (573 in the last, so that the rows add up to 88,269), 7,083 of them joins of
/// new users, the rest changes to members chosen across the room. Returns the
/// top group, its state, and the event mapped to it.
fn build_hq(store: &StateStore) -> (i64, StateMap, String) {
    let mut next_event = 0;
    let mut new_event = || {
        next_event += 1;
        event_id(next_event)
    };
    let mut state = StateMap::new();
    for t in [
        "m.room.create",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.guest_access",
        "m.room.server_acl",
    ] {
        state.insert(key(t, ""), new_event().into());
    }
    for a in 0..HQ_ALIASES {
        state.insert(
            key("m.room.aliases", &format!("alias{a}.example.org")),
            new_event().into(),
        );
    }
    for m in 0..HQ_ROOT_MEMBERS {
        state.insert(key(MEMBER, &hq_user(m)), new_event().into());
    }
    assert_eq!(state.len(), 30_856);
    let mut group = store
        .store_state_group(&NewStateGroup::snapshot(&event_id(1), HQ_ROOM, &state))
        .expect("snapshot");
    let mut members = HQ_ROOT_MEMBERS;
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut last_event = String::new();
    for d in 0..HQ_DELTAS {
        let changes = if d + 1 == HQ_DELTAS {
            HQ_ROWS - 30_856 - (HQ_DELTAS - 1) * HQ_CHANGES
        } else {
            HQ_CHANGES
        };
        let joins = HQ_NEW_MEMBERS / HQ_DELTAS + usize::from(d < HQ_NEW_MEMBERS % HQ_DELTAS);
        let mut delta: StateMap = StateMap::new();
        for _ in 0..joins {
            last_event = new_event();
            delta.insert(key(MEMBER, &hq_user(members)), last_event.as_str().into());
            members += 1;
        }
        while delta.len() < changes {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let who = (rng % members as u64) as usize;
            last_event = new_event();
            delta.insert(key(MEMBER, &hq_user(who)), last_event.as_str().into());
        }
        for (k, v) in &delta {
            state.insert(k.clone(), v.clone());
        }
        group = store
            .store_state_group(&NewStateGroup::delta(&last_event, HQ_ROOM, group, &delta))
            .expect("delta");
    }
    assert_eq!(state.len(), HQ_TOP_ENTRIES);
    store
        .database()
        .run_interaction("bench_map_event", |txn| {
            store.store_event_state_groups_txn(txn, &[(last_event.as_str(), group)])
        })
        .expect("mapping the top event");
    (group, state, last_event)
}

struct Timing {
    p50: Duration,
    p90: Duration,
}

fn time(iterations: usize, mut f: impl FnMut()) -> Timing {
    f(); // warm the database's own page cache
    let mut samples: Vec<Duration> = (0..iterations)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    samples.sort();
    Timing {
        p50: samples[samples.len() / 2],
        p90: samples[samples.len() * 9 / 10],
    }
}

fn ms(d: Duration) -> String {
    format!("{:8.3} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:8.2} us", d.as_secs_f64() * 1e6)
}

fn line(e: &str, what: &str, t: &Timing, bare: Option<Duration>) {
    let ratio = bare.map_or(String::new(), |b| {
        format!("  {:5.2}x bare", t.p50.as_secs_f64() / b.as_secs_f64())
    });
    println!(
        "{e:<9} {what:<36} median {} p90 {}{ratio}",
        ms(t.p50),
        ms(t.p90)
    );
}

fn fresh(store: &StateStore) -> StateStore {
    StateStore::new(store.database().clone(), &StoreConfig::default()).expect("store")
}

fn cold_read(store: &StateStore, group: i64, filter: &StateFilter) -> StateMap {
    fresh(store)
        .get_state_for_groups(&[group], filter)
        .expect("cold read")
        .remove(&group)
        .expect("the group's state")
}

/// Reads through a store with empty caches, `iterations` times after one
/// warm-up (the database's own page cache): only the read is timed, not making
/// the store nor dropping it and its caches afterwards.
fn time_cold(
    iterations: usize,
    store: &StateStore,
    group: i64,
    filter: &StateFilter,
    expected_len: usize,
) -> Timing {
    let mut samples: Vec<Duration> = Vec::with_capacity(iterations);
    for i in 0..=iterations {
        let s = fresh(store);
        let start = Instant::now();
        let got = s.get_state_for_groups(&[group], filter).expect("cold read");
        let elapsed = start.elapsed();
        assert_eq!(got[&group].len(), expected_len);
        drop(got);
        drop(s);
        if i > 0 {
            samples.push(elapsed);
        }
    }
    samples.sort();
    Timing {
        p50: samples[samples.len() / 2],
        p90: samples[samples.len() * 9 / 10],
    }
}

/// Gives PostgreSQL the planner statistics that autovacuum would have gathered
/// by the time anyone reads a room this size (without them it plans the
/// filtered walks as sequential scans). SQLite is left as it is deployed: no
/// ANALYZE, no statistics.
fn analyze(t: &TestDb) {
    if let Conn::Postgres(c) = &mut t.raw_connection() {
        diesel::sql_query("ANALYZE").execute(c).expect("ANALYZE");
    }
}

/// On PostgreSQL, plans the bare statements as a real table would get them.
/// The benchmark's `state_groups_state` holds one room, so the planner
/// hash-joins the chain against a scan of the whole table (88,269 rows, all
/// of them the room's); on a table of many rooms that plan is not on offer:
/// with 1,000 other rooms of 1,000 rows beside the HQ room (EXPLAIN, after
/// ANALYZE), the bare statement gets the store's plan, an index scan of the
/// rows of each group on the chain. Sequential scans off, it gets that plan
/// here too. Only the bare statements' connection; SQLite is left as it is.
fn honest_plans(raw: &mut Conn) {
    if let Conn::Postgres(c) = raw {
        diesel::sql_query("SET enable_seqscan = off")
            .execute(c)
            .expect("SET enable_seqscan");
    }
}

fn run_chain(t: &TestDb) {
    let store = StateStore::new(t.open(), &StoreConfig::default()).expect("store");
    let (group, expected) = build_chain(&store);
    analyze(t);
    let mut raw: Conn = t.raw_connection();
    honest_plans(&mut raw);
    let sql = distinct_sql(t.engine());
    let bare = time(30, || {
        let rows: Vec<Row> = with_conn!(&mut raw, |c| diesel::sql_query(sql)
            .bind::<BigInt, _>(group)
            .load(c))
        .expect("bare SQL");
        assert_eq!(rows.len(), expected.len());
    });
    let all = StateFilter::all();
    let cold = time_cold(30, &store, group, &all, expected.len());
    let warm_store = fresh(&store);
    warm_store
        .get_state_for_groups(&[group], &all)
        .expect("warming");
    let warm = time(200, || {
        let got = warm_store
            .get_state_for_groups(&[group], &all)
            .expect("warm read");
        assert_eq!(got[&group].len(), expected.len());
    });
    let narrow =
        StateFilter::from_types([(MEMBER, Some("@user5:bench")), ("m.room.name", Some(""))]);
    let narrow_cold = time_cold(30, &store, group, &narrow, 2);
    // The member changed by the newest delta: the per-hop walk stops at once.
    let newest = format!("@user{}:bench", (HOPS - 1) * 37 % MEMBERS);
    let recent = StateFilter::from_types([(MEMBER, Some(newest.as_str()))]);
    let recent_cold = time_cold(30, &store, group, &recent, 1);
    let e = t.engine();
    let b = Some(bare.p50);
    line(e, "bare SQL statement (DISTINCT)", &bare, None);
    line(e, "store, cold cache", &cold, b);
    line(e, "store, warm cache", &warm, b);
    line(e, "store, cold, 2-slot filter", &narrow_cold, b);
    line(e, "store, cold, newest slot", &recent_cold, b);
}

fn run_hq(t: &TestDb) {
    let e = t.engine();
    let store = StateStore::new(t.open(), &StoreConfig::default()).expect("store");
    let started = Instant::now();
    let (group, expected, top_event) = build_hq(&store);
    println!(
        "{e:<9} built the HQ room in {:.1} s (top group {group}, event {top_event})",
        started.elapsed().as_secs_f64()
    );
    if let Ok(dir) = std::env::var("HS_BENCH_KEEP") {
        keep(t, &dir, group, &top_event);
    }
    analyze(t);
    let mut raw: Conn = t.raw_connection();
    honest_plans(&mut raw);
    let chain_sql = chain_rows_sql(e);
    let bare = time(20, || {
        let n = with_conn!(&mut raw, |c| diesel::sql_query(chain_sql)
            .bind::<BigInt, _>(group)
            .load_iter::<ChainRow, diesel::connection::DefaultLoadingMode>(c)
            .and_then(|mut rows| rows.try_fold(0, |n, r| r.map(|_| n + 1))))
        .expect("bare SQL");
        assert_eq!(n, HQ_ROWS);
    });
    let own = time(20, || {
        let n = storage_state::bare_chain_rows(store.database(), group, &StateFilter::all())
            .expect("the store's statement");
        assert_eq!(n, HQ_ROWS);
    });
    let distinct = distinct_sql(e);
    let bare_distinct = time(20, || {
        let rows: Vec<Row> = with_conn!(&mut raw, |c| diesel::sql_query(distinct)
            .bind::<BigInt, _>(group)
            .load(c))
        .expect("bare SQL");
        assert_eq!(rows.len(), HQ_TOP_ENTRIES);
    });

    let all = StateFilter::all();
    assert!(
        cold_read(&store, group, &all) == expected,
        "the store reads the HQ state right"
    );
    let cold = time_cold(20, &store, group, &all, HQ_TOP_ENTRIES);
    // A lazy-loading members request: 20 members (from the snapshot, from
    // deltas, and new users) plus all non-member state.
    let users: Vec<String> = (0..20).map(|i| hq_user(i * 1_877 + 3)).collect();
    let lazy = StateFilter::from_lazy_load_member_list(users.iter().map(String::as_str));
    let lazy_expected = lazy.filter_state(&expected);
    assert_eq!(lazy_expected.len(), 195 + 20);
    assert!(
        cold_read(&store, group, &lazy) == lazy_expected,
        "the store filters the HQ state right"
    );
    let lazy_cold = time_cold(30, &store, group, &lazy, lazy_expected.len());

    let warm_store = fresh(&store);
    warm_store
        .get_state_for_groups(&[group], &all)
        .expect("warming");
    let warm = time(200, || {
        let got = warm_store
            .get_state_for_groups(&[group], &all)
            .expect("warm read");
        assert_eq!(got[&group].len(), HQ_TOP_ENTRIES);
    });
    let lazy_warm = time(2_000, || {
        let got = warm_store
            .get_state_for_groups(&[group], &lazy)
            .expect("warm read");
        assert_eq!(got[&group].len(), lazy_expected.len());
    });

    // The bytes the caches hold for the full state: allocated while a cold read
    // filled them, less what was freed, with the answer itself dropped.
    let region = Region::new(&GLOBAL);
    let measured_store = fresh(&store);
    let got = measured_store
        .get_state_for_groups(&[group], &all)
        .expect("read");
    drop(got);
    let change = region.change();
    // (Reallocations are already in both counters.)
    let held = change.bytes_allocated as i64 - change.bytes_deallocated as i64;
    let counted = measured_store.caches().group_state_bytes();
    let strings: usize = expected
        .iter()
        .map(|((t, k), v)| t.len() + k.len() + v.len())
        .sum();

    let b = Some(bare.p50);
    line(e, "bare SQL, all 88,269 chain rows", &bare, None);
    line(e, "bare SQL, the store's statement", &own, b);
    line(e, "bare SQL, DISTINCT / GROUP BY", &bare_distinct, b);
    line(e, "store, cold, full (37,939)", &cold, b);
    println!(
        "{e:<9} {:<36} {:5.2}x the store's own statement",
        "",
        cold.p50.as_secs_f64() / own.p50.as_secs_f64()
    );
    line(e, "store, cold, lazy members (20 + 195)", &lazy_cold, b);
    println!(
        "{e:<9} {:<36} median {} p90 {}",
        "store, warm, full",
        ms(warm.p50),
        ms(warm.p90)
    );
    println!(
        "{e:<9} {:<36} median {} p90 {}",
        "store, warm, lazy members",
        us(lazy_warm.p50),
        us(lazy_warm.p90)
    );
    println!(
        "{e:<9} cache bytes for the full state: {held} measured ({:.2}x its strings, {strings}); \
         {counted} as the caches count them (/metrics)",
        held as f64 / strings as f64
    );

    // The same rows, each group's in a hash order (as Synapse and older
    // databases wrote them) instead of the index's: SQLite only, where a
    // group's rows are read by where they lie (`sql::chain_rows_by_range`).
    if let Conn::Sqlite(c) = &mut raw {
        c.batch_execute(
            "CREATE TEMP TABLE shuffled AS SELECT state_group, room_id, type, state_key, \
                 event_id FROM state_groups_state \
                 ORDER BY state_group, (rowid * 2654435761) % 1000003; \
             DELETE FROM state_groups_state; \
             INSERT INTO state_groups_state SELECT * FROM shuffled ORDER BY rowid; \
             DROP TABLE shuffled",
        )
        .expect("rewriting the rows in hash order");
        let bare = time(20, || {
            let n = diesel::sql_query(chain_sql)
                .bind::<BigInt, _>(group)
                .load_iter::<ChainRow, diesel::connection::DefaultLoadingMode>(c)
                .and_then(|mut rows| rows.try_fold(0, |n, r| r.map(|_| n + 1)))
                .expect("bare SQL");
            assert_eq!(n, HQ_ROWS);
        });
        let own = time(20, || {
            let n = storage_state::bare_chain_rows(store.database(), group, &all)
                .expect("the store's statement");
            assert_eq!(n, HQ_ROWS);
        });
        assert!(
            cold_read(&store, group, &all) == expected,
            "the store reads the HQ state right from rows in hash order"
        );
        let cold = time_cold(20, &store, group, &all, HQ_TOP_ENTRIES);
        let b = Some(bare.p50);
        line(e, "rows in hash order: bare SQL, all", &bare, None);
        line(e, "rows in hash order: store's statement", &own, b);
        line(e, "rows in hash order: store, cold, full", &cold, b);
    }
}

/// Keeps a copy of the HQ database for by-hand runs (SQLite only): the file,
/// the bare statement of its 88,269 chain rows beside it for the sqlite3 shell,
/// and the command pair that times `hs-main state` as a whole command against
/// the shell running that statement (the goal: at most 2x).
fn keep(t: &TestDb, dir: &str, group: i64, top_event: &str) {
    let mut raw = t.raw_connection();
    match &mut raw {
        Conn::Sqlite(c) => {
            let path = format!("{dir}/hq.db");
            let _ = std::fs::remove_file(&path);
            diesel::sql_query(format!("VACUUM INTO '{path}'"))
                .execute(c)
                .expect("copying the HQ database");
            let sql = format!("{dir}/hq-chain.sql");
            let statement = chain_rows_sql(t.engine()).replace("$1", &group.to_string());
            std::fs::write(&sql, format!("{statement};\n")).expect("writing the bare statement");
            println!("sqlite    kept the HQ room in {path}; hs-main state against the shell:");
            println!(
                "          farm-bench --vs \"sh -c 'sqlite3 -readonly {path} < {sql}'\" -- \
                 target/release/hs-main --database sqlite:{path} state '{HQ_ROOM}' --at '{top_event}'"
            );
        }
        Conn::Postgres(_) => println!("postgres  HQ room kept only for SQLite"),
    }
}

/// `HS_BENCH_PROFILE=cold|lazy|warm|warm-lazy|bare`: only the HQ room (on SQLite, or
/// PostgreSQL with `HS_BENCH_ENGINE=postgres`), then that read
/// `HS_BENCH_ITERATIONS` times (default 5), for `perf record` and callgrind
/// (`bare`: the store's own statement alone, rows decoded and dropped).
fn profile(what: &str) {
    let t = match std::env::var("HS_BENCH_ENGINE").as_deref() {
        Ok("postgres") => TestDb::postgres().expect("HS_TEST_POSTGRES_URL"),
        _ => TestDb::sqlite(),
    };
    // `HS_BENCH_DB=FILE` (SQLite): the room kept in FILE by an earlier run,
    // so that a profile of the reads does not pay for building it.
    let kept = std::env::var("HS_BENCH_DB").ok();
    let (store, group) = match kept.as_deref() {
        Some(file) if std::path::Path::new(file).exists() => {
            let url = format!("sqlite:{file}");
            let config = storage_core::DatabaseConfig::parse(&url, storage_core::OpenMode::Writer)
                .expect("HS_BENCH_DB");
            let db = storage_core::Database::open(config).expect("opening HS_BENCH_DB");
            let store = StateStore::new(db, &StoreConfig::default()).expect("store");
            let group = storage_state::highest_state_group(store.database()).expect("top group");
            (store, group)
        }
        _ => {
            let store = StateStore::new(t.open(), &StoreConfig::default()).expect("store");
            let (group, _, _) = build_hq(&store);
            analyze(&t);
            if let Some(file) = &kept {
                if let Conn::Sqlite(c) = &mut t.raw_connection() {
                    diesel::sql_query(format!("VACUUM INTO '{file}'"))
                        .execute(c)
                        .expect("keeping the HQ database");
                }
            }
            (store, group)
        }
    };
    let users: Vec<String> = (0..20).map(|i| hq_user(i * 1_877 + 3)).collect();
    let filter = match what {
        "lazy" | "warm-lazy" => {
            StateFilter::from_lazy_load_member_list(users.iter().map(String::as_str))
        }
        _ => StateFilter::all(),
    };
    let n: usize = std::env::var("HS_BENCH_ITERATIONS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5);
    let warm = fresh(&store);
    warm.get_state_for_groups(&[group], &StateFilter::all())
        .expect("warming");
    let started = Instant::now();
    for _ in 0..n {
        if what == "bare" {
            let rows = storage_state::bare_chain_rows(store.database(), group, &filter);
            assert_eq!(rows.expect("the store's statement"), HQ_ROWS);
            continue;
        }
        let got = match what {
            "warm" | "warm-lazy" => warm.get_state_for_groups(&[group], &filter).expect("read"),
            _ => fresh(&store)
                .get_state_for_groups(&[group], &filter)
                .expect("read"),
        };
        std::hint::black_box(got);
    }
    println!("{n} {what} reads in {:?}", started.elapsed());
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    if let Ok(what) = std::env::var("HS_BENCH_PROFILE") {
        return profile(&what);
    }
    println!(
        "state read: group at the end of a {HOPS}-hop delta chain, {MEMBERS} members, full state unless noted"
    );
    for db in &TestDb::for_bench("state") {
        run_chain(db);
    }
    println!(
        "HQ-shaped room: snapshot of 30,856 state events, {HQ_DELTAS} deltas of {HQ_CHANGES} member changes, \
         {HQ_ROWS} rows, top group {HQ_TOP_ENTRIES} entries"
    );
    for db in &TestDb::for_bench("state") {
        run_hq(db);
    }
}
