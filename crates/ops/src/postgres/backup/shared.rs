//! What the two ways of taking a base backup share: their options and report, the set-up
//! before reading (the parent and its files, the shared lock, the files cache), storing a
//! small file, waiting for the last WAL segment, and the WAL a backup needs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use custos_model::{ChunkId, Error, Kind, Lsn, Result};
use custos_repo::snapshot::{PgBackupType, PgInfo, SourceKind};
use custos_repo::{BlobKind, BlobWriter, Repository};
use custos_sources::files::{Entry, EntryKind, Fingerprint};
use custos_sources::postgres::db::{ClusterInfo, ConnectOptions};
use serde::Serialize;

use crate::backup::{BackupOptions, BackupReport, Run};
use crate::cache;
use crate::postgres::pages::ParentFile;

pub struct PgBackupOptions {
    pub backup_type: PgBackupType,
    pub conn: ConnectOptions,
    /// The data directory; by default the server's `data_directory`.
    pub pgdata: Option<PathBuf>,
    /// A name for the cluster (custos.toml); snapshots are also told apart by system id.
    pub cluster: Option<String>,
    /// Copy the WAL from start to stop into the snapshot.
    pub include_wal: bool,
    /// How long to wait for the backup's last WAL segment to reach the repository.
    pub archive_timeout: std::time::Duration,
    /// Stream the backup over the replication protocol (`pg_basebackup`) instead of
    /// reading the data directory: for a cluster on another host.
    pub replication: bool,
    /// Where PostgreSQL's client programs are (`pg_basebackup`); by default the Debian
    /// folder of the server's major version, else PATH.
    pub pg_bin: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PgBackupReport {
    #[serde(flatten)]
    pub backup: BackupReport,
    /// `path block N: checksum X, computed Y` for each damaged page.
    pub damaged_pages: Vec<String>,
    /// An incremental was asked for but there was no earlier backup of the cluster.
    pub promoted_to_full: bool,
    /// Pages stored on their own (page-level incremental) instead of in whole blocks.
    pub pages_patched: u64,
    /// Changed pages of which only the changed 1 KiB units were stored.
    pub units_patched: u64,
    /// Blocks taken from the parent without reading them, because the server's WAL
    /// summaries (PostgreSQL 17+) say no page of them changed.
    pub blocks_skipped: u64,
    /// Whether the server's WAL summaries were used.
    pub wal_summaries: bool,
    /// How the files were read: `datadir` (on the database host) or `replication`.
    pub via: &'static str,
    /// The server's configuration files outside its data directory, which the backup
    /// does not hold (see [`config_outside`]).
    pub config_outside: Vec<String>,
}

/// The configuration files the server reads from outside its data directory, as on
/// Debian (`/etc/postgresql/<version>/<cluster>/`): a base backup holds the data directory
/// only, so a restore on a host without them has no configuration to start with.
pub(crate) fn config_outside(info: &ClusterInfo) -> Vec<String> {
    let data = Path::new(&info.data_directory);
    info.config_files
        .iter()
        .filter(|p| {
            let p = Path::new(p);
            p.is_absolute() && !p.starts_with(data)
        })
        .cloned()
        .collect()
}

pub(crate) type ParentFiles = HashMap<custos_model::PathBytes, ParentFile>;

pub fn source_name(cluster: Option<&str>, system_id: u64) -> String {
    match cluster {
        Some(name) => format!("postgres:{name}"),
        None => format!("postgres:{system_id}"),
    }
}

/// Records this backup's files in the local cache for the next incremental.
pub(crate) fn save_cache<'e>(
    path: &Path,
    snapshot: custos_model::SnapshotId,
    entries: impl Iterator<Item = (&'e Entry, Fingerprint)>,
) {
    let mut c = cache::FilesCache {
        snapshot: Some(snapshot),
        ..Default::default()
    };
    for (e, fp) in entries {
        // The cache is keyed by text: a name that is not (never PostgreSQL's) is read
        // again next time rather than risk two names sharing a key.
        let Some(path) = e.path.to_str() else {
            continue;
        };
        if let Some(pages) = &e.pages {
            c.pages.insert(path.to_string(), pages.clone());
        }
        if e.kind == EntryKind::File {
            c.files.insert(
                path.to_string(),
                (
                    Fingerprint {
                        size: e.size,
                        mtime_ns: e.mtime_ns,
                        ..fp
                    },
                    e.chunks.clone(),
                ),
            );
        }
    }
    cache::save(path, &c);
}

/// What both ways of reading a cluster set up before reading.
pub(crate) struct Begun<'a> {
    /// The shared lock, the writer, and the parent: the newest backup of this cluster.
    pub run: Run<'a>,
    /// As asked, or full when there is no parent.
    pub backup_type: PgBackupType,
    pub promoted_to_full: bool,
    /// The files cache of this cluster on this host.
    pub cache_path: Option<PathBuf>,
    /// An incremental's parent files (None: read everything).
    pub parents: Option<ParentFiles>,
    /// Files written at or after this time may have changed without their time changing.
    pub parent_start_ns: i64,
}

