//! A base backup read from the data directory, on the database host: `pg_backup_start`,
//! a parallel read in fixed 128 KiB blocks (16 pages, so an unchanged block deduplicates),
//! data page checksums checked on the way, `pg_backup_stop`, and the backup label written
//! into the snapshot.
//!
//! An incremental takes a file from its parent without reading it when the file's size
//! and modification time are those recorded by the parent and that time is older than the
//! parent's start (a file written during the parent's backup may have changed again within
//! the same timestamp tick, so it is read again). A file read again stores only its blocks
//! that changed (the others are already in the repository under the same id), and of a
//! relation's main fork only its changed pages, where its pages say which changed
//! (`ReadFile::read`; the patches themselves are built in `postgres/pages.rs`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use chrono::Utc;
use custos_model::{ChunkId, Error, Kind, Lsn, Result};
use custos_repo::snapshot::{RootMeta, SnapshotStats};
use custos_repo::{BlobWriter, Repository, SnapshotBody};
use custos_sources::direct::DirectReader;
use custos_sources::files::{Entry, EntryKind, Walked};
use custos_sources::postgres::datadir::{self, PageCheck, PAGE_SIZE};
use custos_sources::postgres::db::{ClusterInfo, Db};
use custos_sources::postgres::summary::FileChanges;

use super::shared::{
    begin, config_outside, pg_info, save_cache, segments, store_bytes, wait_archived,
    waits_for_archive, Begun, PgBackupOptions, PgBackupReport, Span,
};
use crate::backup::BackupOptions;
use crate::cache;
use crate::postgres::pages::{FileBuilder, ParentFile, Sink};

