//! The persistence queue: shared batches, shared errors, independent rooms,
//! abandoned callers, log context, and commit order of stream positions.

use persistence::queue::{BatchOutcome, PersistenceQueue};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;
use storage_core::{logging, Error, LogContext, StoreConfig};
use storage_events::{
    new_forward_extremities, CurrentStateDelta, EventReads, EventToPersist, EventsStore,
    PersistedBatch, RoomBatch,
};
use storage_state::{key, NewStateGroup, StateGroupAccess, StateMap};

fn event(room: &str, id: &str, group: Option<i64>) -> EventToPersist {
    storage_events::testing::event(room, id, &[], group)
}

fn ok_batch(events: &[EventToPersist]) -> PersistedBatch {
    PersistedBatch {
        positions: events
            .iter()
            .enumerate()
            .map(|(i, e)| (e.event_id.clone(), i as i64))
            .collect(),
        skipped: vec![],
        max_stream_ordering: events.len() as i64,
        announced: None,
    }
}

/// A persister that blocks its first call until released, recording what it got.
struct Gate {
    calls: Mutex<Vec<Vec<String>>>,
    entered: Barrier,
    release: Barrier,
}

/// A gated queue batching up to 100 events.
fn gated_queue() -> (PersistenceQueue, Arc<Gate>) {
    gated_queue_of(100)
}

fn gated_queue_of(max_batch: usize) -> (PersistenceQueue, Arc<Gate>) {
    let gate = Arc::new(Gate {
        calls: Mutex::new(Vec::new()),
        entered: Barrier::new(2),
        release: Barrier::new(2),
    });
    let g = gate.clone();
    let queue = PersistenceQueue::new(
        max_batch,
        Box::new(move |_room, events| {
            let first = {
                let mut calls = g.calls.lock().unwrap();
                calls.push(events.iter().map(|e| e.event_id.clone()).collect());
                calls.len() == 1
            };
            if first {
                g.entered.wait();
                g.release.wait();
            }
            if events.iter().any(|e| e.event_id.starts_with("$bad")) {
                return Err(Error::other("injected failure"));
            }
            Ok(ok_batch(events))
        }),
    );
    (queue, gate)
}

#[test]
fn callers_arriving_during_a_batch_share_the_next_one() {
    let (queue, gate) = gated_queue();
    let h1 = queue.enqueue("!r", vec![event("!r", "$1", Some(1))]);
    gate.entered.wait(); // the loop is writing $1
    let h2 = queue.enqueue("!r", vec![event("!r", "$2", Some(1))]);
    let h3 = queue.enqueue(
        "!r",
        vec![event("!r", "$3", Some(1)), event("!r", "$4", Some(1))],
    );
    assert_eq!(queue.depth(), 4);
    gate.release.wait();
    let (r1, r2, r3) = (h1.wait().unwrap(), h2.wait().unwrap(), h3.wait().unwrap());
    assert!(
        Arc::ptr_eq(&r2, &r3),
        "one batch, one outcome for both callers"
    );
    assert!(!Arc::ptr_eq(&r1, &r2));
    assert_eq!(r3.positions.len(), 3);
    assert_eq!(
        *gate.calls.lock().unwrap(),
        vec![vec!["$1"], vec!["$2", "$3", "$4"]]
    );
    assert_eq!(queue.depth(), 0);
}

#[test]
fn a_failing_batch_fails_every_caller_and_the_loop_goes_on() {
    let (queue, gate) = gated_queue();
    let h1 = queue.enqueue("!r", vec![event("!r", "$1", Some(1))]);
    gate.entered.wait();
    let bad_a = queue.enqueue("!r", vec![event("!r", "$bad-a", Some(1))]);
    let bad_b = queue.enqueue("!r", vec![event("!r", "$b", Some(1))]);
    gate.release.wait();
    h1.wait().unwrap();
    let (ea, eb) = (bad_a.wait().unwrap_err(), bad_b.wait().unwrap_err());
    assert!(Arc::ptr_eq(&ea, &eb), "the same error for everyone");
    assert!(ea.to_string().contains("injected failure"), "{ea}");
    assert!(ea.to_string().contains("persisting 2 events in !r"), "{ea}");
    assert!(
        format!("{:?}", ea.backtrace()).contains("queue"),
        "backtrace from where it happened"
    );
    // The loop continues with later items.
    let later = queue.enqueue("!r", vec![event("!r", "$later", Some(1))]);
    assert_eq!(later.wait().unwrap().positions.len(), 1);
}

