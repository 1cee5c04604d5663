//! PostgreSQL: the one place that knows PostgreSQL's file formats and naming.
//! WAL segment and history-file names, WAL page headers, and pg_control.

pub mod datadir;
pub mod db;
pub mod summary;
pub mod tables;
pub mod wal;
