//! `wal-push` (PostgreSQL's archive_command) and `wal-fetch` (restore_command).
//!
//! wal-push acknowledges a file only once it is durably stored, succeeds again for a file
//! already archived with the same content, and refuses a different file under an existing
//! name and a segment whose header names another cluster.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use custos_model::{Error, Kind, Result};
use custos_repo::trail::Anchor;
use custos_repo::wal::PushOutcome;
use custos_repo::Repository;
use custos_sources::postgres::wal::{self, WalFileKind};
use custos_storage::DynStorage;

/// Archives one file; with `also`, writes the stored object to each secondary as well
/// (byte for byte) before returning, so that PostgreSQL's acknowledgement means both.
/// `anchor`: the last trail entry this host wrote, recorded in the object's label.
pub fn push(
    repo: &Repository,
    path: &Path,
    pgdata: &Path,
    also: &[(String, DynStorage)],
    anchor: Option<&Anchor>,
) -> Result<(String, PushOutcome)> {
    repo.require_write("archive WAL")?;
    let (name, system_id, data) = read_checked(path, pgdata)?;
    let outcome = repo.wal_push(system_id, &name, &data, anchor)?;
    mirror(repo, also, system_id, &name)?;
    Ok((name, outcome))
}

/// Writes an archived WAL object to secondaries, from the primary's stored bytes.
pub fn mirror(
    repo: &Repository,
    also: &[(String, DynStorage)],
    system_id: u64,
    name: &str,
) -> Result<()> {
    let path = custos_repo::paths::wal(system_id, name);
    for (sec, storage) in also {
        crate::maintenance::copy::copy_object(&repo.storage, storage, &path)
            .map_err(|e| e.context(format!("secondary `{sec}`")))?;
    }
    Ok(())
}

/// A WAL file's content: mapped (segments: no copy of 16 MiB through a fresh buffer on the
/// path archive_command waits on) or read (small files).
pub enum WalBytes {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl std::ops::Deref for WalBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            WalBytes::Mapped(m) => m,
            WalBytes::Read(v) => v,
        }
    }
}

fn read_wal(path: &Path) -> std::io::Result<WalBytes> {
    let f = std::fs::File::open(path)?;
    if f.metadata()?.len() < (1 << 20) {
        let mut v = vec![];
        std::io::Read::read_to_end(&mut &f, &mut v)?;
        return Ok(WalBytes::Read(v));
    }
    // SAFETY: PostgreSQL neither writes to nor truncates a WAL file it handed to
    // archive_command (it is complete, and recycled only once archived), so the mapping
    // stays valid and unchanged while it is read.
    let m = unsafe { memmap2::MmapOptions::new().map(&f)? };
    Ok(WalBytes::Mapped(m))
}

/// Reads a WAL file handed over by archive_command and checks it belongs to the cluster:
/// (name, system id, content).
pub fn read_checked(path: &Path, pgdata: &Path) -> Result<(String, u64, WalBytes)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::config(format!("{} names no WAL file", path.display())))?
        .to_string();
    let kind = wal::classify(&name)?;
    let data = read_wal(path)
        .map_err(|e| Error::new(Kind::Source, format!("cannot read {}: {e}", path.display())))?;
    let system_id = wal::system_id(pgdata)?;
    if let WalFileKind::Segment { .. } = kind {
        let h = wal::parse_header(&data, &name)?;
        if h.system_id != system_id {
            return Err(Error::new(
                Kind::Conflict,
                format!(
                    "{name} belongs to another cluster (system identifier {}, this cluster {system_id}); refusing to archive it",
                    h.system_id
                ),
            )
            .hint("archive_command must run for the cluster whose data directory is given by --pgdata / PGDATA"));
        }
    }
    Ok((name, system_id, data))
}

/// The asynchronous mode. PostgreSQL's own `pg_wal` is the queue: a background pusher
/// (one per cluster and repository, by `flock`) reads ahead every file PostgreSQL has
/// marked `.ready` in `pg_wal/archive_status`, uploads four at a time, and leaves a marker
/// in this folder once the repository holds a file. `wal-push --async` for a file finds
/// its marker (usually already there: a few milliseconds), or starts the pusher and waits
/// for it. Nothing is acknowledged before it is durable in the repository, and nothing is
/// copied or dropped: until it is pushed, a file stays in `pg_wal`, where PostgreSQL keeps
/// it for as long as it is `.ready`.
pub struct Spool {
    pub dir: std::path::PathBuf,
}

