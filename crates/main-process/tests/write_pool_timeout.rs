//! A write that cannot get a database connection in time answers 503 with
//! `Retry-After` over HTTP, not 500: the pool timeout keeps its kind through
//! the persistence queue (which shares one failure among its waiters) up to
//! the error format. The main process's own API, served over a database opened
//! with a pool of one connection and a short wait; the test holds that one
//! connection while the write is under way.

use e2e_tests::{free_port, post, Room, ALICE};
use http_api::{self as http, Limits};
use persistence::Pipeline;
use serde_json::json;
use std::sync::mpsc;
use std::time::Duration;
use storage_core::testing::TestDb;
use storage_core::{Database, DatabaseConfig, OpenMode, StoreConfig};

/// How long a caller waits for the pool's one connection.
const POOL_WAIT: Duration = Duration::from_millis(300);

/// Serves the main process's API over `db` on a free port; returns its URL.
fn serve(db: &Database) -> String {
    let pipeline = Pipeline::open(db.clone(), &StoreConfig::default()).unwrap();
    let api = main_process::serve_cmd::main_api(pipeline, Some(e2e_tests::TOKEN.into()), vec![]);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    std::thread::spawn(move || http::serve(addr, http::router(api), Limits::default()));
    let url = format!("http://{addr}");
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return url;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the API did not start listening on {addr}");
}

/// Holds the pool's one connection until the returned sender is dropped.
fn hold_the_connection(db: &Database) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (held_tx, held_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let db = db.clone();
    let holder = std::thread::spawn(move || {
        db.with_connection(|_, _| {
            held_tx.send(()).unwrap();
            let _ = release_rx.recv();
            Ok(())
        })
        .unwrap();
    });
    held_rx.recv().expect("the holder got the connection");
    (release_tx, holder)
}

fn a_write_that_times_out_on_the_pool_answers_503(t: &TestDb) {
    let config = DatabaseConfig::parse(t.url(), OpenMode::Writer)
        .unwrap()
        .with_pool_size(1)
        .with_pool_wait(POOL_WAIT);
    let db = Database::open(config).unwrap();
    let url = serve(&db);
    let mut room = Room::default();
    post(&url, room.founding("")).expect("the founding events are written");
    let warm_up = room.event(
        "warm-up",
        "m.room.message",
        ALICE,
        None,
        json!({"msgtype": "m.text", "body": "warm-up"}),
    );
    // A message beside the warm-up one, on the same prev event: the reads its
    // context needs (room version, prev event, the state after it) are cached
    // by the warm-up write, so the write's first wait for a connection is the
    // persistence itself, behind the queue.
    let mut message = room.event(
        "hello",
        "m.room.message",
        ALICE,
        None,
        json!({"msgtype": "m.text", "body": "hello"}),
    );
    message["prev_events"] = warm_up["prev_events"].clone();
    message["depth"] = warm_up["depth"].clone();
    post(&url, vec![warm_up]).expect("a first message is written");

    let (release, holder) = hold_the_connection(&db);
    let answer = ureq::post(&format!(
        "{url}/_hs/v1/rooms/{}/events",
        e2e_tests::encode(e2e_tests::ROOM)
    ))
    .set("Authorization", &format!("Bearer {}", e2e_tests::TOKEN))
    .send_json(json!({ "events": [message.clone()] }));
    drop(release);
    holder.join().unwrap();
    match answer {
        Err(ureq::Error::Status(503, answer)) => {
            assert_eq!(
                answer.header("Retry-After"),
                Some(http_api::RETRY_AFTER_SECONDS.to_string().as_str())
            );
            let body: serde_json::Value = answer.into_json().unwrap();
            assert_eq!(body["errcode"], "M_UNKNOWN", "{body}");
            let error = body["error"].as_str().unwrap();
            assert!(
                error.contains("persisting 1 events in"),
                "the wait was the persistence's, behind the queue: {error}"
            );
        }
        other => panic!("a write without a connection: expected 503, got {other:?}"),
    }

    // Nothing of it was stored, and with the connection back the same write
    // goes through.
    let written = post(&url, vec![message]).expect("the write succeeds once the pool has room");
    assert_eq!(
        written["event_ids"],
        json!(["$hello:example.com"]),
        "{written}"
    );
}

storage_core::engine_tests!(a_write_that_times_out_on_the_pool_answers_503);
