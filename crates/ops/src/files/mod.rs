//! Folders, buckets and streams (a command's output, such as `terraform state pull`):
//! backing them up. Restoring them is the shared tree restore (`crate::restore`).

pub mod backup;

pub use backup::{backup_bucket, backup_files, backup_stream};
