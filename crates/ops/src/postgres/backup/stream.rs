//! Base backups over the replication protocol, for a cluster on another host. custos runs
//! PostgreSQL's own `pg_basebackup`, which asks the server for the backup (`BASE_BACKUP`:
//! start, every file, stop) and writes it as one tar stream to its standard output; custos
//! reads that stream into the same fixed blocks as a backup read from the data directory,
//! so both kinds of backup deduplicate against each other and restore the same way.
//!
//! Incrementals: on PostgreSQL 17+ with `summarize_wal = on` the server sends only the
//! blocks its WAL summaries name since the parent (format.md 6.3): custos gives
//! `pg_basebackup --incremental` a manifest made from the parent's snapshot and lays the
//! blocks sent over the parent's as page patches (a file grown past the parent's last,
//! short block goes on as zeros under patches). Older servers send every file each time
//! (still stored only where its blocks changed, and not hashed when size and time match
//! the parent).
//!
//! What is given up against reading the data directory: pages of files that come whole
//! are not patched one by one (a file's birth time, which guards page mode against a
//! relation made again under the same name, is not in the stream), and only clusters
//! without extra tablespaces (pg_basebackup writes one tablespace to its output). A page
//! failing its checksum is read once more through the server (`pg_read_binary_file`)
//! before it is reported, since a page being written while the server read it can tear.

use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use custos_model::ChunkId;
use custos_model::{Error, Kind, Lsn, PathBytes, Result};
use custos_repo::snapshot::{PgInfo, RootMeta, SnapshotStats};
use custos_repo::{BlobKind, Repository, SnapshotBody};
use custos_sources::files::{Entry, EntryKind, Fingerprint, PagePatches};
use custos_sources::postgres::datadir::{self, PageCheck, PAGE_SIZE};
use custos_sources::postgres::db::{ClusterInfo, Db};

use crate::backup::BackupOptions;
use crate::postgres::backup::shared::{
    begin, config_outside, pg_info, save_cache, segments, store_bytes, wait_archived,
    waits_for_archive, Begun, PgBackupOptions, PgBackupReport, Span,
};
use crate::postgres::pages::{FileBuilder, ParentFile, Sink};

