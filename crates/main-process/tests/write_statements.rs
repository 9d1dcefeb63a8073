//! The SQL statements one single-event write costs (what `POST .../events`
//! with one event does: its context, then its batch), counted with diesel's
//! instrumentation hook on every connection of the process. With one request
//! at a time, round trips are what a write costs on PostgreSQL, so the number
//! is pinned: a change that adds a statement to the write path shows here.

use http_api::wire::{adopt_contexted, ContextedEvent, WriteOutcome};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use storage_core::testing::TestDb;

storage_core::engine_tests!(
    a_message_costs_a_fixed_number_of_statements,
    a_state_event_costs_a_fixed_number_of_statements,
    a_fork_costs_a_fixed_number_of_statements,
    an_event_stored_already_costs_a_fixed_number_of_statements,
    a_forwarded_write_costs_the_worker_at_most_the_group_id,
    the_main_process_claim_costs_postgres_no_statement,
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
        // The SQLite writer's checkpoint thread runs beside the write, on a
        // connection of its own, whenever it wakes: no part of what the write
        // costs its caller.
        if sql.starts_with("PRAGMA wal_checkpoint") {
            return;
        }
        // Nor the PostgreSQL claim's watcher, which pings the claim's own
        // session every second.
        if sql == "SELECT 1" {
            return;
        }
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
    statements_of_one_write_to(|| t.open(), before, line)
}

/// [`statements_of_one_write`] to the database `open` opens (once no other
/// test counts: opening sends statements).
fn statements_of_one_write_to(
    open: impl FnOnce() -> storage_core::Database,
    before: &[String],
    line: &str,
) -> Vec<String> {
    install();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let pipeline =
        persistence::Pipeline::open(open(), &storage_core::StoreConfig::default()).unwrap();
    let room = ROOM;
    let write = |l: &str| {
        let events = event_context::contexts_for(&pipeline.builder, room, &[l.to_owned()]).unwrap();
        pipeline.persist(room, &events).unwrap();
    };
    for l in before {
        write(l);
    }
    recording(|| write(line)).1
}

/// Statements recorded while `f` runs.
fn recording<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    STATEMENTS.lock().unwrap().clear();
    COUNTING.store(true, Ordering::SeqCst);
    let out = f();
    COUNTING.store(false, Ordering::SeqCst);
    (out, std::mem::take(&mut *STATEMENTS.lock().unwrap()))
}

/// What `hs-worker` and `hs-main` do with one request posted to the worker:
/// the worker computes the contexts (with stores of its own), the main
/// process reads them from JSON, adopts the groups the worker prepared,
/// checks and persists them; the worker then remembers what was written.
/// Answers the statements of the worker's part and of the main process's.
struct Forwarding {
    main: persistence::Pipeline,
    worker: event_context::ContextBuilder,
}

impl Forwarding {
    fn open(t: &TestDb) -> Forwarding {
        let config = storage_core::StoreConfig::default();
        let main = persistence::Pipeline::open(t.open(), &config).unwrap();
        let worker_events =
            storage_events::EventsStore::new(t.open_mode(storage_core::OpenMode::Replica), &config)
                .unwrap();
        let worker =
            event_context::ContextBuilder::new(worker_events, &config).deferring_group_writes();
        Forwarding { main, worker }
    }

    fn write(&self, line: &str) -> (Vec<String>, Vec<String>) {
        let (events, at_worker) = recording(|| {
            event_context::contexts_for(&self.worker, ROOM, &[line.to_owned()]).unwrap()
        });
        let sent: Vec<ContextedEvent> = events
            .iter()
            .map(|(p, c)| ContextedEvent::new(p, c))
            .collect();
        let sent: Vec<ContextedEvent> =
            serde_json::from_str(&serde_json::to_string(&sent).unwrap()).unwrap();
        let (outcome, at_main) = recording(|| {
            let state = self.main.builder.state();
            let received = adopt_contexted(state, sent).unwrap();
            event_context::check_contexts(state, ROOM, &received).unwrap();
            let batch = self.main.persist(ROOM, &received).unwrap();
            WriteOutcome::new(&received, &batch)
        });
        let skipped = outcome.skipped.iter().map(String::as_str).collect();
        self.worker.remember_written_elsewhere(&events, &skipped);
        (at_worker, at_main)
    }
}

