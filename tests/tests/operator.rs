//! What an operator's tooling reads from a running server: one access-log
//! line per request (a GET and a POST alike) with the request id the answer
//! echoes, JSON log lines that parse, and `/metrics` that a Prometheus text
//! parser reads whole, every family with its HELP and TYPE, the request
//! latency histogram growing with requests.

use e2e_tests::{
    encode, founded_room, free_port, main_process_with, message, post, Process, ROOM, TOKEN,
};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use storage_core::testing::TestDb;

storage_core::engine_tests!(
    every_request_logs_one_access_line_as_json,
    metrics_parse_with_help_and_type_and_histograms_grow
);

/// `hs-main serve` on `db` with `extra` arguments before the command.
fn serve(db: &TestDb, extra: &[&str]) -> Process {
    main_process_with(db, free_port(), extra)
}

/// GETs `path` with the token; (the `x-request-id` answered, the body).
fn get_with_id(url: &str, path: &str) -> (String, String) {
    let answer = ureq::get(&format!("{url}{path}"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let id = answer.header("x-request-id").unwrap_or_default().to_owned();
    (id, answer.into_string().unwrap())
}

/// The process's log lines so far, each parsed as JSON.
fn json_lines(process: &Process) -> Vec<Value> {
    let text = process.log_text();
    text.lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"))
        })
        .collect()
}

fn every_request_logs_one_access_line_as_json(db: &TestDb) {
    let server = serve(db, &["--log-format", "json"]);
    let (mut room, _) = founded_room(&server.url);
    post(&server.url, vec![message(&mut room, "access-log-post")]).unwrap();
    let state_path = format!("/_hs/v1/rooms/{}/state", encode(ROOM));
    let (request_id, body) = get_with_id(&server.url, &state_path);
    assert!(body.contains("m.room.topic"), "{body}");
    assert!(!request_id.is_empty(), "the answer carries x-request-id");
    // The line of a request is written before its answer is sent.
    let lines = json_lines(&server);
    let access: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "http_api::access")
        .collect();
    let gets: Vec<&&Value> = access
        .iter()
        .filter(|l| {
            let m = l["message"].as_str().unwrap();
            m.starts_with(&format!("GET {state_path} "))
        })
        .collect();
    assert_eq!(gets.len(), 1, "one line for the GET: {access:#?}");
    let get = gets[0]["message"].as_str().unwrap();
    assert!(get.contains(" 200 "), "{get}");
    assert!(get.contains(&format!("request_id={request_id}")), "{get}");
    assert!(get.contains(" bytes ") && get.contains(" ms "), "{get}");
    assert!(
        gets[0]["context"].as_str().unwrap().starts_with("GET-"),
        "the request's log context is a field: {}",
        gets[0]
    );
    let post_path = format!("/_hs/v1/rooms/{}/events", encode(ROOM));
    let posts = access
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("POST {post_path} 200 "))
        })
        .count();
    // The founding events were posted one at a time, then the topic.
    assert_eq!(
        posts,
        room_founding_len() + 1,
        "one line per POST: {access:#?}"
    );
    for l in &lines {
        for field in ["time", "level", "context", "target", "message"] {
            assert!(l.get(field).is_some(), "{field} missing: {l}");
        }
    }
}

/// How many events `founded_room` posts.
fn room_founding_len() -> usize {
    e2e_tests::Room::default().founding("").len()
}

/// The family of a sample: its name less a histogram's suffixes.
fn family_of<'a>(name: &'a str, histograms: &BTreeSet<String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if histograms.contains(base) {
                return base;
            }
        }
    }
    name
}

