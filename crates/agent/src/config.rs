//! What the agent runs and watches, as resolved by the CLI from `custos.toml`: the jobs
//! (each a custos command line and a schedule), the data categories of the status page,
//! the alert sinks and the agent's own settings. The agent never reads the file itself:
//! on SIGHUP the CLI's reload function builds a new [`AgentConfig`] or says why not.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::schedule::Schedule;

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    /// What custos.toml says the job runs (a source's name or an action).
    pub run: String,
    /// The custos command line after the global flags, e.g. `backup postgres --type full`.
    pub argv: Vec<String>,
    pub schedule: Schedule,
    /// Longest one attempt may take.
    pub timeout: Duration,
    /// Further attempts after a failed one.
    pub retries: u32,
    /// The data category whose freshness a successful run renews (None: maintenance).
    pub category: Option<String>,
    /// A verification job: its result is the repository's "last verify".
    pub verifies: bool,
    /// Maintenance that removes snapshots (forget, prune): runs with no other job.
    pub exclusive: bool,
}

impl JobSpec {
    /// A restore drill (`custos drill ...`): a failed one is the `drill_failed` alert.
    pub fn drills(&self) -> bool {
        self.argv.first().is_some_and(|a| a == "drill")
    }
}

/// A row of the status page: one kind of data the seed backs up.
#[derive(Debug, Clone)]
pub struct Category {
    pub name: String,
    /// How a snapshot of it is recognised in the repository: `postgres` (any cluster),
    /// else a snapshot source name (tagged `source` for `backup all`) or kind.
    pub matches: Vec<String>,
    /// The shortest interval between two runs that renew it (from the jobs' schedules):
    /// its backup is stale past 1.5 times this.
    pub interval: Option<Duration>,
}

#[derive(Debug, Clone)]
pub enum SinkSpec {
    /// A Slack-compatible incoming webhook: `{"text": ...}`.
    Slack { url: String },
    /// Any webhook: the alert as a JSON document.
    Webhook { url: String },
    /// A command run with the alert as JSON on standard input.
    Command { command: String },
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub listen: SocketAddr,
    /// Needed (as `Authorization: Bearer ...`) when listening beyond the loopback.
    pub token: Option<zeroize::Zeroizing<String>>,
    pub state_dir: PathBuf,
    pub jobs: Vec<JobSpec>,
    pub categories: Vec<Category>,
    pub sinks: Vec<SinkSpec>,
    /// SIGTERM: how long running jobs may go on before they are stopped.
    pub grace: Duration,
    /// How often the cluster's archiver is read (the WAL lag alert's resolution).
    pub probe_interval: Duration,
    /// How often the repository is listed (sizes, newest snapshots, key ages).
    pub repo_probe_interval: Duration,
    pub wal_lag_alert: Duration,
    /// An alert that holds is sent again this often.
    pub alert_repeat: Duration,
    /// The first retry waits this long, then twice as long each time (with jitter).
    pub retry_base: Duration,
    pub key_max_age: Duration,
    /// When the daily report of the day before is written.
    pub report_schedule: Schedule,
    /// The cluster's name in metrics and alerts.
    pub cluster: String,
    /// The secondaries `copy` jobs keep, each with how far behind it may fall before the
    /// `secondary_behind` alert.
    pub secondaries: Vec<(String, Duration)>,
}

impl AgentConfig {
    pub const DEFAULT_LISTEN: &'static str = "127.0.0.1:9187";
}