pub(crate) fn backup_streamed(
    repo: &Repository,
    pg: &PgBackupOptions,
    opts: &BackupOptions,
    db: &Db,
    info: &ClusterInfo,
) -> Result<PgBackupReport> {
    let spaces = db.tablespaces()?;
    if !spaces.is_empty() {
        return Err(Error::new(
            Kind::Source,
            format!(
                "the cluster has tablespaces ({}): a backup over the replication protocol carries only the main data directory",
                spaces.join(", ")
            ),
        )
        .hint("run `custos backup postgres` on the database host, where it reads tablespaces from the data directory"));
    }
    let program = pg_tool(
        "pg_basebackup",
        info.server_version_num / 10000,
        pg.pg_bin.as_deref(),
    )?;
    let Begun {
        mut run,
        backup_type,
        promoted_to_full,
        cache_path,
        parents,
        parent_start_ns,
    } = begin(repo, pg, opts, info)?;

    // The server's clock before the backup starts: at or before its true start, which is
    // what an incremental's "changed since" test needs.
    let (start_time, _) = db.clock_and_next_xid()?;
    let (conninfo, password) = pg.conn.libpq()?;
    let label = format!("custos {}", Utc::now().format("%Y-%m-%dT%H:%M:%SZ"));
    // PostgreSQL 17+ with WAL summaries: the server sends only the blocks changed since
    // the parent started, told of the parent by a backup manifest made from its snapshot.
    let block_size = match repo.config.block_chunker {
        custos_chunk::ChunkerParams::Fixed { size } => u64::from(size),
        _ => 0,
    };
    let parent_pg = run.parent.as_ref().and_then(|p| p.summary.pg.clone());
    let server_incremental = match (&parents, &parent_pg) {
        (Some(files), Some(ppg))
            if info.server_version_num >= 170000
                && info.summarize_wal
                && block_size > PAGE_SIZE as u64
                && block_size % PAGE_SIZE as u64 == 0 =>
        {
            Some(TempManifest::write(&parent_manifest(
                info.system_id,
                files,
                ppg,
            ))?)
        }
        _ => None,
    };
    let archive_wait = waits_for_archive(info, pg.include_wal);
    let stream = |incremental: Option<&Path>| -> Result<StreamRead> {
        let mut cmd = Command::new(&program);
        if let Some(m) = incremental {
            cmd.arg(format!("--incremental={}", m.display()));
        }
        cmd.args(["-D", "-", "-F", "t", "-c", "fast", "-w"])
            .args(["-X", if pg.include_wal { "fetch" } else { "none" }])
            .args(["--no-verify-checksums", "--manifest-checksums=NONE"])
            .args(["-l", &label, "-d", &conninfo])
            .env("LC_MESSAGES", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = &password {
            cmd.env("PGPASSWORD", p.as_str());
        }
        let mut child = cmd.spawn().map_err(|e| {
            Error::new(
                Kind::Source,
                format!("cannot run {}: {e}", program.display()),
            )
        })?;
        let stderr = child.stderr.take().expect("piped");
        let messages = std::thread::spawn(move || {
            let mut last = std::collections::VecDeque::new();
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(|l| l.ok())
            {
                tracing::debug!("pg_basebackup: {line}");
                if last.len() == 20 {
                    last.pop_front();
                }
                last.push_back(line);
            }
            last.into_iter().collect::<Vec<_>>()
        });
        // The server waits for the archiver after the last data file, while pg_basebackup
        // holds the end of that file in its output buffer: custos bounds how long the stream
        // may go quiet once data flows.
        let watchdog = Watchdog::start(child.id(), pg.archive_timeout);

        opts.progress.start("backup", None);
        let stdout = child.stdout.take().expect("piped");
        let read = read_stream(
            repo,
            &run.writer,
            stdout,
            parents.as_ref(),
            parent_start_ns,
            info.data_checksums,
            incremental.is_some().then_some(block_size),
            opts,
            || {
                if archive_wait {
                    watchdog.arm();
                }
            },
        );
        opts.progress.finish();
        // custos stopped reading (its own error, storage for one; or a file it cannot rebuild
        // from an incremental stream): that is the story, not the signal that ends
        // pg_basebackup.
        let stopped_reading = read.as_ref().map_or(true, |r| r.redo.is_some());
        if stopped_reading {
            let _ = child.kill();
        }
        let status = child.wait();
        let timed_out = watchdog.stop();
        let messages = messages.join().unwrap_or_default();
        if timed_out {
            return Err(Error::new(
                Kind::Source,
                format!(
                    "the server did not finish the backup within {} s: it sent nothing more, waiting until the last WAL segment is archived; the backup is not saved",
                    pg.archive_timeout.as_secs()
                ),
            )
            .hint("archiving is failing or slow: check `custos pg check` and the server log for archive_command errors, or raise --archive-timeout"));
        }
        let status = status.map_err(|e| Error::internal(e.to_string()))?;
        if let (true, false, Err(e)) = (stopped_reading, timed_out, &read) {
            return Err(e.clone());
        }
        if let Ok(r) = &read {
            if r.redo.is_some() {
                return read;
            }
        }
        if !status.success() {
            let said: Vec<&String> = messages
                .iter()
                .filter(|l| !l.starts_with("NOTICE") && !l.contains("warning:"))
                .collect();
            let said = said
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(Error::new(
                Kind::Source,
                format!("pg_basebackup failed ({status}): {said}"),
            )
            .hint("the role needs the REPLICATION attribute and a `replication` line in pg_hba.conf; a password comes from PGPASSWORD or ~/.pgpass"));
        }
        read
    };
    let mut read = match &server_incremental {
        Some(m) => match stream(Some(&m.path)) {
            // The server cannot take an incremental from this parent: its WAL summaries do
            // not reach back to it (summarize_wal turned on later, wal_summary_keep_time),
            // the parent is on a timeline this server did not come through, or (a standby)
            // this backup would start at a restartpoint before the parent's end.
            Err(e) if refused_incremental(&e.message) => {
                tracing::warn!(
                    "the server refused an incremental from the parent ({}): taking every file over the stream instead",
                    e.message
                );
                stream(None)?
            }
            r => r?,
        },
        None => stream(None)?,
    };
    if let Some(why) = read.redo.take() {
        // Rare (a relation cut short inside a block since the parent): the whole stream
        // once more, which needs nothing from the parent.
        tracing::warn!("{why}: taking every file over the stream instead");
        read = stream(None)?;
    }
    let server_incremental = read.incremental_files > 0;
    let manifest = read.manifest.take().ok_or_else(|| {
        Error::new(
            Kind::Source,
            "pg_basebackup's stream ended without a backup manifest: the backup is incomplete",
        )
    })?;
    let (start_lsn, timeline) = read.start.ok_or_else(|| {
        Error::new(
            Kind::Source,
            "pg_basebackup's stream has no backup_label: the backup is incomplete",
        )
    })?;
    let stop_lsn = parse_manifest_end(&manifest)?;
    if read.system_id != Some(info.system_id) {
        return Err(Error::new(
            Kind::Source,
            format!(
                "the streamed backup's pg_control names cluster {:?}, but the server connected to is cluster {}",
                read.system_id, info.system_id
            ),
        )
        .hint("the SQL and replication connections reached different servers: name one host"));
    }
    // A page that failed its checksum may have been torn by a concurrent write: the
    // server reads it once more (pages changed since the start are WAL-logged and skipped).
    let mut damaged = vec![];
    for (path, blk, stored, computed) in read.damaged.drain(..) {
        let first = datadir::relation_first_page(&path).unwrap_or(0);
        let offset = u64::from(blk - first) * PAGE_SIZE as u64;
        let still = match db.read_page(&path, offset, PAGE_SIZE) {
            Ok(page) if page.len() == PAGE_SIZE => matches!(
                datadir::check_page(&page, blk, start_lsn),
                PageCheck::Damaged { .. }
            ),
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(
                    "could not read {path} block {blk} again to confirm its damage: {}",
                    e.message
                );
                true
            }
        };
        if still {
            damaged.push(format!(
                "{path} block {blk}: checksum {stored:#06x}, computed {computed:#06x}"
            ));
        }
    }
    if archive_wait {
        let last = segments(timeline, start_lsn, stop_lsn, info.segment_size)
            .pop()
            .expect("at least one segment");
        wait_archived(repo, info.system_id, &last, pg.archive_timeout)?;
    }
    // Taken after the stream ended: at or after the backup's true end.
    let (stop_time, next_xid) = db.clock_and_next_xid()?;

    let manifest_id = crate::manifest::store(repo, &run.writer, &read.entries)?;
    run.pg = Some(pg_info(
        info,
        pg,
        backup_type,
        Span {
            timeline,
            start_lsn,
            stop_lsn,
            start_time,
            stop_time,
            next_xid,
        },
        damaged.len() as u64,
    ));
    let stats = SnapshotStats {
        files_unchanged: read.unchanged,
        bytes_read: read.bytes,
        ..crate::backup::tree_stats(&read.entries)
    };
    let host = conninfo
        .split(' ')
        .find_map(|kv| kv.strip_prefix("host="))
        .unwrap_or("")
        .trim_matches('\'')
        .to_string();
    let body = SnapshotBody {
        paths: vec![format!("{host}:{}", info.data_directory)],
        manifest: manifest_id,
        root: Some(read.root),
        pg_config_outside: config_outside(info),
        ..Default::default()
    };
    let report = run.finish(opts, stats, &body, vec![])?;
    if let Some(p) = cache_path {
        let fp = Fingerprint {
            size: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            inode: 0,
        };
        save_cache(&p, report.snapshot, read.entries.iter().map(|e| (e, fp)));
    }
    Ok(PgBackupReport {
        backup: report,
        damaged_pages: damaged,
        promoted_to_full,
        pages_patched: read.pages_patched,
        units_patched: 0,
        blocks_skipped: 0,
        wal_summaries: server_incremental,
        via: "replication",
        config_outside: body.pg_config_outside.clone(),
    })
}

