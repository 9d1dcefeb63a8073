//! The endpoints: state reads, event writes (posted PDUs, and events with
//! contexts from workers), the stream position, health and metrics.

use super::errors::{bad_body, ApiError};
use super::{blocking, ApiState};
use crate::wire::{ContextedEvent, WriteOutcome};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::sync::Arc;
use storage_core::metrics;
use storage_state::StateLookupError;

/// `{"ok": true, "database": "ok", ...}` while every check passes; otherwise
/// 503 with `"ok": false`, each check's verdict, and the error format's
/// `errcode` and `error` naming what is wrong. No token needed: it says
/// nothing about the data, and a check's detail stays in the log.
pub(super) async fn health(State(state): State<Arc<ApiState>>) -> Response {
    let checks = state.health.clone();
    let verdicts = blocking("GET", move || {
        Ok(checks
            .iter()
            .map(|(name, check)| (*name, check()))
            .collect::<Vec<_>>())
    })
    .await;
    let verdicts = match verdicts {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let mut body = serde_json::Map::new();
    let mut failed = Vec::new();
    for (name, verdict) in &verdicts {
        match verdict {
            Ok(()) => {
                body.insert((*name).to_owned(), json!("ok"));
            }
            Err(why) => {
                log::warn!("health: {name} {why}");
                body.insert((*name).to_owned(), json!("unhealthy"));
                failed.push(*name);
            }
        }
    }
    body.insert("ok".into(), json!(failed.is_empty()));
    if failed.is_empty() {
        return Json(Value::Object(body)).into_response();
    }
    body.insert("errcode".into(), json!("M_UNKNOWN"));
    body.insert(
        "error".into(),
        json!(format!("unhealthy: {}", failed.join(", "))),
    );
    (StatusCode::SERVICE_UNAVAILABLE, Json(Value::Object(body))).into_response()
}

/// A write endpoint of a read-only server.
pub(super) async fn refuse_write() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        errcode: "M_UNRECOGNIZED",
        error: "this server is read-only (hs-main serve --read-only): it persists nothing".into(),
    }
}

pub(super) async fn metrics_text() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::global().render_prometheus(),
    )
}

#[derive(serde::Deserialize)]
pub(super) struct AtQuery {
    at: Option<String>,
}

pub(super) async fn room_state(
    State(state): State<Arc<ApiState>>,
    Path(room_id): Path<String>,
    Query(q): Query<AtQuery>,
) -> Result<Response, ApiError> {
    storable_or_unknown(&room_id, StateLookupError::UnknownRoom)?;
    if let Some(at) = &q.at {
        storable_or_unknown(at, StateLookupError::UnknownEvent)?;
    }
    let body = blocking("GET", move || {
        if state.read_only {
            // Another process writes this database and nothing tells this
            // one: the current state is read afresh, and so is which group
            // holds the state after an event (a group never changes, but one
            // may be deleted and its id used again: Synapse on SQLite).
            match &q.at {
                None => state.state.invalidate_current_state(&room_id),
                Some(at) => {
                    state.state.reread_event_state_group(at)?;
                }
            }
        }
        Ok(crate::state_json::state_json(
            &state.state,
            &room_id,
            q.at.as_deref(),
        )?)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

pub(super) async fn stream_position(State(state): State<Arc<ApiState>>) -> Json<Value> {
    Json(json!({"events": (state.position)()}))
}

pub(super) async fn post_events(
    State(state): State<Arc<ApiState>>,
    Path(room_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<WriteOutcome>, ApiError> {
    storable_or_unknown(&room_id, StateLookupError::UnknownRoom)?;
    let pdus = posted_pdus(&body)?;
    blocking("POST", move || {
        let outcome = state.writer.write(&room_id, pdus)?;
        log_written(&room_id, &outcome);
        Ok(Json(outcome))
    })
    .await
}

/// A room or event id from a path or query, refused as unknown if it holds a
/// NUL: no stored id does (writes refuse them), and PostgreSQL cannot even be
/// asked for one (its text type has no NUL: the query failed as a database
/// error, a 500, where SQLite answered "unknown").
fn storable_or_unknown(id: &str, unknown: fn(String) -> StateLookupError) -> Result<(), ApiError> {
    if id.contains('\0') {
        return Err(unknown(id.to_owned()).into());
    }
    Ok(())
}

/// `{"events": [PDU, ...]}`: the PDUs' texts as posted, each parsed once,
/// later, by the writer (never into a `Value` here and written back out).
fn posted_pdus(body: &[u8]) -> Result<Vec<String>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow, default)]
        events: Option<Vec<&'a RawValue>>,
    }
    let shape = || bad_body("body must be {\"events\": [PDU, ...]}");
    // An array would be read as the struct's fields in order.
    let is_object = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    match serde_json::from_slice::<Body<'_>>(body) {
        Ok(Body {
            events: Some(events),
        }) if is_object => Ok(events.iter().map(|e| e.get().to_owned()).collect()),
        // Which answer a bad body gets is worth a second parse.
        _ => match serde_json::from_slice::<Value>(body) {
            Err(e) => Err(bad_body(&format!("body is not JSON: {e}"))),
            Ok(_) => Err(shape()),
        },
    }
}

/// One line per write: what an operator looks for when a client says its
/// events went missing.
fn log_written(room_id: &str, outcome: &WriteOutcome) {
    log::info!(
        "{} event(s) in {room_id} committed up to stream position {}{}",
        outcome.event_ids.len(),
        outcome.stream_ordering,
        if outcome.rejected.is_empty() {
            String::new()
        } else {
            format!(", {} rejected", outcome.rejected.len())
        }
    );
}

#[derive(serde::Deserialize)]
pub(super) struct ContextedBody {
    events: Vec<ContextedEvent>,
}

pub(super) async fn post_contexted(
    State(state): State<Arc<ApiState>>,
    Path(room_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<WriteOutcome>, ApiError> {
    storable_or_unknown(&room_id, StateLookupError::UnknownRoom)?;
    let body: ContextedBody =
        serde_json::from_slice(&body).map_err(|e| bad_body(&format!("malformed body: {e}")))?;
    blocking("POST", move || {
        let outcome = state.writer.write_contexted(&room_id, body.events)?;
        log_written(&room_id, &outcome);
        Ok(Json(outcome))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::posted_pdus;

    fn error_of(body: &str) -> String {
        posted_pdus(body.as_bytes()).unwrap_err().error
    }

    #[test]
    fn posted_pdus_are_the_texts_as_posted() {
        let body =
            r#" {"events": [{"type": "m.room.message", "n": 1.50}, {"a":"\u00e9"}], "other": 1}"#;
        assert_eq!(
            posted_pdus(body.as_bytes()).unwrap(),
            vec![
                r#"{"type": "m.room.message", "n": 1.50}"#.to_owned(),
                r#"{"a":"\u00e9"}"#.to_owned()
            ]
        );
        assert!(posted_pdus(br#"{"events": []}"#).unwrap().is_empty());
    }

    #[test]
    fn a_bad_body_is_named() {
        assert!(error_of("{\"events\": [").starts_with("body is not JSON: "));
        let shape = "body must be {\"events\": [PDU, ...]}";
        assert_eq!(error_of(r#"{"events": {}}"#), shape);
        assert_eq!(error_of(r#"{"events": null}"#), shape);
        assert_eq!(error_of(r#"{"event": []}"#), shape);
        // An array is not read as the object's fields in order.
        assert_eq!(error_of(r#"[[{"type": "x"}]]"#), shape);
        assert_eq!(error_of("5"), shape);
    }
}
