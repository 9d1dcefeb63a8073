//! A slaved store kept right by the replication stream, against a main-process
//! store writing to the same PostgreSQL database: invalidations applied in
//! order, the position reported only once applied, LISTEN/NOTIFY following that
//! survives a killed connection. On SQLite (one process only) a slaved store is
//! refused with a clear error.

use diesel::prelude::*;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::{with_conn, OpenMode, StoreConfig};
use storage_events::{
    new_forward_extremities, testing, Announced, CurrentStateDelta, EventReads, EventToPersist,
    EventsStore, Invalidations, Notification, RoomBatch,
};
use storage_slaved::{SlavedStore, APPLICATION_NAME};
use storage_state::{key, NewStateGroup, StateGroupAccess, StateMap};

const ROOM: &str = "!replicated:test";

/// The main process's side: writes one state event at a time.
struct Main {
    store: EventsStore,
    group: Option<i64>,
    last: Option<String>,
    /// What the last batch's commit told workers.
    announced: Option<Announced>,
}

impl Main {
    fn new(t: &TestDb) -> Main {
        let db = t.open();
        let config = StoreConfig::default();
        Main {
            store: EventsStore::new(db, &config).unwrap(),
            group: None,
            last: None,
            announced: None,
        }
    }

    /// Persists `id` filling `slot` and making it current; returns its position.
    fn write(&mut self, id: &str, slot: (&str, &str)) -> i64 {
        let delta = StateMap::from_iter([(key(slot.0, slot.1), id.into())]);
        let state = self.store.state();
        let group = match self.group {
            None => state.store_state_group(&NewStateGroup::snapshot(id, ROOM, &delta)),
            Some(g) => state.store_state_group(&NewStateGroup::delta(id, ROOM, g, &delta)),
        }
        .unwrap();
        let prevs: Vec<&str> = self.last.iter().map(String::as_str).collect();
        let events = vec![testing::state_event(ROOM, id, &prevs, slot, Some(group))];
        let current_state = CurrentStateDelta {
            removed: vec![],
            added: vec![(key(slot.0, slot.1), id.to_owned(), None)],
        };
        self.group = Some(group);
        self.persist(id, events, current_state)
    }

    /// Persists a message `id` (no change of state); returns its position.
    fn message(&mut self, id: &str) -> i64 {
        let prevs: Vec<&str> = self.last.iter().map(String::as_str).collect();
        let events = vec![testing::event(ROOM, id, &prevs, self.group)];
        self.persist(id, events, CurrentStateDelta::default())
    }

    /// Persists `events` (the last of them `id`) as one batch after the room's
    /// extremities; returns the batch's highest position.
    fn persist(
        &mut self,
        id: &str,
        events: Vec<EventToPersist>,
        current_state: CurrentStateDelta,
    ) -> i64 {
        let current = self.store.get_forward_extremities(ROOM).unwrap();
        let persisted = self
            .store
            .persist_batch(&RoomBatch {
                room_id: ROOM.into(),
                new_extremities: new_forward_extremities(&current, &events, &Default::default()),
                old_extremities: current.clone(),
                current_state,
                events,
            })
            .unwrap();
        self.last = Some(id.to_owned());
        self.announced = persisted.announced;
        persisted.max_stream_ordering
    }
}

/// A room with a topic, and a worker that has its current state cached.
fn room_with_a_cached_topic(t: &TestDb) -> (Main, SlavedStore) {
    let mut main = Main::new(t);
    main.write("$create", ("m.room.create", ""));
    main.write("$topic1", ("m.room.topic", ""));
    let worker = slaved(t);
    assert_eq!(topic(&worker).as_deref(), Some("$topic1"));
    (main, worker)
}

fn slaved(t: &TestDb) -> SlavedStore {
    SlavedStore::new(t.open_mode(OpenMode::Replica), &StoreConfig::default()).unwrap()
}

fn topic(store: &SlavedStore) -> Option<String> {
    store
        .state()
        .get_current_state_ids(ROOM)
        .unwrap()
        .get(&key("m.room.topic", ""))
        .map(|e| e.to_string())
}

/// `aggregate` (a count) over this database's listening connections.
fn listeners(admin: &mut storage_core::Conn, aggregate: &str) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    with_conn!(admin, |c| diesel::sql_query(format!(
        "SELECT {aggregate} AS n FROM pg_stat_activity \
         WHERE application_name = '{APPLICATION_NAME}' AND datname = current_database()"
    ))
    .get_result::<N>(c))
    .unwrap()
    .n
}