/// What the tar stream held.
struct StreamRead {
    entries: Vec<Entry>,
    root: RootMeta,
    /// Start LSN and timeline, from the backup label.
    start: Option<(Lsn, u32)>,
    manifest: Option<String>,
    system_id: Option<u64>,
    /// (path, block, stored checksum, computed checksum) of pages failing their checksum.
    damaged: Vec<(String, u32, u16, u16)>,
    unchanged: u64,
    bytes: u64,
    /// Relation files the server sent incrementally, and the pages they patched.
    incremental_files: u64,
    pages_patched: u64,
    /// Set when a file came incrementally in a shape the parent's blocks cannot rebuild:
    /// the reading stopped there, and the backup is taken again without the parent.
    redo: Option<String>,
}

#[allow(clippy::too_many_arguments)]
fn read_stream(
    repo: &Repository,
    writer: &custos_repo::BlobWriter,
    stream: impl Read,
    parents: Option<&crate::postgres::backup::shared::ParentFiles>,
    parent_start_ns: i64,
    check_pages: bool,
    incremental: Option<u64>,
    opts: &BackupOptions,
    alive: impl Fn(),
) -> Result<StreamRead> {
    let broken = |e: std::io::Error| {
        Error::new(Kind::Source, format!("reading pg_basebackup's stream: {e}"))
    };
    let mut out = StreamRead {
        entries: vec![],
        root: RootMeta {
            mode: 0o700,
            uid: 0,
            gid: 0,
        },
        start: None,
        manifest: None,
        system_id: None,
        damaged: vec![],
        unchanged: 0,
        bytes: 0,
        incremental_files: 0,
        pages_patched: 0,
        redo: None,
    };
    let mut owners = Owners::default();
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, stream));
    for item in archive.entries().map_err(broken)? {
        let mut item = item.map_err(broken)?;
        alive();
        let header = item.header();
        // The name as bytes for the entry; as text to match PostgreSQL's own names.
        let raw = item.path_bytes();
        let mut exact: &[u8] = &raw;
        while let Some(rest) = exact.strip_prefix(b"./") {
            exact = rest;
        }
        while let Some(rest) = exact.strip_suffix(b"/") {
            exact = rest;
        }
        let exact = PathBytes::new(exact.to_vec());
        let path = exact.lossy().into_owned();
        let kind = match header.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            _ => EntryKind::Other,
        };
        let size = header.size().map_err(broken)?;
        let mut entry = Entry {
            path: exact,
            kind,
            mode: header.mode().map_err(broken)? & 0o7777,
            uid: owners.user(
                header.username().ok().flatten(),
                header.uid().map_err(broken)?,
            ),
            gid: owners.group(
                header.groupname().ok().flatten(),
                header.gid().map_err(broken)?,
            ),
            mtime_ns: (header.mtime().map_err(broken)? as i64).saturating_mul(1_000_000_000),
            size: if kind == EntryKind::File { size } else { 0 },
            target: None,
            chunks: vec![],
            pages: None,
            etag: None,
        };
        if kind == EntryKind::Symlink {
            entry.target = item
                .link_name()
                .map_err(broken)?
                .map(|t| PathBytes::from(t.as_ref()));
        }
        // Not part of the data directory: the manifest says where the backup ends.
        if path == "backup_manifest" {
            let mut text = String::new();
            item.read_to_string(&mut text).map_err(broken)?;
            out.manifest = Some(text);
            continue;
        }
        if path == "tablespace_map" && size == 0 {
            continue;
        }
        if path == "backup_label" {
            let mut text = String::new();
            item.read_to_string(&mut text).map_err(broken)?;
            // An incremental's label names its parent, and PostgreSQL refuses to start
            // from such a label; the files stored are whole, so the label is a full one.
            let text: String = text
                .split_inclusive('\n')
                .filter(|l| !l.starts_with("INCREMENTAL FROM "))
                .collect();
            entry.size = text.len() as u64;
            entry.chunks = store_bytes(repo, writer, text.as_bytes())?;
            // The label comes first in the stream.
            out.start = Some(parse_label(&text)?);
            out.entries.push(entry);
            continue;
        }
        // With --wal (-X fetch) the WAL from start to stop comes under pg_wal/.
        let wal_file = kind == EntryKind::File
            && path
                .strip_prefix("pg_wal/")
                .is_some_and(|n| !n.contains('/'));
        if let (Some(block_size), Some(real)) = (incremental, incremental_target(&path)) {
            if kind != EntryKind::File || !datadir::included(&real, kind) {
                continue;
            }
            let real = PathBytes::from(real);
            let Some(parent) = parents.and_then(|p| p.get(&real)) else {
                out.redo = Some(format!(
                    "{real} came incrementally but the parent has no such file"
                ));
                return Ok(out);
            };
            entry.path = real;
            let since = out.start.map_or(Lsn(0), |s| s.0);
            let first_page =
                datadir::relation_first_page(&entry.path.lossy()).filter(|_| check_pages);
            match rebuild(
                repo,
                writer,
                &mut item,
                size,
                parent,
                block_size,
                |blk, page| {
                    if let Some(first) = first_page {
                        if let PageCheck::Damaged { stored, computed } =
                            datadir::check_page(page, first + blk, since)
                        {
                            out.damaged.push((
                                entry.path.to_string(),
                                first + blk,
                                stored,
                                computed,
                            ));
                        }
                    }
                    alive();
                },
            )
            .map_err(|e| match e {
                Rebuild::Io(e) => broken(e),
                Rebuild::Other(e) => e,
            })? {
                Some((pages, size, chunks, patches)) => {
                    entry.size = size;
                    entry.chunks = chunks;
                    entry.pages = patches;
                    out.pages_patched += pages;
                }
                None => {
                    out.redo = Some(format!(
                        "{} came incrementally in a shape its parent's blocks cannot rebuild (cut short inside a block)",
                        entry.path
                    ));
                    return Ok(out);
                }
            }
            out.incremental_files += 1;
            out.bytes += size;
            opts.progress.add(size);
            out.entries.push(entry);
            continue;
        }
        if path.is_empty() || !(wal_file || datadir::included(&path, kind)) {
            continue;
        }
        if kind != EntryKind::File {
            out.entries.push(entry);
            continue;
        }
        let same = parents
            .and_then(|p| p.get(&entry.path))
            .filter(|pf| {
                pf.size == entry.size
                    && pf.mtime_ns == entry.mtime_ns
                    && pf.mtime_ns < parent_start_ns
            })
            .map(|pf| Entry {
                chunks: pf.chunks.clone(),
                pages: pf.pages.clone(),
                ..entry.clone()
            })
            .filter(|e| e.chunk_refs().all(|id| writer.has(id)));
        if let Some(same) = same {
            let n = std::io::copy(&mut item, &mut std::io::sink()).map_err(broken)?;
            if n != size {
                return Err(broken(std::io::ErrorKind::UnexpectedEof.into()));
            }
            entry = same;
            out.unchanged += 1;
            out.bytes += n;
            opts.progress.add(n);
            out.entries.push(entry);
            continue;
        }
        let first_page = datadir::relation_first_page(&path).filter(|_| check_pages);
        let mut offset = 0u64;
        for chunk in repo.config.block_chunker.split(&mut item, Some(size), 0) {
            let chunk = chunk.map_err(broken)?;
            alive();
            if let Some(first) = first_page {
                // Pages changed since the start (WAL replay rewrites them) are not checked.
                let since = out.start.map_or(Lsn(0), |s| s.0);
                for (k, page) in chunk.chunks(PAGE_SIZE).enumerate() {
                    let blk = first + (offset / PAGE_SIZE as u64) as u32 + k as u32;
                    if let PageCheck::Damaged { stored, computed } =
                        datadir::check_page(page, blk, since)
                    {
                        out.damaged.push((path.clone(), blk, stored, computed));
                    }
                }
            }
            if path == "global/pg_control" && offset == 0 && chunk.len() >= 8 {
                out.system_id = Some(u64::from_le_bytes(chunk[..8].try_into().unwrap()));
            }
            offset += chunk.len() as u64;
            opts.progress.add(chunk.len() as u64);
            let id = repo.keys.chunk_id(&chunk);
            writer.add(id, BlobKind::Data, chunk)?;
            entry.chunks.push(id);
        }
        if offset != size {
            return Err(broken(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{path} ended after {offset} of {size} bytes"),
            )));
        }
        out.bytes += offset;
        out.entries.push(entry);
    }
    // Past the end-of-archive blocks pg_basebackup pads its output: read it all, or it
    // dies of SIGPIPE writing the padding.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(broken)?;
    if let Some(c) = out.entries.iter().find(|e| e.path == "global/pg_control") {
        out.root = RootMeta {
            mode: 0o700,
            uid: c.uid,
            gid: c.gid,
        };
    }
    Ok(out)
}

