//! The persistence queue of the main process, which alone writes events.
//!
//! - [`queue`]: events wait per room; one loop per room drains them in batches,
//!   every caller of a batch sees its outcome, chained items stop after a failure.
//! - [`persister`]: what a loop does with a batch: the room's new forward
//!   extremities and the change of its current state (resolving the state of
//!   several extremities), then the one-transaction write.
//! - [`pipeline`]: the stores, context builder and queue a writer of events
//!   works with, and [`Pipeline::persist`] for events whose contexts are known.
//!
//! Replica workers never link this crate: they hand events to the main process.

pub mod persister;
pub mod pipeline;
pub mod queue;

pub use persister::{ExtremityResolver, RoomPersister};
pub use pipeline::Pipeline;
pub use queue::{BatchOutcome, Chain, Handle, PersistenceQueue};