/// Through a worker, a message costs the worker nothing and a state event
/// one statement (its group's id), once the room's last event went through
/// it: it remembers what the main process committed. The main process costs
/// what a write posted to it does, less that id; its groups are written in
/// the batch, and each is kept readable in the meantime.
fn a_forwarded_write_costs_the_worker_at_most_the_group_id(t: &TestDb) {
    install();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let lines = room();
    let forwarding = Forwarding::open(t);
    for l in &lines[..20] {
        forwarding.write(l);
    }
    let (message, state) = expected(t);
    let id = group_id_statements(t);
    // Line 20 is a join, 21 a message.
    let (worker, main) = forwarding.write(&lines[20]);
    assert_eq!(
        worker.len(),
        id,
        "the worker's statements of a state event:\n{}",
        worker.join("\n")
    );
    assert_eq!(
        main.len(),
        state - id,
        "the main process's statements of a forwarded state event on {}:\n{}",
        t.engine(),
        main.join("\n")
    );
    let (worker, main) = forwarding.write(&lines[21]);
    assert!(
        worker.is_empty(),
        "the worker's statements of a message:\n{}",
        worker.join("\n")
    );
    assert_eq!(
        main.len(),
        message,
        "the main process's statements of a forwarded message on {}:\n{}",
        t.engine(),
        main.join("\n")
    );
    for l in &lines[22..] {
        forwarding.write(l);
    }
    assert_eq!(forwarding.main.builder.state().prepared_groups_waiting(), 0);
    assert_eq!(forwarding.worker.state().prepared_groups_waiting(), 0);
    storage_events::testing::assert_invariants(&t.open());
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

/// Line 22 of `lines` (a message) with line 20 as its prev event instead of
/// line 21: written after line 21, the room's second forward extremity.
fn fork_of(lines: &[String]) -> String {
    use event_context::ruma::RoomVersionId;
    let id = |line: &str| {
        event_context::Pdu::from_json(line, Some(&RoomVersionId::V10))
            .unwrap()
            .event_id
            .to_string()
    };
    let mut fork: serde_json::Value = serde_json::from_str(&lines[22]).unwrap();
    fork["prev_events"] = serde_json::json!([id(&lines[20])]);
    fork["content"]["body"] = serde_json::json!("a fork");
    fork.to_string()
}

/// A message that forks the room (the batch leaves two extremities, so it
/// is not written on the guess that none of its events is stored): which
/// of its events are stored and which stored events name them as prev
/// events are read before its transaction, and that transaction reads
/// nothing again (on PostgreSQL it is then the batch's one statement); the
/// current state after both extremities is resolved from groups in memory.
fn a_fork_costs_a_fixed_number_of_statements(t: &TestDb) {
    let lines = room();
    let statements = statements_of_one_write(t, &lines[..22], &fork_of(&lines));
    assert_eq!(
        statements.len(),
        expected_fork(t),
        "statements of a fork on {}:\n{}",
        t.engine(),
        statements.join("\n")
    );
    storage_events::testing::assert_invariants(&t.open());
}

/// A request of an event stored already and a new message after it: the
/// guess that none is stored fails (its statement, on the event id's
/// uniqueness), what is stored of them is read once, then which stored
/// events name them, and the write reads nothing again.
fn an_event_stored_already_costs_a_fixed_number_of_statements(t: &TestDb) {
    let lines = room();
    install();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let pipeline =
        persistence::Pipeline::open(t.open(), &storage_core::StoreConfig::default()).unwrap();
    let write = |l: &[String]| {
        let events = event_context::contexts_for(&pipeline.builder, ROOM, l).unwrap();
        pipeline.persist(ROOM, &events).unwrap()
    };
    for l in &lines[..22] {
        write(std::slice::from_ref(l));
    }
    let (batch, statements) = recording(|| write(&lines[21..23]));
    assert_eq!(batch.skipped.len(), 1, "{batch:?}");
    assert_eq!(
        statements.len(),
        expected_stored_already(t),
        "statements of an event stored already and a new one on {}:\n{}",
        t.engine(),
        statements.join("\n")
    );
    storage_events::testing::assert_invariants(&t.open());
}

/// As `hs-main` writes, under the main-process claim: a message costs what it
/// costs unclaimed plus the claim's proof, which on PostgreSQL is no
/// statement of its own (the batch's statement, sent alone, holds its row
/// and checks its epoch inside the server before it writes, then reads it),
/// on SQLite one (in-process).
fn the_main_process_claim_costs_postgres_no_statement(t: &TestDb) {
    let lines = room();
    let mut claim = None;
    let open = || {
        let config =
            storage_core::DatabaseConfig::parse(t.url(), storage_core::OpenMode::Writer).unwrap();
        let held =
            storage_core::MainProcessClaim::acquire(&config, std::time::Duration::ZERO).unwrap();
        let db = storage_core::Database::open_claimed(config, &held).unwrap();
        claim = Some(held);
        db
    };
    let statements = statements_of_one_write_to(open, &lines[..21], &lines[21]);
    let held_epoch = claim.as_ref().and_then(|c| c.epoch());
    drop(claim);
    let proof = match t.engine() {
        "sqlite" => 1,
        _ => 0,
    };
    assert_eq!(
        statements.len(),
        expected(t).0 + proof,
        "statements of one message under the claim on {}:\n{}",
        t.engine(),
        statements.join("\n")
    );
    // SQLite (3.47 on) plans a bound LIMIT as the value it was prepared
    // with, so binding one again expires the kept statement: it would be
    // parsed and planned again in every write. And it runs `IN (VALUES ..)`
    // by building a temporary table, worth it for many rows, not for the
    // one extremity a message replaces.
    if t.engine() == "sqlite" {
        assert!(
            statements
                .iter()
                .all(|s| !s.contains("LIMIT ?") && !s.contains("IN (VALUES")),
            "a statement of a message binds its LIMIT or builds a temporary table:\n{}",
            statements.join("\n")
        );
    }
    if t.engine() == "postgres" {
        let epoch = held_epoch.expect("a claimed database's epoch");
        assert!(
            statements[0].starts_with("WITH claim AS (SELECT epoch = coalesce(")
                && statements[0].contains(&format!("Some({epoch})")),
            "the batch's statement proves the claim's epoch {epoch} in the server: {}",
            statements[0]
        );
        assert!(
            statements
                .iter()
                .any(|s| s.contains("pg_notify") && s.contains("epoch")),
            "the batch's statement reads the epoch:\n{}",
            statements.join("\n")
        );
    }
}

/// (a message, a state event): the statements each costs on `t`'s engine,
/// without the main-process claim (the test opens the database unclaimed;
/// for what the claim adds, see
/// [`the_main_process_claim_costs_postgres_no_statement`]).
///
/// A message on PostgreSQL (1): one statement, sent outside any transaction
/// and committed on its own (no BEGIN, no COMMIT), taking the stream
/// position (under the stream positions lock, held until it commits),
/// inserting the rows of events, event_json, event_edges, event_auth,
/// event_to_state_groups, deleting the replaced extremity, inserting the new
/// one and sending the NOTIFY
/// (`Transaction::insert_columns_taking_positions`). Nothing is
/// read: the prev event (the room's last batch left it in the event cache),
/// the forward extremities and the current state (kept up to date by the
/// writer) come from memory, and neither which of the batch's events are
/// stored nor which stored events name them as prev events is read while
/// none of them is stored (were one stored, inserting it would fail the
/// transaction, and the batch would be written again knowing).
/// A state event adds the group's id (before it, alone too); the group's rows
/// (group, edge, state: its prev group's room and chain length are cached),
/// its cache_invalidations row and the current state's change go in the
/// events' statement.
/// SQLite takes its sequences from memory, has no lock or NOTIFY, and
/// inserts table after table, in multi-row INSERTs of a power of two rows,
/// or of all of a table's rows when they are fewer than 8 (no round trip to
/// save; each such statement kept prepared): a message: the events, JSON,
/// edge and event-to-group rows, its 3 auth events in one INSERT, and the
/// extremities' DELETE and INSERT in place of the one statement; a state
/// event: 3 INSERTs for the group, the cache_invalidations row and the
/// current state's upsert (no slot removed, so no DELETE).
fn expected(t: &TestDb) -> (usize, usize) {
    match t.engine() {
        "sqlite" => (9, 14),
        _ => (1, 2),
    }
}

/// A fork's statements: one read transaction (BEGIN, which of the batch's
/// events are stored, which stored events name them, COMMIT), then the
/// write, which reads nothing: on PostgreSQL the batch's one statement; on
/// SQLite a message's (9) less the DELETE of a replaced extremity (none is).
/// Before the write stopped reading what its caller had read: 10 and 15.
fn expected_fork(t: &TestDb) -> usize {
    match t.engine() {
        "sqlite" => 12,
        _ => 5,
    }
}

/// An event stored already and a new one: the request's read of which are
/// stored (its contexts), the failed guess, which are stored (read once
/// the guess failed), which stored events name them, then the write, which
/// reads nothing. Before the write stopped reading what its caller had
/// read, which were stored was read three times: 25 and 17.
fn expected_stored_already(t: &TestDb) -> usize {
    match t.engine() {
        "sqlite" => 21,
        _ => 11,
    }
}

/// The statements taking a new state group's id: none on SQLite, which takes
/// its sequences from memory.
fn group_id_statements(t: &TestDb) -> usize {
    match t.engine() {
        "sqlite" => 0,
        _ => 1,
    }
}
