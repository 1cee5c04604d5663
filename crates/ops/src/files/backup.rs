//! Backups of folder trees, buckets and streams: the sources that are not a database.
//! A file is stored as one version of it (read again if it changed while read), unchanged
//! files are taken from the files cache without reading, a bucket's objects and a command's
//! output go through the same chunker.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use chrono::Utc;
use custos_model::{Error, Kind, Result};
use custos_repo::snapshot::{SnapshotStats, SourceKind};
use custos_repo::{BlobWriter, Repository, SnapshotBody};
use custos_sources::files::{self, Entry, EntryKind, Walked};
use custos_sources::stream::CommandStream;
use custos_storage::DynStorage;

use crate::cache;
use crate::progress::Progress;

use crate::backup::{chunk_reader, each_file, queue, tree_stats, BackupOptions, BackupReport, Run};

/// What identifies one version of a file: it changes when the file is written or cut.
fn version_of(m: &std::fs::Metadata) -> (u64, i64, i64, u64) {
    use std::os::unix::fs::MetadataExt;
    (
        m.len(),
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        m.ino(),
    )
}

/// Reads a regular file into chunks so that what is stored is one version of it: the
/// same size, modification and change time, and inode before and after the read, and as
/// many bytes read as its size. A file that changed is read once more; if it changed
/// again, what the second read got is kept with its size set to the bytes read (never
/// padded to a size it no longer has) and `Ok(false)` tells the caller to report it. The
/// inner error is the file's own (unreadable), the outer one the repository's.
fn read_one_version(
    repo: &Repository,
    writer: &BlobWriter,
    w: &mut Walked,
    progress: &dyn Progress,
    bytes_read: &AtomicU64,
) -> Result<std::io::Result<bool>> {
    for attempt in 0..2 {
        let file = match std::fs::File::open(&w.source) {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        };
        let before = match file.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(Err(std::io::Error::other("no longer a regular file"))),
            Err(e) => return Ok(Err(e)),
        };
        let counted = AtomicU64::new(0);
        let ids = match chunk_reader(repo, writer, &file, Some(before.len()), progress, &counted) {
            Ok(Ok(ids)) => ids,
            Ok(Err(e)) => return Err(e),
            Err(e) => return Ok(Err(e)),
        };
        let n = counted.load(Ordering::Relaxed);
        bytes_read.fetch_add(n, Ordering::Relaxed);
        let after = match file.metadata() {
            Ok(m) => m,
            Err(e) => return Ok(Err(e)),
        };
        let stable = version_of(&before) == version_of(&after) && n == before.len();
        if stable || attempt == 1 {
            let (size, mtime_ns, ctime_ns, inode) = version_of(&after);
            w.entry.chunks = ids;
            w.entry.size = n;
            w.entry.mtime_ns = mtime_ns;
            // A file stored as read must be read again next time, whatever its times.
            w.fingerprint = custos_sources::files::Fingerprint {
                size: if stable { size } else { u64::MAX },
                mtime_ns,
                ctime_ns,
                inode,
            };
            return Ok(Ok(stable));
        }
        tracing::info!(
            "{} changed while it was read; reading it again",
            w.source.display()
        );
    }
    unreachable!("the second attempt returns")
}

pub fn backup_files(
    repo: &Repository,
    paths: &[PathBuf],
    opts: &BackupOptions,
) -> Result<BackupReport> {
    backup_tree(repo, paths, opts, SourceKind::Files, None, None)
}

