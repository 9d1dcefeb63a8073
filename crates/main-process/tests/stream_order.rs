//! Stream positions follow commit order while batches of different rooms are
//! written at once (each takes its positions last, under the stream
//! positions lock, after what needs none): whatever a reader sees, every
//! position below the highest it sees is there already, so a worker that
//! caught up to a position never misses an event committed later below it.

use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use storage_core::testing::TestDb;
use storage_core::with_conn;

storage_core::engine_tests!(a_reader_never_sees_a_position_before_a_lower_one);

/// Rooms written at once, one writer each, and events each.
const ROOMS: usize = 2;
const EVENTS: usize = 150;

#[derive(QueryableByName)]
struct Position {
    #[diesel(sql_type = BigInt)]
    stream_ordering: i64,
}

/// The positions stored, as one statement (one snapshot) sees them.
fn positions(conn: &mut storage_core::Conn) -> BTreeSet<i64> {
    with_conn!(conn, |c| diesel::sql_query(
        "SELECT stream_ordering FROM events"
    )
    .load::<Position>(c))
    .unwrap()
    .into_iter()
    .map(|p| p.stream_ordering)
    .collect()
}

fn a_reader_never_sees_a_position_before_a_lower_one(t: &TestDb) {
    let pipeline =
        persistence::Pipeline::open(t.open(), &storage_core::StoreConfig::default()).unwrap();
    let rooms: Vec<(String, Vec<String>)> = (0..ROOMS)
        .map(|r| {
            let room = format!("!order{r}:test");
            let lines = main_process::bench_room::linear_room(&room, EVENTS, 20);
            (room, lines)
        })
        .collect();
    let writing = AtomicBool::new(true);
    let seen = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut conn = t.raw_connection();
            let mut seen = Vec::new();
            loop {
                seen.push(positions(&mut conn));
                if !writing.load(Ordering::SeqCst) {
                    return seen;
                }
            }
        });
        let writers: Vec<_> = rooms
            .iter()
            .map(|(room, lines)| {
                let pipeline = &pipeline;
                s.spawn(move || {
                    // One event a request, as a client posting messages.
                    for line in lines {
                        let events = event_context::contexts_for(
                            &pipeline.builder,
                            room,
                            std::slice::from_ref(line),
                        )
                        .unwrap();
                        pipeline.persist(room, &events).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        writing.store(false, Ordering::SeqCst);
        reader.join().unwrap()
    });
    let all = positions(&mut t.raw_connection());
    assert_eq!(all.len(), ROOMS * EVENTS);
    for s in &seen {
        let Some(&highest) = s.last() else { continue };
        let below: BTreeSet<i64> = all.range(..=highest).copied().collect();
        let missing: Vec<&i64> = below.difference(s).collect();
        assert!(
            missing.is_empty(),
            "a reader saw position {highest} while {missing:?} below it were not committed yet"
        );
    }
    storage_events::testing::assert_invariants(&t.open());
}
