//! The HTTP API of `hs-main serve` and `hs-worker` (shared/design/HTTP.md): the
//! same read API on both, writes through whichever [`EventWriter`] the process
//! has. axum on tokio; every storage call runs on a blocking thread under a log
//! context of its own request.
//!
//! `handlers` answers the endpoints, `guards` runs before them (the token rule,
//! the body limit, unknown paths), `errors` turns every failure into the
//! contract's `{"errcode", "error"}` answer.

mod errors;
mod guards;
mod handlers;

use errors::json_errors;
use guards::{refuse_announced_oversize, require_token, unknown_path};
use handlers::{metrics_text, post_contexted, post_events, room_state, stream_position};

pub use errors::ApiError;
pub use guards::BODY_LIMIT;

use crate::write_path::{ContextedEvent, WriteOutcome};
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use storage_core::{Error, LogContext};
use storage_state::StateStore;

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