/// Whether pg_basebackup failed because the server would not base an incremental on the
/// manifest it was given (PostgreSQL's `PrepareForIncrementalBackup`), rather than for a
/// reason a whole stream would meet as well.
fn refused_incremental(message: &str) -> bool {
    message.contains("WAL summaries are required")
        || message.contains("manifest requires WAL")
        || message.contains("found in manifest, but not in this server's history")
}

/// `dir/INCREMENTAL.name` (a file PostgreSQL 17+ sent incrementally): `dir/name`.
fn incremental_target(path: &str) -> Option<String> {
    let (dir, name) = path.rsplit_once('/')?;
    let name = name.strip_prefix("INCREMENTAL.")?;
    Some(format!("{dir}/{name}"))
}

/// The header of an incremental file (PostgreSQL's `basebackup_incremental.h`).
const INCREMENTAL_MAGIC: u32 = 0xd3ae_1f0d;

/// Why a rebuild failed: the stream (said as the stream's error) or the repository.
enum Rebuild {
    Io(std::io::Error),
    Other(Error),
}

impl From<std::io::Error> for Rebuild {
    fn from(e: std::io::Error) -> Rebuild {
        Rebuild::Io(e)
    }
}

impl From<Error> for Rebuild {
    fn from(e: Error) -> Rebuild {
        Rebuild::Other(e)
    }
}

