//! Base backups over the replication protocol, for a cluster on another host. custos runs
//! PostgreSQL's own `pg_basebackup`, which asks the server for the backup (`BASE_BACKUP`:
//! start, every file, stop) and writes it as one tar stream to its standard output; custos
//! reads that stream into the same fixed blocks as a backup read from the data directory,
//! so both kinds of backup deduplicate against each other and restore the same way.
//!
//! What is given up against reading the data directory: every file crosses the network
//! each time (an incremental still stores only changed blocks, and skips hashing files
//! whose size and time match its parent), pages are not patched one by one (a file's
//! birth time, which guards page mode against a relation made again under the same name,
//! is not in the stream), and only clusters without extra tablespaces (pg_basebackup
//! writes one tablespace to its output). A page failing its checksum is read once more
//! through the server (`pg_read_binary_file`) before it is reported, since a page being
//! written while the server read it can tear.

use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use custos_model::{Error, Kind, Lsn, Result};
use custos_repo::snapshot::{PgInfo, RootMeta, SnapshotStats};
use custos_repo::{BlobKind, Repository, SnapshotBody};
use custos_sources::files::{Entry, EntryKind, Fingerprint};
use custos_sources::postgres::datadir::{self, PageCheck, PAGE_SIZE};
use custos_sources::postgres::db::{ClusterInfo, Db};

use crate::backup::BackupOptions;
use crate::pg_backup::{
    begin, save_cache, segments, store_bytes, wait_archived, waits_for_archive, Begun,
    PgBackupOptions, PgBackupReport,
};

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
    let mut cmd = Command::new(&program);
    cmd.args(["-D", "-", "-F", "t", "-c", "fast", "-w"])
        .args(["-X", if pg.include_wal { "fetch" } else { "none" }])
        .args(["--no-verify-checksums", "--manifest-checksums=NONE"])
        .args(["-l", &label, "-d", &conninfo])
        .env("LC_MESSAGES", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
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
    let archive_wait = waits_for_archive(info, pg.include_wal);

    opts.progress.start("backup", None);
    let stdout = child.stdout.take().expect("piped");
    let read = read_stream(
        repo,
        &run.writer,
        stdout,
        parents.as_ref(),
        parent_start_ns,
        info.data_checksums,
        opts,
        || {
            if archive_wait {
                watchdog.arm();
            }
        },
    );
    opts.progress.finish();
    // custos stopped reading (its own error, storage for one): that error is the story,
    // not the signal that ends pg_basebackup.
    let stopped_reading = read.is_err();
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
    let mut read = read?;
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
    run.pg = Some(PgInfo {
        system_id: info.system_id,
        cluster: pg.cluster.clone(),
        version_num: info.server_version_num,
        backup_type,
        timeline,
        start_lsn,
        stop_lsn,
        start_time,
        stop_time,
        next_xid,
        segment_size: info.segment_size,
        wal_included: pg.include_wal,
        data_checksums: info.data_checksums,
        damaged_pages: damaged.len() as u64,
    });
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
        pages_patched: 0,
        units_patched: 0,
        blocks_skipped: 0,
        wal_summaries: false,
        via: "replication",
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
}

#[allow(clippy::too_many_arguments)]
fn read_stream(
    repo: &Repository,
    writer: &custos_repo::BlobWriter,
    stream: impl Read,
    parents: Option<&crate::pg_backup::ParentFiles>,
    parent_start_ns: i64,
    check_pages: bool,
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
    };
    let mut owners = Owners::default();
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, stream));
    for item in archive.entries().map_err(broken)? {
        let mut item = item.map_err(broken)?;
        alive();
        let header = item.header();
        let raw = item.path().map_err(broken)?.to_string_lossy().into_owned();
        let path = raw
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let kind = match header.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
            tar::EntryType::Directory => EntryKind::Dir,
            tar::EntryType::Symlink => EntryKind::Symlink,
            _ => EntryKind::Other,
        };
        let size = header.size().map_err(broken)?;
        let mut entry = Entry {
            path: path.clone(),
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
        };
        if kind == EntryKind::Symlink {
            entry.target = item
                .link_name()
                .map_err(broken)?
                .map(|t| t.to_string_lossy().into_owned());
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
        if path.is_empty() || !(wal_file || datadir::included(&path, kind)) {
            continue;
        }
        if kind != EntryKind::File {
            out.entries.push(entry);
            continue;
        }
        let same = parents
            .and_then(|p| p.get(&path))
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
