//! Event contexts and state resolution: the part of the homeserver that reads events and
//! decides room state. It reads and stores state groups through the storage crates, and
//! writes no SQL of its own.
//!
//! - [`Pdu`] ([`pdu`]): one event in the federation format, read with [`Pdu::from_json`]
//!   for room versions 1 to 12, its id computed from the reference hash from version 3 on.
//! - [`auth`]: ruma's authorization rules on `Pdu`s; the reasons they give are what
//!   `rejections.reason` stores.
//! - [`context`]: `compute_event_context` over the state and events stores: the
//!   state groups before and after each event, and whether it was rejected.
//! - [`incoming`]: events as they arrive (import, HTTP, workers): each PDU read with its
//!   room's version and checked against the limits, the contexts of a batch, and the
//!   check of contexts a worker computed.
//! - [`resolve`]: ruma's state resolution (v2, and v2.1 for room version 12) over plain
//!   [`StateMap`]s.
//!
//! Everything Matrix-specific (canonical JSON, reference hashes, auth rules, state
//! resolution) is ruma's; this crate adapts it to the storage layer's types. ruma logs
//! through `tracing`, whose `log` feature forwards those records to the `log` logger.

pub mod auth;
pub mod auth_chain;
mod conflict;
pub mod context;
mod error;
pub mod event_id;
pub mod incoming;
mod parse;
pub mod pdu;
pub mod resolve;
pub mod room_version;
mod state_map;

pub use auth::{
    auth_types_for_event, auth_types_for_pdu, check_auth, check_auth_against_state,
    check_auth_events,
};
pub use auth_chain::auth_chain;
pub use context::{choose_delta_base, ContextBuilder, EventContext, PendingEvents};
pub use error::{PduError, ResolveError};
pub use incoming::{check_contexts, contexts_for, stored_room_version, PduReader};
pub use pdu::{Pdu, MAX_AUTH_EVENTS, MAX_ID_BYTES, MAX_PDU_BYTES, MAX_PREV_EVENTS};
pub use resolve::{resolve_state, resolve_state_with_auth_chains};
pub use room_version::{parse_room_version, room_version_rules, state_res_rules};
pub use state_map::{StateKey, StateMap};

/// The ruma this crate is built on, so that callers name the same types.
pub use ruma;