/// A relation file rebuilt from an incremental file: pages patched, size, chunks, patches.
type Rebuilt = (u64, u64, Vec<ChunkId>, Option<PagePatches>);

/// Rebuilds a relation file the server sent incrementally (`INCREMENTAL.*`, `size` bytes
/// in the stream) over its parent, as `pg_combinebackup` would: the file is
/// `max(truncation length, last block sent + 1)` pages; a page sent is taken, a page
/// below the truncation length and inside the parent's file is the parent's, any other
/// is zeros. Block by block (format.md 6.3): all pages known, the block whole; else the
/// parent's block of the same length with the pages sent patched over it; else, the
/// parent's block being shorter or missing (the file grew), the parent's chunks, zeros
/// and patches from there on. `None` when the parent's block is longer (the file was cut
/// short inside it): no chunk can say that. `seen(block, page)` is told of every page
/// sent.
fn rebuild(
    repo: &Repository,
    writer: &custos_repo::BlobWriter,
    item: &mut impl Read,
    size: u64,
    parent: &ParentFile,
    block_size: u64,
    mut seen: impl FnMut(u32, &[u8]),
) -> std::result::Result<Option<Rebuilt>, Rebuild> {
    let bad = |m: String| Rebuild::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, m));
    let mut word = || -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        item.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    };
    let (magic, n, truncation) = (word()?, word()?, word()?);
    if magic != INCREMENTAL_MAGIC {
        return Err(bad(format!(
            "incremental file with magic {magic:#010x}, not {INCREMENTAL_MAGIC:#010x}"
        )));
    }
    if n > datadir::RELSEG_PAGES || truncation > datadir::RELSEG_PAGES {
        return Err(bad(format!(
            "incremental file of {n} blocks, truncation length {truncation}: more than a segment"
        )));
    }
    let blocks = (0..n)
        .map(|_| word())
        .collect::<std::io::Result<Vec<u32>>>()?;
    if blocks.windows(2).any(|w| w[0] >= w[1])
        || blocks.last().is_some_and(|b| *b >= datadir::RELSEG_PAGES)
    {
        return Err(bad(
            "incremental file with block numbers out of order".into()
        ));
    }
    let mut header = 12 + 4 * u64::from(n);
    if n > 0 && header % PAGE_SIZE as u64 != 0 {
        let pad = PAGE_SIZE as u64 - header % PAGE_SIZE as u64;
        std::io::copy(&mut item.take(pad), &mut std::io::sink())?;
        header += pad;
    }
    if header + u64::from(n) * PAGE_SIZE as u64 != size {
        return Err(bad(format!(
            "incremental file of {n} blocks holds {size} bytes"
        )));
    }
    let pages = blocks.last().map_or(truncation, |b| truncation.max(b + 1));
    let parent_pages = (parent.size / PAGE_SIZE as u64) as u32;
    let from_parent = |p: u32| p < truncation && p < parent_pages;
    let sink = Sink::writer(repo, writer);
    let mut builder = FileBuilder::new(Some(parent), block_size);
    let per = (block_size / PAGE_SIZE as u64) as u32;
    let zero = [0u8; PAGE_SIZE];
    let mut next = 0;
    // Past the parent's last block of its full length the file is the parent's chunks,
    // zeros, and patches (format.md 6.3): no chunk can follow.
    let mut tail = false;
    for i in 0..pages.div_ceil(per) {
        let first = i * per;
        let end = (first + per).min(pages);
        let mut sent: Vec<(u32, Vec<u8>)> = vec![];
        while next < blocks.len() && blocks[next] < end {
            let mut page = vec![0u8; PAGE_SIZE];
            item.read_exact(&mut page)?;
            seen(blocks[next], &page);
            sent.push((blocks[next] - first, page));
            next += 1;
        }
        let is_sent = |p: u32| sent.iter().any(|(k, _)| *k == p - first);
        let len = (end - first) as usize * PAGE_SIZE;
        if !tail && !(first..end).any(|p| !is_sent(p) && from_parent(p)) {
            let mut data = vec![0u8; len];
            for (k, page) in &sent {
                let at = *k as usize * PAGE_SIZE;
                data[at..at + PAGE_SIZE].copy_from_slice(page);
            }
            builder.block(i, data, |_, _| true, &sink)?;
            continue;
        }
        // The pages sent, and zeros where the parent may hold something it should not.
        let mut over: Vec<(u32, &[u8])> = sent.iter().map(|(k, p)| (*k, p.as_slice())).collect();
        over.extend(
            (first..end)
                .filter(|p| !is_sent(*p) && !from_parent(*p) && *p < parent_pages)
                .map(|p| (p - first, &zero[..])),
        );
        over.sort_by_key(|(k, _)| *k);
        if !tail {
            if builder.patch(i, len, &over, &sink)? {
                continue;
            }
            let held = parent
                .covered
                .saturating_sub(u64::from(first) * PAGE_SIZE as u64);
            if held > len as u64 {
                // Cut short inside a block the parent holds longer: its pages below the
                // cut would need a chunk cut short too.
                return Ok(None);
            }
            tail = true;
        }
        builder.tail(i, &over, &sink)?;
    }
    let last = pages.saturating_sub(1);
    if tail && !builder.has_patch_at(last) {
        // Past the chunks, the last page is zeros: said with a patch, so that the file
        // has patches (a file without is its chunks alone) and reaches its size.
        builder.tail(last / per, &[(last % per, &zero[..])], &sink)?;
    }
    let patched = builder.pages_patched;
    let size = u64::from(pages) * PAGE_SIZE as u64;
    let (chunks, patches, _) = builder.finish(size, &sink)?;
    Ok(Some((patched, size, chunks, patches)))
}

