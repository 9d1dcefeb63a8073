//! kill -9 at several points of `import` and `port`, on both engines (of
//! `serve` with a client posting: `claim.rs`; of `serve` in the middle of a
//! request of 100 events, here), and `port` of a source that `serve` writes
//! meanwhile. After each kill the same command run again
//! finishes the job, nothing committed or acknowledged is missing, and the
//! storage invariants hold.

use e2e_tests::*;
use std::process::Child;
use storage_core::testing::TestDb;

storage_core::engine_tests!(
    import_killed_early_mid_and_late_then_rerun_finishes,
    port_killed_then_resumed_checks_out,
    port_killed_then_the_source_changed_says_restart,
    port_while_serve_writes_copies_one_snapshot,
    serve_killed_mid_request_then_the_retry_is_answered_right,
);

const EVENTS: &str = "SELECT COUNT(*) AS n FROM events";
/// Rows a port has committed into its target so far.
const PORTED: &str = "SELECT CAST(COALESCE(SUM(rows_copied), 0) AS BIGINT) AS n FROM port_progress";

/// The events of the import, then three runs killed once that many events
/// were committed: early (the first batch), half-way, near the end.
const IMPORT_EVENTS: usize = 1200;
const IMPORT_KILLS: [i64; 3] = [1, 600, 1000];

