//! Serving connections: what keeps idle, slow or numerous clients from
//! starving the others.
//!
//! hyper's HTTP/1 connection (through hyper-util's glue and graceful shutdown)
//! with the settings axum's own `serve` does not expose: a header-read
//! timeout, which also closes keep-alive connections idle for that long; a
//! limit on open connections, kept below the process's file descriptors so
//! that the database and the log always have some (a client past the limit
//! waits in the kernel's backlog until a slot frees); and the per-request time
//! bound, from tower-http (see `router`). Only the contract's HTTP/1.1 is
//! served: HTTP/2's multiplexed, long-lived connections would need limits of
//! their own.

use super::parse_errors::JsonParseErrors;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use storage_core::Error;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// How long a client may take to send a request's headers, and how long a
/// kept-alive connection may wait idle for its next request (default).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections open at once, at most (fewer where file descriptors are fewer).
pub const MAX_CONNECTIONS: usize = 10_000;

/// The limits a server keeps its clients within.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: connection_limit(),
        }
    }
}

/// File descriptors kept for everything but client connections: database
/// connections, the SQLite file, logs, the listener.
const RESERVED_FDS: usize = 256;

/// The connection limit for this process: [`MAX_CONNECTIONS`], or fewer when
/// the open-files limit would run out first.
pub fn connection_limit() -> usize {
    let soft = open_files_limit().unwrap_or(1024);
    soft.saturating_sub(RESERVED_FDS).clamp(16, MAX_CONNECTIONS)
}

/// The soft open-files limit, as the kernel reports it (Linux).
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Serves `router` on `listener` until `shutdown` completes, then stops
/// accepting, closes idle connections and waits for requests in flight.
pub async fn serve_until(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let limit = limits.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(limit));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // One write per response head, so that `JsonParseErrors` sees hyper's
        // own error answers whole.
        .writev(false);
    let graceful = GracefulShutdown::new();
    log::info!(
        "at most {limit} connections; {} s to send headers or between requests",
        limits.header_read_timeout.as_secs_f32()
    );
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(|e| Error::other(e.to_string()))?,
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or a connection reset before it was
                    // taken: not fatal; pause so as not to spin.
                    log::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            router
                .clone()
                .map_request(|r: axum::http::Request<Incoming>| r.map(axum::body::Body::new)),
        );
        let io = JsonParseErrors::new(TokioIo::new(stream));
        let connection = graceful.watch(http.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("connection ended: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