/// A backup manifest (version 2) of the parent as PostgreSQL's incremental backup reads
/// it: the system identifier, the parent's WAL range, and its files with their sizes.
fn parent_manifest(
    system_id: u64,
    files: &crate::postgres::backup::shared::ParentFiles,
    parent: &PgInfo,
) -> String {
    let mut listed: Vec<(&PathBytes, &ParentFile)> = files.iter().collect();
    listed.sort_by(|a, b| a.0.cmp(b.0));
    let mut m = format!(
        "{{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": {system_id},\n\"Files\": [\n"
    );
    for (k, (path, f)) in listed.iter().enumerate() {
        let time =
            chrono::DateTime::from_timestamp_nanos(f.mtime_ns).format("%Y-%m-%d %H:%M:%S GMT");
        let sep = if k + 1 < listed.len() { "," } else { "" };
        // A name that is not UTF-8 goes as PostgreSQL writes it: hex, as Encoded-Path.
        let name = match path.to_str() {
            Some(p) => format!("\"Path\": {}", serde_json::Value::from(p)),
            None => format!("\"Encoded-Path\": \"{}\"", hex::encode(path.as_bytes())),
        };
        m.push_str(&format!(
            "{{ {name}, \"Size\": {}, \"Last-Modified\": \"{time}\" }}{sep}\n",
            f.size
        ));
    }
    m.push_str(&format!(
        "],\n\"WAL-Ranges\": [\n{{ \"Timeline\": {}, \"Start-LSN\": \"{}\", \"End-LSN\": \"{}\" }}\n],\n",
        parent.timeline, parent.start_lsn, parent.stop_lsn
    ));
    // The checksum covers every line but its own.
    let sum = ring::digest::digest(&ring::digest::SHA256, m.as_bytes());
    m.push_str(&format!(
        "\"Manifest-Checksum\": \"{}\"}}\n",
        hex::encode(sum)
    ));
    m
}

