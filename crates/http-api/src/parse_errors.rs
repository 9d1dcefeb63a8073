//! hyper's own answers to requests it cannot parse, in the contract's error
//! format.
//!
//! A request line or headers that hyper refuses (a URI over 64 KiB: 414;
//! headers over its buffer: 431; malformed: 400) never reach the router: hyper
//! writes a bare head with `content-length: 0` and closes the connection, and
//! offers no hook to shape that answer. This wrapper of the connection's I/O
//! recognises exactly such a head, written whole (the server writes heads in
//! one piece, see `server.rs`) with no body, and sends the same status with a
//! `{"errcode", "error"}` body instead. Every answer the router makes has a
//! body or is not one of these statuses, so nothing else is touched.
//!
//! Such a request never reaches the access log's middleware either, so the
//! wrapper writes its access line (and its latency, under the route
//! `unparsed`): it keeps the time the request's first bytes came and its
//! first [`HEAD_KEPT`] bytes, for the method and path the line names (as far
//! as they can be read), and the answer echoes a request id as the router's
//! do.

use crate::access::AccessLine;
use hyper::rt::{Read, ReadBuf, ReadBufCursor, Write};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;
use storage_core::{metrics, LogContext};
use tower_http::request_id::{MakeRequestId, MakeRequestUuid};

/// Bytes of a request kept for its access line, should hyper refuse it.
const HEAD_KEPT: usize = 512;

/// The connection's I/O, with hyper's bare parse-error answers given a body
/// and an access line.
#[derive(Debug)]
pub struct JsonParseErrors<T> {
    inner: T,
    /// The answer being written instead of hyper's, and how much of it is out.
    pending: Vec<u8>,
    written: usize,
    /// The length of hyper's head, reported written once ours is.
    replaced: usize,
    /// The request being read: when its first bytes came, and those bytes
    /// (up to [`HEAD_KEPT`]). `None` until a request's first bytes, and again
    /// once an answer is written.
    request: Option<(Instant, Vec<u8>)>,
}

impl<T> JsonParseErrors<T> {
    pub fn new(inner: T) -> Self {
        JsonParseErrors {
            inner,
            pending: Vec::new(),
            written: 0,
            replaced: 0,
            request: None,
        }
    }
}

/// What is sent instead of one of hyper's bare parse-error answers.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// The length of its body.
    body: usize,
    /// Head and body.
    bytes: Vec<u8>,
}

