//! `hs-main port` from SQLite to PostgreSQL: a complete copy, sequences moved past
//! the copied ids, a non-empty target refused unless resuming, and a port killed
//! half-way and resumed ending like an uninterrupted one. Needs both engines.

use e2e_tests::hs_main_output;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use storage_core::testing::TestDb;
use storage_core::{with_conn, Conn, StoreConfig};
use storage_events::{
    new_forward_extremities, testing, CurrentStateDelta, EventReads, EventToPersist, EventsStore,
    RoomBatch,
};
use storage_state::{key, NewStateGroup, StateGroupAccess, StateMap, StateStore};

const ROOM: &str = "!port:test";

/// A room with a create event, 40 member joins (each a state group, deltas and
/// a snapshot every 100 hops) and messages between them.
fn fill_source(t: &TestDb, events: usize) {
    let db = t.open();
    let config = StoreConfig::default();
    let store = EventsStore::new(db, &config).unwrap();
    let mut state = StateMap::new();
    let mut group = None;
    let mut prev: Option<String> = None;
    for i in 0..events {
        let id = format!("$e{i:05}");
        let slot = match i {
            0 => Some(key("m.room.create", "")),
            i if i % 5 == 1 => Some(key("m.room.member", &format!("@u{}:test", i % 40))),
            _ => None,
        };
        if let Some(s) = &slot {
            let delta = StateMap::from_iter([(s.clone(), id.as_str().into())]);
            state.extend(delta.clone());
            group = Some(match group {
                None => store
                    .state()
                    .store_state_group(&NewStateGroup::snapshot(&id, ROOM, &state))
                    .unwrap(),
                Some(g) => store
                    .state()
                    .store_state_group(&NewStateGroup::delta(&id, ROOM, g, &delta))
                    .unwrap(),
            });
        }
        let prevs: Vec<&str> = prev.iter().map(String::as_str).collect();
        let event = EventToPersist {
            sender: "@u0:test".into(),
            origin_server_ts: 1_700_000_000_000 + i as i64,
            json: format!(r#"{{"n":{i}}}"#),
            depth: i as i64 + 1,
            ..match &slot {
                Some(s) => testing::state_event(ROOM, &id, &prevs, (&s.0, &s.1), group),
                None => testing::event(ROOM, &id, &prevs, group),
            }
        };
        let current = store.get_forward_extremities(ROOM).unwrap();
        let batch = vec![event];
        store
            .persist_batch(&RoomBatch {
                room_id: ROOM.into(),
                new_extremities: new_forward_extremities(&current, &batch, &Default::default()),
                old_extremities: current.clone(),
                current_state: CurrentStateDelta {
                    removed: vec![],
                    added: slot.map(|s| (s, id.clone(), None)).into_iter().collect(),
                },
                events: batch,
            })
            .unwrap();
        prev = Some(id);
    }
}

/// Every row of every table, as text, sorted: two databases with equal dumps
/// hold the same data.
fn dump(conn: &mut Conn) -> Vec<String> {
    use diesel::prelude::*;
    #[derive(QueryableByName)]
    struct Line {
        #[diesel(sql_type = diesel::sql_types::Text)]
        line: String,
    }
    let queries = [
        "SELECT 'rooms ' || room_id || ' ' || COALESCE(room_version, '') AS line FROM rooms",
        "SELECT 'events ' || CAST(stream_ordering AS TEXT) || ' ' || event_id || ' ' || type || ' ' || COALESCE(state_key, '-') AS line FROM events",
        "SELECT 'event_json ' || event_id || ' ' || json AS line FROM event_json",
        "SELECT 'event_edges ' || event_id || ' ' || prev_event_id AS line FROM event_edges",
        "SELECT 'extremities ' || event_id AS line FROM event_forward_extremities",
        "SELECT 'state_groups ' || CAST(id AS TEXT) || ' ' || event_id AS line FROM state_groups",
        "SELECT 'edges ' || CAST(state_group AS TEXT) || ' ' || CAST(prev_state_group AS TEXT) AS line FROM state_group_edges",
        "SELECT 'sgs ' || CAST(state_group AS TEXT) || ' ' || type || ' ' || state_key || ' ' || event_id AS line FROM state_groups_state",
        "SELECT 'etsg ' || event_id || ' ' || CAST(state_group AS TEXT) AS line FROM event_to_state_groups",
        "SELECT 'cse ' || type || ' ' || state_key || ' ' || event_id AS line FROM current_state_events",
    ];
    let mut lines = Vec::new();
    for q in queries {
        let rows: Vec<Line> = with_conn!(&mut *conn, |c| diesel::sql_query(q).load(c)).unwrap();
        lines.extend(rows.into_iter().map(|r| r.line));
    }
    lines.sort();
    lines
}

#[test]
fn port_sqlite_to_postgres() {
    let Some(target) = TestDb::postgres() else {
        return;
    };
    let source = TestDb::sqlite();
    fill_source(&source, 120);

    let out = hs_main_output(&[
        "--database",
        source.url(),
        "port",
        "--to",
        target.url(),
        "--batch-size",
        "7",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("checked: row counts equal in 12 tables"),
        "{stdout}"
    );
    assert!(stdout.contains("checked: state after"), "{stdout}");
    assert_eq!(
        dump(&mut source.raw_connection()),
        dump(&mut target.raw_connection())
    );

    // The expected move of the target's sequences is an info line, not a warning.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("WARN"), "{stderr}");
    assert!(
        stderr.contains("sequence state_group_id_seq: moved past the copied ids"),
        "{stderr}"
    );

    // A second port into the finished target says so and succeeds, with or
    // without --resume, copying nothing.
    for extra in [&[][..], &["--resume"][..]] {
        let mut args = vec!["--database", source.url(), "port", "--to", target.url()];
        args.extend_from_slice(extra);
        let again = hs_main_output(&args);
        let stdout = String::from_utf8_lossy(&again.stdout);
        assert!(
            again.status.success(),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&again.stderr)
        );
        assert!(
            stdout.contains("already holds a finished port (12 tables"),
            "{stdout}"
        );
    }
    assert_eq!(
        dump(&mut source.raw_connection()),
        dump(&mut target.raw_connection())
    );

    // A target holding data that no port put there is refused.
    let other = TestDb::sqlite();
    fill_source(&other, 3);
    let refused = hs_main_output(&["--database", source.url(), "port", "--to", other.url()]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("already holds 3 events"), "{stderr}");

    // The next state group and stream position after the port are new.
    let db = target.open();
    let config = StoreConfig::default();
    let state = StateStore::new(db.clone(), &config).unwrap();
    let max_group: i64 = {
        use diesel::prelude::*;
        use storage_state::schema::state_groups as sg;
        with_conn!(&mut target.raw_connection(), |c| sg::table
            .select(diesel::dsl::max(sg::id))
            .first::<Option<i64>>(c))
        .unwrap()
        .unwrap()
    };
    let g = state
        .store_state_group(&NewStateGroup::snapshot(
            "$after-port",
            ROOM,
            &StateMap::from_iter([(key("m.room.create", ""), "$x".into())]),
        ))
        .expect("no collision with a copied group");
    assert_eq!(g, max_group + 1);
    let events = EventsStore::new(db.clone(), &config).unwrap();
    assert_eq!(events.max_stream_ordering(), 120);
    testing::assert_invariants(&db);
}

#[test]
fn killed_port_resumes_to_the_same_result() {
    let Some(interrupted) = TestDb::postgres() else {
        return;
    };
    let Some(straight) = TestDb::postgres() else {
        return;
    };
    let source = TestDb::sqlite();
    fill_source(&source, 150);

    // One key per transaction, so that the port is still running when killed.
    let mut child = e2e_tests::hs_main_command()
        .args([
            "--database",
            source.url(),
            "port",
            "--to",
            interrupted.url(),
            "--batch-size",
            "1",
        ])
        .env_remove("HS_DATABASE")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    for line in stderr.lines() {
        if line.unwrap().contains("copying event_json") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = dump(&mut interrupted.raw_connection());
    let whole = dump(&mut source.raw_connection());
    assert!(partial.len() < whole.len(), "the port was cut short");

    let resumed = hs_main_output(&[
        "--database",
        source.url(),
        "port",
        "--to",
        interrupted.url(),
        "--resume",
        "--batch-size",
        "1",
    ]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let out = hs_main_output(&["--database", source.url(), "port", "--to", straight.url()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        dump(&mut interrupted.raw_connection()),
        dump(&mut straight.raw_connection())
    );
    assert_eq!(dump(&mut straight.raw_connection()), whole);
    testing::assert_invariants(&interrupted.open());
}

/// A source event mapped to a state group that is not stored (a damaged
/// database): the port copies it as it is, and its check stops, naming the
/// side it could not read, the event and the group.
#[test]
fn a_damaged_source_fails_the_check_naming_the_event() {
    let source = TestDb::sqlite();
    fill_source(&source, 12);
    {
        use diesel::prelude::*;
        use storage_state::schema::event_to_state_groups as etsg;
        with_conn!(&mut source.raw_connection(), |c| diesel::update(
            etsg::table.filter(etsg::event_id.eq("$e00007"))
        )
        .set(etsg::state_group.eq(4242))
        .execute(c))
        .unwrap();
    }
    let target = TestDb::sqlite();
    let out = hs_main_output(&["--database", source.url(), "port", "--to", target.url()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("in the source") && stderr.contains("$e00007") && stderr.contains("4242"),
        "{stderr}"
    );
}
