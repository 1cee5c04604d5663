//! Repository locks: shared for writers that add data (backup), exclusive for prune.
//!
//! A lock is an object `locks/<random id>` written create-only, then every lock is listed:
//! an exclusive lock conflicts with any other live lock, a shared lock with any live
//! exclusive one; on conflict the new lock is removed and the caller gets `Locked`. A live
//! holder rewrites its lock every [`REFRESH`]; a lock older than [`STALE_AFTER`], or left by
//! a dead process on this host, is stale and ignored. Prune relies on this: while it holds
//! the exclusive lock no writer is running, so unindexed packs are garbage.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use custos_crypto::aead;
use custos_model::{Error, Kind, LockId, Result};
use custos_storage::{DynStorage, PutMode};
use serde::{Deserialize, Serialize};

use crate::paths;

pub const REFRESH: Duration = Duration::from_secs(5 * 60);
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
const AAD: &[u8] = b"custos lock v1";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockInfo {
    pub time: DateTime<Utc>,
    pub exclusive: bool,
    pub host: String,
    pub pid: u32,
    pub command: String,
}

impl LockInfo {
    pub fn is_stale(&self, this_host: &str) -> bool {
        let now = Utc::now();
        let age = (now - self.time).to_std().unwrap_or_default();
        if age > STALE_AFTER {
            return true;
        }
        // Dated further ahead than a lock lives: a clock that far ahead breaks locking as
        // one that far behind does (its fresh locks look stale), and a lock that never
        // ages would hold off prune, or every backup, for good (any key can write one).
        let ahead = (self.time - now).to_std().unwrap_or_default();
        if ahead > STALE_AFTER {
            tracing::warn!(
                host = %self.host,
                command = %self.command,
                "a lock dated {} ahead is ignored as stale",
                humantime::format_duration(Duration::from_secs(ahead.as_secs()))
            );
            return true;
        }
        if self.host == this_host && self.pid != std::process::id() {
            // kill(2) takes 0 for this process group and -1 for every process: such a
            // pid (or one past i32::MAX) names no process that could hold the lock.
            let Some(pid) = i32::try_from(self.pid).ok().filter(|p| *p > 0) else {
                return true;
            };
            // SAFETY: kill(2) with signal 0 sends nothing; it only checks the pid exists
            // (EPERM means it exists but belongs to another user).
            let r = unsafe { libc::kill(pid, 0) };
            let alive =
                r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            return !alive;
        }
        false
    }
}

pub struct LockGuard {
    storage: DynStorage,
    path: String,
    stop: Arc<AtomicBool>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.refresher.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        let _ = self.storage.delete(&self.path);
    }
}

pub fn read_all(storage: &DynStorage, meta_key: &[u8; 32]) -> Result<Vec<(LockId, LockInfo)>> {
    let mut out = vec![];
    for e in storage.list(paths::LOCKS)? {
        let Some(id) = paths::id_of(&e.path) else {
            continue;
        };
        // A lock is a hundred bytes of JSON; a larger one is not read.
        let bytes = match custos_storage::get_listed(&**storage, &e, 64 << 10, "lock") {
            Ok(b) => b,
            Err(e) if e.kind == Kind::NotFound => continue,
            Err(err) if err.kind == Kind::Integrity => {
                tracing::warn!(lock = %id, "{}; ignored", err.message);
                continue;
            }
            Err(e) => return Err(e),
        };
        let info = aead::open(meta_key, AAD, &bytes, "lock").and_then(|p| {
            serde_json::from_slice::<LockInfo>(&p).map_err(|e| Error::integrity(e.to_string()))
        });
        match info {
            Ok(i) => out.push((LockId(id), i)),
            Err(_) => tracing::warn!(lock = %id, "unreadable lock object ignored"),
        }
    }
    Ok(out)
}

fn seal(meta_key: &[u8; 32], info: &LockInfo) -> Vec<u8> {
    aead::seal(
        meta_key,
        AAD,
        &serde_json::to_vec(info).expect("serializable"),
    )
}

pub fn acquire(
    storage: DynStorage,
    meta_key: &[u8; 32],
    exclusive: bool,
    host: &str,
    command: &str,
) -> Result<LockGuard> {
    let mut idb = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut idb);
    let id = LockId(custos_model::Id(idb));
    let path = paths::lock(&id);
    let info = LockInfo {
        time: Utc::now(),
        exclusive,
        host: host.into(),
        pid: std::process::id(),
        command: command.into(),
    };
    storage.put(&path, &seal(meta_key, &info), PutMode::CreateOnly)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut guard = LockGuard {
        storage: storage.clone(),
        path: path.clone(),
        stop: stop.clone(),
        refresher: None,
    };
    for (other, o) in read_all(&storage, meta_key)? {
        if other == id || o.is_stale(host) {
            continue;
        }
        if exclusive || o.exclusive {
            let what = if o.exclusive { "an exclusive" } else { "a" };
            return Err(Error::new(
                Kind::Locked,
                format!(
                    "the repository is locked: {what} lock is held by `{}` (pid {}) on {} since {}",
                    o.command,
                    o.pid,
                    o.host,
                    o.time.format("%Y-%m-%d %H:%M:%S UTC")
                ),
            )
            .hint("wait for that operation to finish and retry; a lock not refreshed for 30 minutes is ignored"));
        }
    }
    let key = *meta_key;
    let st = storage.clone();
    guard.refresher = Some(std::thread::spawn(move || loop {
        std::thread::park_timeout(REFRESH);
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut i = info.clone();
        i.time = Utc::now();
        let sealed = seal(&key, &i);
        if let Err(e) = st.put(&path, &sealed, PutMode::Overwrite) {
            tracing::warn!("cannot refresh repository lock: {e}");
        }
    }));
    Ok(guard)
}

/// [`acquire`], waiting up to `wait` while a conflicting lock is held: tries again after
/// 0.5 s, doubling to 5 s, with jitter (so that two waiters do not meet again and
/// again). Said once on stderr through tracing; past `wait`, the last `Locked` error with
/// how long it waited.
pub fn acquire_waiting(
    storage: DynStorage,
    meta_key: &[u8; 32],
    exclusive: bool,
    host: &str,
    command: &str,
    wait: Duration,
) -> Result<LockGuard> {
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(500);
    let mut said = false;
    loop {
        match acquire(storage.clone(), meta_key, exclusive, host, command) {
            Err(e) if e.kind == Kind::Locked && !wait.is_zero() => {
                let left = wait.saturating_sub(start.elapsed());
                if left.is_zero() {
                    return Err(e.context(format!(
                        "waited {} (--lock-wait)",
                        humantime::format_duration(Duration::from_secs(wait.as_secs()))
                    )));
                }
                if !said {
                    tracing::warn!(
                        "{}; waiting up to {} for it",
                        e.message,
                        humantime::format_duration(Duration::from_secs(wait.as_secs()))
                    );
                    said = true;
                }
                let jitter = Duration::from_millis(
                    rand::random::<u64>() % (pause.as_millis() as u64 / 2 + 1),
                );
                std::thread::sleep((pause + jitter).min(left));
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            r => return r,
        }
    }
}

/// Removes stale locks; returns how many.
pub fn remove_stale(storage: &DynStorage, meta_key: &[u8; 32], host: &str) -> Result<usize> {
    let mut n = 0;
    for (id, i) in read_all(storage, meta_key)? {
        if i.is_stale(host) {
            storage.delete(&paths::lock(&id))?;
            n += 1;
        }
    }
    Ok(n)
}