/// A folder tree backed up as a snapshot of `kind` (files, or a dump's folder) under
/// `source` (default: the paths), with the kind's `facts`.
pub(crate) fn backup_tree(
    repo: &Repository,
    paths: &[PathBuf],
    opts: &BackupOptions,
    kind: SourceKind,
    source: Option<String>,
    facts: Option<serde_json::Value>,
) -> Result<BackupReport> {
    let roots: Vec<PathBuf> = paths
        .iter()
        .map(|p| {
            std::fs::canonicalize(p).map_err(|e| {
                Error::new(Kind::Source, format!("cannot read {}: {e}", p.display()))
                    .hint("check the path given to `custos backup files`")
            })
        })
        .collect::<Result<_>>()?;
    let source = source.unwrap_or_else(|| {
        roots
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    });
    let mut run = Run::begin(repo, kind, &source)?;
    run.facts = facts;
    let writer = &run.writer;

    let cache_path = opts
        .cache_dir
        .as_ref()
        .map(|d| cache::location(d, &repo.config.id, &source, &repo.keys.id_key));
    let old_cache = cache_path.as_deref().map(cache::load).unwrap_or_default();

    let walked = files::walk(&roots)?;
    let entries = queue(walked.entries, opts.progress);
    let errors: Mutex<Vec<String>> = Mutex::new(
        walked
            .errors
            .iter()
            .map(|(p, e)| format!("{}: {e}", p.display()))
            .collect(),
    );
    let unchanged = AtomicU64::new(0);
    let bytes_read = AtomicU64::new(0);
    let failed: Mutex<std::collections::HashSet<usize>> = Mutex::new(Default::default());
    let result = each_file(&entries, repo.threads(), |i, w| {
        let key = cache::path_key(&repo.keys.id_key, w.entry.path.as_bytes());
        if let Some((fp, ids)) = old_cache.files.get(&key) {
            if *fp == w.fingerprint && ids.iter().all(|id| writer.has(id)) {
                w.entry.chunks = ids.clone();
                unchanged.fetch_add(1, Ordering::Relaxed);
                opts.progress.add(w.entry.size);
                return Ok(());
            }
        }
        match read_one_version(repo, writer, w, opts.progress, &bytes_read)? {
            Ok(true) => {}
            Ok(false) => errors.lock().unwrap().push(format!(
                "{}: changed while it was read, twice; stored as read ({} bytes), which may mix two versions",
                w.source.display(),
                w.entry.size
            )),
            Err(e) => {
                errors
                    .lock()
                    .unwrap()
                    .push(format!("{}: {e}", w.source.display()));
                failed.lock().unwrap().insert(i);
            }
        }
        Ok(())
    });
    opts.progress.finish();
    result?;
    let errors = errors.into_inner().unwrap();
    let walked: Vec<Walked> = entries
        .into_iter()
        .map(|m| m.into_inner().unwrap())
        .collect();
    // A file that failed to read is left out of the manifest rather than stored empty.
    let failed = failed.into_inner().unwrap();
    let kept: Vec<&Walked> = walked
        .iter()
        .enumerate()
        .filter(|(i, _)| !failed.contains(i))
        .map(|(_, w)| w)
        .collect();
    let manifest_entries: Vec<Entry> = kept.iter().map(|w| w.entry.clone()).collect();
    let manifest = crate::manifest::store(repo, writer, &manifest_entries)?;

    let stats = SnapshotStats {
        files_unchanged: unchanged.load(Ordering::Relaxed),
        bytes_read: bytes_read.load(Ordering::Relaxed),
        errors: errors.len() as u64,
        ..tree_stats(&manifest_entries)
    };
    let body = SnapshotBody {
        paths: roots.iter().map(|p| p.display().to_string()).collect(),
        manifest,
        ..Default::default()
    };
    let report = run.finish(opts, stats, &body, errors)?;

    if let Some(p) = cache_path {
        let mut c = cache::FilesCache {
            snapshot: Some(report.snapshot),
            ..Default::default()
        };
        for w in &kept {
            if w.entry.kind == EntryKind::File {
                c.files.insert(
                    cache::path_key(&repo.keys.id_key, w.entry.path.as_bytes()),
                    (w.fingerprint, w.entry.chunks.clone()),
                );
            }
        }
        cache::save(&p, &c);
    }
    Ok(report)
}

