//! LISTEN/NOTIFY, the wake-up between processes: the main process notifies in
//! its batch transactions (`Engine::notify`), replicas listen on a connection
//! of their own. Only PostgreSQL has it; SQLite is one process.

use crate::error::{Error, Result};
use diesel::connection::SimpleConnection;
use diesel::PgConnection;

/// A connection listening on one channel.
pub trait Listener: Send {
    /// The payloads of the notifications that arrived since the last call, in
    /// order. Never blocks: diesel gives no socket to wait on, so a listener
    /// polls this on a short interval.
    fn drain(&mut self) -> Result<Vec<String>>;

    /// One round trip, so that a dead connection is noticed between
    /// notifications.
    fn ping(&mut self) -> Result<()>;
}

/// A PostgreSQL connection that issued `LISTEN`.
pub(crate) struct PgListener {
    conn: PgConnection,
}

impl PgListener {
    /// Names the connection (so it can be told apart in `pg_stat_activity`)
    /// and listens on `channel`.
    pub(crate) fn start(
        mut conn: PgConnection,
        channel: &str,
        application_name: &str,
    ) -> Result<Self> {
        let quoted = application_name.replace('\'', "''");
        conn.batch_execute(&format!(
            "SET application_name = '{quoted}'; LISTEN {channel}"
        ))
        .map_err(|e| Error::from(e).context(format!("listening on {channel}")))?;
        Ok(PgListener { conn })
    }
}

impl Listener for PgListener {
    fn drain(&mut self) -> Result<Vec<String>> {
        let mut payloads = Vec::new();
        for n in self.conn.notifications_iter() {
            payloads.push(n?.payload);
        }
        Ok(payloads)
    }

    fn ping(&mut self) -> Result<()> {
        Ok(self.conn.batch_execute("SELECT 1")?)
    }
}