pub(crate) fn begin<'a>(
    repo: &'a Repository,
    pg: &PgBackupOptions,
    opts: &BackupOptions,
    info: &ClusterInfo,
) -> Result<Begun<'a>> {
    let source = source_name(pg.cluster.as_deref(), info.system_id);
    let run = Run::begin_with(repo, SourceKind::Postgres, &source, |s| {
        s.pg.as_ref().is_some_and(|p| p.system_id == info.system_id)
    })?;
    let promoted_to_full = pg.backup_type == PgBackupType::Incremental && run.parent.is_none();
    let backup_type = if promoted_to_full {
        PgBackupType::Full
    } else {
        pg.backup_type
    };
    let cache_path = opts.cache_dir.as_ref().map(|d| {
        cache::location(
            d,
            &repo.config.id,
            &format!("postgres {}", info.system_id),
            &repo.keys.id_key,
        )
    });
    let parents = match (&run.parent, backup_type) {
        (Some(parent), PgBackupType::Incremental) => {
            parent_files(repo, run.writer.index(), parent, cache_path.as_deref())?
        }
        _ => None,
    };
    let parent_start_ns = run
        .parent
        .as_ref()
        .and_then(|p| p.summary.pg.as_ref())
        .map(|p| p.start_time.timestamp_nanos_opt().unwrap_or(0) - 1_000_000_000)
        .unwrap_or(i64::MIN);
    Ok(Begun {
        run,
        backup_type,
        promoted_to_full,
        cache_path,
        parents,
        parent_start_ns,
    })
}

/// Whether the server's WAL goes to an archive: archive_mode is on, or it is a standby,
/// whose primary archives (a standby itself only with archive_mode = always).
pub(crate) fn archived(info: &ClusterInfo) -> bool {
    info.archive_mode != "off" || info.in_recovery
}

/// Whether the backup's last WAL segment must reach the repository before it is saved:
/// without --wal, whenever the WAL is archived.
pub(crate) fn waits_for_archive(info: &ClusterInfo, include_wal: bool) -> bool {
    !include_wal && archived(info)
}

/// The parent's files: from the local cache when it describes the parent, else from the
/// parent's manifest (restore role only). None: read everything (still deduplicated).
fn parent_files(
    repo: &Repository,
    index: &custos_repo::Index,
    parent: &custos_repo::Snapshot,
    cache_path: Option<&Path>,
) -> Result<Option<ParentFiles>> {
    if let Some(p) = cache_path {
        let mut c = cache::load(p);
        if c.snapshot == Some(parent.id) {
            return Ok(Some(
                c.files
                    .into_iter()
                    .map(|(path, (fp, chunks))| {
                        let pages = c.pages.remove(&path);
                        let covered = crate::postgres::pages::covered(&chunks, fp.size, |id| {
                            index.get(id).map(|(_, loc)| u64::from(loc.raw_length))
                        });
                        let pf = ParentFile {
                            size: fp.size,
                            mtime_ns: fp.mtime_ns,
                            chunks,
                            pages,
                            covered,
                        };
                        (custos_model::PathBytes::from(path), pf)
                    })
                    .collect(),
            ));
        }
    }
    if repo.keys.secret.is_none() {
        tracing::warn!(
            "the parent's file list is not cached on this host and a backup key cannot read it: every file is read (unchanged blocks are still not stored again)"
        );
        return Ok(None);
    }
    let body = repo.snapshot_body(&parent.id)?;
    let entries = crate::manifest::load(repo, index, &body.manifest)?;
    Ok(Some(
        entries
            .into_iter()
            .filter(|e| e.kind == EntryKind::File)
            .map(|e| {
                let pf = ParentFile::of(&e, |id| {
                    index.get(id).map(|(_, loc)| u64::from(loc.raw_length))
                });
                (e.path.clone(), pf)
            })
            .collect(),
    ))
}