fn import_killed_early_mid_and_late_then_rerun_finishes(db: &TestDb) {
    let dir = TempDir(tempdir("import-kill"));
    let file = dir.0.join("room.jsonl");
    let (ids, text) = room_lines(IMPORT_EVENTS);
    std::fs::write(&file, text).unwrap();
    let file = file.to_str().unwrap();
    let mut killed = 0;
    for at in IMPORT_KILLS {
        let mut import = spawn_hs_main(db, &["import", file]);
        if wait_for_count(db.url(), EVENTS, at, &mut import) {
            kill_9(&mut import);
            killed += 1;
        } else {
            assert!(import.wait().unwrap().success());
        }
        // What a killed import committed is a whole prefix of the room.
        let stored = stored_events(db.url());
        assert!(stored.len() >= at as usize);
        assert!(
            ids[..stored.len()].iter().all(|id| stored.contains(id)),
            "killed after {at}: the stored events are not the file's first {}",
            stored.len()
        );
        assert_invariants(db);
    }
    eprintln!(
        "{killed} of {} kills landed while the import ran",
        IMPORT_KILLS.len()
    );
    // At least the early and the half-way kills landed while it ran.
    assert!(killed >= 2, "only {killed} kills landed");
    let (status, _, stderr) = hs_main(db, &["import", file]);
    assert_eq!(status, 0, "{stderr}");
    assert_all_stored(db.url(), &ids);
    let (status, stdout, stderr) = hs_main(db, &["inspect", "--check"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert_invariants(db);
}

/// `db` holding a room of `n` events, imported.
fn import_room(db: &TestDb, n: usize) -> Vec<String> {
    let dir = TempDir(tempdir("port-source"));
    let file = dir.0.join("room.jsonl");
    let (ids, text) = room_lines(n);
    std::fs::write(&file, text).unwrap();
    let (status, _, stderr) = hs_main(db, &["import", file.to_str().unwrap()]);
    assert_eq!(status, 0, "{stderr}");
    ids
}

/// `port` from `source` to `target`, one key per transaction so that there is
/// time to kill it, killed once `rows` rows are committed in the target.
fn port_killed_after(source: &TestDb, target: &TestDb, rows: i64) {
    let mut port: Child =
        spawn_hs_main(source, &["port", "--to", target.url(), "--batch-size", "1"]);
    assert!(
        wait_for_count(target.url(), PORTED, rows, &mut port),
        "the port ended before {rows} rows were copied"
    );
    kill_9(&mut port);
}

/// Every event of `ids` has the same state (and rejection) on both sides,
/// the room the same current state, and the invariants hold on both.
fn assert_same_rooms(source: &TestDb, target: &TestDb, ids: &[String]) {
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(
        event_states(source, &ids, &[ROOM]),
        event_states(target, &ids, &[ROOM])
    );
    assert_eq!(stored_events(source.url()), stored_events(target.url()));
    assert_invariants(source);
    assert_invariants(target);
}

fn port_killed_then_resumed_checks_out(db: &TestDb) {
    let Some(target) = other_engine(db) else {
        return;
    };
    let ids = import_room(db, 300);
    port_killed_after(db, &target, 200);
    // Refused without --resume; finished with it.
    let (status, _, stderr) = hs_main(db, &["port", "--to", target.url()]);
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("pass --resume"), "{stderr}");
    let (status, stdout, stderr) = hs_main(db, &["port", "--to", target.url(), "--resume"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert!(stdout.contains("checked: state after"), "{stdout}");
    assert_same_rooms(db, &target, &ids);
    let (status, stdout, stderr) = hs_main(&target, &["inspect", "--check"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
}

fn port_killed_then_the_source_changed_says_restart(db: &TestDb) {
    let Some(target) = other_engine(db) else {
        return;
    };
    import_room(db, 300);
    port_killed_after(db, &target, 200);
    // The room goes on in the source.
    let ids = import_room(db, 340);
    let (status, _, stderr) = hs_main(db, &["port", "--to", target.url(), "--resume"]);
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr.contains("changed since the port began")
            && stderr.contains("events: 300 rows then, 340 now")
            && stderr.contains("Pass --restart instead of --resume"),
        "{stderr}"
    );
    let (status, stdout, stderr) = hs_main(db, &["port", "--to", target.url(), "--restart"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert_same_rooms(db, &target, &ids);
    // Finished, then the source changes again: the port says the target is
    // behind, and --restart brings it up to date.
    let ids = import_room(db, 350);
    let (status, _, stderr) = hs_main(db, &["port", "--to", target.url()]);
    assert_eq!(status, 1, "{stderr}");
    assert!(
        stderr.contains("holds a finished port of an older state")
            && stderr.contains("pass --restart"),
        "{stderr}"
    );
    let (status, stdout, stderr) = hs_main(db, &["port", "--to", target.url(), "--restart"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert_same_rooms(db, &target, &ids);
}

/// `port` of a source that `serve` writes all along, a client posting one
/// event after another: no duplicate key, and the target holds exactly the
/// first events posted, up to some point (a snapshot), with the state the
/// source gave them and the current state as of the last of them.
fn port_while_serve_writes_copies_one_snapshot(db: &TestDb) {
    let Some(target) = other_engine(db) else {
        return;
    };
    let main = main_process(db, free_port());
    let (room, founding) = founded_room(&main.url);
    let poster = Poster::start(&main.url, room, "live");
    poster.wait_for(20);
    let (status, stdout, stderr) =
        hs_main(db, &["port", "--to", target.url(), "--batch-size", "3"]);
    let during = poster.acknowledged.lock().unwrap().len();
    poster.wait_for(during + 3);
    let (_, posted, err) = poster.finish();
    assert_eq!(err, None, "serve stopped acknowledging");
    assert_eq!(status, 0, "{stdout}{stderr}");
    let acknowledged: Vec<String> = founding.into_iter().chain(posted).collect();
    let copied = stored_events(target.url());
    assert!(copied.len() >= 24, "{} events copied", copied.len());
    assert!(copied.len() < acknowledged.len(), "writes went on after it");
    let prefix = &acknowledged[..copied.len()];
    assert!(
        prefix.iter().all(|id| copied.contains(id)),
        "the target holds events that are not the first {} posted",
        copied.len()
    );
    let ids: Vec<&str> = prefix.iter().map(String::as_str).collect();
    let (src, dst) = (
        event_states(db, &ids, &[]),
        event_states(&target, &ids, &[ROOM]),
    );
    for id in &ids {
        assert_eq!(src[*id], dst[*id], "{id}");
    }
    let last = prefix.last().unwrap().as_str();
    assert_eq!(dst[&format!("current {ROOM}")].0, dst[last].0);
    assert_invariants(&target);
    let (status, stdout, stderr) = hs_main(&target, &["inspect", "--check"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    // Stopped, the source ports again whole.
    drop(main);
    let (status, stdout, stderr) = hs_main(db, &["port", "--to", target.url(), "--restart"]);
    assert_eq!(status, 0, "{stdout}{stderr}");
    assert_same_rooms(db, &target, &acknowledged);
}

/// `serve` killed with SIGKILL in the middle of a request of 100 events,
/// then started again: the client's retry of the same request is answered
/// with its 100 events, none of them written twice and none lost, and the
/// room goes on. Killed (PostgreSQL, where the state group ids it takes are
/// seen outside) once it has taken ids for half of the request's groups,
/// before its batch; and (both engines) once the batch's events are
/// committed, maybe before its answer was sent. The batch is one
/// transaction: after the kill the database holds all of the request or
/// none of it, and the retry's answer names as skipped exactly the events
/// it found stored.
fn serve_killed_mid_request_then_the_retry_is_answered_right(db: &TestDb) {
    let mut kill_points = vec![("committed", EVENTS.to_owned(), 100)];
    if db.engine() == "postgres" {
        kill_points.insert(
            0,
            (
                "half its groups' ids taken",
                "SELECT last_value AS n FROM state_group_id_seq".to_owned(),
                50,
            ),
        );
    }
    let port = free_port();
    let main = main_process(db, port);
    let (mut room, mut acknowledged) = founded_room(&main.url);
    drop(main);
    for (point, sql, ahead) in kill_points {
        let mut main = main_process(db, port);
        // 100 topic changes: each a state event with a group of its own.
        let request: Vec<serde_json::Value> = (0..100)
            .map(|i| message(&mut room, &format!("{point} {i}")))
            .collect();
        let ids: Vec<String> = request.iter().map(id_of).collect();
        let events_before = try_count(db.url(), EVENTS).unwrap();
        let start = try_count(db.url(), &sql).unwrap();
        let client = {
            let (url, request) = (main.url.clone(), request.clone());
            std::thread::spawn(move || post(&url, request))
        };
        assert!(
            wait_for_count(db.url(), &sql, start + ahead, &mut main.child),
            "{point}: serve exited first"
        );
        kill_9(&mut main.child);
        if let Ok(answer) = client.join().unwrap() {
            assert_eq!(
                answer["event_ids"],
                serde_json::json!(ids),
                "{point}: {answer}"
            );
        }
        drop(main);
        let stored = try_count(db.url(), EVENTS).unwrap() - events_before;
        eprintln!("{point}: killed with {stored} of the request's events stored");
        assert!(
            stored == 0 || stored == 100,
            "{point}: {stored} of the request's 100 events stored after the kill"
        );
        let main = main_process(db, port);
        let answer = post(&main.url, request).unwrap();
        assert_eq!(
            answer["event_ids"],
            serde_json::json!(ids),
            "{point}: {answer}"
        );
        let skipped = if stored == 100 {
            ids.clone()
        } else {
            Vec::new()
        };
        assert_eq!(
            answer["skipped"].as_array().cloned().unwrap_or_default(),
            skipped
                .iter()
                .map(|s| serde_json::json!(s))
                .collect::<Vec<_>>(),
            "{point}: {answer}"
        );
        acknowledged.extend(ids);
        let next = message(&mut room, &format!("after {point}"));
        post(&main.url, vec![next.clone()]).unwrap();
        acknowledged.push(id_of(&next));
        let state = get(&main.url, &format!("/_hs/v1/rooms/{}/state", encode(ROOM)));
        assert_eq!(
            state["m.room.topic"][""],
            serde_json::json!(id_of(&next)),
            "{point}"
        );
        drop(main);
    }
    assert_all_stored(db.url(), &acknowledged);
    assert_invariants(db);
}