/// Reads the data directory of the cluster `db` is connected to (on the database host).
pub(crate) fn backup_datadir(
    repo: &Repository,
    pg: &PgBackupOptions,
    opts: &BackupOptions,
    db: &Db,
    info: &ClusterInfo,
) -> Result<PgBackupReport> {
    let pgdata = pg
        .pgdata
        .clone()
        .unwrap_or_else(|| PathBuf::from(&info.data_directory));
    let dir_id = custos_sources::postgres::wal::system_id(&pgdata).map_err(|e| {
        e.context(format!("reading the data directory {}", pgdata.display()))
            .hint("pass --pgdata (or PGDATA) naming the data directory of the server backed up; custos must run on the database host, or pass --replication to stream the backup from another host")
    })?;
    if dir_id != info.system_id {
        return Err(Error::config(format!(
            "{} belongs to cluster {dir_id}, but the server connected to is cluster {}",
            pgdata.display(),
            info.system_id
        ))
        .hint("--pgdata and the connection settings must name the same cluster"));
    }
    let root_meta = std::fs::metadata(&pgdata)
        .map_err(|e| custos_model::error::io_error(Kind::Source, &pgdata, e))?;

    let Begun {
        mut run,
        backup_type,
        promoted_to_full,
        cache_path,
        parents: parent_files,
        parent_start_ns,
    } = begin(repo, pg, opts, info)?;
    let parent_pg = run.parent.as_ref().and_then(|p| p.summary.pg.clone());

    let label = format!("custos {}", Utc::now().format("%Y-%m-%dT%H:%M:%SZ"));
    let (start_lsn, timeline, start_time) = db.backup_start(&label, true)?;
    // Page mode: changed relation files store only pages newer than the parent's start.
    // Page LSNs order changes only along one history: same timeline, parent before this.
    let block_size = match repo.config.block_chunker {
        custos_chunk::ChunkerParams::Fixed { size } => u64::from(size),
        _ => 0,
    };
    let page_since = parent_pg
        .as_ref()
        .filter(|p| parent_files.is_some() && p.timeline == timeline && p.stop_lsn <= start_lsn)
        .filter(|_| block_size > PAGE_SIZE as u64 && block_size % PAGE_SIZE as u64 == 0)
        .map(|p| p.start_lsn);
    let pages_patched = AtomicU64::new(0);
    let units_patched = AtomicU64::new(0);
    let blocks_skipped = AtomicU64::new(0);
    // Unit hashes of relation files as restored, kept on this host for the next backup.
    let units = cache_path.as_ref().filter(|_| block_size > 0).map(|p| {
        let parent = run
            .parent
            .as_ref()
            .map(|s| s.id)
            .filter(|_| page_since.is_some());
        cache::UnitStore::open(p, parent, &repo.keys.id_key)
    });
    // PostgreSQL 17+: the server's WAL summaries say which blocks changed since the
    // parent started; an incremental then reads only those (and what they cannot vouch
    // for). Unavailable summaries only cost reading.
    let summaries = match page_since {
        Some(since) if info.server_version_num >= 170000 && info.summarize_wal => db
            .changed_blocks(
                timeline,
                since,
                start_lsn,
                std::time::Duration::from_secs(30),
            )
            .unwrap_or_else(|e| {
                tracing::warn!(
                    "WAL summaries unusable, reading every changed file: {}",
                    e.message
                );
                None
            }),
        _ => None,
    };
    let entries = crate::backup::queue(datadir::walk(&pgdata)?.entries, opts.progress);
    let vanished: Mutex<Vec<usize>> = Mutex::new(vec![]);
    let damaged: Mutex<Vec<String>> = Mutex::new(vec![]);
    let unchanged = AtomicU64::new(0);
    let bytes_read = AtomicU64::new(0);
    let writer = &run.writer;
    let check_pages = info.data_checksums;
    let result = crate::backup::each_file(&entries, repo.threads(), |i, w| {
        let parent = parent_files.as_ref().and_then(|p| p.get(&w.entry.path));
        let same = parent.filter(|pf| {
            pf.size == w.entry.size
                && pf.mtime_ns == w.entry.mtime_ns
                && pf.mtime_ns < parent_start_ns
        });
        if let Some(pf) = same {
            let entry = Entry {
                chunks: pf.chunks.clone(),
                pages: pf.pages.clone(),
                ..w.entry.clone()
            };
            if entry.chunk_refs().all(|id| writer.has(id)) {
                w.entry = entry;
                if let Some(u) = &units {
                    u.keep(&w.entry.path.lossy());
                }
                unchanged.fetch_add(1, Ordering::Relaxed);
                opts.progress.add(w.entry.size);
                return Ok(());
            }
        }
        // PostgreSQL's own names are text; a name that is not cannot be a relation file.
        let rel = w.entry.path.lossy().into_owned();
        let first_page = datadir::relation_first_page(&rel);
        let pages = match (page_since, parent) {
            (Some(since), Some(pf)) if datadir::is_main_fork(&rel) => Some(PageMode {
                parent: pf,
                since,
                // A file made after the parent started (a relation dropped and made
                // again under the same name) owes nothing to the parent's blocks.
                made_before_ns: parent_start_ns,
            }),
            _ => None,
        };
        let changes = summaries
            .as_ref()
            .filter(|_| pages.is_some())
            .map(|c| c.for_file(&rel))
            .filter(|c| *c != FileChanges::ReadAll);
        let read = ReadFile {
            path: &w.source,
            rel: &rel,
            units: units
                .as_ref()
                .filter(|u| u.enabled() && datadir::is_main_fork(&rel)),
            first_page,
            check_pages,
            start_lsn,
            pages,
            changes,
            block_size,
        };
        match read.run(repo, writer, &bytes_read, opts)? {
            Some(r) => {
                w.entry.chunks = r.chunks;
                w.entry.pages = r.pages;
                w.entry.size = r.size;
                pages_patched.fetch_add(r.pages_patched, Ordering::Relaxed);
                units_patched.fetch_add(r.units_patched, Ordering::Relaxed);
                blocks_skipped.fetch_add(r.blocks_skipped, Ordering::Relaxed);
                let bad = r.damaged;
                let mut d = damaged.lock().unwrap();
                for (blk, stored, computed) in bad {
                    d.push(format!(
                        "{} block {blk}: checksum {stored:#06x}, computed {computed:#06x}",
                        w.entry.path
                    ));
                }
            }
            // Dropped while the backup ran: recovery will drop it too.
            None => vanished.lock().unwrap().push(i),
        }
        Ok(())
    });
    opts.progress.finish();
    result?;
    // The server switches to a new segment at stop; custos then waits until the last
    // segment the backup needs is in the repository, not merely handed to the archiver.
    let stop = db.backup_stop(false)?;
    // With --wal the snapshot carries that WAL itself: no need to wait for the archive.
    if waits_for_archive(info, pg.include_wal) {
        let last = segments(timeline, start_lsn, stop.stop_lsn, info.segment_size)
            .pop()
            .expect("at least one segment");
        wait_archived(repo, info.system_id, &last, pg.archive_timeout)?;
    }

    let vanished = vanished.into_inner().unwrap();
    let walked: Vec<Walked> = entries
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !vanished.contains(i))
        .map(|(_, m)| m.into_inner().unwrap())
        .collect();
    let mut manifest_entries: Vec<Entry> = walked.iter().map(|w| w.entry.clone()).collect();
    let owner = {
        use std::os::unix::fs::MetadataExt;
        RootMeta {
            mode: root_meta.mode() & 0o7777,
            uid: root_meta.uid(),
            gid: root_meta.gid(),
        }
    };
    let small_file = |path: &str, data: &[u8]| -> Result<Entry> {
        let ids = store_bytes(repo, writer, data)?;
        Ok(Entry {
            path: path.into(),
            kind: EntryKind::File,
            mode: 0o600,
            uid: owner.uid,
            gid: owner.gid,
            mtime_ns: Utc::now().timestamp_nanos_opt().unwrap_or(0),
            size: data.len() as u64,
            target: None,
            chunks: ids,
            pages: None,
            etag: None,
        })
    };
    manifest_entries.push(small_file("backup_label", stop.backup_label.as_bytes())?);
    let mut wal_bytes = 0u64;
    if pg.include_wal {
        for name in segments(timeline, start_lsn, stop.stop_lsn, info.segment_size) {
            let p = pgdata.join("pg_wal").join(&name);
            let data = std::fs::read(&p).map_err(|e| {
                Error::new(
                    Kind::Source,
                    format!("WAL segment {name} needed by the backup could not be read: {e}"),
                )
                .hint("it was recycled before custos copied it; run the backup again (or rely on the archive without --wal)")
            })?;
            wal_bytes += data.len() as u64;
            manifest_entries.push(small_file(&format!("pg_wal/{name}"), &data)?);
        }
    }
    let manifest = crate::manifest::store(repo, writer, &manifest_entries)?;
    let damaged = damaged.into_inner().unwrap();
    run.pg = Some(pg_info(
        info,
        pg,
        backup_type,
        Span {
            timeline,
            start_lsn,
            stop_lsn: stop.stop_lsn,
            start_time,
            stop_time: stop.stop_time,
            next_xid: stop.next_xid,
        },
        damaged.len() as u64,
    ));
    let stats = SnapshotStats {
        files_unchanged: unchanged.load(Ordering::Relaxed),
        bytes_read: bytes_read.load(Ordering::Relaxed) + wal_bytes,
        ..crate::backup::tree_stats(&manifest_entries)
    };
    let body = SnapshotBody {
        paths: vec![pgdata.display().to_string()],
        manifest,
        tablespace_map: Some(stop.tablespace_map.clone()).filter(|m| !m.is_empty()),
        root: Some(owner),
        pg_config_outside: config_outside(info),
        ..Default::default()
    };
    let report = run.finish(opts, stats, &body, vec![])?;
    if let Some(u) = units {
        u.commit(report.snapshot);
    }
    if let Some(p) = cache_path {
        save_cache(
            &p,
            report.snapshot,
            walked.iter().map(|w| (&w.entry, w.fingerprint)),
        );
    }
    Ok(PgBackupReport {
        backup: report,
        damaged_pages: damaged,
        promoted_to_full,
        pages_patched: pages_patched.into_inner(),
        units_patched: units_patched.into_inner(),
        blocks_skipped: blocks_skipped.into_inner(),
        wal_summaries: summaries.is_some(),
        via: "datadir",
        config_outside: body.pg_config_outside.clone(),
    })
}

