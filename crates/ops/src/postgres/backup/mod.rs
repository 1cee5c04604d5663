//! Base backups of a PostgreSQL cluster. Every backup is restorable on its own: an
//! incremental differs from a full only in what it reads. Two ways to read a cluster:
//! its data directory on the database host (`datadir`), or a stream from
//! `pg_basebackup` over the replication protocol from another host (`stream`); what both
//! need is in `shared`.

pub mod datadir;
pub mod shared;
pub mod stream;

pub use shared::{segments, source_name, PgBackupOptions, PgBackupReport};

use custos_model::{Error, Kind, Result};
use custos_repo::Repository;
use custos_sources::postgres::datadir::PAGE_SIZE;
use custos_sources::postgres::db::{ClusterInfo, Db};

use shared::archived;

use crate::backup::BackupOptions;

/// Takes a base backup the way `pg` asks: from the data directory, or streamed.
pub fn backup_postgres(
    repo: &Repository,
    pg: &PgBackupOptions,
    opts: &BackupOptions,
) -> Result<PgBackupReport> {
    let db = Db::connect(&pg.conn)?;
    let info = db.cluster_info()?;
    check_cluster(&info, pg.include_wal)?;
    if pg.replication {
        stream::backup_streamed(repo, pg, opts, &db, &info)
    } else {
        datadir::backup_datadir(repo, pg, opts, &db, &info)
    }
}

/// What every base backup requires of the server, however it is read.
fn check_cluster(info: &ClusterInfo, include_wal: bool) -> Result<()> {
    if info.server_version_num < 150000 {
        return Err(Error::new(
            Kind::Source,
            format!(
                "PostgreSQL {} is too old: custos takes base backups of PostgreSQL 15 and later",
                info.server_version
            ),
        ));
    }
    if info.block_size as usize != PAGE_SIZE {
        return Err(Error::new(
            Kind::Source,
            format!("block_size is {}; custos supports 8192", info.block_size),
        ));
    }
    if !include_wal && !archived(info) {
        return Err(Error::config(
            "archive_mode is off: the backup could not be recovered without the WAL written while it runs",
        )
        .hint("set archive_mode = on and archive_command = 'custos wal-push %p', or pass --wal to store that WAL in the snapshot"));
    }
    Ok(())
}