impl Spool {
    /// `<cache>/wal-spool/<system id>-<hash of the repository location>`.
    pub fn location(cache_dir: &Path, system_id: u64, repo_location: &str) -> std::path::PathBuf {
        let h = blake3::hash(repo_location.as_bytes()).to_hex();
        cache_dir
            .join("wal-spool")
            .join(format!("{system_id:016x}-{}", &h[..16]))
    }

    fn io(&self, e: std::io::Error) -> Error {
        Error::new(
            Kind::Internal,
            format!("WAL spool {}: {e}", self.dir.display()),
        )
        .hint(
            "check the free space and permissions of the spool folder (the cache folder of custos)",
        )
    }

    fn marker(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(format!("{name}.ok"))
    }

    fn error_file(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(format!("{name}.error"))
    }

    fn ensure_dir(&self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| self.io(e))
    }

    /// Files PostgreSQL waits to have archived (`.ready`), oldest first.
    pub fn ready(pgdata: &Path) -> Vec<String> {
        let mut out: Vec<String> =
            names_ending(&pgdata.join("pg_wal/archive_status"), ".ready").collect();
        out.sort();
        out
    }

    /// Files the pusher stored whose marker PostgreSQL's archive_command has not taken yet.
    fn stored(&self) -> std::collections::HashSet<String> {
        names_ending(&self.dir, ".ok").collect()
    }

    /// Consumes the marker of `name` if the pusher already stored it.
    pub fn take_done(&self, name: &str) -> bool {
        std::fs::remove_file(self.marker(name)).is_ok()
    }

    /// The pusher's last failure, as written in `.last-error` (what archive_command's
    /// message points to, and what `pg check` reports).
    pub fn last_error(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(".last-error"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    /// Records that the pusher could not start (the repository would not open, say):
    /// in `.last-error`, and for the archive_command waiting for it, which then fails at
    /// once with this error instead of waiting out its timeout.
    pub fn pusher_failed(&self, e: &Error) {
        let _ = self.ensure_dir();
        let text = match &e.hint {
            Some(h) => format!("{} (hint: {h})", e.message),
            None => e.message.clone(),
        };
        let _ = std::fs::write(
            self.dir.join(".last-error"),
            format!(
                "{} the WAL pusher could not start: {text}\n",
                chrono::Utc::now().to_rfc3339()
            ),
        );
        self.write_whole(&self.dir.join(".pusher-error"), &text);
    }

    /// Writes a message the archive_command waiting in [`Spool::wait_done`] reads as soon
    /// as the file appears: written aside and renamed in place, whole or not at all
    /// (written in place, it was once read empty and said nothing).
    fn write_whole(&self, path: &Path, text: &str) {
        let Some(name) = path.file_name() else {
            return;
        };
        let tmp = path.with_file_name(format!(".{}.new", name.to_string_lossy()));
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, path);
        }
    }

    /// A pusher started: the failure of an earlier one no longer holds.
    pub fn pusher_started(&self) {
        let _ = std::fs::remove_file(self.dir.join(".pusher-error"));
    }

    /// Waits for the pusher to store `name`; its error if it failed to, or could not
    /// start.
    pub fn wait_done(&self, name: &str, timeout: std::time::Duration) -> Result<bool> {
        let start = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.take_done(name) {
                return Ok(true);
            }
            let failed = self.dir.join(".pusher-error");
            let fresh = std::fs::metadata(&failed)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= start);
            if fresh {
                let msg = std::fs::read_to_string(&failed).unwrap_or_default();
                return Err(Error::new(
                    Kind::Storage,
                    format!("the WAL pusher could not start, so {name} was not stored: {}", msg.trim()),
                )
                .hint(format!("fix the cause and PostgreSQL's next retry archives it; the pusher's last error is in {}", self.dir.join(".last-error").display())));
            }
            if let Ok(msg) = std::fs::read_to_string(self.error_file(name)) {
                let _ = std::fs::remove_file(self.error_file(name));
                return Err(Error::new(
                    Kind::Storage,
                    format!("the WAL pusher could not store {name}: {}", msg.trim()),
                ));
            }
            if std::time::Instant::now() > deadline {
                return Ok(false);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Takes the pusher's lock; None when another pusher holds it.
    pub fn try_lock(&self) -> Result<Option<std::fs::File>> {
        self.ensure_dir()?;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.dir.join(".pusher.lock"))
            .map_err(|e| self.io(e))?;
        // SAFETY: flock on a descriptor we own.
        let r = unsafe {
            libc::flock(
                std::os::unix::io::AsRawFd::as_raw_fd(&f),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        Ok((r == 0).then_some(f))
    }

    /// The pusher: stores every `.ready` file of `pgdata` that has no marker yet,
    /// `threads` at a time, until nothing has been ready for `idle`. Returns how many it
    /// stored. A failure is left beside the file's name (`<name>.error`, read by the
    /// waiting archive_command) and in `.last-error`, and retried after a pause.
    pub fn drain(
        &self,
        repo: &Repository,
        pgdata: &Path,
        threads: usize,
        idle: std::time::Duration,
        also: &[(String, DynStorage)],
        anchor: Option<&Anchor>,
    ) -> Result<u64> {
        self.ensure_dir()?;
        let mut pushed = 0u64;
        let mut quiet_since = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            // One listing of each folder per round, not a lookup per file: the pusher
            // polls while the archiver works through what it stored.
            let stored = self.stored();
            let todo: Vec<String> = Self::ready(pgdata)
                .into_iter()
                .filter(|n| !stored.contains(n))
                .collect();
            if todo.is_empty() {
                if quiet_since.elapsed() >= idle {
                    self.clean_markers(pgdata);
                    return Ok(pushed);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
            let results =
                custos_repo::repository::parallel_map(&todo, threads, |name| -> Result<bool> {
                    let path = pgdata.join("pg_wal").join(name);
                    match read_checked(&path, pgdata).and_then(|(n, sys, data)| {
                        repo.wal_push_with(sys, &n, &data, false, anchor)?;
                        mirror(repo, also, sys, &n)
                    }) {
                        Ok(_) => {
                            std::fs::write(self.marker(name), b"").map_err(|e| self.io(e))?;
                            let _ = std::fs::remove_file(self.error_file(name));
                            Ok(true)
                        }
                        Err(e) => {
                            self.write_whole(&self.error_file(name), &e.message);
                            let _ = std::fs::write(
                                self.dir.join(".last-error"),
                                format!(
                                    "{} {name}: {}\n",
                                    chrono::Utc::now().to_rfc3339(),
                                    e.message
                                ),
                            );
                            tracing::warn!("WAL pusher: {name}: {}", e.message);
                            Ok(false)
                        }
                    }
                })?;
            let ok = results.iter().filter(|r| **r).count() as u64;
            pushed += ok;
            if ok == results.len() as u64 {
                let _ = std::fs::remove_file(self.dir.join(".last-error"));
                pause = std::time::Duration::from_millis(100);
            } else {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_secs(30));
            }
            quiet_since = std::time::Instant::now();
        }
    }

    /// Markers whose file PostgreSQL no longer waits for (it archived it through another
    /// call, or the marker outlived a crash) are removed after ten minutes.
    fn clean_markers(&self, pgdata: &Path) {
        let ready: std::collections::HashSet<String> = Self::ready(pgdata).into_iter().collect();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(name) = n.strip_suffix(".ok") else {
                continue;
            };
            let old = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a > std::time::Duration::from_secs(600));
            if old && !ready.contains(name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Names of the files in `dir` ending in `suffix`, without it (none if `dir` is missing).
fn names_ending<'a>(dir: &Path, suffix: &'a str) -> impl Iterator<Item = String> + 'a {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(move |e| {
            let name = e.ok()?.file_name();
            Some(name.to_str()?.strip_suffix(suffix)?.to_string())
        })
}

/// Restores one archived file to `dest`; `Ok(false)` if it was never archived.
pub fn fetch(repo: &Repository, name: &str, dest: &Path, pgdata: &Path) -> Result<bool> {
    wal::classify(name)?;
    let system_id = wal::system_id(pgdata)?;
    let Some(data) = repo.wal_fetch(system_id, name)? else {
        return Ok(false);
    };
    // Whole or nothing at `dest`: temp file in the same folder, fsync, rename.
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{name}.custos-tmp"));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::new(
            Kind::Internal,
            format!("cannot write {}: {e}", dest.display()),
        )
    })?;
    Ok(true)
}
