//! Operations: backup, restore, verify, forget and prune. Destructive operations are a
//! plan first (`ForgetPlan`, `PrunePlan`), printable with `--dry-run`, then carried out.
//! Every operation returns a `*Report` that the CLI prints as text or JSON.

pub mod backup;
pub mod cache;
pub mod cold;
pub mod config;
pub mod drill;
pub mod files;
#[doc(hidden)]
pub mod fuzzing;
pub mod keys;
pub mod maintenance;
pub mod manifest;
pub mod postgres;
pub mod progress;
pub mod restore;
pub mod tables;

pub use progress::{NoProgress, Progress};