/// Backs up every object of a bucket (S3 or another OpenDAL location).
pub fn backup_bucket(
    repo: &Repository,
    bucket: &DynStorage,
    url: &str,
    prefix: &str,
    opts: &BackupOptions,
) -> Result<BackupReport> {
    let run = Run::begin(repo, SourceKind::Bucket, url)?;
    let writer = &run.writer;
    let objects = bucket
        .list(prefix)
        .map_err(|e| e.context("listing the source bucket"))?;
    // The parent's objects by path: one whose size, modification time and MD5 (where the
    // store lists one) are those recorded is not read again, as an unchanged file is not.
    let previous: HashMap<String, Entry> = match &run.parent {
        Some(p) => {
            let body = repo.snapshot_body(&p.id)?;
            crate::manifest::load(repo, writer.index(), &body.manifest)
                .map_err(|e| e.context("the parent snapshot's manifest"))?
                .into_iter()
                .map(|e| (String::from_utf8_lossy(e.path.as_bytes()).into_owned(), e))
                .collect()
        }
        None => HashMap::new(),
    };
    let rel_of = |path: &str| {
        path.strip_prefix(prefix)
            .unwrap_or(path)
            .trim_start_matches('/')
            .to_string()
    };
    let nanos = |t: std::time::SystemTime| {
        chrono::DateTime::<Utc>::from(t)
            .timestamp_nanos_opt()
            .unwrap_or_default()
    };
    let unchanged = |o: &custos_storage::Entry| -> Option<Entry> {
        let prev = previous.get(&rel_of(&o.path))?;
        let same = o.modified.map(nanos) == Some(prev.mtime_ns)
            && prev.size == o.size
            && prev.etag == o.md5
            && prev.chunks.iter().all(|c| writer.index().contains(c));
        same.then(|| prev.clone())
    };
    let total: u64 = objects
        .iter()
        .filter(|o| unchanged(o).is_none())
        .map(|o| o.size)
        .sum();
    opts.progress.start("backup", Some(total));
    let read = AtomicU64::new(0);
    let kept = AtomicU64::new(0);
    let gone: Mutex<Vec<String>> = Mutex::new(vec![]);
    let now = Utc::now().timestamp_nanos_opt().unwrap_or_default();
    let entries = custos_repo::repository::parallel_map(
        &objects,
        repo.threads() * 2,
        |o| -> Result<Option<Entry>> {
            if let Some(e) = unchanged(o) {
                kept.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(e));
            }
            // An object deleted since the listing is left out and reported, not fatal:
            // a live bucket changes while it is read.
            let data = match bucket.get(&o.path) {
                Ok(d) => d,
                Err(e) if e.kind == Kind::NotFound => {
                    gone.lock()
                        .unwrap()
                        .push(format!("{}: deleted after it was listed", o.path));
                    return Ok(None);
                }
                Err(e) => return Err(e.context("reading the source bucket")),
            };
            let ids = chunk_reader(
                repo,
                writer,
                &data[..],
                Some(data.len() as u64),
                opts.progress,
                &read,
            )
            .map_err(|e| Error::new(Kind::Source, e.to_string()))??;
            // What was read is what is recorded: a size that differs from the listing's
            // means the object changed meanwhile, and it is read again next time.
            let listed = data.len() as u64 == o.size;
            Ok(Some(Entry {
                path: rel_of(&o.path).into(),
                kind: EntryKind::File,
                mode: 0o600,
                uid: 0,
                gid: 0,
                mtime_ns: o.modified.filter(|_| listed).map(nanos).unwrap_or(now),
                size: data.len() as u64,
                target: None,
                chunks: ids,
                pages: None,
                etag: o.md5.clone().filter(|_| listed),
            }))
        },
    )?;
    let entries: Vec<Entry> = entries.into_iter().flatten().collect();
    let errors = gone.into_inner().unwrap();
    opts.progress.finish();
    let manifest = crate::manifest::store(repo, writer, &entries)?;
    let stats = SnapshotStats {
        files: entries.len() as u64,
        files_unchanged: kept.load(Ordering::Relaxed),
        errors: errors.len() as u64,
        bytes: entries.iter().map(|e| e.size).sum(),
        bytes_read: read.load(Ordering::Relaxed),
        ..Default::default()
    };
    let body = SnapshotBody {
        paths: vec![url.into()],
        manifest,
        ..Default::default()
    };
    run.finish(opts, stats, &body, errors)
}

/// Backs up standard input (`command` = None) or a command's output under `name`.
pub fn backup_stream(
    repo: &Repository,
    name: &str,
    command: Option<&str>,
    opts: &BackupOptions,
) -> Result<BackupReport> {
    backup_stream_from(repo, name, command, None, opts)
}

/// A stream snapshot of bytes the caller holds (the agent's daily report).
pub fn backup_bytes(
    repo: &Repository,
    name: &str,
    data: &[u8],
    opts: &BackupOptions,
) -> Result<BackupReport> {
    backup_stream_from(repo, name, None, Some(data), opts)
}

fn backup_stream_from(
    repo: &Repository,
    name: &str,
    command: Option<&str>,
    data: Option<&[u8]>,
    opts: &BackupOptions,
) -> Result<BackupReport> {
    let run = Run::begin(repo, SourceKind::Stream, name)?;
    let writer = &run.writer;
    opts.progress.start("backup", None);
    let read = AtomicU64::new(0);
    let ids = match command {
        Some(cmd) => {
            let mut child = CommandStream::spawn(cmd)?;
            let r = chunk_reader(repo, writer, child.stdout(), None, opts.progress, &read);
            // The command's exit status decides before anything is recorded.
            child.finish()?;
            r.map_err(|e| Error::new(Kind::Source, format!("reading the output of `{cmd}`: {e}")))??
        }
        None if data.is_some() => chunk_reader(
            repo,
            writer,
            data.unwrap_or_default(),
            None,
            opts.progress,
            &read,
        )
        .map_err(|e| Error::new(Kind::Source, format!("reading the data: {e}")))??,
        None => chunk_reader(
            repo,
            writer,
            std::io::stdin().lock(),
            None,
            opts.progress,
            &read,
        )
        .map_err(|e| Error::new(Kind::Source, format!("reading standard input: {e}")))??,
    };
    opts.progress.finish();
    let size = read.load(Ordering::Relaxed);
    let stats = SnapshotStats {
        files: 1,
        bytes: size,
        bytes_read: size,
        ..Default::default()
    };
    let body = SnapshotBody {
        paths: vec![name.into()],
        stream: ids,
        stream_size: size,
        ..Default::default()
    };
    run.finish(opts, stats, &body, vec![])
}
