//! `wal-push` (PostgreSQL's archive_command) and `wal-fetch` (restore_command).
//!
//! wal-push acknowledges a file only once it is durably stored, succeeds again for a file
//! already archived with the same content, and refuses a different file under an existing
//! name and a segment whose header names another cluster.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use custos_model::{Error, Kind, Result};
use custos_repo::wal::PushOutcome;
use custos_repo::Repository;
use custos_sources::postgres::wal::{self, WalFileKind};

pub fn push(repo: &Repository, path: &Path, pgdata: &Path) -> Result<(String, PushOutcome)> {
    repo.require_write("archive WAL")?;
    let (name, system_id, data) = read_checked(path, pgdata)?;
    let outcome = repo.wal_push(system_id, &name, &data)?;
    Ok((name, outcome))
}

/// Reads a WAL file handed over by archive_command and checks it belongs to the cluster:
/// (name, system id, content).
pub fn read_checked(path: &Path, pgdata: &Path) -> Result<(String, u64, Vec<u8>)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::config(format!("{} names no WAL file", path.display())))?
        .to_string();
    let kind = wal::classify(&name)?;
    let data = std::fs::read(path)
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

/// The asynchronous mode's spool: a local folder where `wal-push --async` leaves each
/// file, durable (written to a temp name, fsynced, renamed, folder fsynced) before it
/// acknowledges, and from which one background pusher per spool uploads in parallel,
/// deleting each file only once the repository holds it.
pub struct Spool {
    pub dir: std::path::PathBuf,
    /// Above this many bytes waiting, `push_async` stores synchronously instead: WAL is
    /// never dropped and never acknowledged before it is durable somewhere.
    pub max_bytes: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SpoolOutcome {
    /// In the spool, durable; the pusher uploads it.
    Spooled,
    /// The spool was full: the caller must push synchronously.
    Full,
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

    /// Files waiting in the spool, oldest name first, with their sizes.
    pub fn waiting(&self) -> Result<Vec<(String, u64)>> {
        let mut out = vec![];
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(self.io(e)),
        };
        for e in rd {
            let e = e.map_err(|e| self.io(e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((name, len));
        }
        out.sort();
        Ok(out)
    }

    /// Leaves a file in the spool, durably. An identical file already waiting is a
    /// success; a different one under the same name is refused.
    pub fn put(&self, name: &str, data: &[u8]) -> Result<SpoolOutcome> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| self.io(e))?;
        let path = self.dir.join(name);
        if let Ok(existing) = std::fs::read(&path) {
            if existing == data {
                return Ok(SpoolOutcome::Spooled);
            }
            return Err(Error::new(
                Kind::Conflict,
                format!("{name} is already waiting in the WAL spool with different content; refusing to replace it"),
            )
            .hint("check that only one cluster archives through this spool"));
        }
        let waiting: u64 = self.waiting()?.iter().map(|(_, n)| n).sum();
        if waiting + data.len() as u64 > self.max_bytes {
            return Ok(SpoolOutcome::Full);
        }
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.io(e)
        })?;
        Ok(SpoolOutcome::Spooled)
    }

    /// Takes the pusher's lock; None when another pusher holds it.
    pub fn try_lock(&self) -> Result<Option<std::fs::File>> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| self.io(e))?;
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

    /// Uploads everything waiting, `threads` files at a time, until the spool has stayed
    /// empty for `idle`. A file leaves the spool only after the repository holds it; a
    /// failure is recorded in `.last-error`, and retried after a pause.
    pub fn drain(
        &self,
        repo: &Repository,
        system_id: u64,
        threads: usize,
        idle: std::time::Duration,
    ) -> Result<u64> {
        let mut pushed = 0u64;
        let mut quiet_since = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            let waiting = self.waiting()?;
            if waiting.is_empty() {
                if quiet_since.elapsed() >= idle {
                    return Ok(pushed);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            let results = custos_repo::repository::parallel_map(
                &waiting,
                threads,
                |(name, _)| -> Result<()> {
                    let path = self.dir.join(name);
                    let data = std::fs::read(&path).map_err(|e| self.io(e))?;
                    repo.wal_push(system_id, name, &data)?;
                    std::fs::remove_file(&path).map_err(|e| self.io(e))?;
                    Ok(())
                },
            );
            match results {
                Ok(done) => {
                    pushed += done.len() as u64;
                    let _ = std::fs::remove_file(self.dir.join(".last-error"));
                    pause = std::time::Duration::from_millis(100);
                }
                Err(e) => {
                    let _ = std::fs::write(
                        self.dir.join(".last-error"),
                        format!("{} {}\n", chrono::Utc::now().to_rfc3339(), e.message),
                    );
                    tracing::warn!("WAL spool: {}", e.message);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_secs(30));
                }
            }
            if let Ok(d) = std::fs::File::open(&self.dir) {
                let _ = d.sync_all();
            }
            quiet_since = std::time::Instant::now();
        }
    }
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
