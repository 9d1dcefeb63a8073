//! The HTTP API of `hs-main serve` and `hs-worker` (shared/design/HTTP.md): the
//! same read API on both, writes through whichever [`EventWriter`] the process
//! has. axum on tokio; every storage call runs on a blocking thread under a log
//! context of its own request.

use crate::cli::Failure;
use crate::write_path::{ContextedEvent, WriteOutcome};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use storage_core::{metrics, Error, ErrorKind, LogContext};
use storage_state::StateStore;
use subtle::ConstantTimeEq;

/// Writes events for the HTTP API: the main process persists them itself, a
/// worker computes their contexts and forwards them.
pub trait EventWriter: Send + Sync {
    /// `pdus` (federation JSON, all of `room_id`, in order).
    fn write(&self, room_id: &str, pdus: Vec<String>) -> Result<WriteOutcome, Error>;
    /// Events whose contexts another process computed (main process only).
    fn write_contexted(
        &self,
        _room_id: &str,
        _events: Vec<ContextedEvent>,
    ) -> Result<WriteOutcome, Error> {
        Err(Error::invalid_argument(
            "only the main process persists events",
        ))
    }
}

/// What the handlers need.
#[derive(Clone)]
pub struct ApiState {
    pub state: StateStore,
    pub writer: Arc<dyn EventWriter>,
    /// The highest stream position this process has applied.
    pub position: Arc<dyn Fn() -> i64 + Send + Sync>,
    /// `HS_API_TOKEN`, if set.
    pub token: Option<String>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("position", &(self.position)())
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

/// An error answer: `{"errcode": ..., "error": ...}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    errcode: &'static str,
    error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"errcode": self.errcode, "error": self.error})),
        )
            .into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, errcode) = match e.kind() {
            ErrorKind::NotFound(_) => (StatusCode::NOT_FOUND, "M_NOT_FOUND"),
            ErrorKind::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "M_BAD_JSON"),
            // Nothing wrong with the request: the database or the main process
            // cannot be reached right now; a client should retry.
            ErrorKind::Unavailable(_) | ErrorKind::Pool(_) | ErrorKind::Connection(_) => {
                log::error!("{e:?}");
                (StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN")
            }
            _ => {
                log::error!("{e:?}");
                (StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN")
            }
        };
        ApiError {
            status,
            errcode,
            error: e.to_string(),
        }
    }
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::NotFound(msg) => ApiError {
                status: StatusCode::NOT_FOUND,
                errcode: "M_NOT_FOUND",
                error: msg,
            },
            Failure::Error(e) => e.into(),
        }
    }
}

/// Runs `f` on a blocking thread under a fresh request context.
async fn blocking<T: Send + 'static>(
    kind: &'static str,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let ctx = LogContext::request(kind);
    tokio::task::spawn_blocking(move || ctx.scope(f))
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            errcode: "M_UNKNOWN",
            error: format!("request task failed: {e}"),
        })?
}