#[test]
fn rooms_do_not_wait_for_each_other() {
    let (queue, gate) = gated_queue();
    let blocked = queue.enqueue("!slow", vec![event("!slow", "$s", Some(1))]);
    gate.entered.wait();
    // !slow's loop is stuck in its persister; !fast still gets through.
    let fast = queue.enqueue("!fast", vec![event("!fast", "$f", Some(1))]);
    assert!(fast
        .wait_timeout(Duration::from_secs(10))
        .expect("not blocked")
        .is_ok());
    assert!(blocked.wait_timeout(Duration::from_millis(10)).is_none());
    gate.release.wait();
    assert!(blocked.wait().is_ok());
}

#[test]
fn a_caller_that_stops_waiting_does_not_block_the_loop_and_errors_are_logged_once() {
    let capture = logging::capture();
    // One event a batch, and both failing items queued while the loop is held
    // in its first batch: each fails in a batch of its own, in queue order, so
    // the unwatched failure is logged before the watched one is even tried.
    // (Queued after the first batch, the watched event could join the
    // unwatched one's item if the loop had not taken it yet: one shared batch,
    // a caller waiting on it, nothing unhandled.)
    let (queue, gate) = gated_queue_of(1);
    let h1 = queue.enqueue("!gone", vec![event("!gone", "$1", Some(1))]);
    gate.entered.wait();
    drop(queue.enqueue("!gone", vec![event("!gone", "$bad-unwatched", Some(1))]));
    let after = queue.enqueue("!gone", vec![event("!gone", "$bad-watched", Some(1))]);
    gate.release.wait();
    h1.wait().unwrap();
    let err = after.wait().unwrap_err();
    assert!(
        err.to_string().contains("persisting 1 events in !gone"),
        "{err}"
    );
    assert_eq!(
        *gate.calls.lock().unwrap(),
        vec![vec!["$1"], vec!["$bad-unwatched"], vec!["$bad-watched"]],
        "three batches, in queue order"
    );
    let lines = capture.lines();
    let unhandled: Vec<_> = lines
        .iter()
        .filter(|l| l.level == log::Level::Error && l.message.contains("in !gone"))
        .collect();
    assert_eq!(
        unhandled.len(),
        1,
        "only the unwatched failure is unhandled: {unhandled:?}"
    );
    assert!(unhandled[0].message.contains("no caller was waiting"));
}

#[test]
fn the_loop_runs_in_its_own_log_context() {
    let capture = logging::capture();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let queue = PersistenceQueue::new(
        10,
        Box::new(move |room, events| {
            log::info!("writing {} events of {room} (context check)", events.len());
            s.lock()
                .unwrap()
                .push(storage_core::log_context::current_name());
            Ok(ok_batch(events))
        }),
    );
    LogContext::new("request-42").scope(|| {
        queue
            .enqueue("!ctx", vec![event("!ctx", "$1", Some(1))])
            .wait()
            .unwrap();
    });
    assert_eq!(
        *seen.lock().unwrap(),
        vec!["persistence loop !ctx".to_owned()]
    );
    let line = capture
        .lines()
        .into_iter()
        .find(|l| l.message.contains("(context check)"))
        .expect("the persister's line was logged");
    assert_eq!(line.context, "persistence loop !ctx");
}

