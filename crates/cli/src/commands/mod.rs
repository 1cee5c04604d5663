//! One module per command group: its flags, its call into the library, and its output
//! (text, or one JSON document with --json). `main.rs` only parses and dispatches.

pub mod agent;
pub mod audit;
pub mod backup;
pub mod config;
pub mod copy;
pub mod drill;
pub mod init;
pub mod key;
pub mod lock;
pub mod maintenance;
pub mod pg;
pub mod report;
pub mod restore;
pub mod snapshots;
pub mod tables;