/// Waits for `condition`, failing after a deadline far beyond any expected delay.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sqlite_is_refused() {
    let t = TestDb::sqlite();
    drop(Main::new(&t));
    let err = SlavedStore::new(t.open_mode(OpenMode::Replica), &StoreConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs PostgreSQL"), "{err}");
    assert!(err.contains(t.url()), "{err}");
}

#[test]
fn catch_up_applies_invalidations_then_reports_the_position() {
    let Some(t) = TestDb::postgres() else { return };
    let (mut main, worker) = room_with_a_cached_topic(&t);
    assert_eq!(worker.position(), main.store.max_stream_ordering());

    let position = main.write("$topic2", ("m.room.topic", ""));
    // Not applied yet: the worker's cache still holds the old current state, and
    // its position says so.
    assert!(worker.position() < position);
    assert_eq!(topic(&worker).as_deref(), Some("$topic1"));
    assert_eq!(worker.catch_up().unwrap(), position);
    assert_eq!(worker.position(), position);
    assert_eq!(topic(&worker).as_deref(), Some("$topic2"));
    // Nothing new: the position stays.
    assert_eq!(worker.catch_up().unwrap(), position);
    storage_events::testing::assert_invariants(&t.open());
}

/// A batch's notification says what it invalidated: a state change carries
/// its room's current state, a message nothing.
#[test]
fn a_batch_announces_what_it_invalidated() {
    let Some(t) = TestDb::postgres() else { return };
    let mut main = Main::new(&t);
    main.write("$create", ("m.room.create", ""));
    let db = t.open_mode(OpenMode::Replica);
    let mut listener = db
        .engine()
        .listen(storage_events::REPLICATION_CHANNEL, "announce-test")
        .unwrap();
    let mut next = || {
        let mut payloads = Vec::new();
        wait_until("a notification", || {
            payloads.extend(listener.drain().unwrap());
            !payloads.is_empty()
        });
        assert_eq!(payloads.len(), 1, "{payloads:?}");
        Notification::parse(&payloads[0]).unwrap()
    };
    let position = main.write("$topic", ("m.room.topic", ""));
    let n = next();
    assert_eq!(
        (n.position, n.invalidations),
        (position, Invalidations::CurrentState(ROOM.to_owned()))
    );
    let position = main.message("$message");
    let n = next();
    assert_eq!(
        (n.position, n.invalidations),
        (position, Invalidations::None)
    );
    storage_events::testing::assert_invariants(&t.open());
}

/// Notifications without invalidations, or carrying them, are applied by
/// taking their position, reading nothing; one that says to read them, or
/// does not say (an older main process), is applied by reading what is new.
#[test]
fn notifications_that_carry_their_invalidations_cost_no_read() {
    let Some(t) = TestDb::postgres() else { return };
    let (mut main, worker) = room_with_a_cached_topic(&t);
    let stored = main.write("$topic2", ("m.room.topic", ""));
    // Positions beyond what is stored tell which way a notification went: a
    // read stops at the stored one.
    let payload = |position: i64, flag: &str| format!("{position} 1700000000000{flag}");
    for says_read in [payload(stored + 5, " 1"), payload(stored + 5, "")] {
        assert_eq!(worker.apply_notifications(&[says_read]).unwrap(), stored);
        assert_eq!(topic(&worker).as_deref(), Some("$topic2"));
    }
    let messages = [payload(stored + 1, " 0"), payload(stored + 2, " 0")];
    assert_eq!(worker.apply_notifications(&messages).unwrap(), stored + 2);
    assert_eq!(worker.position(), stored + 2);
    // A payload that does not parse is read past, never taken.
    assert_eq!(
        worker.apply_notifications(&["garbage".to_owned()]).unwrap(),
        stored + 2
    );
    assert!(worker.replication_health().is_ok());
}

