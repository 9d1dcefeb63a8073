//! What runs before the handlers: the token rule, the limit on announced
//! body sizes, and the answer for paths no route serves.

use super::errors::ApiError;
use super::ApiState;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The largest request body taken (a batch of events): 8 MiB.
pub const BODY_LIMIT: usize = 8 << 20;

/// Refuses a body whose announced length is over [`BODY_LIMIT`] before any of
/// it is read (the body-limit layer alone would wait for the bytes), so the
/// client learns at once and nothing is buffered.
pub(super) async fn refuse_announced_oversize(request: Request, next: Next) -> Response {
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
pub(super) async fn unknown_path(State(state): State<Arc<ApiState>>, request: Request) -> Response {
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

pub(super) async fn require_token(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    if !token_matches(&state, &request) {
        return unauthorized();
    }
    next.run(request).await
}

/// Whether `request` carries the process's token (always, without one).
pub(super) fn token_matches(state: &ApiState, request: &Request) -> bool {
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

pub(super) fn unauthorized() -> Response {
    ApiError {
        status: StatusCode::UNAUTHORIZED,
        errcode: "M_UNKNOWN_TOKEN",
        error: "missing or wrong access token".into(),
    }
    .into_response()
}