/// The answer to send instead of `head`, if `head` is one of hyper's bare
/// parse-error answers, with the request id `request_id` makes (asked for
/// only then: every other write passes through untouched).
fn json_answer(head: &[u8], request_id: impl FnOnce() -> String) -> Option<Answer> {
    let text = std::str::from_utf8(head).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    let (status, errcode, error) = match rest.get(..4)? {
        "414 " => (414, "M_TOO_LARGE", "request URI too long"),
        "431 " => (431, "M_TOO_LARGE", "request headers too large"),
        "400 " => (400, "M_UNKNOWN", "malformed HTTP request"),
        "505 " => (505, "M_UNKNOWN", "HTTP version not supported"),
        _ => return None,
    };
    let head = text.strip_suffix("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let headers: Vec<&str> = lines.collect();
    // No body: hyper's own answers, never the router's (which have one).
    if headers.iter().any(|h| h.contains("\r\n\r\n")) {
        return None;
    }
    if !headers
        .iter()
        .any(|h| h.eq_ignore_ascii_case("content-length: 0"))
    {
        return None;
    }
    let body = serde_json::json!({"errcode": errcode, "error": error}).to_string();
    let mut answer = format!("{status_line}\r\n");
    for h in headers
        .iter()
        .filter(|h| !h.to_ascii_lowercase().starts_with("content-length:"))
    {
        answer.push_str(h);
        answer.push_str("\r\n");
    }
    answer.push_str(&format!(
        "x-request-id: {}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        request_id(),
        body.len()
    ));
    Some(Answer {
        status,
        body: body.len(),
        bytes: answer.into_bytes(),
    })
}

/// A request id as the router's layers make them (a UUID).
fn new_request_id() -> String {
    MakeRequestUuid
        .make_request_id(&axum::http::Request::new(()))
        .and_then(|id| id.header_value().to_str().ok().map(str::to_owned))
        .unwrap_or_else(|| "-".to_owned())
}

/// The method and target of a request's first line, as far as `head` holds
/// them: printable ASCII only (anything else escaped), the target cut at 200
/// characters; `-` for what is missing.
fn request_line(head: &[u8]) -> (String, String) {
    let line = head
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or(&[]);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let mut printable = |limit: usize| {
        let part = parts.next().filter(|p| !p.is_empty());
        part.map_or_else(
            || "-".to_owned(),
            |p| {
                let text: String = p.escape_ascii().to_string();
                match text.char_indices().nth(limit) {
                    Some((cut, _)) => format!("{}...", &text[..cut]),
                    None => text,
                }
            },
        )
    };
    let method = printable(20);
    (method, printable(200))
}

impl<T> JsonParseErrors<T> {
    /// Logs the access line of the request hyper refused with `status`,
    /// answered with `bytes` bytes of body.
    fn log_refused(&mut self, status: u16, bytes: usize, request_id: &str) {
        let (started, head) = self
            .request
            .take()
            .unwrap_or_else(|| (Instant::now(), Vec::new()));
        let (method, target) = request_line(&head);
        let elapsed = started.elapsed();
        metrics::global().record_request("-", "unparsed", status, elapsed);
        let line = AccessLine {
            method: &method,
            target: &target,
            status,
            bytes: &bytes.to_string(),
            elapsed,
            request_id,
        };
        LogContext::request("unparsed").scope(|| line.log());
    }
}

impl<T: Read + Unpin> Read for JsonParseErrors<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let kept = this.request.as_ref().map_or(0, |(_, head)| head.len());
        if kept >= HEAD_KEPT {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        // The start of a request: read through a buffer of ours to keep its
        // first bytes, then hand them on.
        let mut raw = [MaybeUninit::<u8>::uninit(); 8192];
        let len = buf.remaining().min(raw.len());
        let mut read = ReadBuf::uninit(&mut raw[..len]);
        ready!(Pin::new(&mut this.inner).poll_read(cx, read.unfilled()))?;
        let bytes = read.filled();
        if !bytes.is_empty() {
            let (_, head) = this
                .request
                .get_or_insert_with(|| (Instant::now(), Vec::new()));
            head.extend_from_slice(&bytes[..bytes.len().min(HEAD_KEPT - kept)]);
            buf.put_slice(bytes);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: Write + Unpin> Write for JsonParseErrors<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            let mut request_id = String::new();
            match json_answer(buf, || {
                request_id = new_request_id();
                request_id.clone()
            }) {
                Some(answer) => {
                    this.log_refused(answer.status, answer.body, &request_id);
                    this.pending = answer.bytes;
                    this.written = 0;
                    this.replaced = buf.len();
                }
                None => {
                    // An answer of the router's: the next bytes read begin
                    // another request.
                    this.request = None;
                    return Pin::new(&mut this.inner).poll_write(cx, buf);
                }
            }
        }
        while this.written < this.pending.len() {
            let n =
                ready!(Pin::new(&mut this.inner).poll_write(cx, &this.pending[this.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.written += n;
        }
        this.pending.clear();
        Poll::Ready(Ok(this.replaced))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::{json_answer, request_line};

    #[test]
    fn the_request_line_is_read_as_far_as_it_goes_and_printable() {
        let line = |head: &[u8]| request_line(head);
        assert_eq!(
            line(b"GET /_hs/v1/health HTTP/1.1\r\nHost: x\r\n"),
            ("GET".into(), "/_hs/v1/health".into())
        );
        assert_eq!(line(b"G\x01T / HTTP/1.1\r\n").0, "G\\x01T");
        assert_eq!(line(b""), ("-".into(), "-".into()));
        let long = format!("GET /{} HTTP/1.1", "a".repeat(1000));
        let (_, target) = line(long.as_bytes());
        assert!(target.len() < 210 && target.ends_with("..."), "{target}");
    }

    #[test]
    fn bare_parse_error_heads_get_a_json_body() {
        let head = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Fri, 27 Nov 2026 05:00:00 GMT\r\n\r\n";
        let answer = json_answer(head, || "id-1".into()).unwrap();
        assert_eq!(answer.status, 414);
        let answer = String::from_utf8(answer.bytes).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains("date: Fri"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("x-request-id: id-1"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["errcode"], "M_TOO_LARGE");
    }

    #[test]
    fn answers_with_a_body_or_other_statuses_are_left_alone() {
        for head in [
            &b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 5\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
            b"{\"events\": 3}",
        ] {
            let answer = json_answer(head, || {
                panic!("no request id is made for a write passed on")
            });
            assert!(answer.is_none());
        }
    }
}
