//! The access log and the request metrics: one line per answered request
//! (method, path with its ids, status, body bytes, duration, request id) at
//! info under the target `http_api::access`, and the request's time in the
//! latency histogram by route and status.
//!
//! The request id comes from tower-http's request-id layers (a client's or
//! proxy's `x-request-id` is kept, otherwise a UUID is made) and is echoed in
//! the answer's `x-request-id` header. The request's log context
//! (`GET-17`) is made here and handed to the handler's storage work through a
//! task-local, so the access line and every line the request caused share it.

use axum::body::HttpBody;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use std::time::{Duration, Instant};
use storage_core::{metrics, LogContext};

tokio::task_local! {
    static REQUEST_CONTEXT: LogContext;
}

/// The log context of the request the calling task is answering, if any.
pub(crate) fn request_context() -> Option<LogContext> {
    REQUEST_CONTEXT.try_with(LogContext::clone).ok()
}

/// The route label of a request: the pattern it matched, so that the
/// metric's series stay few whatever the ids, with its parameters written
/// `:room_id` rather than `{room_id}` (braces in a label value are valid,
/// but trip simple text-format parsers).
fn route(request: &Request) -> String {
    request.extensions().get::<MatchedPath>().map_or_else(
        || "unmatched".to_owned(),
        |p| p.as_str().replace('{', ":").replace('}', ""),
    )
}

/// Logs the access line and records the latency of each request.
pub(crate) async fn access_log(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = request.method().clone();
    let target = request.uri().path_and_query().map_or_else(
        || request.uri().path().to_owned(),
        |p| p.as_str().to_owned(),
    );
    let route = route(&request);
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let context = LogContext::request(method.as_str());
    let response = REQUEST_CONTEXT
        .scope(context.clone(), next.run(request))
        .await;
    let elapsed = start.elapsed();
    let status = response.status();
    let bytes = response
        .body()
        .size_hint()
        .exact()
        .map_or_else(|| "-".to_owned(), |n| n.to_string());
    metrics::global().record_request(method.as_str(), &route, status.as_u16(), elapsed);
    let line = AccessLine {
        method: method.as_str(),
        target: &target,
        status: status.as_u16(),
        bytes: &bytes,
        elapsed,
        request_id: &request_id,
    };
    context.scope(|| line.log());
    response
}

/// One request's access line; also written for the requests hyper refuses
/// before they reach the router (`parse_errors`).
pub(crate) struct AccessLine<'a> {
    pub method: &'a str,
    /// The path and query as the client sent them.
    pub target: &'a str,
    pub status: u16,
    /// The body's length, or `-` when not known before it is streamed.
    pub bytes: &'a str,
    pub elapsed: Duration,
    pub request_id: &'a str,
}

impl AccessLine<'_> {
    /// Logs the line at info under the target `http_api::access`, in the
    /// caller's log context.
    pub fn log(&self) {
        log::info!(
            target: "http_api::access",
            "{} {} {} {} bytes {:.3} ms request_id={}",
            self.method,
            self.target,
            self.status,
            self.bytes,
            self.elapsed.as_secs_f64() * 1000.0,
            self.request_id
        )
    }
}