/// The parent's manifest in a private temporary file for `pg_basebackup --incremental`,
/// removed when dropped.
struct TempManifest {
    path: PathBuf,
}

impl TempManifest {
    fn write(text: &str) -> Result<TempManifest> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = std::env::temp_dir().join(format!(
            "custos-parent-manifest-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| custos_model::error::io_error(Kind::Internal, &path, e))?;
        let t = TempManifest { path };
        f.write_all(text.as_bytes())
            .map_err(|e| custos_model::error::io_error(Kind::Internal, &t.path, e))?;
        Ok(t)
    }
}

impl Drop for TempManifest {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Owner names in the stream mapped to this host's ids (the server's `postgres` may have
/// another uid here); the numeric id when the name is unknown here.
#[derive(Default)]
struct Owners {
    users: HashMap<String, u32>,
    groups: HashMap<String, u32>,
}

impl Owners {
    fn user(&mut self, name: Option<&str>, id: u64) -> u32 {
        // SAFETY: getpwnam returns null or a pointer valid until the next call.
        Owners::local(&mut self.users, name, id, |c| unsafe {
            let p = libc::getpwnam(c);
            (!p.is_null()).then(|| (*p).pw_uid)
        })
    }

    fn group(&mut self, name: Option<&str>, id: u64) -> u32 {
        // SAFETY: getgrnam returns null or a pointer valid until the next call.
        Owners::local(&mut self.groups, name, id, |c| unsafe {
            let g = libc::getgrnam(c);
            (!g.is_null()).then(|| (*g).gr_gid)
        })
    }