/// `write` with no loop running for the room: the caller's own thread writes
/// its item (under the loop's context, not the request's), the caller gets
/// its answer as soon as that batch is written, and what arrived meanwhile is
/// written by a loop thread, not by the caller.
#[test]
fn a_lone_writer_writes_its_own_item_and_hands_the_rest_to_a_loop() {
    type Call = (Vec<String>, std::thread::ThreadId, String);
    let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
    let (entered_tx, entered) = crossbeam_channel::bounded::<()>(0);
    let (release, release_rx) = crossbeam_channel::bounded::<()>(0);
    let (proceed, proceed_rx) = crossbeam_channel::bounded::<()>(1);
    let c = calls.clone();
    let queue = PersistenceQueue::new(
        10,
        Box::new(move |_, events| {
            let n = {
                let mut calls = c.lock().unwrap();
                calls.push((
                    events.iter().map(|e| e.event_id.clone()).collect(),
                    std::thread::current().id(),
                    storage_core::log_context::current_name(),
                ));
                calls.len()
            };
            let wait = Duration::from_secs(10);
            if n == 1 {
                entered_tx.send(()).unwrap();
                release_rx.recv_timeout(wait).unwrap();
            } else if n == 2 && proceed_rx.recv_timeout(wait).is_err() {
                return Err(Error::other("the first writer never returned"));
            }
            Ok(ok_batch(events))
        }),
    );
    let (answered_tx, answered) = crossbeam_channel::bounded(1);
    let writer = std::thread::scope(|s| {
        let q = &queue;
        let writer = s.spawn(move || {
            LogContext::new("request-a").scope(|| {
                let outcome = q.write("!r", vec![event("!r", "$1", Some(1))]);
                answered_tx
                    .send((outcome, storage_core::log_context::current_name()))
                    .unwrap();
            });
            std::thread::current().id()
        });
        entered.recv().unwrap(); // $1 is being written
        let later = queue.enqueue("!r", vec![event("!r", "$2", Some(1))]);
        release.send(()).unwrap();
        let (outcome, context) = answered
            .recv_timeout(Duration::from_secs(5))
            .expect("the writer answered while $2 still waited to be written");
        assert_eq!(outcome.unwrap().positions.len(), 1);
        assert_eq!(context, "request-a", "the caller's context is back");
        proceed.send(()).unwrap();
        assert!(later.wait().is_ok());
        writer.join().unwrap()
    });
    // Once the loop has ended with its queue (it answers $2 first, then finds
    // the queue empty), the next lone writer writes inline again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.rooms_writing() > 0 {
        assert!(Instant::now() < deadline, "the loop never ended");
        std::thread::sleep(Duration::from_millis(1));
    }
    queue.write("!r", vec![event("!r", "$3", Some(1))]).unwrap();
    let calls = calls.lock().unwrap();
    let loop_ctx = "persistence loop !r";
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert_eq!(
        (calls[0].0.as_slice(), calls[0].1),
        (&["$1".to_owned()][..], writer)
    );
    assert_eq!(calls[1].0, ["$2"]);
    assert_ne!(calls[1].1, writer, "$2 was written by a loop thread");
    assert_ne!(calls[1].1, std::thread::current().id());
    assert_eq!(calls[2].1, std::thread::current().id());
    assert!(calls.iter().all(|c| c.2 == loop_ctx), "{calls:?}");
    assert_eq!(queue.depth(), 0);
}

#[test]
fn a_panicking_persister_fails_its_callers() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    // What was prepared for the panicked item is dropped (its persister
    // never got to), and only for it.
    let discarded = Arc::new(Mutex::new(Vec::new()));
    let d = discarded.clone();
    let queue = PersistenceQueue::discarding(
        10,
        Box::new(move |_, events| {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("persister bug");
            }
            Ok(ok_batch(events))
        }),
        Box::new(move |events| {
            d.lock()
                .unwrap()
                .extend(events.iter().map(|e| e.event_id.clone()))
        }),
    );
    let err = queue
        .enqueue("!p", vec![event("!p", "$1", None)])
        .wait()
        .unwrap_err();
    assert!(err.to_string().contains("panicked"), "{err}");
    assert!(queue
        .enqueue("!p", vec![event("!p", "$2", None)])
        .wait()
        .is_ok());
    assert_eq!(*discarded.lock().unwrap(), vec!["$1".to_owned()]);
}