/// Stores a small in-memory file (backup label, a WAL segment) in fixed blocks.
pub(crate) fn store_bytes(
    repo: &Repository,
    writer: &BlobWriter,
    data: &[u8],
) -> Result<Vec<ChunkId>> {
    let mut ids = vec![];
    for chunk in repo
        .config
        .block_chunker
        .split(data, Some(data.len() as u64), 0)
    {
        let chunk = chunk.map_err(|e| Error::internal(e.to_string()))?;
        let id = repo.keys.chunk_id(&chunk);
        writer.add(id, BlobKind::Data, chunk)?;
        ids.push(id);
    }
    Ok(ids)
}

pub(crate) fn wait_archived(
    repo: &Repository,
    system_id: u64,
    name: &str,
    timeout: std::time::Duration,
) -> Result<()> {
    let start = std::time::Instant::now();
    let deadline = start + timeout;
    loop {
        if repo.wal_meta(system_id, name)?.is_some() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::new(
                Kind::Source,
                format!(
                    "WAL segment {name}, which this backup needs, did not reach the repository within {} s; the backup is not saved",
                    timeout.as_secs()
                ),
            )
            .hint("archiving is failing or slow: check `custos pg check` and the server log for archive_command errors, or raise --archive-timeout; a backup from a standby waits for the primary to finish that segment (set archive_timeout there, or pass --wal)"));
        }
        // The segment usually lands within a few hundred milliseconds (one archive_command
        // run): poll often at first, then back off to once a second.
        let pause = if start.elapsed() < std::time::Duration::from_secs(5) {
            25
        } else {
            1000
        };
        std::thread::sleep(std::time::Duration::from_millis(pause));
    }
}

/// WAL segment names from the one holding `start` to the one holding the last byte
/// before `stop`: the WAL a backup needs to be consistent.
pub fn segments(timeline: u32, start: Lsn, stop: Lsn, segment_size: u64) -> Vec<String> {
    let last = Lsn(stop.0.saturating_sub(1).max(start.0)).segment(segment_size);
    (start.segment(segment_size)..=last)
        .map(|n| custos_sources::postgres::wal::segment_name(timeline, n, segment_size))
        .collect()
}

/// Where a base backup lies in the cluster's WAL and time: what its summary records.
pub(crate) struct Span {
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub start_time: chrono::DateTime<chrono::Utc>,
    pub stop_time: chrono::DateTime<chrono::Utc>,
    pub next_xid: u64,
}

/// The PostgreSQL part of a base backup's summary, however the cluster was read.
pub(crate) fn pg_info(
    info: &ClusterInfo,
    pg: &PgBackupOptions,
    backup_type: PgBackupType,
    span: Span,
    damaged_pages: u64,
) -> PgInfo {
    PgInfo {
        system_id: info.system_id,
        cluster: pg.cluster.clone(),
        version_num: info.server_version_num,
        backup_type,
        timeline: span.timeline,
        start_lsn: span.start_lsn,
        stop_lsn: span.stop_lsn,
        start_time: span.start_time,
        stop_time: span.stop_time,
        next_xid: span.next_xid,
        segment_size: info.segment_size,
        wal_included: pg.include_wal,
        data_checksums: info.data_checksums,
        damaged_pages,
    }
}