/// A room's current-state invalidation carried in the notification is applied
/// as it is: the cached state goes, nothing is read.
#[test]
fn a_carried_invalidation_drops_the_cached_current_state() {
    let Some(t) = TestDb::postgres() else { return };
    let (mut main, worker) = room_with_a_cached_topic(&t);
    let stored = main.write("$topic2", ("m.room.topic", ""));
    assert_eq!(topic(&worker).as_deref(), Some("$topic1"));
    // A position beyond what is stored: a read would stop at the stored one.
    let carried = [
        format!("{} 1700000000000 0", stored + 4),
        format!("{} 1700000000000 c {ROOM}", stored + 5),
    ];
    assert_eq!(worker.apply_notifications(&carried).unwrap(), stored + 5);
    assert_eq!(topic(&worker).as_deref(), Some("$topic2"));
    // Another room's invalidation leaves this one's cache alone.
    let elsewhere = main.write("$topic3", ("m.room.topic", ""));
    assert_eq!(topic(&worker).as_deref(), Some("$topic2"));
    let other = [format!("{} 1700000000000 c !other:test", elsewhere + 10)];
    assert_eq!(worker.apply_notifications(&other).unwrap(), elsewhere + 10);
    assert_eq!(topic(&worker).as_deref(), Some("$topic2"));
    storage_events::testing::assert_invariants(&t.open());
}

#[test]
fn follower_is_woken_and_survives_a_killed_connection() {
    let Some(t) = TestDb::postgres() else { return };
    let (mut main, worker) = room_with_a_cached_topic(&t);
    let logs = storage_core::logging::capture();
    let follower = worker.follow();

    let position = main.write("$topic2", ("m.room.topic", ""));
    wait_until("the first position", || worker.position() >= position);
    assert_eq!(topic(&worker).as_deref(), Some("$topic2"));

    // Kill the listening connection from the server side; the follower
    // reconnects and catches up with what was committed meanwhile.
    let mut admin = t.raw_connection();
    wait_until("the listening connection", || {
        listeners(&mut admin, "COUNT(*)") == 1
    });
    assert_eq!(
        listeners(
            &mut admin,
            "COUNT(*) FILTER (WHERE pg_terminate_backend(pid))"
        ),
        1
    );
    let position = main.write("$topic3", ("m.room.topic", ""));
    wait_until("the position after the reconnect", || {
        worker.position() >= position
    });
    assert_eq!(topic(&worker).as_deref(), Some("$topic3"));
    drop(follower);
    let lost = logs
        .lines()
        .into_iter()
        .find(|l| l.message.contains("replication connection lost"))
        .expect("the lost connection is logged");
    assert_eq!(lost.level, log::Level::Warn);
    assert_eq!(lost.context, "replication");
    storage_events::testing::assert_invariants(&t.open());
}

/// Synapse's `check(method, args)`: after catching up, the worker answers
/// every read exactly as the main process does.
#[test]
fn worker_reads_match_the_main_process() {
    let Some(t) = TestDb::postgres() else { return };
    let mut main = Main::new(&t);
    let worker = slaved(&t);
    main.write("$create", ("m.room.create", ""));
    // Read on the worker before the next writes, so that its caches hold what
    // must then be replaced.
    worker.catch_up().unwrap();
    assert_eq!(
        worker.events().get_forward_extremities(ROOM).unwrap(),
        vec!["$create".to_owned()]
    );
    assert_eq!(topic(&worker), None);
    main.write("$member", ("m.room.member", "@alice:test"));
    main.write("$topic", ("m.room.topic", ""));
    worker.catch_up().unwrap();

    let ids = ["$create", "$member", "$topic"];
    let (m, w) = (main.store.state(), worker.state());
    assert_eq!(
        worker.events().get_forward_extremities(ROOM).unwrap(),
        main.store.get_forward_extremities(ROOM).unwrap()
    );
    assert_eq!(
        w.get_current_state_ids(ROOM).unwrap(),
        m.get_current_state_ids(ROOM).unwrap()
    );
    assert_eq!(
        w.get_state_group_for_events(&ids).unwrap(),
        m.get_state_group_for_events(&ids).unwrap()
    );
    for id in ids {
        assert_eq!(
            w.get_state_for_event(id, &storage_state::StateFilter::all())
                .unwrap(),
            m.get_state_for_event(id, &storage_state::StateFilter::all())
                .unwrap(),
            "state after {id}"
        );
    }
    let on_main = main.store.get_events(&ids).unwrap();
    let on_worker = worker.events().get_events(&ids).unwrap();
    assert_eq!(on_worker.len(), 3);
    for id in ids {
        assert_eq!(on_worker[id], on_main[id], "{id}");
    }
    assert_eq!(
        w.get_current_state_ids(ROOM)
            .unwrap()
            .get(&key("m.room.member", "@alice:test")),
        Some(&"$member".into())
    );
    storage_events::testing::assert_invariants(&t.open());
}

