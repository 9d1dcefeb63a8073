//! Every failure as the contract's answer: `{"errcode": ..., "error": ...}`
//! with a 4xx or 5xx status, including the answers axum makes itself.

use super::guards::BODY_LIMIT;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use storage_core::{Error, ErrorKind};
use storage_state::StateLookupError;

/// What a 503 answer asks the client to wait before retrying (`Retry-After`).
pub const RETRY_AFTER_SECONDS: u64 = 5;

/// An error answer: `{"errcode": ..., "error": ...}` with a status.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) errcode: &'static str,
    pub(super) error: String,
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
            // Nothing wrong with the request either: the database's disk is
            // full, the write left nothing, and works once there is room. An
            // operator's problem, named in the log (its context says which
            // write) without a backtrace: where it arose is known.
            ErrorKind::OutOfSpace(_) => {
                log::error!("{e}");
                (
                    StatusCode::INSUFFICIENT_STORAGE,
                    "M_RESOURCE_LIMIT_EXCEEDED",
                )
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

/// The state lookups' "does not exist" answers 404 (unknown room, unknown
/// event, event in another room); a storage failure keeps its own status.
impl From<StateLookupError> for ApiError {
    fn from(e: StateLookupError) -> Self {
        match e {
            StateLookupError::Storage(e) => e.into(),
            not_found => ApiError {
                status: StatusCode::NOT_FOUND,
                errcode: "M_NOT_FOUND",
                error: not_found.to_string(),
            },
        }
    }
}

pub(super) fn bad_body(msg: &str) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        errcode: "M_BAD_JSON",
        error: msg.to_owned(),
    }
}

/// Every error answer in the contract's format, including those axum makes
/// itself (a wrong method, a body over the limit, a malformed query): their
/// plain-text reason becomes the `error`.
pub(super) async fn json_errors(response: Response) -> Response {
    let mut response = json_body(response).await;
    // Every 503 says when to come back: the database or the main process is
    // expected back, or the request ran out of time.
    if response.status() == StatusCode::SERVICE_UNAVAILABLE
        && !response.headers().contains_key(header::RETRY_AFTER)
    {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            header::HeaderValue::from(RETRY_AFTER_SECONDS),
        );
    }
    response
}

async fn json_body(response: Response) -> Response {
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
        // Only the request timeout answers 503 without a body.
        StatusCode::SERVICE_UNAVAILABLE if text.is_empty() => (
            "M_UNKNOWN",
            format!(
                "no answer within {} s; try again later",
                super::REQUEST_TIMEOUT.as_secs()
            ),
        ),
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
