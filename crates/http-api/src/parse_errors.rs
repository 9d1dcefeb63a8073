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

use hyper::rt::{Read, ReadBufCursor, Write};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

/// The connection's I/O, with hyper's bare parse-error answers given a body.
#[derive(Debug)]
pub struct JsonParseErrors<T> {
    inner: T,
    /// The answer being written instead of hyper's, and how much of it is out.
    pending: Vec<u8>,
    written: usize,
    /// The length of hyper's head, reported written once ours is.
    replaced: usize,
}

impl<T> JsonParseErrors<T> {
    pub fn new(inner: T) -> Self {
        JsonParseErrors {
            inner,
            pending: Vec::new(),
            written: 0,
            replaced: 0,
        }
    }
}

/// The answer to send instead of `head`, if `head` is one of hyper's bare
/// parse-error answers.
fn json_answer(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ")?;
    let (errcode, error) = match rest.get(..4)? {
        "414 " => ("M_TOO_LARGE", "request URI too long"),
        "431 " => ("M_TOO_LARGE", "request headers too large"),
        "400 " => ("M_UNKNOWN", "malformed HTTP request"),
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
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    Some(answer.into_bytes())
}

impl<T: Read + Unpin> Read for JsonParseErrors<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
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
            match json_answer(buf) {
                Some(answer) => {
                    this.pending = answer;
                    this.written = 0;
                    this.replaced = buf.len();
                }
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
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
    use super::json_answer;

    #[test]
    fn bare_parse_error_heads_get_a_json_body() {
        let head = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Fri, 27 Nov 2026 05:00:00 GMT\r\n\r\n";
        let answer = String::from_utf8(json_answer(head).unwrap()).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(head.contains("date: Fri"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["errcode"], "M_TOO_LARGE");
    }

    #[test]
    fn answers_with_a_body_or_other_statuses_are_left_alone() {
        assert!(json_answer(b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 5\r\n\r\n").is_none());
        assert!(json_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(json_answer(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}").is_none());
        assert!(json_answer(b"{\"events\": 3}").is_none());
    }
}
