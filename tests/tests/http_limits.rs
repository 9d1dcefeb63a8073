//! The HTTP API under faults and abuse: requests hyper cannot parse answered
//! in the error format; idle connections closed and capped so that they
//! cannot starve other clients; and, while PostgreSQL is unreachable, 503
//! with Retry-After, a health check that says so (the database on the main
//! process, the database and replication on a worker), and recovery after.

use e2e_tests::{
    assert_all_stored, encode, founded_room, free_port, id_of, main_process, message, post, start,
    PgProxy, Process, ROOM, TOKEN,
};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use storage_core::testing::TestDb;

fn serve(db_url: &str, port: u16, extra: &[&str]) -> Process {
    let mut args: Vec<String> = vec![
        "--database".into(),
        db_url.into(),
        "serve".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    start("hs-main", &args, port)
}

/// Sends `request` as it is and reads the whole answer: (status, headers, body).
fn raw(url: &str, request: &[u8]) -> (u16, String, String) {
    let mut stream = TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // The server may answer and close before it has read everything.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer: {answer:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

fn errcode(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    assert!(v["error"].is_string(), "{body}");
    v["errcode"].as_str().unwrap().to_owned()
}

#[test]
fn unparsable_requests_are_answered_in_the_error_format() {
    let db = TestDb::sqlite();
    let main = serve(db.url(), free_port(), &[]);
    let long_uri = format!(
        "GET /_hs/v1/rooms/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(70_000)
    );
    let mut answered = Vec::new();
    let (status, head, body) = raw(&main.url, long_uri.as_bytes());
    assert_eq!((status, errcode(&body).as_str()), (414, "M_TOO_LARGE"));
    answered.push((status, head, "GET /_hs/v1/rooms/aaaa"));
    let big_headers = format!(
        "GET /_hs/v1/health HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..2000)
            .map(|i| format!("X-Filler-{i}: {}\r\n", "b".repeat(400)))
            .collect::<String>()
    );
    let (status, head, body) = raw(&main.url, big_headers.as_bytes());
    assert_eq!((status, errcode(&body).as_str()), (431, "M_TOO_LARGE"));
    answered.push((status, head, "GET /_hs/v1/health 431 "));
    let (status, head, body) = raw(&main.url, b"NOT HTTP AT ALL\r\n\r\n");
    assert_eq!((status, errcode(&body).as_str()), (400, "M_UNKNOWN"));
    answered.push((status, head, "NOT HTTP 400 "));
    let (status, head, body) = raw(&main.url, b"G(T /_hs/v1/health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((status, errcode(&body).as_str()), (400, "M_UNKNOWN"));
    answered.push((status, head, "G(T /_hs/v1/health 400 "));
    // Every one of them has its access line, with the request id its answer echoes.
    let log = main.log_text();
    for (status, head, start) in answered {
        let id = head
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap_or_else(|| panic!("{status}: no request id in {head}"));
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("http_api::access: ") && l.contains(id))
            .collect();
        assert_eq!(lines.len(), 1, "one access line for the {status}: {log}");
        let message = lines[0].split_once("http_api::access: ").unwrap().1;
        assert!(message.starts_with(start), "{status}: {message}");
        assert!(message.contains(&format!(" {status} ")), "{message}");
    }
    // The server is still there for everyone else.
    let health: Value = ureq::get(&format!("{}/_hs/v1/health", main.url))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(health["ok"], true);
}

#[test]
fn idle_connections_are_closed_and_capped() {
    let db = TestDb::sqlite();
    let main = serve(
        db.url(),
        free_port(),
        &["--max-connections", "8", "--header-timeout", "1"],
    );
    // Far more idle connections than the cap: without the header timeout
    // they would hold every slot for ever.
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(main.url.trim_start_matches("http://")).unwrap())
        .collect();
    let started = Instant::now();
    let health = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
        .get(&format!("{}/_hs/v1/health", main.url))
        .call()
        .expect("a new client is served once idle connections time out");
    assert_eq!(health.status(), 200);
    // An idle connection is closed by the server (read returns end of file),
    // not left open.
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 16];
    match first.read(&mut buf) {
        Ok(0) => {}
        other => panic!("the idle connection was not closed: {other:?}"),
    }
    eprintln!("served after {:?}", started.elapsed());
    assert!(
        main.log_text()
            .contains("at most 8 connections; 1 s to send headers or between requests"),
        "{}",
        main.log_text()
    );
}