fn scrape(url: &str) -> (String, prometheus_parse::Scrape) {
    let text = ureq::get(&format!("{url}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("/metrics does not parse ({e}):\n{text}"));
    (text, scrape)
}

/// The cumulative counts of the latency histogram of the state route's
/// 200 answers, by bucket bound.
fn state_latency_buckets(scrape: &prometheus_parse::Scrape) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in &scrape.samples {
        if s.metric != "synapse_http_server_response_time_seconds"
            || s.labels.get("servlet") != Some("/_hs/v1/rooms/:room_id/state")
            || s.labels.get("code") != Some("200")
        {
            continue;
        }
        if let prometheus_parse::Value::Histogram(buckets) = &s.value {
            for b in buckets {
                out.insert(format!("{}", b.less_than), b.count);
            }
        }
    }
    out
}

fn metrics_parse_with_help_and_type_and_histograms_grow(db: &TestDb) {
    let server = serve(db, &[]);
    let (mut room, _) = founded_room(&server.url);
    post(&server.url, vec![message(&mut room, "metrics-post")]).unwrap();
    let state_path = format!("/_hs/v1/rooms/{}/state", encode(ROOM));
    get_with_id(&server.url, &state_path);
    let (text, before) = scrape(&server.url);

    let typed: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').unwrap();
            (name.to_owned(), kind.to_owned())
        })
        .collect();
    let histograms: BTreeSet<String> = typed
        .iter()
        .filter(|(_, kind)| *kind == "histogram")
        .map(|(name, _)| name.clone())
        .collect();
    let mut families = BTreeSet::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name = line.split(['{', ' ']).next().unwrap();
        families.insert(family_of(name, &histograms).to_owned());
    }
    let parsed: BTreeSet<&str> = before.samples.iter().map(|s| s.metric.as_str()).collect();
    for family in &families {
        assert!(
            parsed.contains(family.as_str()),
            "the parser read no sample of {family}:\n{text}"
        );
        assert!(
            typed.contains_key(family),
            "{family} has no # TYPE:\n{text}"
        );
        let help = before.docs.get(family);
        assert!(
            help.is_some_and(|h| !h.is_empty()),
            "{family} has no # HELP:\n{text}"
        );
    }
    for expected in [
        "synapse_storage_transaction_time",
        "synapse_storage_schedule_time",
        "synapse_http_server_response_time_seconds",
        "hs_persistence_batch_size",
        "synapse_util_caches_cache_hits",
        "synapse_util_caches_cache_size",
        "synapse_util_caches_cache_size_bytes",
        "hs_cache_entries",
        "hs_cache_bytes",
        "hs_build_info",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(families.contains(expected), "{expected} missing:\n{text}");
    }
    for histogram in [
        "synapse_storage_transaction_time",
        "synapse_http_server_response_time_seconds",
        "hs_persistence_batch_size",
    ] {
        assert_eq!(typed[histogram], "histogram", "{histogram}");
    }
    assert!(
        text.contains(r#"synapse_storage_transaction_time_bucket{desc="persist_events""#),
        "transaction time by description:\n{text}"
    );
    // Built in this git checkout: the revision is known.
    let build = text
        .lines()
        .find(|l| l.starts_with("hs_build_info{"))
        .unwrap();
    assert!(
        build.contains(r#"revision=""#) && !build.contains(r#"revision="unknown""#),
        "{build}"
    );
    // Sums of float seconds are written without the float's tail
    // (0.0006090409999999999): at most 12 significant digits.
    for line in text.lines().filter(|l| l.contains("_sum")) {
        let value = line.rsplit_once(' ').unwrap().1;
        let digits = value
            .trim_start_matches(['0', '.'])
            .chars()
            .filter(char::is_ascii_digit)
            .count();
        assert!(digits <= 12, "{line}");
    }

    let buckets_before = state_latency_buckets(&before);
    let inf_before = buckets_before.get("inf").copied().unwrap_or(0.0);
    assert!(
        inf_before >= 1.0,
        "the GET above is counted: {buckets_before:?} in {:#?}",
        before
            .samples
            .iter()
            .filter(|s| s.metric.contains("response_time"))
            .collect::<Vec<_>>()
    );
    for _ in 0..5 {
        get_with_id(&server.url, &state_path);
    }
    let (_, after) = scrape(&server.url);
    let buckets_after = state_latency_buckets(&after);
    assert_eq!(
        buckets_after.get("inf").copied().unwrap_or(0.0),
        inf_before + 5.0,
        "{buckets_before:?} -> {buckets_after:?}"
    );
    for (bound, count) in &buckets_before {
        assert!(
            buckets_after[bound] >= *count,
            "bucket {bound} went down: {buckets_before:?} -> {buckets_after:?}"
        );
    }
}