/// Synapse's `test_backwards_stream_id`: a position once reported never goes
/// back, even when the stream seems to (here: the newest event purged).
#[test]
fn position_never_goes_backwards() {
    let Some(t) = TestDb::postgres() else { return };
    let mut main = Main::new(&t);
    main.write("$create", ("m.room.create", ""));
    let position = main.write("$topic1", ("m.room.topic", ""));
    let worker = slaved(&t);
    assert_eq!(worker.catch_up().unwrap(), position);
    let mut admin = t.raw_connection();
    let deleted = with_conn!(&mut admin, |c| diesel::sql_query(format!(
        "DELETE FROM events WHERE stream_ordering = {position}"
    ))
    .execute(c))
    .unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(worker.catch_up().unwrap(), position);
    assert_eq!(worker.position(), position);
    // A store started now begins where the stream is, and moves on with it.
    let fresh = slaved(&t);
    assert!(fresh.position() < position);
    let next = main.write("$topic2", ("m.room.topic", ""));
    assert!(next > position);
    assert_eq!(worker.catch_up().unwrap(), next);
    assert_eq!(topic(&worker).as_deref(), Some("$topic2"));
}

/// A write this worker forwarded is applied from the main process's answer
/// (the positions its batch took, and its notification) when every position
/// below them is applied here: the room's cached current state goes and the
/// position moves. With one below missing (another process's commit not
/// applied yet) it is left to the stream, which applies both in order.
#[test]
fn an_own_commit_is_applied_from_its_answer_only_with_nothing_missing_below() {
    let Some(t) = TestDb::postgres() else { return };
    let (mut main, worker) = room_with_a_cached_topic(&t);
    let before = worker.position();
    let answer = |main: &Main| {
        let a = main.announced.clone().expect("a batch that took positions");
        (a.first, a.notification.payload())
    };
    // Another process's commit, then this worker's: one below is missing.
    main.write("$topic2", ("m.room.topic", ""));
    main.write("$topic3", ("m.room.topic", ""));
    let (first, notification) = answer(&main);
    assert!(!worker.apply_own_commit(first, &notification));
    assert_eq!(worker.position(), before);
    assert_eq!(topic(&worker).as_deref(), Some("$topic1"));
    let caught_up = worker.catch_up().unwrap();
    assert_eq!(topic(&worker).as_deref(), Some("$topic3"));
    // Nothing missing below: applied from the answer.
    let position = main.write("$topic4", ("m.room.topic", ""));
    let (first, notification) = answer(&main);
    assert_eq!((first, caught_up + 1), (position, position));
    assert!(worker.apply_own_commit(first, &notification));
    assert_eq!(worker.position(), position);
    assert_eq!(topic(&worker).as_deref(), Some("$topic4"));
    // A message invalidates nothing; its position is taken all the same.
    let position = main.message("$message");
    let (first, message) = answer(&main);
    assert!(worker.apply_own_commit(first, &message));
    assert_eq!(worker.position(), position);
    assert_eq!(topic(&worker).as_deref(), Some("$topic4"));
    // The stream's copies of those notifications, when they come, are
    // applied already.
    assert_eq!(
        worker
            .apply_notifications(&[notification, message])
            .unwrap(),
        position
    );
    assert_eq!(topic(&worker).as_deref(), Some("$topic4"));
    storage_events::testing::assert_invariants(&t.open());
}

/// A worker further behind than the invalidations the main process keeps
/// drops all its current-state caches rather than serving stale state.
#[test]
fn worker_behind_pruned_invalidations_drops_its_caches() {
    let Some(t) = TestDb::postgres() else { return };
    let (mut main, worker) = room_with_a_cached_topic(&t);
    main.write("$topic2", ("m.room.topic", ""));
    let position = main.write("$name", ("m.room.name", ""));
    assert_eq!(main.store.prune_cache_invalidations(0).unwrap(), 4);
    // Still cached, and the invalidation of it is gone...
    assert_eq!(topic(&worker).as_deref(), Some("$topic1"));
    let logs = storage_core::logging::capture();
    assert_eq!(worker.catch_up().unwrap(), position);
    // ...but the marker left in its place made the worker forget.
    assert_eq!(topic(&worker).as_deref(), Some("$topic2"));
    let warned = logs
        .lines()
        .into_iter()
        .any(|l| l.level == log::Level::Warn && l.message.contains("pruned"));
    assert!(warned, "{:?}", logs.lines());
    storage_events::testing::assert_invariants(&t.open());
}