/// Every answer while the database is down: 503 with Retry-After and the
/// error format.
fn assert_unavailable(url: &str, path: &str) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    match agent
        .get(&format!("{url}{path}"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call()
    {
        Err(ureq::Error::Status(503, answer)) => {
            assert_eq!(answer.header("Retry-After"), Some("5"), "{path}");
            let body = answer.into_string().unwrap();
            errcode(&body);
        }
        other => panic!("{url}{path}: expected 503, got {other:?}"),
    }
}

fn health(url: &str) -> (u16, Value) {
    match ureq::get(&format!("{url}/_hs/v1/health")).call() {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{url}: {e}"),
    }
}

/// Polls `url`'s health until `done` holds, for at most 60 s.
fn wait_for_health(url: &str, what: &str, done: impl Fn(u16, &Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = health(url);
        if done(code, &body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url}: {what}; last {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_database_outage_is_503_and_unhealthy_until_it_ends() {
    let Some(db) = TestDb::postgres() else {
        return;
    };
    let mut proxy = PgProxy::start(&db);
    let url = proxy.url(&db);
    let main = serve(&url, free_port(), &[]);
    let worker = {
        let port = free_port();
        let args: Vec<String> = vec![
            "--database".into(),
            url.clone(),
            "--main".into(),
            main.url.clone(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--name".into(),
            "w1".into(),
        ];
        start("hs-worker", &args, port)
    };
    let state_path = format!("/_hs/v1/rooms/{}/state", encode(ROOM));
    for p in [&main, &worker] {
        let (code, body) = health(&p.url);
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["database"], "ok");
    }
    assert_eq!(health(&worker.url).1["replication"], "ok");

    proxy.cut();
    for p in [&main, &worker] {
        assert_unavailable(&p.url, &state_path);
        assert_unavailable(&p.url, "/_hs/v1/health");
        let (_, body) = health(&p.url);
        assert_eq!(
            (body["ok"].clone(), body["database"].clone()),
            (false.into(), "unhealthy".into())
        );
    }
    wait_for_health(&worker.url, "replication unhealthy", |_, b| {
        b["replication"] == "unhealthy"
    });

    proxy.restore();
    for p in [&main, &worker] {
        wait_for_health(&p.url, "healthy again", |code, b| {
            code == 200 && b["ok"] == true
        });
        let answer = ureq::get(&format!("{}{state_path}", p.url))
            .set("Authorization", &format!("Bearer {TOKEN}"))
            .call();
        // The room does not exist: a 404, from a database that answers again.
        assert!(
            matches!(answer, Err(ureq::Error::Status(404, _))),
            "{answer:?}"
        );
    }
}

/// A write that waits longer than the request timeout (an operator's
/// `LOCK TABLE events IN ACCESS EXCLUSIVE MODE`, held past it) is answered 503
/// "no answer within 30 s" while the lock is still held; once the lock goes,
/// posting it again is answered 200 and the event is stored. Takes the timeout's 30 s. (With each connection's storage work
/// run on its own runtime's thread, as c6a47d2 did, the timer could not fire:
/// no answer came while the lock was held.)
#[test]
fn postgres_a_write_held_past_the_request_timeout_is_answered_503() {
    let Some(db) = TestDb::postgres() else { return };
    let server = main_process(&db, free_port());
    let (mut room, _) = founded_room(&server.url);
    let mut lock = db.raw_connection();
    lock.batch_execute("BEGIN; LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let event = message(&mut room, "held");
    let (answered, answer) = std::sync::mpsc::channel();
    {
        let (url, event) = (server.url.clone(), event.clone());
        std::thread::spawn(move || answered.send(post(&url, vec![event])));
    }
    // Bounded, so that a server that never answers fails the test.
    let first = answer
        .recv_timeout(Duration::from_secs(90))
        .expect("no answer while the lock was held");
    let err = first.expect_err("answered 200 while the lock was held");
    assert!(
        err.starts_with("503: ") && err.contains("no answer within 30 s"),
        "{err}"
    );
    lock.batch_execute("COMMIT").unwrap();
    // Posting it again is safe whether or not the first write landed yet.
    post(&server.url, vec![event.clone()]).unwrap();
    assert_all_stored(db.url(), &[id_of(&event)]);
}
