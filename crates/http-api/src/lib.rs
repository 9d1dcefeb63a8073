//! The HTTP API of `hs-main serve` and `hs-worker` (docs/http.md): the
//! same read API on both, writes through whichever [`EventWriter`] the process
//! has. axum on tokio; every storage call runs on a blocking thread under a log
//! context of its own request.
//!
//! `access` logs one line per request and times it for `/metrics`,
//! `handlers` answers the endpoints, `guards` runs before them (the token rule,
//! the body limit, unknown paths), `errors` turns every failure into the
//! contract's `{"errcode", "error"}` answer, `server` serves connections
//! within limits (timeouts, a connection cap), `parse_errors` gives hyper's
//! own answers to unparsable requests the same format (and their access
//! line). `settings` is the configuration both binaries read (file, flags,
//! environment); it lives here because this is the crate both binaries
//! share, as does `build.rs`'s [`BUILD_REVISION`], and the memory allocator
//! (`allocator`).

mod access;
mod allocator;
mod errors;
mod guards;
mod handlers;
mod parse_errors;
mod server;
pub mod settings;
pub mod state_json;
pub mod wire;

use errors::json_errors;
use guards::{refuse_announced_oversize, require_token, unknown_path};
use handlers::{
    health, metrics_text, post_contexted, post_events, refuse_write, room_state, stream_position,
};

pub use errors::{ApiError, RETRY_AFTER_SECONDS};
pub use guards::BODY_LIMIT;
pub use server::{connection_limit, Limits, HEADER_READ_TIMEOUT, MAX_CONNECTIONS};

use crate::wire::{ContextedEvent, WriteOutcome};
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use storage_core::{Error, LogContext};
use storage_state::StateStore;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;

/// The git revision this build was made from (`build.rs`), or `unknown`.
pub const BUILD_REVISION: &str = env!("HS_BUILD_REVISION");

/// The longest a request may take, body included, before it is answered 503:
/// past it a client is better off retrying than waiting (a write that was
/// still running may have committed; stored events are skipped on retry).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request waits for a database connection before it is answered
/// 503 (the database is down, or every connection is busy): well under
/// [`REQUEST_TIMEOUT`], so that the answer says why.
pub const DATABASE_WAIT: Duration = Duration::from_secs(5);

/// A part of the process that `/_hs/v1/health` checks, by name: `Ok`, or why
/// it is unhealthy. Runs on a blocking thread; must answer within seconds.
pub type HealthCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

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
    /// What `/_hs/v1/health` checks (the database; a worker's replication).
    pub health: Vec<(&'static str, HealthCheck)>,
    /// Serve reads only: every write endpoint answers 405.
    pub read_only: bool,
}

impl ApiState {
    /// The check of `db` that `/_hs/v1/health` runs: it answers a trivial
    /// statement within [`DATABASE_WAIT`].
    pub fn database_check(db: storage_core::Database) -> (&'static str, HealthCheck) {
        (
            "database",
            Arc::new(move || {
                db.check_reachable(DATABASE_WAIT)
                    .map_err(|e| format!("unreachable: {e}"))
            }),
        )
    }
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("position", &(self.position)())
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// Runs `f` on a blocking thread under the request's log context (the one
/// its access line names), or a fresh one outside a request.
async fn blocking<T: Send + 'static>(
    kind: &'static str,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let ctx = access::request_context().unwrap_or_else(|| LogContext::request(kind));
    tokio::task::spawn_blocking(move || ctx.scope(f))
        .await
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            errcode: "M_UNKNOWN",
            error: format!("request task failed: {e}"),
        })?
}

/// The router: health and metrics open, everything else under the token rule;
/// in read-only mode the write endpoints answer 405.
pub fn router(state: ApiState) -> Router {
    // Shared, not copied: axum clones the state for every request (and its
    // token, health checks and stores with it).
    let state = Arc::new(state);
    let (events, contexted) = if state.read_only {
        (post(refuse_write), post(refuse_write))
    } else {
        (post(post_events), post(post_contexted))
    };
    // Each group of layers is one layer (a `ServiceBuilder`, its first layer
    // outermost): every `layer` call boxes the routes again, and a middleware
    // that clones its inner service for each request (`from_fn`,
    // `map_response`) then cloned box after box (58 allocations a write).
    let protected = Router::new()
        .route("/_hs/v1/rooms/{room_id}/state", get(room_state))
        .route("/_hs/v1/rooms/{room_id}/events", events)
        .route("/_hs/v1/stream/position", get(stream_position))
        .route("/_hs/v1/internal/rooms/{room_id}/events", contexted)
        // The token before anything else.
        .route_layer(
            ServiceBuilder::new()
                .layer(middleware::from_fn_with_state(state.clone(), require_token))
                .layer(middleware::from_fn(refuse_announced_oversize)),
        );
    Router::new()
        .route("/_hs/v1/health", get(health))
        .route("/metrics", get(metrics_text))
        .merge(protected)
        .fallback(unknown_path)
        .layer(
            ServiceBuilder::new()
                // Outermost: the request id is made (or kept) before and
                // echoed after; every answer below, errors and timeouts
                // included, gets its access line and its latency.
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(middleware::from_fn(access::access_log))
                .layer(DefaultBodyLimit::max(BODY_LIMIT))
                .layer(middleware::map_response(json_errors))
                // tower-http's bound on the whole request (body included);
                // its bare 503 gets the error format and Retry-After from
                // `json_errors`.
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::SERVICE_UNAVAILABLE,
                    REQUEST_TIMEOUT,
                )),
        )
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

/// Serves `router` on `addr` until Ctrl-C or SIGTERM, within the limits of
/// `server` (header-read and idle timeouts, a connection cap).
pub fn serve(addr: SocketAddr, router: Router, limits: Limits) -> Result<(), Error> {
    // The runtime's threads log under the process's context ("serve", or the
    // worker's name); each request's storage work under a context of its own.
    let process = LogContext::current().unwrap_or_else(|| LogContext::new("http"));
    // One thread runs every connection's async part (reading, routing,
    // answering: little work a request); each request's storage work runs on
    // a blocking thread (`blocking`). With the multi-threaded scheduler each
    // hand-off between the two also woke the other, idle, worker thread to
    // look for work: 7.5 context switches a single-event write, 4.4 now.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .on_thread_start(move || process.set_for_thread())
        .enable_all()
        .build()
        .map_err(Error::from)?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::from(e).context(format!("listening on {addr}")))?;
        // The address bound, which names the port when 0 asked for any.
        let bound = listener.local_addr().unwrap_or(addr);
        log::info!("listening on http://{bound}");
        server::serve_until(listener, router, limits, shutdown_signal()).await?;
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

#[cfg(test)]
mod build_tests {
    /// Built in a git checkout (this repository), the revision is one of its
    /// commits, not `unknown`. (Not necessarily HEAD: a commit made while
    /// the tests run moves HEAD past the build.)
    #[test]
    fn the_build_revision_is_a_commit_of_the_checkout() {
        assert_ne!(super::BUILD_REVISION, "unknown");
        let commit = std::process::Command::new("git")
            .args(["rev-parse", "--verify", "--quiet"])
            .arg(format!("{}^{{commit}}", super::BUILD_REVISION))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("running git");
        assert!(
            commit.status.success(),
            "{} is not a commit of this checkout",
            super::BUILD_REVISION
        );
    }
}
