//! The worker's HTTP/1.1 client of the main process: requests over kept-alive
//! connections, each request (head and body) in one write.
//!
//! ureq, which this replaces, wrote a request's head and body in two writes
//! (two TCP segments, and the main process read the head before its body
//! came), and set the socket's timeouts, checked a pooled connection
//! (`ioctl`, a peek) and read its address in every request: nine system
//! calls of the worker's and two of the main process's, on every forwarded
//! write's path. Here a connection's timeouts are set once, when it is made,
//! and a kept connection that the main process closed meanwhile (its idle
//! timeout, or a restart) is noticed when it answers nothing, and the request
//! is sent once more on a new one: the main process closes a connection only
//! between requests, or when it dies, and a write forwarded again is safe
//! either way (events already stored are skipped).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

/// How long a connection may take to be made, and to send or answer a
/// request: past the main process's own bound on a request (30 s), so that
/// its answer, a 503 then, is what the worker reports.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Connections kept for the next requests, at most.
const KEPT: usize = 16;

/// An answer: its status and its body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum Failure {
    /// No connection could be made.
    Connect(std::io::Error),
    /// The request could not be sent, or its answer not read whole.
    Exchange(std::io::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connecting: {e}"),
            Failure::Exchange(e) => write!(f, "no answer: {e}"),
        }
    }
}

/// The main process at an `http://HOST:PORT[/PREFIX]` URL.
#[derive(Debug)]
pub struct MainClient {
    /// `HOST:PORT`, for connecting and for the `Host` header.
    authority: String,
    /// The URL's path, without its trailing `/`, put before every path.
    prefix: String,
    idle: Mutex<Vec<BufReader<TcpStream>>>,
}

impl MainClient {
    /// `url` must start with `http://` (checked by the caller); a missing port
    /// is 80.
    pub fn new(url: &str) -> Self {
        let rest = url.strip_prefix("http://").unwrap_or(url);
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        MainClient {
            authority,
            prefix: path.trim_end_matches('/').to_owned(),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn connect(&self) -> std::io::Result<BufReader<TcpStream>> {
        let mut last = None;
        for addr in self.authority.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, TIMEOUT) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(TIMEOUT))?;
                    stream.set_write_timeout(Some(TIMEOUT))?;
                    return Ok(BufReader::new(stream));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(ErrorKind::NotFound, "the host name resolves to no address")
        }))
    }

    /// The request `method path` with `headers` (`Name: value`, each) and
    /// `body` (sent with its length; none for an empty one), and its answer.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Answer, Failure> {
        let mut request = Vec::with_capacity(256 + body.len());
        let _ = write!(
            request,
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\n",
            self.prefix, self.authority
        );
        for (name, value) in headers {
            let _ = write!(request, "{name}: {value}\r\n");
        }
        if !body.is_empty() || method == "POST" {
            let _ = write!(request, "Content-Length: {}\r\n", body.len());
        }
        request.extend_from_slice(b"\r\n");
        request.extend_from_slice(body);

        let kept = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(mut connection) = kept {
            match exchange(&mut connection, &request) {
                Ok((answer, keep)) => {
                    if keep {
                        self.keep(connection);
                    }
                    return Ok(answer);
                }
                // Closed by the main process while it was kept: nothing of
                // the request was answered; sent again on a new connection.
                Err(Exchange::Unanswered(_)) => {}
                Err(Exchange::Broken(e)) => return Err(Failure::Exchange(e)),
            }
        }
        let mut connection = self.connect().map_err(Failure::Connect)?;
        match exchange(&mut connection, &request) {
            Ok((answer, keep)) => {
                if keep {
                    self.keep(connection);
                }
                Ok(answer)
            }
            Err(Exchange::Unanswered(e) | Exchange::Broken(e)) => Err(Failure::Exchange(e)),
        }
    }

    fn keep(&self, connection: BufReader<TcpStream>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < KEPT {
            idle.push(connection);
        }
    }
}

enum Exchange {
    /// The connection was closed or reset before any byte of an answer.
    Unanswered(std::io::Error),
    /// Failed after the answer began, or an answer that is not HTTP.
    Broken(std::io::Error),
}

fn broken(what: &str) -> Exchange {
    Exchange::Broken(std::io::Error::new(ErrorKind::InvalidData, what.to_owned()))
}

fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::UnexpectedEof
    )
}

/// Sends `request` and reads its answer; says whether the connection may
/// serve another request.
fn exchange(
    connection: &mut BufReader<TcpStream>,
    request: &[u8],
) -> Result<(Answer, bool), Exchange> {
    let unanswered = |e: std::io::Error| {
        if is_closed(&e) {
            Exchange::Unanswered(e)
        } else {
            Exchange::Broken(e)
        }
    };
    connection
        .get_mut()
        .write_all(request)
        .map_err(unanswered)?;
    let mut line = String::new();
    match connection.read_line(&mut line) {
        Ok(0) => {
            return Err(Exchange::Unanswered(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "the connection was closed",
            )))
        }
        Ok(_) => {}
        Err(e) => return Err(unanswered(e)),
    }
    let status = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| broken(&format!("not an HTTP answer: {:?}", line.trim_end())))?;
    let mut keep = line.starts_with("HTTP/1.1 ");
    let mut length = None;
    let mut chunked = false;
    loop {
        line.clear();
        if connection.read_line(&mut line).map_err(Exchange::Broken)? == 0 {
            return Err(broken("the answer's headers were cut short"));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(broken(&format!("not a header: {header:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| broken(&format!("bad content-length {value:?}")))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            keep = !value.eq_ignore_ascii_case("close");
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            connection.read_line(&mut line).map_err(Exchange::Broken)?;
            let size = line.trim_end().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size.trim(), 16)
                .map_err(|_| broken(&format!("bad chunk size {:?}", line.trim_end())))?;
            if size == 0 {
                // Trailers, then the blank line.
                loop {
                    line.clear();
                    if connection.read_line(&mut line).map_err(Exchange::Broken)? == 0
                        || line.trim_end().is_empty()
                    {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            connection
                .read_exact(&mut body[start..])
                .map_err(Exchange::Broken)?;
            let mut crlf = [0; 2];
            connection.read_exact(&mut crlf).map_err(Exchange::Broken)?;
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        connection.read_exact(&mut body).map_err(Exchange::Broken)?;
    } else if !(status == 204 || status == 304 || (100..200).contains(&status)) {
        // Neither: the body runs to the connection's end.
        connection
            .read_to_end(&mut body)
            .map_err(Exchange::Broken)?;
        keep = false;
    }
    Ok((Answer { status, body }, keep))
}
