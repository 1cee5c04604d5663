//! What every backup shares, whatever it reads: the run (shared lock, writer, parent,
//! clock), its options and report, and reading sources into chunks.
//!
//! Order of writes, for crash safety: chunks go into packs; when every pack is stored, an
//! index naming them is written; only then the snapshot. A run killed at any moment leaves
//! at most unreferenced packs or index entries, which prune removes.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use chrono::Utc;
use custos_model::{ChunkId, Error, Result, SnapshotId};
use custos_repo::lock::LockGuard;
use custos_repo::snapshot::{PgInfo, SnapshotStats, SourceKind};
use custos_repo::{BlobKind, BlobWriter, Repository, Snapshot, SnapshotBody, SnapshotSummary};
use custos_sources::files::{Entry, EntryKind, Walked};
use serde::Serialize;

use crate::progress::Progress;

#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub snapshot: SnapshotId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pg: Option<PgInfo>,
    pub parent: Option<SnapshotId>,
    pub source: String,
    pub kind: SourceKind,
    pub stats: SnapshotStats,
    /// Paths that could not be read; the snapshot is partial when not empty.
    pub errors: Vec<String>,
}

pub struct BackupOptions<'a> {
    pub tags: Vec<String>,
    /// Time recorded for the snapshot instead of now (importing older backups, tests).
    pub time: Option<chrono::DateTime<Utc>>,
    pub cache_dir: Option<PathBuf>,
    pub progress: &'a dyn Progress,
}

/// What every backup shares: the shared lock (taken before the index is read, so prune
/// cannot delete what this run deduplicates against), a writer over the index, the parent
/// snapshot of the same source, and the clock.
pub(crate) struct Run<'a> {
    repo: &'a Repository,
    _lock: LockGuard,
    pub(crate) writer: BlobWriter,
    pub(crate) parent: Option<Snapshot>,
    kind: SourceKind,
    source: String,
    start: Instant,
    /// Set by PostgreSQL backups before `finish`.
    pub(crate) pg: Option<PgInfo>,
    /// Set by table, audit-log and dump backups before `finish`.
    pub(crate) facts: Option<serde_json::Value>,
}

impl<'a> Run<'a> {
    pub(crate) fn begin(repo: &'a Repository, kind: SourceKind, source: &str) -> Result<Run<'a>> {
        Run::begin_with(repo, kind, source, |s| s.source == source)
    }

    /// Like `begin`, with the parent chosen as the newest snapshot of `kind` that
    /// `is_parent` accepts.
    pub(crate) fn begin_with(
        repo: &'a Repository,
        kind: SourceKind,
        source: &str,
        is_parent: impl Fn(&SnapshotSummary) -> bool,
    ) -> Result<Run<'a>> {
        // The lock and the index first: prune cannot remove the parent, or what this run
        // deduplicates against, once they are held.
        let mut run = Run::begin_after(repo, kind, source, None)?;
        run.parent = repo
            .snapshots_for_reading()?
            .into_iter()
            .rev()
            .find(|s| s.summary.kind == kind && is_parent(&s.summary));
        Ok(run)
    }

    /// Like `begin`, with the parent already found by the caller (who listed the
    /// snapshots for its own reasons: they are not listed again).
    pub(crate) fn begin_after(
        repo: &'a Repository,
        kind: SourceKind,
        source: &str,
        parent: Option<Snapshot>,
    ) -> Result<Run<'a>> {
        let start = Instant::now();
        repo.require_write("back up")?;
        let lock = repo.lock(false, &format!("backup {}", kind.as_str()))?;
        let index = Arc::new(repo.load_index()?);
        Ok(Run {
            repo,
            _lock: lock,
            writer: repo.writer(index),
            parent,
            kind,
            source: source.into(),
            start,
            pg: None,
            facts: None,
        })
    }

    /// Finishes the writer, writes the index, then the snapshot (in that order).
    pub(crate) fn finish(
        self,
        opts: &BackupOptions,
        mut stats: SnapshotStats,
        body: &SnapshotBody,
        errors: Vec<String>,
    ) -> Result<BackupReport> {
        let (packs, ws) = self.writer.finish()?;
        stats.chunks_new = ws.chunks_new;
        stats.bytes_new = ws.bytes_new;
        stats.bytes_stored = ws.bytes_stored;
        self.repo.write_index(packs)?;
        stats.duration_ms = self.start.elapsed().as_millis() as u64;
        let parent = self.parent.as_ref().map(|p| p.id);
        let summary = SnapshotSummary {
            time: opts.time.unwrap_or_else(custos_model::clock::now),
            kind: self.kind,
            source: self.source.clone(),
            host: self.repo.opts.host.clone(),
            user: self.repo.opts.user.clone(),
            parent,
            tags: opts.tags.clone(),
            stats,
            key: self.repo.key_id,
            pg: self.pg.clone(),
            facts: self.facts.clone(),
            // The head this backup saw; a trail that cannot be read is no reason to fail
            // the backup (verify and audit verify report it).
            trail: custos_repo::trail::head_of(&self.repo.storage, None).unwrap_or_else(|e| {
                tracing::warn!("the trail's head could not be read: {}", e.message);
                None
            }),
        };
        let snapshot = self.repo.save_snapshot(&summary, body)?;
        Ok(BackupReport {
            snapshot,
            pg: summary.pg.clone(),
            parent,
            source: self.source,
            kind: self.kind,
            stats: summary.stats,
            errors,
        })
    }
}