/// The router: health and metrics open, everything else under the token rule.
pub fn router(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/_hs/v1/rooms/{room_id}/state", get(room_state))
        .route("/_hs/v1/rooms/{room_id}/events", post(post_events))
        .route("/_hs/v1/stream/position", get(stream_position))
        .route(
            "/_hs/v1/internal/rooms/{room_id}/events",
            post(post_contexted),
        )
        // The last layer added runs first: the token before anything else.
        .route_layer(middleware::from_fn(refuse_announced_oversize))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route(
            "/_hs/v1/health",
            get(|| async { Json(json!({"ok": true})) }),
        )
        .route("/metrics", get(metrics_text))
        .merge(protected)
        .fallback(unknown_path)
        .layer(middleware::map_response(json_errors))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// The largest request body taken (a batch of events): 8 MiB.
pub const BODY_LIMIT: usize = 8 << 20;

/// Refuses a body whose announced length is over [`BODY_LIMIT`] before any of
/// it is read (the body-limit layer alone would wait for the bytes), so the
/// client learns at once and nothing is buffered.
async fn refuse_announced_oversize(request: Request, next: Next) -> Response {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > BODY_LIMIT as u64) {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    next.run(request).await
}

/// A path no route serves: under /_hs/v1/ the token rule still comes first, so
/// that a caller without the token learns nothing about which paths exist.
async fn unknown_path(State(state): State<ApiState>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    if path.starts_with("/_hs/v1/") && !token_matches(&state, &request) {
        return unauthorized();
    }
    ApiError {
        status: StatusCode::NOT_FOUND,
        errcode: "M_UNRECOGNIZED",
        error: format!("no endpoint {} {path}", request.method()),
    }
    .into_response()
}

/// Every error answer in the contract's format, including those axum makes
/// itself (a wrong method, a body over the limit, a malformed query): their
/// plain-text reason becomes the `error`.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let reason = status.canonical_reason().unwrap_or("error");
    let (errcode, error) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "M_TOO_LARGE",
            format!("request body over {} MiB", BODY_LIMIT >> 20),
        ),
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
            ("M_UNRECOGNIZED", reason.to_owned())
        }
        StatusCode::BAD_REQUEST => ("M_INVALID_PARAM", text),
        _ => (
            "M_UNKNOWN",
            if text.is_empty() {
                reason.to_owned()
            } else {
                text
            },
        ),
    };
    let mut answer = ApiError {
        status,
        errcode,
        error,
    }
    .into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        answer.headers_mut().insert(header::ALLOW, allow.clone());
    }
    answer
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if !token_matches(&state, &request) {
        return unauthorized();
    }
    next.run(request).await
}

/// Whether `request` carries the process's token (always, without one).
fn token_matches(state: &ApiState, request: &Request) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant time, so that the answer's timing does not reveal how much of a
    // guess was right.
    given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.as_bytes())))
}

fn unauthorized() -> Response {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        errcode: "M_UNKNOWN_TOKEN",
        error: "missing or wrong access token".into(),
    }
    .into_response()
}

async fn metrics_text() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::global().render_prometheus(),
    )
}

#[derive(serde::Deserialize)]
struct AtQuery {
    at: Option<String>,
}

async fn room_state(
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

async fn stream_position(State(state): State<ApiState>) -> Json<Value> {
    Json(json!({"events": (state.position)()}))
}

fn bad_body(msg: &str) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        errcode: "M_BAD_JSON",
        error: msg.to_owned(),
    }
}

async fn post_events(
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
struct ContextedBody {
    events: Vec<ContextedEvent>,
}

async fn post_contexted(
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

/// Without a token the API may only listen on a loopback address.
pub fn check_listen(addr: &SocketAddr, token: Option<&str>) -> Result<(), Error> {
    if token.is_none() && !addr.ip().is_loopback() {
        return Err(Error::invalid_argument(format!(
            "refusing to listen on {addr} without HS_API_TOKEN: set it, or listen on a loopback address"
        )));
    }
    Ok(())
}

/// Serves `router` on `addr` until Ctrl-C or SIGTERM.
pub fn serve(addr: SocketAddr, router: Router) -> Result<(), Error> {
    // The runtime's threads log under the process's context ("serve", or the
    // worker's name); each request's storage work under a context of its own.
    let process = LogContext::current().unwrap_or_else(|| LogContext::new("http"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .on_thread_start(move || process.set_for_thread())
        .enable_all()
        .build()
        .map_err(Error::from)?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::from(e).context(format!("listening on {addr}")))?;
        log::info!("listening on http://{addr}");
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(Error::from)?;
        log::info!("stopped: requests in flight were answered");
        Ok(())
    })
}

/// Ctrl-C or SIGTERM (what service managers send): stop accepting, let the
/// requests in flight finish (their events committed and answered), then return.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                log::warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops the server");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => log::info!("Ctrl-C: shutting down"),
        _ = terminate => log::info!("SIGTERM: shutting down"),
    }
}
