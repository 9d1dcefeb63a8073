//! A TCP front for the test PostgreSQL server, which listens on a Unix socket
//! only: clients reach it over TCP, as an operator's processes do (libpq takes
//! other paths over TCP, GSSAPI encryption among them), and a test can cut
//! the database off from them and bring it back, as a server restart does, or
//! lose the answer to one statement after the server ran it, as a network cut
//! while the client waits does.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use storage_core::testing::TestDb;

/// Forwards every connection on a loopback port to the server's socket.
#[derive(Debug)]
pub struct PgProxy {
    port: u16,
    socket: PathBuf,
    live: Arc<Mutex<Vec<Live>>>,
    /// Client bytes that make their connection's answers held back.
    marker: Arc<Mutex<Option<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl PgProxy {
    /// A proxy to the server of `db` (a PostgreSQL test database).
    pub fn start(db: &TestDb) -> PgProxy {
        let dir = db
            .url()
            .split_once("host=")
            .map(|(_, rest)| rest.split('&').next().unwrap_or(rest))
            .expect("the test server's URL names its socket folder (host=...)");
        let mut proxy = PgProxy {
            port: 0,
            socket: PathBuf::from(dir).join(".s.PGSQL.5432"),
            live: Arc::default(),
            marker: Arc::default(),
            stop: Arc::default(),
            acceptor: None,
        };
        proxy.listen(TcpListener::bind("127.0.0.1:0").unwrap());
        proxy
    }

    /// The URL of `db` through this proxy.
    pub fn url(&self, db: &TestDb) -> String {
        let path = db.url().split('?').next().unwrap_or_default();
        let name = path.rsplit_once('/').map(|(_, name)| name).unwrap();
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    fn listen(&mut self, listener: TcpListener) {
        self.port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        self.stop.store(false, Ordering::SeqCst);
        let (stop, live, socket) = (self.stop.clone(), self.live.clone(), self.socket.clone());
        let marker = self.marker.clone();
        self.acceptor = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        forward(client, &socket, &live, &marker);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => panic!("proxy accept: {e}"),
                }
            }
        }));
    }

    /// The database becomes unreachable: no new connection is accepted and
    /// every open one is cut.
    pub fn cut(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.join().unwrap();
        }
        for live in self.live.lock().unwrap().drain(..) {
            let _ = live.client.shutdown(Shutdown::Both);
        }
    }

    /// The connection whose client next sends `marker` (an event id in a
    /// statement's parameters, say) gets no answer from then on: the server
    /// runs the statement, and commits it if it is committed on its own,
    /// while its client waits, until [`Self::cut_held`].
    pub fn hold_answers_after(&self, marker: &str) {
        *self.marker.lock().unwrap() = Some(marker.as_bytes().to_vec());
    }

    /// Cuts the connections whose answers are held; the others go on.
    pub fn cut_held(&self) {
        *self.marker.lock().unwrap() = None;
        for live in self.live.lock().unwrap().iter() {
            if live.held.load(Ordering::SeqCst) {
                let _ = live.client.shutdown(Shutdown::Both);
            }
        }
    }

    /// The database is reachable again, on the same port.
    pub fn restore(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).unwrap();
        self.listen(listener);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// A connection being forwarded.
#[derive(Debug)]
struct Live {
    client: TcpStream,
    /// Its answers are held back ([`PgProxy::hold_answers_after`]).
    held: Arc<AtomicBool>,
}

/// Copies both ways between `client` and a new connection to `socket`.
fn forward(
    client: TcpStream,
    socket: &PathBuf,
    live: &Mutex<Vec<Live>>,
    marker: &Arc<Mutex<Option<Vec<u8>>>>,
) {
    let Ok(server) = UnixStream::connect(socket) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let mut live = live.lock().unwrap();
    // Forget connections that have ended, keep the rest cuttable.
    live.retain(|l| l.client.peer_addr().is_ok());
    let held = Arc::new(AtomicBool::new(false));
    live.push(Live {
        client: client.try_clone().unwrap(),
        held: held.clone(),
    });
    drop(live);
    let (mut c_in, mut c_out) = (client.try_clone().unwrap(), client);
    let (mut s_in, mut s_out) = (server.try_clone().unwrap(), server);
    let (marker, holding) = (marker.clone(), held.clone());
    std::thread::spawn(move || {
        // The marker may straddle two reads: what may begin it is kept.
        let mut window = Vec::new();
        copy(&mut c_in, &mut s_out, |bytes| {
            let mut marker = marker.lock().unwrap();
            let Some(m) = marker.as_deref() else {
                return true;
            };
            window.extend_from_slice(bytes);
            if window.windows(m.len()).any(|w| w == m) {
                holding.store(true, Ordering::SeqCst);
                *marker = None;
                window.clear();
            } else {
                let keep = (m.len() - 1).min(window.len());
                window.drain(..window.len() - keep);
            }
            true
        });
        let _ = s_out.shutdown(Shutdown::Write);
    });
    std::thread::spawn(move || {
        copy(&mut s_in, &mut c_out, |_| !held.load(Ordering::SeqCst));
        let _ = c_out.shutdown(Shutdown::Both);
    });
}

/// Copies what `pass` lets through (it sees each read first).
fn copy(from: &mut impl Read, to: &mut impl Write, mut pass: impl FnMut(&[u8]) -> bool) {
    let mut buf = [0u8; 16 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if pass(&buf[..n]) && to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