/// Files, folders and bytes of a tree's manifest entries.
pub(crate) fn tree_stats(entries: &[Entry]) -> SnapshotStats {
    SnapshotStats {
        files: entries.iter().filter(|e| e.kind == EntryKind::File).count() as u64,
        dirs: entries.iter().filter(|e| e.kind == EntryKind::Dir).count() as u64,
        bytes: entries.iter().map(|e| e.size).sum(),
        ..Default::default()
    }
}

/// Starts the progress bar at the walked files' total size and queues them for
/// [`each_file`].
pub(crate) fn queue(walked: Vec<Walked>, progress: &dyn Progress) -> Vec<Mutex<Walked>> {
    let total: u64 = walked
        .iter()
        .filter(|w| w.entry.kind == EntryKind::File)
        .map(|w| w.entry.size)
        .sum();
    progress.start("backup", Some(total));
    walked.into_iter().map(Mutex::new).collect()
}

/// Runs `f` on every regular file of `entries`, `threads` at a time. The first error
/// stops the work and is returned (per-file problems that only make the snapshot partial
/// are handled inside `f`).
pub(crate) fn each_file(
    entries: &[Mutex<Walked>],
    threads: usize,
    f: impl Fn(usize, &mut Walked) -> Result<()> + Sync,
) -> Result<()> {
    let next = AtomicUsize::new(0);
    let fatal: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= entries.len() || fatal.lock().unwrap().is_some() {
                    break;
                }
                let mut w = entries[i].lock().unwrap();
                if w.entry.kind != EntryKind::File {
                    continue;
                }
                if let Err(e) = f(i, &mut w) {
                    fatal.lock().unwrap().get_or_insert(e);
                    break;
                }
            });
        }
    });
    match fatal.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub(crate) fn chunk_reader(
    repo: &Repository,
    writer: &BlobWriter,
    r: impl Read,
    size: Option<u64>,
    progress: &dyn Progress,
    read: &AtomicU64,
) -> std::io::Result<Result<Vec<ChunkId>>> {
    let mut ids = vec![];
    for chunk in repo.config.chunker.split(r, size, repo.cdc_seed()) {
        let chunk = chunk?;
        let n = chunk.len() as u64;
        read.fetch_add(n, Ordering::Relaxed);
        progress.add(n);
        let id = repo.keys.chunk_id(&chunk);
        if let Err(e) = writer.add(id, BlobKind::Data, chunk) {
            return Ok(Err(e));
        }
        ids.push(id);
    }
    Ok(Ok(ids))
}

/// The `facts` of a snapshot of `kind` (format.md 6.4), read as `T`; None for another
/// kind or facts that do not read.
pub fn facts<T: serde::de::DeserializeOwned>(s: &Snapshot, kind: SourceKind) -> Option<T> {
    if s.summary.kind != kind {
        return None;
    }
    serde_json::from_value(s.summary.facts.clone()?).ok()
}

/// The body's `record` of a snapshot of `kind` (format.md 6.4), read as `T` with a
/// restore key; `what` names the kind in messages, with its article ("a table export").
pub fn record<T: serde::de::DeserializeOwned>(
    repo: &Repository,
    snap: &Snapshot,
    kind: SourceKind,
    what: &str,
) -> Result<T> {
    repo.require_restore(&format!("read {what}"))?;
    if snap.summary.kind != kind {
        return Err(Error::config(format!(
            "snapshot {} is a {} snapshot, not {what}",
            snap.id.short(),
            snap.summary.kind.as_str()
        ))
        .hint(format!(
            "`custos snapshots` lists them with kind `{}`",
            kind.as_str()
        )));
    }
    let body = repo.snapshot_body(&snap.id)?;
    let v = body.record.ok_or_else(|| {
        Error::integrity(format!(
            "snapshot {} ({what}) has no record",
            snap.id.short()
        ))
    })?;
    serde_json::from_value(v).map_err(|e| {
        Error::integrity(format!(
            "snapshot {} ({what}) has a malformed record: {e}",
            snap.id.short()
        ))
    })
}

/// Whether the schema-qualified, quoted table name `qualified` (`public.audit_log`) is
/// the table a user named `name`: the same, or its name without the schema, plain or
/// quoted.
pub fn names_table(qualified: &str, name: &str) -> bool {
    qualified == name
        || qualified.ends_with(&format!(".{name}"))
        || qualified.ends_with(&format!(
            ".{}",
            custos_sources::postgres::tables::ident(name)
        ))
}
