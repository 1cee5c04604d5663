//! What the agent reads besides its own jobs: the cluster's archiver (often, it is the
//! WAL lag alert) and the repository (less often: sizes, newest snapshot per source, the
//! archive's window and gaps, key ages). Both are plain library calls on a repository
//! the agent opens once and keeps, so a probe costs a query or a listing, not a key
//! derivation.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use custos_model::Result;
use custos_ops::keys::KeyAge;
use custos_ops::maintenance::info::InfoReport;
use custos_repo::Repository;
use custos_sources::postgres::db::{ConnectOptions, Db};

pub type Opener = Box<dyn Fn() -> Result<Repository> + Send + Sync>;

/// The repository, opened on first use and again after an error.
pub struct RepoHandle {
    opener: Opener,
    current: Mutex<Option<Arc<Repository>>>,
    trail_hint: Option<PathBuf>,
    host: String,
    user: String,
}

impl RepoHandle {
    pub fn new(opener: Opener, trail_hint: Option<PathBuf>, host: String, user: String) -> Self {
        RepoHandle {
            opener,
            current: Mutex::new(None),
            trail_hint,
            host,
            user,
        }
    }

    pub fn get(&self) -> Result<Arc<Repository>> {
        let mut cur = self.current.lock().unwrap();
        if let Some(r) = &*cur {
            return Ok(r.clone());
        }
        let r = Arc::new((self.opener)()?);
        *cur = Some(r.clone());
        Ok(r)
    }

    /// Forget the open repository (after an error, or to see rotated keys).
    pub fn reset(&self) {
        *self.current.lock().unwrap() = None;
    }

    /// Appends an entry signed by the agent's key to the operation trail.
    pub fn trail(
        &self,
        command: &str,
        touched: serde_json::Value,
        result: &str,
        time: DateTime<Utc>,
    ) -> Result<u64> {
        let repo = self.get()?;
        let mut w = repo.trail_writer();
        if let Some(h) = &self.trail_hint {
            w = w.with_hint(h.join(repo.config.id.to_hex()).join("trail-last"));
        }
        w.append(&custos_repo::trail::Entry {
            time,
            role: repo.role().as_str().into(),
            key: repo.key_id,
            host: self.host.clone(),
            user: self.user.clone(),
            command: command.into(),
            touched,
            result: result.into(),
            introduces: None,
            introduces_role: None,
            authority: None,
        })
        .inspect_err(|_| self.reset())
    }
}

enum TrailMsg {
    /// Command, what it touched, result, and when (sent, not written).
    Entry(String, serde_json::Value, String, DateTime<Utc>),
    Flush(std::sync::mpsc::Sender<()>),
}

/// The agent's trail entries, written in order by one thread so that neither the loop
/// nor a task waits on storage; [`TrailQueue::flush`] waits until all are written (at
/// shutdown, so that no entry is lost when the process exits).
pub struct TrailQueue {
    tx: std::sync::mpsc::Sender<TrailMsg>,
}

impl TrailQueue {
    pub fn start(repo: Arc<RepoHandle>) -> TrailQueue {
        let (tx, rx) = std::sync::mpsc::channel::<TrailMsg>();
        std::thread::spawn(move || {
            for m in rx {
                match m {
                    TrailMsg::Entry(command, touched, result, time) => {
                        if let Err(e) = repo.trail(&command, touched, &result, time) {
                            tracing::warn!(
                                "`{command}` could not be written to the operation trail: {}",
                                e.message
                            );
                        }
                    }
                    TrailMsg::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        TrailQueue { tx }
    }

    pub fn send(&self, command: &str, touched: serde_json::Value, result: &str) {
        let _ = self.tx.send(TrailMsg::Entry(
            command.into(),
            touched,
            result.into(),
            custos_model::clock::now(),
        ));
    }

    /// Waits (at most `limit`) until every entry sent before is written.
    pub fn flush(&self, limit: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(TrailMsg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(limit);
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WalObs {
    pub time: DateTime<Utc>,
    #[serde(with = "custos_model::id::u64_text")]
    pub system_id: u64,
    /// Seconds the oldest waiting segment has waited (0: none waits; None: never archived).
    pub lag_seconds: Option<u64>,
    pub pending: u64,
    pub last_archived: Option<String>,
    pub last_archived_time: Option<DateTime<Utc>>,
    pub failed_count: i64,
    /// The archiver's last attempt failed.
    pub failing: bool,
}

pub fn observe_wal(conn: &ConnectOptions) -> Result<WalObs> {
    let db = Db::connect(conn)?;
    let a = db.archiver()?;
    let (pending, lag) = custos_ops::postgres::check::pending_and_lag(&a);
    Ok(WalObs {
        time: a.now,
        system_id: a.system_id,
        lag_seconds: lag,
        pending,
        failing: a.failed_count > 0 && a.last_failed_time > a.last_archived_time,
        failed_count: a.failed_count,
        last_archived: a.last_archived_wal,
        last_archived_time: a.last_archived_time,
    })
}

#[derive(Debug, Clone)]
pub struct RepoObs {
    pub time: DateTime<Utc>,
    pub info: InfoReport,
    pub keys: Vec<KeyAge>,
    /// Snapshot source → newest snapshot time, for every source (info lists sources;
    /// clusters by name or system id).
    pub took: Duration,
}

pub fn observe_repo(handle: &RepoHandle, key_max_age: Duration) -> Result<RepoObs> {
    let started = std::time::Instant::now();
    let repo = handle.get()?;
    let now = Utc::now();
    let r = custos_ops::maintenance::info::info(&repo, now)
        .and_then(|info| Ok((info, custos_ops::keys::ages(&repo, key_max_age, now)?)));
    match r {
        Ok((info, keys)) => Ok(RepoObs {
            time: now,
            info,
            keys,
            took: started.elapsed(),
        }),
        Err(e) => {
            handle.reset();
            Err(e)
        }
    }
}
