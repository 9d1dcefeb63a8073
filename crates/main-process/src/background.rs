//! The background jobs of `hs-main serve` (replication pruning, state group
//! purge, state compression): threads that wait on a stop signal between
//! passes instead of sleeping, so that a stopping server can end them and join
//! them before it lets go of the database. A thread left sleeping would keep
//! its clone of the database open to the end of the process, and SQLite would
//! leave its write-ahead log and shared-memory files beside the database.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use storage_core::log_context;

/// Raised once, when the server stops; the jobs wait on it between passes.
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: Mutex<bool>,
    raised: Condvar,
}

impl StopSignal {
    /// Waits up to `timeout` for the signal; whether it was raised.
    pub fn wait(&self, timeout: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (stopped, _) = self
            .raised
            .wait_timeout_while(stopped, timeout, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *stopped
    }

    /// Whether the signal was raised: a job checks between steps of a pass.
    pub fn is_raised(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raise(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.raised.notify_all();
    }
}

/// The jobs started so far, and the signal that stops them.
#[derive(Debug, Default)]
pub struct BackgroundJobs {
    stop: Arc<StopSignal>,
    threads: Vec<JoinHandle<()>>,
}

impl BackgroundJobs {
    /// Runs `job` on a thread of its own under the log context `name`; the
    /// job returns once the signal it is given is raised.
    pub fn spawn(&mut self, name: &str, job: impl FnOnce(&StopSignal) + Send + 'static) {
        let stop = self.stop.clone();
        self.threads
            .push(log_context::spawn(name, move || job(&stop)));
    }

    /// Raises the stop signal and waits for every job to return: a pass in
    /// progress finishes its transaction (or its room) first.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for BackgroundJobs {
    /// Stops the jobs however the server ends (an error included), so that
    /// they never outlive the database they hold.
    fn drop(&mut self) {
        self.stop.raise();
        for thread in self.threads.drain(..) {
            let name = thread.thread().name().unwrap_or("background").to_string();
            if thread.join().is_err() {
                log::warn!("the {name} job panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_waiting_for_its_next_pass_stops_when_told() {
        let mut jobs = BackgroundJobs::default();
        let (passes_tx, passes) = std::sync::mpsc::channel();
        jobs.spawn("test job", move |stop| loop {
            passes_tx.send(()).unwrap();
            if stop.wait(Duration::from_secs(3600)) {
                break;
            }
        });
        passes.recv().unwrap();
        // Without the signal, this join would wait an hour.
        jobs.stop();
        assert_eq!(passes.try_iter().count(), 0);
    }

    #[test]
    fn a_wait_without_the_signal_ends_after_its_timeout() {
        let signal = StopSignal::default();
        assert!(!signal.wait(Duration::from_millis(10)));
        assert!(!signal.is_raised());
        signal.raise();
        assert!(signal.wait(Duration::from_secs(3600)));
    }
}