/// Synapse's multi-event-persist race, in our terms: while the main process
/// commits change after change, whatever position a worker reports, its current
/// state already shows every change up to that position (invalidations are
/// applied before the position is advertised, and a read racing an
/// invalidation never refills the cache with what it replaced).
#[test]
fn reported_position_never_runs_ahead_of_current_state() {
    let Some(t) = TestDb::postgres() else { return };
    let mut main = Main::new(&t);
    main.write("$create", ("m.room.create", ""));
    let worker = slaved(&t);
    let follower = worker.follow();
    const TOPICS: usize = 150;
    let committed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let committed = committed.clone();
        std::thread::spawn(move || {
            for i in 0..TOPICS {
                let position = main.write(&format!("$t{i}"), ("m.room.topic", ""));
                committed.lock().unwrap().push((position, i));
            }
            main.store.max_stream_ordering()
        })
    };
    let index = |id: &str| id.trim_start_matches("$t").parse::<usize>().unwrap();
    let mut checks = 0;
    while !writer.is_finished() {
        let position = worker.position();
        let shown = topic(&worker).map(|id| index(&id));
        // Every change committed at or before the reported position.
        let due = committed
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| *p <= position)
            .map(|(_, i)| *i)
            .max();
        assert!(
            shown >= due,
            "at position {position} the worker shows topic {shown:?}, but {due:?} was committed"
        );
        checks += 1;
    }
    let last = writer.join().unwrap();
    wait_until("the last position", || worker.position() >= last);
    assert_eq!(topic(&worker), Some(format!("$t{}", TOPICS - 1)));
    assert!(checks > 10, "only {checks} checks ran");
    drop(follower);
    storage_events::testing::assert_invariants(&t.open());
}

/// An event stored as an outlier, then given its place in the room's graph
/// (Synapse's `ex_outlier_stream`): a worker that read it as an outlier, with
/// no state after it, learns of the change through the stream. Its position
/// covers the change (a position of its own), it reads the event as no
/// outlier, the state after it, and the room's new current state.
#[test]
fn an_outlier_no_longer_reaches_the_worker() {
    let Some(t) = TestDb::postgres() else { return };
    let (main, worker) = room_with_a_cached_topic(&t);
    let slot = ("m.room.topic", "");
    let outlier = EventToPersist {
        outlier: true,
        ..testing::state_event(ROOM, "$aside", &["$topic1"], slot, None)
    };
    let current = main.store.get_forward_extremities(ROOM).unwrap();
    let batch = |events: Vec<EventToPersist>, current_state| RoomBatch {
        room_id: ROOM.into(),
        new_extremities: new_forward_extremities(&current, &events, &Default::default()),
        old_extremities: current.clone(),
        current_state,
        events,
    };
    let stored = main
        .store
        .persist_batch(&batch(vec![outlier], CurrentStateDelta::default()))
        .unwrap();
    assert_eq!(worker.catch_up().unwrap(), stored.max_stream_ordering);
    assert!(worker.events().get_events(&["$aside"]).unwrap()["$aside"].outlier);
    assert!(worker
        .state()
        .get_state_group_for_events(&["$aside"])
        .unwrap()
        .is_empty());

    let delta = StateMap::from_iter([(key(slot.0, slot.1), "$aside".into())]);
    let group = main
        .store
        .state()
        .store_state_group(&NewStateGroup::delta(
            "$aside",
            ROOM,
            main.group.unwrap(),
            &delta,
        ))
        .unwrap();
    let placed = testing::state_event(ROOM, "$aside", &["$topic1"], slot, Some(group));
    let current_state = CurrentStateDelta {
        removed: vec![],
        added: vec![(key(slot.0, slot.1), "$aside".to_owned(), None)],
    };
    let written = main
        .store
        .persist_batch(&batch(vec![placed], current_state))
        .unwrap();
    let position = written.positions["$aside"];
    assert!(position > stored.max_stream_ordering, "{written:?}");
    assert_eq!(written.max_stream_ordering, position);
    assert_eq!(worker.catch_up().unwrap(), position);
    let read = worker.events().get_events(&["$aside"]).unwrap()["$aside"].clone();
    assert!(
        !read.outlier,
        "the worker still has it as an outlier: {read:?}"
    );
    assert_eq!(read.stream_ordering, stored.positions["$aside"]);
    assert_eq!(
        worker
            .state()
            .get_state_group_for_events(&["$aside"])
            .unwrap()
            .get("$aside"),
        Some(&group)
    );
    assert_eq!(topic(&worker).as_deref(), Some("$aside"));
    storage_events::testing::assert_invariants(&t.open());
}