/// Page mode for one file: its parent's record and the parent's start.
struct PageMode<'p> {
    parent: &'p ParentFile,
    since: Lsn,
    made_before_ns: i64,
}

struct ReadFile<'a> {
    path: &'a Path,
    /// The path in the snapshot.
    rel: &'a str,
    /// Unit hashes: the parent's are read from here, this file's written (relation
    /// main forks).
    units: Option<&'a cache::UnitStore>,
    /// Relation files: the number of the first page (checksums, page mode).
    first_page: Option<u32>,
    check_pages: bool,
    start_lsn: Lsn,
    pages: Option<PageMode<'a>>,
    /// What the server's WAL summaries say changed in the file (page mode only).
    changes: Option<FileChanges>,
    block_size: u64,
}

struct FileRead {
    chunks: Vec<ChunkId>,
    pages: Option<custos_sources::files::PagePatches>,
    size: u64,
    pages_patched: u64,
    units_patched: u64,
    /// Blocks taken from the parent unread (WAL summaries).
    blocks_skipped: u64,
    /// (block, stored checksum, computed checksum) of damaged pages.
    damaged: Vec<(u32, u16, u16)>,
}

impl ReadFile<'_> {
    /// Reads the file in fixed blocks, checking page checksums of relation files. None
    /// when the file disappeared.
    fn run(
        &self,
        repo: &Repository,
        writer: &BlobWriter,
        read: &AtomicU64,
        opts: &BackupOptions,
    ) -> Result<Option<FileRead>> {
        let path = self.path;
        let io = |e| custos_model::error::io_error(Kind::Source, path, e);
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        // Page mode only: birth time, and the size the summaries' blocks are counted in.
        let meta = self.pages.as_ref().and_then(|_| file.metadata().ok());
        // Without a birth time the file's age is unknown: whole blocks.
        let pages = self.pages.as_ref().filter(|m| {
            meta.as_ref()
                .and_then(|md| md.created().ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .is_some_and(|t| (t.as_nanos() as i64) < m.made_before_ns)
        });
        let sink = Sink::writer(repo, writer);
        let mut builder = FileBuilder::new(pages.map(|m| m.parent), self.block_size);
        let parent_units = self
            .units
            .filter(|_| pages.is_some())
            .and_then(|u| u.load(self.rel));
        if let Some(u) = self.units {
            builder = builder.with_units(u.seed, parent_units.as_deref());
        }
        let mut bad = vec![];
        let first_page = self.first_page.filter(|_| self.check_pages);
        let mut block = |builder: &mut FileBuilder, i: u32, offset: u64, chunk: Vec<u8>| {
            let first_blk = (offset / PAGE_SIZE as u64) as u32;
            if let Some(first) = first_page {
                for (k, page) in chunk.chunks(PAGE_SIZE).enumerate() {
                    let blk = first + first_blk + k as u32;
                    if let PageCheck::Damaged { stored, computed } =
                        datadir::check_page(page, blk, self.start_lsn)
                    {
                        // A page being written while read tears: read it once more.
                        let at = offset + (k * PAGE_SIZE) as u64;
                        if still_damaged(&file, at, blk, self.start_lsn) {
                            bad.push((blk, stored, computed));
                        }
                    }
                }
            }
            let n = chunk.len() as u64;
            read.fetch_add(n, Ordering::Relaxed);
            opts.progress.add(n);
            let rel_first = self.first_page.unwrap_or(0) + first_blk;
            builder.block(
                i,
                chunk,
                |k, page| match pages {
                    Some(m) => !datadir::page_unchanged_since(
                        page,
                        rel_first + k as u32,
                        m.since,
                        self.check_pages,
                    ),
                    None => true,
                },
                &sink,
            )
        };
        let mut offset = 0u64;
        let mut blocks_skipped = 0u64;
        match (pages, &self.changes) {
            // The server's WAL summaries name the changed pages: read only their blocks,
            // take every other block of the parent's as it is.
            (Some(m), Some(changes)) => {
                use std::os::unix::fs::FileExt;
                // Page mode survived the birth-time check, so the metadata was read.
                let size = meta.as_ref().expect("read in page mode").len();
                let per = (self.block_size / PAGE_SIZE as u64) as u32;
                for i in 0..size.div_ceil(self.block_size) as u32 {
                    let start = u64::from(i) * self.block_size;
                    let len = self.block_size.min(size - start);
                    if len == self.block_size
                        && m.parent.covered >= start + len
                        && !changes.touches(i * per, per)
                    {
                        builder.carry(i)?;
                        blocks_skipped += 1;
                        opts.progress.add(len);
                        offset += len;
                        continue;
                    }
                    let mut buf = vec![0u8; len as usize];
                    match file.read_exact_at(&mut buf, start) {
                        Ok(()) => {}
                        // Truncated while read: WAL replay truncates it too.
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                        Err(e) => return Err(io(e)),
                    }
                    block(&mut builder, i, offset, buf)?;
                    offset += len;
                }
            }
            _ => {
                let blocks: Box<dyn Iterator<Item = std::io::Result<Vec<u8>>>> =
                    match DirectReader::open(path, self.block_size as usize) {
                        Some(d) => Box::new(d),
                        None => repo.config.block_chunker.split(&file, None, 0),
                    };
                for (i, chunk) in blocks.enumerate() {
                    let chunk = chunk.map_err(io)?;
                    let n = chunk.len() as u64;
                    block(&mut builder, i as u32, offset, chunk)?;
                    offset += n;
                }
            }
        }
        let (pages_patched, units_patched) = (builder.pages_patched, builder.units_patched);
        let (chunks, pages, unit_hashes) = builder.finish(offset, &sink)?;
        if let (Some(store), Some(h)) = (self.units, unit_hashes) {
            store.save(self.rel, &h);
        }
        Ok(Some(FileRead {
            chunks,
            pages,
            size: offset,
            pages_patched,
            units_patched,
            blocks_skipped,
            damaged: bad,
        }))
    }
}

fn still_damaged(file: &std::fs::File, at: u64, blk: u32, start_lsn: Lsn) -> bool {
    use std::os::unix::fs::FileExt;
    let mut page = vec![0u8; PAGE_SIZE];
    match file.read_exact_at(&mut page, at) {
        Ok(()) => matches!(
            datadir::check_page(&page, blk, start_lsn),
            PageCheck::Damaged { .. }
        ),
        Err(_) => false,
    }
}