/// What a short command relies on at exit: once its last handle of the queue
/// is dropped, no room loop holds the persister (and with it the database)
/// any more; an item nobody waits for any more is still written first.
#[test]
fn dropping_the_queue_waits_for_its_loops_to_let_go_of_the_persister() {
    struct Held(Arc<AtomicUsize>);
    impl Drop for Held {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let released = Arc::new(AtomicUsize::new(0));
    let written = Arc::new(AtomicUsize::new(0));
    let held = Held(released.clone());
    let w = written.clone();
    let queue = PersistenceQueue::new(
        1,
        Box::new(move |_, events| {
            let _ = &held;
            if events[0].event_id == "$slow" {
                std::thread::sleep(Duration::from_millis(300));
            }
            w.fetch_add(1, Ordering::SeqCst);
            Ok(ok_batch(events))
        }),
    );
    let first = queue.enqueue("!r", vec![event("!r", "$1", None)]);
    drop(queue.enqueue("!r", vec![event("!r", "$slow", None)]));
    let second = queue.clone();
    first.wait().unwrap();
    drop(queue);
    assert_eq!(released.load(Ordering::SeqCst), 0, "another handle is left");
    drop(second);
    assert_eq!(
        written.load(Ordering::SeqCst),
        2,
        "the item nobody waited for"
    );
    assert_eq!(
        released.load(Ordering::SeqCst),
        1,
        "the persister was let go of when the last handle was dropped"
    );
}

// With real storage, on both engines.

storage_core::engine_tests!(
    failed_batch_leaves_no_event_behind,
    stream_positions_follow_commit_order
);

fn real_queue(store: &EventsStore) -> PersistenceQueue {
    let store = store.clone();
    PersistenceQueue::new(
        50,
        Box::new(move |room, events| {
            let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
            let current = store.get_forward_extremities(room)?;
            let referenced = store.events_referenced_as_prev(&ids)?;
            let mut batch = RoomBatch {
                room_id: room.to_owned(),
                new_extremities: new_forward_extremities(&current, events, &referenced),
                old_extremities: current.clone(),
                events: events.to_vec(),
                current_state: CurrentStateDelta::default(),
            };
            if events.iter().any(|e| e.event_id.starts_with("$bad")) {
                // current_state_events.event_id is unique: this write fails inside
                // the transaction, after the events went in.
                batch
                    .current_state
                    .added
                    .push((key("a", ""), "$dup".into(), None));
                batch
                    .current_state
                    .added
                    .push((key("b", ""), "$dup".into(), None));
            }
            store.persist_batch(&batch)
        }),
    )
}

fn stores(t: &TestDb) -> (EventsStore, i64) {
    let events = EventsStore::new(t.open(), &StoreConfig::default()).unwrap();
    let group = events
        .state()
        .store_state_group(&NewStateGroup::snapshot(
            "$create",
            "!r",
            &StateMap::from_iter([(key("m.room.create", ""), "$create".into())]),
        ))
        .unwrap();
    (events, group)
}

fn failed_batch_leaves_no_event_behind(t: &TestDb) {
    let (store, g) = stores(t);
    let queue = real_queue(&store);
    let handles: Vec<_> = ["$ok1", "$bad", "$ok2"]
        .iter()
        .map(|id| {
            (
                id.to_string(),
                queue.enqueue("!r", vec![event("!r", id, Some(g))]),
            )
        })
        .collect();
    let outcomes: HashMap<String, BatchOutcome> =
        handles.into_iter().map(|(id, h)| (id, h.wait())).collect();
    // $bad may share a batch with its neighbours; whoever shared it failed with it.
    let failed: Vec<&String> = outcomes
        .iter()
        .filter(|(_, o)| o.is_err())
        .map(|(id, _)| id)
        .collect();
    assert!(failed.contains(&&"$bad".to_owned()));
    let stored = store.have_events(&["$ok1", "$bad", "$ok2"]).unwrap();
    for (id, outcome) in &outcomes {
        assert_eq!(
            stored.contains(id),
            outcome.is_ok(),
            "{id}: stored iff its batch committed"
        );
    }
}

fn stream_positions_follow_commit_order(t: &TestDb) {
    let (store, g) = stores(t);
    let queue = real_queue(&store);
    let committed = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..4)
        .map(|r| {
            let (queue, committed) = (queue.clone(), committed.clone());
            std::thread::spawn(move || {
                let room = format!("!room{r}");
                for i in 0..10 {
                    let events = (0..3)
                        .map(|j| event(&room, &format!("$r{r}-{i}-{j}"), Some(g)))
                        .collect();
                    let batch = queue.enqueue(&room, events).wait().unwrap();
                    let mut positions: Vec<i64> = batch.positions.values().copied().collect();
                    positions.sort();
                    committed.lock().unwrap().push(positions);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut batches = committed.lock().unwrap().clone();
    batches.sort();
    batches.dedup();
    // Batches never interleave: every position of one batch is below every
    // position of the batch committed after it.
    for pair in batches.windows(2) {
        assert!(pair[0].last() < pair[1].first(), "{pair:?}");
    }
    let all: usize = batches.iter().map(Vec::len).sum();
    assert_eq!(all, 120);
    assert_eq!(
        store.max_stream_ordering(),
        *batches.last().unwrap().last().unwrap()
    );
}

/// A chain's later items are not written once an earlier one failed (they may
/// follow its events), while items outside the chain, and other chains, are;
/// a chained item never joins an item of another chain or of none.
#[test]
fn a_failed_item_stops_the_later_items_of_its_chain_only() {
    let (queue, gate) = gated_queue();
    let chain = queue.chain();
    let other = queue.chain();
    let h0 = queue.enqueue("!r", vec![event("!r", "$0", Some(1))]);
    gate.entered.wait(); // the loop is writing $0; the rest waits behind it
    let bad = queue.enqueue_chained("!r", vec![event("!r", "$bad1", Some(1))], chain);
    let unchained = queue.enqueue("!r", vec![event("!r", "$3", Some(1))]);
    let after = queue.enqueue_chained("!r", vec![event("!r", "$2", Some(1))], chain);
    let other_chain = queue.enqueue_chained("!r", vec![event("!r", "$4", Some(1))], other);
    gate.release.wait();
    h0.wait().unwrap();
    assert!(bad
        .wait()
        .unwrap_err()
        .to_string()
        .contains("injected failure"));
    let stopped = after.wait().unwrap_err().to_string();
    assert!(
        stopped.contains("not written: an earlier batch they follow failed"),
        "{stopped}"
    );
    unchained.wait().unwrap();
    other_chain.wait().unwrap();
    assert!(queue.chain_failure(chain).is_some());
    assert!(queue.chain_failure(other).is_none());
    // $2 never reached the persister; the others each came alone.
    let calls = gate.calls.lock().unwrap().clone();
    assert_eq!(
        calls,
        vec![vec!["$0"], vec!["$bad1"], vec!["$3"], vec!["$4"]]
            .into_iter()
            .map(|c| c.into_iter().map(String::from).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
}

/// Every waiter's error keeps the kind of the failure (the HTTP layer answers a
/// pool timeout or an unreachable database with 503, bad input with 400), its
/// text, and the backtrace of where it happened.
#[test]
fn a_failure_keeps_its_kind_for_every_waiter() {
    use storage_core::ErrorKind;
    let queue = PersistenceQueue::new(
        100,
        Box::new(|_room, events| {
            if events[0].event_id == "$down" {
                Err(Error::unavailable("the database is unreachable"))
            } else {
                Err(Error::invalid_argument("a bad event"))
            }
        }),
    );
    for (id, check) in [
        (
            "$down",
            (|k: &ErrorKind| matches!(k, ErrorKind::Unavailable(_))) as fn(&ErrorKind) -> bool,
        ),
        ("$bad", |k: &ErrorKind| {
            matches!(k, ErrorKind::InvalidArgument(_))
        }),
    ] {
        let shared = queue
            .enqueue("!r", vec![event("!r", id, Some(1))])
            .wait()
            .unwrap_err();
        let own: Error = shared.into();
        assert!(check(own.kind()), "{id}: {own}");
        assert!(
            own.to_string().contains("persisting 1 events in !r"),
            "{own}"
        );
        let trace = format!("{:?}", own.backtrace());
        assert!(
            trace.contains("a_failure_keeps_its_kind_for_every_waiter"),
            "the backtrace is the original's, from the persister: {trace}"
        );
    }
}
