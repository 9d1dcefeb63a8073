//! The SQL statements one single-event write costs (what `POST .../events`
//! with one event does: its context, then its batch), counted with diesel's
//! instrumentation hook on every connection of the process. With one request
//! at a time, round trips are what a write costs on PostgreSQL, so the number
//! is pinned: a change that adds a statement to the write path shows here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use storage_core::testing::TestDb;

storage_core::engine_tests!(
    a_message_costs_a_fixed_number_of_statements,
    a_state_event_costs_a_fixed_number_of_statements,
);

/// Whether statements are being recorded, and those recorded.
static COUNTING: AtomicBool = AtomicBool::new(false);
static STATEMENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// The two engines' tests share the hook: one counts at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Recorder;

impl diesel::connection::Instrumentation for Recorder {
    fn on_connection_event(&mut self, event: diesel::connection::InstrumentationEvent<'_>) {
        if !COUNTING.load(Ordering::SeqCst) {
            return;
        }
        // Every statement sent, BEGIN and COMMIT included (the transaction
        // events would count those twice).
        let sql = match event {
            diesel::connection::InstrumentationEvent::StartQuery { query, .. } => query.to_string(),
            _ => return,
        };
        STATEMENTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sql);
    }
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        diesel::connection::set_default_instrumentation(|| Some(Box::new(Recorder)))
            .expect("installing the statement recorder");
    });
}

/// The statements of writing `line` (one event) as `POST .../events` does,
/// after `before` were written one request each (so caches are as warm as a
/// running server's).
fn statements_of_one_write(t: &TestDb, before: &[String], line: &str) -> Vec<String> {
    install();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let pipeline =
        persistence::Pipeline::open(t.open(), &storage_core::StoreConfig::default()).unwrap();
    let room = ROOM;
    let write = |l: &str| {
        let events = event_context::contexts_for(&pipeline.builder, room, &[l.to_owned()]).unwrap();
        pipeline.persist(room, &events).unwrap();
    };
    for l in before {
        write(l);
    }
    STATEMENTS.lock().unwrap().clear();
    COUNTING.store(true, Ordering::SeqCst);
    write(line);
    COUNTING.store(false, Ordering::SeqCst);
    std::mem::take(&mut *STATEMENTS.lock().unwrap())
}

const ROOM: &str = "!statements:bench.test";

/// Lines 0-3 found the room; every fifth line from 5 on is a member joining.
fn room() -> Vec<String> {
    main_process::bench_room::linear_room(ROOM, 30, 20)
}

fn a_message_costs_a_fixed_number_of_statements(t: &TestDb) {
    let lines = room();
    // Line 21 is a message.
    let statements = statements_of_one_write(t, &lines[..21], &lines[21]);
    assert_eq!(
        statements.len(),
        expected(t).0,
        "statements of one message on {}:\n{}",
        t.engine(),
        statements.join("\n")
    );
}

fn a_state_event_costs_a_fixed_number_of_statements(t: &TestDb) {
    let lines = room();
    // Line 20 is a join.
    let statements = statements_of_one_write(t, &lines[..20], &lines[20]);
    assert_eq!(
        statements.len(),
        expected(t).1,
        "statements of one state event on {}:\n{}",
        t.engine(),
        statements.join("\n")
    );
}

/// (a message, a state event): the statements each costs on `t`'s engine,
/// without the main-process claim's proof (one more per write transaction in
/// `hs-main`; the test opens the database unclaimed).
///
/// A message on PostgreSQL (13), all in the write transaction: BEGIN, LOCK,
/// which events are stored, the stream position, events, event_json,
/// event_edges, event_auth, event_to_state_groups, the extremities (DELETE,
/// INSERT), NOTIFY, COMMIT. Nothing is read before it: the prev event (the
/// room's last batch left it in the event cache), the forward extremities and
/// the current state (kept up to date by the writer) come from memory, and
/// which of the batch's events stored events name as prev events needs no read
/// while none of them is stored (the transaction checks that).
/// A state event adds the group's id (no transaction) and, in the write, its
/// prev group's room and three INSERTs (group, edge, row), the current state
/// (DELETE, INSERT) and a cache_invalidations row. SQLite takes its sequences
/// from memory and has no LOCK or NOTIFY.
fn expected(t: &TestDb) -> (usize, usize) {
    match t.engine() {
        "sqlite" => (10, 17),
        _ => (13, 21),
    }
}
