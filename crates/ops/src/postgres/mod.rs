//! Everything custos does with PostgreSQL, kept apart from files and repository upkeep as
//! pgBackRest keeps its commands apart: base backups (`backup/`: from the data directory,
//! or streamed over replication), the pages of page-level incrementals (`pages`),
//! point-in-time restore (`restore`, with `access`: what the server's user can reach),
//! `archive_command` and `restore_command` (`wal`), the WAL archive as recovery reads it
//! (`archive`: windows and gaps), and `pg check` (`check`). The SQL and the data
//! directory's formats are in `custos_sources::postgres`.

pub mod access;
pub mod archive;
pub mod backup;
pub mod check;
pub mod pages;
pub mod restore;
pub mod wal;
