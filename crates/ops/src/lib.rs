//! Operations: backup, restore, verify, forget and prune. Destructive operations are a
//! plan first (`ForgetPlan`, `PrunePlan`), printable with `--dry-run`, then carried out.
//! Every operation returns a `*Report` that the CLI prints as text or JSON.

pub mod access;
pub mod backup;
pub mod cache;
pub mod forget;
pub mod iam;
pub mod info;
pub mod keys;
pub mod manifest;
pub mod pg_backup;
pub mod pg_check;
pub mod pg_pages;
pub mod pg_restore;
pub mod pg_stream;
pub mod progress;
pub mod prune;
pub mod restore;
pub mod target;
pub mod verify;
pub mod wal;
pub mod wal_window;

pub use progress::{NoProgress, Progress};
