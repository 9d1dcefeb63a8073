//! Named log contexts: every log line says which request, loop or background job
//! emitted it.
//!
//! A context is per thread. A thread starts with none; [`LogContext::scope`] sets
//! one for the length of a closure and restores the previous one afterwards, panics
//! included. Work handed to another thread does not inherit anything: the code that
//! hands it over decides, by capturing [`LogContext::current`] and re-entering it
//! ("this is still the request's work"), or by [`spawn`]ing under a context of its
//! own ("this is the persistence loop, whoever started it").

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

thread_local! {
    static CURRENT: RefCell<Option<LogContext>> = const { RefCell::new(None) };
}

/// The name of a unit of work, shown on each log line it emits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogContext {
    name: Arc<str>,
}

impl LogContext {
    pub fn new(name: impl AsRef<str>) -> Self {
        LogContext {
            name: Arc::from(name.as_ref()),
        }
    }

    /// A fresh context for one request: `request-<n>` with a process-wide counter,
    /// prefixed with `kind` (e.g. "GET-3").
    pub fn request(kind: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        LogContext::new(format!("{kind}-{n}"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The context of the calling thread, if any.
    pub fn current() -> Option<LogContext> {
        CURRENT.with(|c| c.borrow().clone())
    }

    /// Runs `f` under this context, replacing (not nesting in) the caller's.
    pub fn scope<R>(&self, f: impl FnOnce() -> R) -> R {
        let _restore = self.enter();
        f()
    }

    /// Makes this the calling thread's context from now on, with nothing to
    /// restore: for the threads of a pool (tokio's workers), which run many
    /// tasks and should name the service they belong to between them.
    pub fn set_for_thread(&self) {
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
    }

    /// Makes this the thread's context until the guard drops.
    pub fn enter(&self) -> ContextGuard {
        let previous = CURRENT.with(|c| c.replace(Some(self.clone())));
        ContextGuard { previous }
    }
}

/// Restores the previous context when dropped.
#[derive(Debug)]
#[must_use = "the context ends when the guard drops"]
pub struct ContextGuard {
    previous: Option<LogContext>,
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

/// The name to print for the calling thread: its context, or `-` when it has none.
pub fn current_name() -> String {
    CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .map_or_else(|| "-".to_owned(), |ctx| ctx.name.to_string())
    })
}

/// Starts a thread named `name` whose work runs under the context `name`, never
/// under the context of the thread that started it.
pub fn spawn<F, R>(name: impl Into<String>, f: F) -> std::thread::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let name = name.into();
    let ctx = LogContext::new(&name);
    std::thread::Builder::new()
        .name(name)
        .spawn(move || ctx.scope(f))
        .expect("spawning a thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_nest_and_restore() {
        assert_eq!(current_name(), "-");
        LogContext::new("outer").scope(|| {
            assert_eq!(current_name(), "outer");
            LogContext::new("inner").scope(|| assert_eq!(current_name(), "inner"));
            assert_eq!(current_name(), "outer");
        });
        assert_eq!(current_name(), "-");
    }

    #[test]
    fn spawned_work_does_not_inherit() {
        let seen = LogContext::new("request-1").scope(|| {
            spawn("background job", current_name)
                .join()
                .expect("thread ran")
        });
        assert_eq!(seen, "background job");
    }

    #[test]
    fn a_pool_thread_keeps_its_context_between_tasks() {
        let seen = std::thread::spawn(|| {
            LogContext::new("w1").set_for_thread();
            let inside = LogContext::request("GET").scope(current_name);
            (inside, current_name())
        })
        .join()
        .expect("thread ran");
        assert!(seen.0.starts_with("GET-"), "{seen:?}");
        assert_eq!(seen.1, "w1");
    }

    #[test]
    fn restores_after_panic() {
        let r = std::panic::catch_unwind(|| LogContext::new("doomed").scope(|| panic!("boom")));
        assert!(r.is_err());
        assert_eq!(current_name(), "-");
    }
}
