//! What the agent knows about its jobs, kept in its state folder so that a restarted
//! agent knows where it was: `jobs.json` (each job's last slot, last run and counters,
//! replaced atomically after every start and end) and `history.jsonl` (one line per
//! finished run, the last 30 days kept). Neither holds a secret or a file name from a
//! backup: errors are kept as their code and kind, the message only in `jobs.json`,
//! which is private to the agent's user (mode 0600, like the folder).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use custos_model::{Error, Result};
use serde::{Deserialize, Serialize};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Ok,
    /// Finished, but some of the source could not be read (exit 3).
    Partial,
    Failed,
    /// Stopped after its timeout.
    Timeout,
    /// The agent stopped (SIGTERM past the grace period) or died while it ran.
    Interrupted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Partial => "partial",
            Outcome::Failed => "failed",
            Outcome::Timeout => "timeout",
            Outcome::Interrupted => "interrupted",
        }
    }
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Partial,
        Outcome::Failed,
        Outcome::Timeout,
        Outcome::Interrupted,
    ];
}

/// One finished run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    pub job: String,
    pub slot: DateTime<Utc>,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub outcome: Outcome,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// `E17 source`: what the status page and alerts may show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    #[serde(default)]
    pub bytes_read: u64,
    #[serde(default)]
    pub bytes_stored: u64,
    #[serde(default)]
    pub snapshots: Vec<String>,
    /// A copy run: per secondary, the time as of which it held everything the primary did.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub in_sync: BTreeMap<String, DateTime<Utc>>,
}

impl RunRecord {
    pub fn seconds(&self) -> f64 {
        (self.end - self.start).num_milliseconds().max(0) as f64 / 1000.0
    }
}

/// A job's place and memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobRecord {
    pub last_slot: Option<DateTime<Utc>>,
    /// Set while a run is going on; found set at start, the agent died during it.
    #[serde(default)]
    pub running_since: Option<DateTime<Utc>>,
    pub last: Option<RunRecord>,
    /// The full message of the last failure (kept here, never served).
    #[serde(default)]
    pub last_error: Option<String>,
    pub last_success: Option<DateTime<Utc>>,
    pub last_failure: Option<DateTime<Utc>>,
    /// Runs by outcome since the state folder was made.
    #[serde(default)]
    pub runs: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct JobsFile {
    version: u32,
    jobs: BTreeMap<String, JobRecord>,
    /// When the agent first ran with this state folder.
    since: Option<DateTime<Utc>>,
    #[serde(default)]
    secondaries: BTreeMap<String, DateTime<Utc>>,
}

pub const HISTORY_DAYS: i64 = 30;

pub struct Store {
    dir: PathBuf,
    pub jobs: BTreeMap<String, JobRecord>,
    pub history: Vec<RunRecord>,
    pub since: DateTime<Utc>,
    /// Per secondary, the newest time as of which a copy left it in sync with the primary.
    pub secondaries: BTreeMap<String, DateTime<Utc>>,
}

impl Store {
    /// Opens (creating) the state folder, private to this user.
    pub fn open(dir: &Path, now: DateTime<Utc>) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::config(format!(
                "cannot create the agent's state folder {}: {e}",
                dir.display()
            ))
            .hint("set [agent] state_dir to a folder the agent's user can write")
        })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        let jobs_path = dir.join("jobs.json");
        let file: JobsFile = match std::fs::read(&jobs_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::config(format!(
                    "the agent state {} is damaged: {e}",
                    jobs_path.display()
                ))
                .hint(
                    "move it aside: the agent then starts afresh (each job runs at its next slot)",
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => JobsFile::default(),
            Err(e) => {
                return Err(Error::config(format!(
                    "cannot read {}: {e}",
                    jobs_path.display()
                )))
            }
        };
        let cutoff = now - chrono::Duration::days(HISTORY_DAYS);
        let history = match std::fs::read_to_string(dir.join("history.jsonl")) {
            // A torn last line (the agent killed while appending) is skipped.
            Ok(t) => t
                .lines()
                .filter_map(|l| serde_json::from_str::<RunRecord>(l).ok())
                .filter(|r| r.end >= cutoff)
                .collect(),
            Err(_) => vec![],
        };
        Ok(Store {
            dir: dir.to_path_buf(),
            jobs: file.jobs,
            history,
            since: file.since.unwrap_or(now),
            secondaries: file.secondaries,
        })
    }

    /// Replaces `jobs.json` atomically (write, fsync, rename).
    pub fn save(&self) -> Result<()> {
        let file = JobsFile {
            version: 1,
            jobs: self.jobs.clone(),
            since: Some(self.since),
            secondaries: self.secondaries.clone(),
        };
        let tmp = self.dir.join("jobs.json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(&file).expect("state serializes"))?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.dir.join("jobs.json"))
        };
        write().map_err(|e| {
            Error::config(format!(
                "cannot write the agent state in {}: {e}",
                self.dir.display()
            ))
        })
    }

    /// Records a finished run: the job's record, its line in the history.
    pub fn finish(&mut self, run: RunRecord, error: Option<String>) -> Result<()> {
        let rec = self.jobs.entry(run.job.clone()).or_default();
        rec.running_since = None;
        *rec.runs.entry(run.outcome.as_str().into()).or_default() += 1;
        match run.outcome {
            Outcome::Ok => {
                rec.last_success = Some(run.end);
                rec.last_error = None;
            }
            _ => {
                rec.last_failure = Some(run.end);
                rec.last_error = error;
            }
        }
        rec.last = Some(run.clone());
        for (name, t) in &run.in_sync {
            let e = self.secondaries.entry(name.clone()).or_insert(*t);
            *e = (*e).max(*t);
        }
        let line = serde_json::to_string(&run).expect("run serializes");
        let append = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("history.jsonl"))?;
            writeln!(f, "{line}")?;
            f.sync_data()
        };
        let cutoff = run.end - chrono::Duration::days(HISTORY_DAYS);
        self.history.push(run);
        self.history.retain(|r| r.end >= cutoff);
        append().map_err(|e| Error::config(format!("cannot append to the agent history: {e}")))?;
        self.save()
    }

    /// Rewrites the history file with what is kept (at start, so it does not grow).
    pub fn compact_history(&self) -> Result<()> {
        let tmp = self.dir.join("history.jsonl.tmp");
        let mut text = String::new();
        for r in &self.history {
            text.push_str(&serde_json::to_string(r).expect("run serializes"));
            text.push('\n');
        }
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, self.dir.join("history.jsonl")))
            .map_err(|e| Error::config(format!("cannot write the agent history: {e}")))
    }
}