    fn local(
        known: &mut HashMap<String, u32>,
        name: Option<&str>,
        id: u64,
        lookup: impl Fn(*const libc::c_char) -> Option<u32>,
    ) -> u32 {
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return id as u32;
        };
        *known.entry(name.into()).or_insert_with(|| {
            let c = std::ffi::CString::new(name).unwrap_or_default();
            lookup(c.as_ptr()).unwrap_or(id as u32)
        })
    }
}

/// Kills `pg_basebackup` when the server has not finished within the timeout of being
/// last armed (each piece of the stream arms it anew; quiet while the server waits for the
/// archiver).
struct Watchdog {
    armed: Arc<Mutex<Option<Instant>>>,
    fired: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(pid: u32, timeout: Duration) -> Watchdog {
        let armed: Arc<Mutex<Option<Instant>>> = Arc::default();
        let fired = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let (armed, fired, done) = (armed.clone(), fired.clone(), done.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if armed.lock().unwrap().is_some_and(|t| t.elapsed() > timeout) {
                        fired.store(true, Ordering::Relaxed);
                        // SAFETY: the child is not reaped before this thread is joined, so
                        // the pid still names it.
                        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Watchdog {
            armed,
            fired,
            done,
            thread: Some(thread),
        }
    }

    fn arm(&self) {
        *self.armed.lock().unwrap() = Some(Instant::now());
    }

    /// Stops watching; whether it killed the program.
    fn stop(mut self) -> bool {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.fired.load(Ordering::Relaxed)
    }
}

/// Start LSN and timeline from a backup label.
fn parse_label(label: &str) -> Result<(Lsn, u32)> {
    let field = |name: &str| {
        label
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .ok_or_else(|| {
                Error::new(
                    Kind::Source,
                    format!("the streamed backup_label has no `{name}` line"),
                )
            })
    };
    let start = field("START WAL LOCATION:")?;
    let lsn: Lsn = start.split_whitespace().next().unwrap_or("").parse()?;
    let timeline = field("START TIMELINE:")?.parse().map_err(|_| {
        Error::new(
            Kind::Source,
            "the streamed backup_label's timeline is not a number",
        )
    })?;
    Ok((lsn, timeline))
}

/// Where the backup ends: the last `End-LSN` of the manifest's WAL ranges.
fn parse_manifest_end(manifest: &str) -> Result<Lsn> {
    let bad = |what: &str| Error::new(Kind::Source, format!("the streamed backup manifest {what}"));
    let v: serde_json::Value =
        serde_json::from_str(manifest).map_err(|e| bad(&format!("is not JSON: {e}")))?;
    v.get("WAL-Ranges")
        .and_then(|r| r.as_array())
        .and_then(|r| r.last())
        .and_then(|r| r.get("End-LSN"))
        .and_then(|l| l.as_str())
        .ok_or_else(|| bad("has no WAL-Ranges End-LSN"))?
        .parse()
}

/// A PostgreSQL program: in `bin` when given, else the Debian folder of `major`, else PATH.
pub fn pg_tool(name: &str, major: i32, bin: Option<&Path>) -> Result<PathBuf> {
    if let Some(b) = bin {
        let p = b.join(name);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::config(format!("{} does not exist", p.display()))
                .hint("--pg-bin (or [postgres] bin) names the folder of PostgreSQL's programs"))
        };
    }
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin/{name}"));
    if debian.is_file() {
        return Ok(debian);
    }
    if let Some(p) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
    {
        return Ok(p);
    }
    Err(Error::config(format!("{name} was not found")).hint(format!(
        "install PostgreSQL {major}'s client programs (Debian: postgresql-client-{major}), or pass --pg-bin"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_and_manifest_give_the_wal_range() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\n\
                     START TIMELINE: 3\n";
        assert_eq!(
            parse_label(label).unwrap(),
            ("0/2000028".parse().unwrap(), 3)
        );
        assert!(parse_label("START TIMELINE: 1\n").is_err());
        let manifest = r#"{"PostgreSQL-Backup-Manifest-Version": 1, "Files": [],
            "WAL-Ranges": [{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/3000100" },
                           { "Timeline": 2, "Start-LSN": "0/3000100", "End-LSN": "0/4000200" }]}"#;
        assert_eq!(
            parse_manifest_end(manifest).unwrap(),
            "0/4000200".parse().unwrap()
        );
        assert!(parse_manifest_end(r#"{"Files": []}"#).is_err());
        assert!(parse_manifest_end("{").is_err());
    }
}
