//! The configuration of `hs-main` and `hs-worker` (docs/configuration.md).
//!
//! A YAML file (`--config FILE` or `HS_CONFIG`) holds every setting the
//! binaries have; flags and environment variables win over it, and it wins
//! over the defaults. Instead of a file of ours, a Synapse `homeserver.yaml`
//! may be given: only its `database:` section is read, so an operator can
//! point us at the database Synapse uses without copying its credentials.
//!
//! `file` reads the file (unknown or ill-typed keys are errors naming the
//! file, line and key), `synapse` turns Synapse's `database:` section into a
//! database string, `effective` layers flags over the file over defaults and
//! prints the result with secrets hidden (`hs-main config check`).

mod effective;
mod file;
mod synapse;

pub use effective::{defaults, Overrides, Settings, TokenSource, WorkerSettings};
pub use file::{ConfigFile, DatabaseSetting, FileKind, LogFormat};
pub use synapse::SynapseDatabase;
