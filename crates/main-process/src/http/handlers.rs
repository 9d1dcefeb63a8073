//! The endpoints: state reads, event writes (posted PDUs, and events with
//! contexts from workers), the stream position, and metrics.

use super::errors::{bad_body, ApiError};
use super::{blocking, ApiState};
use crate::write_path::{ContextedEvent, WriteOutcome};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use storage_core::metrics;

pub(super) async fn metrics_text() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::global().render_prometheus(),
    )
}

#[derive(serde::Deserialize)]
pub(super) struct AtQuery {
    at: Option<String>,
}

pub(super) async fn room_state(
    State(state): State<ApiState>,
    Path(room_id): Path<String>,
    Query(q): Query<AtQuery>,
) -> Result<Response, ApiError> {
    let body = blocking("GET", move || {
        Ok(crate::state_cmd::state_json(
            &state.state,
            &room_id,
            q.at.as_deref(),
        )?)
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

pub(super) async fn stream_position(State(state): State<ApiState>) -> Json<Value> {
    Json(json!({"events": (state.position)()}))
}

pub(super) async fn post_events(
    State(state): State<ApiState>,
    Path(room_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<WriteOutcome>, ApiError> {
    let body: Value =
        serde_json::from_slice(&body).map_err(|e| bad_body(&format!("body is not JSON: {e}")))?;
    let events = body
        .get("events")
        .and_then(Value::as_array)
        .ok_or_else(|| bad_body("body must be {\"events\": [PDU, ...]}"))?;
    let pdus: Vec<String> = events.iter().map(Value::to_string).collect();
    blocking("POST", move || {
        let outcome = state.writer.write(&room_id, pdus)?;
        log_written(&room_id, &outcome);
        Ok(Json(outcome))
    })
    .await
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
    State(state): State<ApiState>,
    Path(room_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<WriteOutcome>, ApiError> {
    let body: ContextedBody =
        serde_json::from_slice(&body).map_err(|e| bad_body(&format!("malformed body: {e}")))?;
    blocking("POST", move || {
        let outcome = state.writer.write_contexted(&room_id, body.events)?;
        log_written(&room_id, &outcome);
        Ok(Json(outcome))
    })
    .await
}
