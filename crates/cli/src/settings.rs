//! Raw arguments, environment and config file resolved into settings, in one place.
//! Precedence: command-line flag, then environment variable, then `custos.toml`.
//! This is the only module that reads the environment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use custos_model::retention::RetentionPolicy;
use custos_model::{Error, Result};
use custos_storage::remote::S3Options;
use custos_storage::url::{Location, StorageOptions};
use serde::Deserialize;
use zeroize::Zeroizing;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub repository: RepositorySection,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub retention: Option<RetentionPolicy>,
    /// A policy of its own for PostgreSQL incrementals (the seed: keep_within = "7d");
    /// fulls then follow [retention].
    #[serde(default)]
    pub retention_incremental: Option<RetentionPolicy>,
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceSection>,
    #[serde(default)]
    pub postgres: PostgresSection,
    #[serde(default)]
    pub keys: KeysSection,
    /// What the agent runs and when (issue 18; `custos config check` validates them).
    #[serde(default, rename = "job")]
    pub jobs: Vec<JobSection>,
    /// `custos agent`: where it listens, its state folder, alert thresholds.
    #[serde(default)]
    pub agent: AgentSection,
    /// Where the agent sends alerts.
    #[serde(default, rename = "alert")]
    pub alerts: Vec<AlertSection>,
    /// Secondary repositories `custos copy` keeps up to date (issue 19).
    #[serde(default, rename = "secondary")]
    pub secondaries: Vec<SecondarySection>,
    /// S3 Object Lock: every object written with a retain-until date from [retention].
    pub object_lock: Option<ObjectLockSection>,
    /// `custos drill`: where scratch restores go, how they are proven.
    #[serde(default)]
    pub drill: DrillSection,
    /// `custos restore all`: what runs before, after, and when a step fails.
    #[serde(default)]
    pub restore_all: RestoreAllSection,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RestoreAllSection {
    /// Commands (`sh -c`) before anything is restored (the seed: stop the application).
    #[serde(default)]
    pub pre: Vec<String>,
    /// Commands after every part is back (restart the application).
    #[serde(default)]
    pub post: Vec<String>,
    /// Commands when a step fails.
    #[serde(default)]
    pub on_failure: Vec<String>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct DrillSection {
    /// Where scratch restores are made (default: the temp folder). Needs room for the
    /// database.
    pub scratch: Option<PathBuf>,
    /// The PostgreSQL server binaries (default: the backup's major version under
    /// /usr/lib/postgresql, else PATH).
    pub bin: Option<PathBuf>,
    /// The OS user the scratch server runs as when custos runs as root (default postgres).
    pub os_user: Option<String>,
    /// The database role to connect as (default postgres).
    pub db_user: Option<String>,
    /// How long recovery may take (default 1h).
    pub recovery_timeout: Option<String>,
    /// Smoke checks: SQL whose `psql -At` output must equal `expect`.
    #[serde(default, rename = "check")]
    pub checks: Vec<DrillCheck>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct DrillCheck {
    pub name: String,
    pub sql: String,
    pub expect: String,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ObjectLockSection {
    /// `governance` or `compliance`.
    pub mode: String,
}

/// What [object_lock] asks of every write: data, index, snapshots and WAL for the
/// policy's shortest span (extended by `lock refresh` as picks become final), the trail
/// for the longest retention in the repository (audit-log minimums included).
fn write_lock(file: &ConfigFile) -> Result<Option<custos_storage::objectlock::WriteLock>> {
    let Some(l) = &file.object_lock else {
        return Ok(None);
    };
    let mode: custos_storage::objectlock::LockMode = l
        .mode
        .parse()
        .map_err(|e: Error| e.context("[object_lock] mode"))?;
    let policies: Vec<&RetentionPolicy> = file
        .retention
        .iter()
        .chain(file.retention_incremental.iter())
        .collect();
    let shortest = policies.iter().filter_map(|p| p.shortest_span()).min().ok_or_else(|| {
        Error::config("[object_lock] dates objects by the retention policy, and [retention] keeps nothing for a time")
            .hint("add [retention] with keep_daily (and weekly, monthly, yearly) or keep_within; `custos config init --profile healthcare` writes the seed's")
    })?;
    let mut longest = policies
        .iter()
        .filter_map(|p| p.longest_span())
        .max()
        .unwrap_or(shortest);
    longest = longest.max(custos_ops::tables::parse_retention(
        custos_ops::maintenance::forget::AUDIT_LOG_MIN_RETENTION,
    )?);
    for s in &file.sources {
        if let Some(r) = &s.min_retention {
            longest = longest.max(
                custos_ops::tables::parse_retention(r)
                    .map_err(|e| e.context(format!("source `{}`: min_retention", s.name)))?,
            );
        }
    }
    let std = |d: chrono::Duration| d.to_std().unwrap_or_default();
    let spans = ["data", "index", "snapshots", "wal"]
        .into_iter()
        .map(|k| (k.to_string(), std(shortest)))
        .chain([(custos_repo::trail::DIR.to_string(), std(longest))])
        .collect();
    Ok(Some(custos_storage::objectlock::WriteLock { mode, spans }))
}

/// A second repository location that `custos copy` keeps as fresh as the primary.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SecondarySection {
    pub name: String,
    /// A path, s3://bucket/prefix, or another OpenDAL scheme.
    pub url: String,
    /// The secondary's S3 store, when it is not the primary's ([storage.s3] otherwise).
    pub s3: Option<S3Section>,
    /// `copy --check` fails when the secondary lacks something older than this (15m).
    pub max_lag: Option<String>,
    /// wal-push writes each WAL file here too before it acknowledges it.
    #[serde(default)]
    pub wal: bool,
    /// Write here with Object Lock too (the primary's [object_lock] mode and dates; the
    /// secondary's bucket must have Object Lock).
    #[serde(default)]
    pub object_lock: bool,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Address of /metrics, /healthz, /readyz and the status page (default 127.0.0.1:9187).
    pub listen: Option<String>,
    /// A file holding the bearer token needed to listen beyond the loopback.
    pub token_file: Option<PathBuf>,
    /// The agent's state (default: the cache folder's `agent/`).
    pub state_dir: Option<PathBuf>,
    /// SIGTERM: how long running jobs may go on (default 5m).
    pub grace: Option<String>,
    /// How often the archiver is read (default 30s) and the repository listed (10m).
    pub probe_interval: Option<String>,
    pub repository_interval: Option<String>,
    /// The WAL lag alert's threshold (default 15m, the seed's).
    pub wal_lag_alert: Option<String>,
    /// A holding alert is sent again this often (default 4h).
    pub alert_repeat: Option<String>,
    /// The first retry's wait (default 1m), doubled at each further retry.
    pub retry_base: Option<String>,
    /// When the daily report of the day before is made (default "5 0 * * *").
    pub daily_report: Option<String>,
}

/// An alert sink: `kind` is `slack`, `webhook` or `command`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AlertSection {
    pub kind: String,
    pub url: Option<String>,
    /// A file holding the URL (a Slack webhook URL carries its secret).
    pub url_file: Option<PathBuf>,
    pub command: Option<String>,
}

/// A scheduled job: `run` is a source's name, or one of `postgres-full`,
/// `postgres-incremental`, `config`, `verify`, `verify-read-data`, `verify-table`,
/// `forget`, `prune`, `copy`; `schedule` a cron expression in UTC.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    pub name: String,
    pub run: String,
    pub schedule: String,
    /// Longest a run may take, like "2h".
    pub timeout: Option<String>,
    /// Further tries after a failed run (with backoff).
    pub retries: Option<u32>,
    /// More arguments for the command the job runs, like ["--subset", "10%"].
    #[serde(default)]
    pub args: Vec<String>,
    /// The data category of the status page this job renews (default: from `run`).
    pub category: Option<String>,
    /// The time zone `schedule` is read in (IANA name; default UTC).
    pub zone: Option<String>,
}

/// What a job may run besides a source.
pub const JOB_ACTIONS: &[&str] = &[
    "postgres-full",
    "postgres-incremental",
    "config",
    "verify",
    "verify-read-data",
    "verify-table",
    "forget",
    "prune",
    "copy",
    "lock-refresh",
    "drill-db",
    "drill-vector",
    "drill-files",
    "drill-audit-log",
    "drill-full",
];

impl ConfigFile {
    /// Reads and parses the file; a malformed one is refused with its line number, one
    /// holding a secret is refused outright.
    pub fn load(p: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(p).map_err(|e| {
            Error::config(format!("cannot read the config file {}: {e}", p.display()))
                .hint("check --config or CUSTOS_CONFIG")
        })?;
        Self::parse(&text, p)
    }

    /// The file's text parsed and checked as [`ConfigFile::load`] does; `p` names it in
    /// messages.
    pub fn parse(text: &str, p: &Path) -> Result<ConfigFile> {
        let text = text.to_string();
        let file: ConfigFile = toml::from_str(&text).map_err(|e| {
            Error::config(format!(
                "the config file {} is malformed: {}",
                p.display(),
                e.message().trim()
            ))
            .hint(span_hint(&text, e.span()))
        })?;
        if file.storage.s3.secret_access_key.is_some()
            || file
                .secondaries
                .iter()
                .any(|s| s.s3.as_ref().is_some_and(|s| s.secret_access_key.is_some()))
        {
            return Err(Error::config("custos.toml must not contain secret_access_key: secrets are never kept in plain text")
                .hint("use secret_access_key_file = \"/path\" (mode 0600) or the AWS_SECRET_ACCESS_KEY environment variable"));
        }
        if let Some(k) = file.storage.options.keys().find(|k| {
            let k = k.to_ascii_lowercase();
            ["token", "secret", "password", "sas", "account_key"]
                .iter()
                .any(|w| k.contains(w))
        }) {
            return Err(Error::config(format!(
                "custos.toml must not contain [storage.options] {k}: secrets are never kept in plain text"
            ))
            .hint("give it in the environment (Vercel Blob: BLOB_READ_WRITE_TOKEN)"));
        }
        Ok(file)
    }

    /// Every job's schedule parses, its `run` names a source or an action, its timeout
    /// is a duration, and no two jobs share a name; the first problem, naming the job.
    pub fn check_jobs(&self) -> Result<Vec<(JobSection, custos_agent::schedule::Schedule)>> {
        let mut out: Vec<(JobSection, custos_agent::schedule::Schedule)> = vec![];
        for j in &self.jobs {
            let ctx = |e: Error| e.context(format!("job `{}`", j.name));
            if out.iter().any(|(o, _)| o.name == j.name) {
                return Err(Error::config(format!("two jobs are named `{}`", j.name)));
            }
            let s = custos_agent::schedule::Schedule::parse_in(&j.schedule, j.zone.as_deref())
                .map_err(ctx)?;
            if !JOB_ACTIONS.contains(&j.run.as_str())
                && !self.sources.iter().any(|src| src.name == j.run)
            {
                return Err(ctx(Error::config(format!(
                    "`run = \"{}\"` names neither a [[source]] nor an action ({})",
                    j.run,
                    JOB_ACTIONS.join(", ")
                ))));
            }
            if let Some(t) = &j.timeout {
                humantime::parse_duration(t)
                    .map_err(|e| ctx(Error::config(format!("timeout = \"{t}\": {e}"))))?;
            }
            out.push((j.clone(), s));
        }
        Ok(out)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysSection {
    /// The crypto-period, like "90d" (the default): older keys are reported.
    pub max_age: Option<String>,
}

/// The cluster backed up; flags and the libpq environment take precedence.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// A name for the cluster in snapshot listings.
    pub name: Option<String>,
    pub pgdata: Option<PathBuf>,
    /// A connection string (no password in it: use ~/.pgpass or peer authentication).
    pub db_url: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub database: Option<String>,
    /// Back up over the replication protocol (pg_basebackup) instead of reading `pgdata`.
    #[serde(default)]
    pub replication: bool,
    /// The folder of PostgreSQL's programs (pg_basebackup) for replication backups.
    pub bin: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositorySection {
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_command: Option<String>,
    pub cache_dir: Option<PathBuf>,
    pub host: Option<String>,
    /// MiB of index objects read into memory rather than into the on-disk index (16).
    pub index_memory_mb: Option<u64>,
    /// How long a command waits for a conflicting lock ("10m"; default: not at all).
    pub lock_wait: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    #[serde(default)]
    pub s3: S3Section,
    /// Options passed to another OpenDAL service, by name.
    #[serde(default)]
    pub options: HashMap<String, String>,
    /// How long to wait to connect to an object store (default 5s).
    pub connect_timeout: Option<String>,
    /// How long a request without a body may take (default 10s).
    pub timeout: Option<String>,
    /// How long each read or write of a body may take (default 30s).
    pub io_timeout: Option<String>,
    /// Further tries after a failure that may pass (default 2).
    pub retries: Option<usize>,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    /// A file holding the secret key; the secret itself is never accepted in the config.
    pub secret_access_key_file: Option<PathBuf>,
    /// Present only to give a clear error if someone writes a secret into the file.
    pub secret_access_key: Option<toml::Value>,
    /// The PEM file of the CA that signs the store's TLS certificate (a private CA),
    /// trusted besides the system's.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    pub name: String,
    pub kind: String,
    #[serde(default)]
    pub paths: Vec<String>,
    pub command: Option<String>,
    /// table: the tables exported together
    #[serde(default)]
    pub tables: Vec<String>,
    /// audit-log: the audit table
    pub table: Option<String>,
    /// audit-log: its growing column; table: the order of tables without a primary key
    pub order_by: Option<String>,
    /// table, audit-log, dump: the database (else [postgres] and the libpq environment)
    pub db_url: Option<String>,
    /// audit-log: kept at least this long whatever forget is told (default 6y)
    pub min_retention: Option<String>,
    /// dump: parallel pg_dump jobs
    pub jobs: Option<usize>,
    /// env: the variable names to take (globs with `*`)
    #[serde(default)]
    pub allow: Vec<String>,
    /// env: names stored as values although their name looks secret
    #[serde(default)]
    pub plain: Vec<String>,
    /// env: read this env file instead of custos's own environment
    pub env_file: Option<PathBuf>,
    /// env: where the secrets live (recorded with each reference)
    pub secrets_ref: Option<String>,
    /// env: a command printing the secrets manager's secret names
    pub list_command: Option<String>,
    /// terraform: the configuration folder (the command runs there)
    pub dir: Option<PathBuf>,
}

/// Secrets and settings read from the environment once, at start, and then removed from
/// the process environment so that no child process (a stream command, a password
/// command) inherits them.
#[derive(Default)]
pub struct Env {
    vars: HashMap<String, String>,
    secrets: HashMap<String, Zeroizing<String>>,
}

const SECRET_VARS: &[&str] = &[
    "CUSTOS_PASSWORD",
    "CUSTOS_NEW_PASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "PGPASSWORD",
    "BLOB_READ_WRITE_TOKEN",
];
const PLAIN_VARS: &[&str] = &[
    "CUSTOS_REPO",
    "CUSTOS_CONFIG",
    "CUSTOS_PASSWORD_FILE",
    "CUSTOS_PASSWORD_COMMAND",
    "CUSTOS_NEW_PASSWORD_FILE",
    "CUSTOS_CACHE_DIR",
    "CUSTOS_INDEX_MEMORY_MB",
    "CUSTOS_LOCK_WAIT",
    "PGDATA",
    "PGHOST",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "CUSTOS_HOST",
    "CUSTOS_TEST_KILL_BEFORE_WRITE",
    "CUSTOS_TEST_CLOCK",
    "AWS_ACCESS_KEY_ID",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "XDG_CACHE_HOME",
    "HOME",
];

impl Env {
    pub fn capture() -> Env {
        let mut env = Env::default();
        for k in PLAIN_VARS {
            if let Ok(v) = std::env::var(k) {
                env.vars.insert((*k).into(), v);
            }
        }
        for k in SECRET_VARS {
            if let Ok(v) = std::env::var(k) {
                env.secrets.insert((*k).into(), Zeroizing::new(v));
                // Single-threaded at this point (called first thing in main).
                std::env::remove_var(k);
            }
        }
        env
    }

    pub fn var(&self, k: &str) -> Option<&str> {
        // A variable read here but not captured would be silently ignored (as
        // CUSTOS_INDEX_MEMORY_MB and CUSTOS_LOCK_WAIT once were).
        debug_assert!(PLAIN_VARS.contains(&k), "{k} is read but not captured");
        self.vars
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub fn secret(&self, k: &str) -> Option<&Zeroizing<String>> {
        self.secrets.get(k)
    }

    /// The secrets this process was given, to hand to a child in its environment.
    pub fn secrets(&self) -> impl Iterator<Item = (&str, &Zeroizing<String>)> {
        self.secrets.iter().map(|(k, v)| (k.as_str(), v))
    }
}

pub struct Settings {
    pub file: ConfigFile,
    pub repo_url: Option<String>,
    pub storage: StorageOptions,
    pub cache_dir: Option<PathBuf>,
    /// Bytes of index objects read into memory rather than into the on-disk index.
    pub index_memory: Option<u64>,
    /// How long taking a lock waits for a conflicting holder (--lock-wait).
    pub lock_wait: std::time::Duration,
    pub host: String,
    pub user: String,
    pub kill_before_write: Option<u64>,
    test_clock: Option<String>,
    pgdata_env: Option<PathBuf>,
    libpq: HashMap<&'static str, String>,
    /// PGSSLMODE and PGSSLROOTCERT.
    pg_tls: (Option<String>, Option<PathBuf>),
    pg_password: Option<Zeroizing<String>>,
    config_path: Option<PathBuf>,
    /// Where the repository location came from, when not the config file.
    repo_from_args: bool,
    /// `--secondary NAME`: the command runs against that secondary, not the primary.
    pub secondary: Option<String>,
    /// wal-push: the secondaries each WAL file is written to as well before it is
    /// acknowledged (`wal-push --secondary NAME`, and every `[[secondary]] wal = true`).
    pub wal_secondaries: Vec<String>,
}

fn read_secret_file(path: &Path, what: &str) -> Result<Zeroizing<String>> {
    let s = std::fs::read_to_string(path)
        .map_err(|e| Error::config(format!("cannot read {what} from {}: {e}", path.display())))?;
    Ok(Zeroizing::new(s.trim_end_matches(['\n', '\r']).to_string()))
}

impl Settings {
    pub fn resolve(
        env: &Env,
        config_flag: Option<&Path>,
        repo_flag: Option<&str>,
    ) -> Result<Settings> {
        let config_path = config_flag
            .map(Path::to_path_buf)
            .or_else(|| env.var("CUSTOS_CONFIG").map(PathBuf::from));
        let file: ConfigFile = match &config_path {
            Some(p) => ConfigFile::load(p)?,
            None => ConfigFile::default(),
        };
        let repo_url = repo_flag
            .map(String::from)
            .or_else(|| env.var("CUSTOS_REPO").map(String::from))
            .or_else(|| file.repository.url.clone());
        let s3f = &file.storage.s3;
        let secret = match env.secret("AWS_SECRET_ACCESS_KEY") {
            Some(s) => Some(s.to_string()),
            None => match &s3f.secret_access_key_file {
                Some(p) => Some(read_secret_file(p, "the S3 secret key")?.to_string()),
                None => None,
            },
        };
        let storage = StorageOptions {
            s3: S3Options {
                endpoint: env
                    .var("AWS_ENDPOINT_URL_S3")
                    .or(env.var("AWS_ENDPOINT_URL"))
                    .map(String::from)
                    .or_else(|| s3f.endpoint.clone()),
                region: env
                    .var("AWS_REGION")
                    .or(env.var("AWS_DEFAULT_REGION"))
                    .map(String::from)
                    .or_else(|| s3f.region.clone()),
                access_key_id: env
                    .var("AWS_ACCESS_KEY_ID")
                    .map(String::from)
                    .or_else(|| s3f.access_key_id.clone()),
                secret_access_key: secret,
                session_token: env.secret("AWS_SESSION_TOKEN").map(|s| s.to_string()),
                ca_pem: s3f.ca_file.as_deref().map(read_ca).transpose()?,
                ..Default::default()
            },
            service: file.storage.options.clone(),
            vercel_token: env.secret("BLOB_READ_WRITE_TOKEN").map(|s| s.to_string()),
            object_lock: write_lock(&file)?,
            timeouts: {
                let d = custos_storage::remote::Timeouts::default();
                let dur = |v: &Option<String>, name: &str, default: std::time::Duration| {
                    v.as_deref().map_or(Ok(default), |t| {
                        humantime::parse_duration(t).map_err(|e| {
                            Error::config(format!("[storage] {name} = \"{t}\": {e}"))
                                .hint("durations look like 5s, 500ms or 1m")
                        })
                    })
                };
                let st = &file.storage;
                custos_storage::remote::Timeouts {
                    connect: dur(&st.connect_timeout, "connect_timeout", d.connect)?,
                    request: dur(&st.timeout, "timeout", d.request)?,
                    io: dur(&st.io_timeout, "io_timeout", d.io)?,
                    retries: st.retries.unwrap_or(d.retries),
                }
            },
        };
        let cache_dir = env
            .var("CUSTOS_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| file.repository.cache_dir.clone())
            .or_else(|| {
                env.var("XDG_CACHE_HOME")
                    .map(|x| PathBuf::from(x).join("custos"))
            })
            .or_else(|| {
                env.var("HOME")
                    .map(|h| PathBuf::from(h).join(".cache/custos"))
            })
            .and_then(trusted_cache);
        let index_memory = match env.var("CUSTOS_INDEX_MEMORY_MB") {
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                Error::config(format!(
                    "CUSTOS_INDEX_MEMORY_MB is {v:?}, not a whole number of MiB"
                ))
            })?),
            None => file.repository.index_memory_mb,
        }
        .map(|mb| mb << 20);
        let lock_wait = lock_wait(
            env.var("CUSTOS_LOCK_WAIT")
                .or(file.repository.lock_wait.as_deref()),
        )?;
        let host = env
            .var("CUSTOS_HOST")
            .map(String::from)
            .or_else(|| file.repository.host.clone())
            .unwrap_or_else(hostname);
        // The user the process runs as, not what USER says (a caller sets that): the
        // trail records who did it.
        // SAFETY: geteuid has no preconditions.
        let user = custos_storage::local::user_name(unsafe { libc::geteuid() });
        let kill_before_write = env
            .var("CUSTOS_TEST_KILL_BEFORE_WRITE")
            .and_then(|v| v.parse().ok());
        let test_clock = env.var("CUSTOS_TEST_CLOCK").map(String::from);
        let pgdata_env = env.var("PGDATA").map(PathBuf::from);
        let libpq = ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE"]
            .into_iter()
            .filter_map(|k| env.var(k).map(|v| (k, v.to_string())))
            .collect();
        let repo_from_args = repo_flag.is_some() || env.var("CUSTOS_REPO").is_some();
        let config_path = config_path.map(|p| std::path::absolute(&p).unwrap_or(p));
        Ok(Settings {
            config_path,
            repo_from_args,
            secondary: None,
            wal_secondaries: vec![],
            pgdata_env,
            libpq,
            pg_tls: (
                env.var("PGSSLMODE").map(String::from),
                env.var("PGSSLROOTCERT").map(PathBuf::from),
            ),
            pg_password: env.secret("PGPASSWORD").cloned(),
            file,
            repo_url,
            storage,
            cache_dir,
            index_memory,
            lock_wait,
            host,
            user,
            kill_before_write,
            test_clock,
        })
    }

    /// The cluster's data directory: the flag, then PGDATA, then the current directory
    /// (PostgreSQL runs archive_command and restore_command in the data directory).
    /// For wal-push and wal-fetch the current directory wins over PGDATA when it is a data
    /// directory: PostgreSQL runs them there, and `pg_ctl -D relative/path` leaves a PGDATA
    /// that is relative to somewhere else.
    pub fn pgdata(&self, flag: Option<PathBuf>) -> PathBuf {
        if flag.is_none() && Path::new("global/pg_control").exists() {
            return PathBuf::from(".");
        }
        self.pgdata_opt(flag).unwrap_or_else(|| PathBuf::from("."))
    }

    /// The data directory if named by the flag, PGDATA or custos.toml.
    pub fn pgdata_opt(&self, flag: Option<PathBuf>) -> Option<PathBuf> {
        flag.or_else(|| self.pgdata_env.clone())
            .or_else(|| self.file.postgres.pgdata.clone())
    }

    /// The minimum retention of audit-log exports: per audit-log source of custos.toml
    /// (`min_retention`, default 6y, the seed's rule).
    pub fn audit_log_min_retention(&self) -> Result<custos_ops::maintenance::forget::MinRetention> {
        let mut m = custos_ops::maintenance::forget::MinRetention {
            incremental: self.file.retention_incremental.clone(),
            ..Default::default()
        };
        for s in self.file.sources.iter().filter(|s| s.kind == "audit-log") {
            let Some(r) = &s.min_retention else { continue };
            let d = custos_ops::tables::parse_retention(r)
                .map_err(|e| e.context(format!("source `{}`: min_retention", s.name)))?;
            if let Some(t) = &s.table {
                m.audit_log.insert(t.clone(), d);
            } else {
                m.audit_log_default = d;
            }
        }
        Ok(m)
    }

    /// Connection to the cluster: the flag, else the libpq environment variables.
    /// Whether a database is named, in custos.toml ([postgres] host, db_url or pgdata)
    /// or by PGHOST in the environment.
    pub fn names_database(&self) -> bool {
        let pg = &self.file.postgres;
        pg.host.is_some()
            || pg.db_url.is_some()
            || pg.pgdata.is_some()
            || self.libpq.contains_key("PGHOST")
    }

    pub fn db(&self, url: Option<String>) -> custos_sources::postgres::db::ConnectOptions {
        let pg = &self.file.postgres;
        custos_sources::postgres::db::ConnectOptions {
            url: url.or_else(|| {
                if self.libpq.is_empty() {
                    pg.db_url.clone()
                } else {
                    None
                }
            }),
            host: self.libpq.get("PGHOST").cloned().or(pg.host.clone()),
            port: self
                .libpq
                .get("PGPORT")
                .and_then(|p| p.parse().ok())
                .or(pg.port),
            user: self.libpq.get("PGUSER").cloned().or(pg.user.clone()),
            dbname: self
                .libpq
                .get("PGDATABASE")
                .cloned()
                .or(pg.database.clone()),
            password: self
                .pg_password
                .as_ref()
                .map(|p| custos_sources::postgres::db::Password(p.to_string())),
            dbname_override: None,
            sslmode: self.pg_tls.0.clone(),
            sslrootcert: self.pg_tls.1.clone(),
        }
    }

    /// The `restore_command` a restored cluster runs: this custos binary with the same
    /// repository and password source, by reference (paths and commands, never secrets).
    pub fn restore_command(&self, env: &Env) -> Result<String> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::internal(format!("cannot find the custos binary: {e}")))?;
        let mut parts: Vec<String> = vec![];
        let mut envs: Vec<(String, String)> = vec![];
        let absolute = |p: &str| {
            std::path::absolute(p)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| p.to_string())
        };
        self.check_secrets_by_reference(env, "restore_command")
            .map_err(|e| e.hint("give the password as a file (CUSTOS_PASSWORD_FILE or password_file, readable by the postgres user) or a command, and the S3 secret as secret_access_key_file; or pass --restore-command"))?;
        if let Some(f) = env.var("CUSTOS_PASSWORD_FILE") {
            envs.push(("CUSTOS_PASSWORD_FILE".into(), absolute(f)));
        } else if let Some(c) = env.var("CUSTOS_PASSWORD_COMMAND") {
            envs.push(("CUSTOS_PASSWORD_COMMAND".into(), c.to_string()));
        }
        for k in [
            "AWS_ENDPOINT_URL_S3",
            "AWS_ENDPOINT_URL",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_ACCESS_KEY_ID",
        ] {
            if let Some(v) = env.var(k) {
                envs.push((k.into(), v.into()));
            }
        }
        for (k, v) in &envs {
            parts.push(format!("{k}={}", shell_quote(v)));
        }
        parts.push(shell_quote(&exe.display().to_string()));
        if let Some(c) = &self.config_path {
            parts.push("--config".into());
            parts.push(shell_quote(&c.display().to_string()));
        }
        if let Some(s) = &self.secondary {
            // A restore from a secondary fetches its WAL from there too.
            parts.push("--secondary".into());
            parts.push(shell_quote(s));
        } else if self.repo_from_args || self.config_path.is_none() {
            parts.push("--repo".into());
            parts.push(shell_quote(&self.location_key()));
        }
        parts.push("--quiet wal-fetch %f %p".into());
        Ok(parts.join(" "))
    }

    /// The global flags a child custos (a job of the agent) needs to see what this one
    /// sees: the same config file, and the repository if it came from the command line.
    pub fn child_global(&self) -> Vec<std::ffi::OsString> {
        let mut out = vec![];
        if let Some(c) = &self.config_path {
            out.push("--config".into());
            out.push(c.clone().into_os_string());
        }
        if self.repo_from_args {
            if let Some(u) = &self.repo_url {
                out.push("--repo".into());
                out.push(u.into());
            }
        }
        if !self.lock_wait.is_zero() {
            out.push("--lock-wait".into());
            out.push(format!("{}s", self.lock_wait.as_secs()).into());
        }
        out
    }

    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// Tests only: CUSTOS_TEST_CLOCK=FROM..TO (RFC 3339) runs the agent on a simulated
    /// clock over that period.
    pub fn test_clock(
        &self,
    ) -> Result<Option<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)>> {
        let Some(v) = &self.test_clock else {
            return Ok(None);
        };
        let parse = |t: &str| {
            chrono::DateTime::parse_from_rfc3339(t.trim())
                .map(|d| d.to_utc())
                .map_err(|e| Error::config(format!("CUSTOS_TEST_CLOCK: `{t}`: {e}")))
        };
        let (a, b) = v
            .split_once("..")
            .ok_or_else(|| Error::config("CUSTOS_TEST_CLOCK is FROM..TO"))?;
        Ok(Some((parse(a)?, parse(b)?)))
    }

    /// The files the generated `restore_command` reads or runs, as (path, must execute):
    /// what the user PostgreSQL runs as must be able to reach.
    pub fn restore_command_files(&self, env: &Env) -> Vec<(PathBuf, bool)> {
        let mut out = vec![];
        if let Ok(exe) = std::env::current_exe() {
            out.push((exe, true));
        }
        if let Some(c) = &self.config_path {
            out.push((c.clone(), false));
        }
        let absolute = |p: &std::path::Path| std::path::absolute(p).unwrap_or(p.to_path_buf());
        if let Some(f) = env.var("CUSTOS_PASSWORD_FILE") {
            out.push((absolute(std::path::Path::new(f)), false));
        } else if env.var("CUSTOS_PASSWORD_COMMAND").is_none() {
            if let Some(f) = &self.file.repository.password_file {
                out.push((absolute(f), false));
            }
        }
        if let Some(f) = &self.file.storage.s3.secret_access_key_file {
            out.push((absolute(f), false));
        }
        if let Some(f) = self
            .secondary
            .as_ref()
            .and_then(|n| self.secondary_section(n).ok())
            .and_then(|s| s.s3.as_ref()?.secret_access_key_file.as_ref())
        {
            out.push((absolute(f), false));
        }
        out
    }

    /// Fails when another process (restore_command, the WAL pusher) could not open the
    /// repository the way this one does: the password or the S3 secret came from this
    /// process's environment or a prompt, and passing them on would write them down.
    pub fn check_secrets_by_reference(&self, env: &Env, what: &str) -> Result<()> {
        let by_reference = env.var("CUSTOS_PASSWORD_FILE").is_some()
            || env.var("CUSTOS_PASSWORD_COMMAND").is_some()
            || self.file.repository.password_file.is_some()
            || self.file.repository.password_command.is_some();
        if env.secret("CUSTOS_PASSWORD").is_some() || !by_reference {
            return Err(Error::config(format!(
                "{what} runs custos in another process, which cannot be given a password from CUSTOS_PASSWORD or a prompt without writing it down"
            ))
            .hint("give the password as a file (CUSTOS_PASSWORD_FILE or password_file in custos.toml) or a command"));
        }
        if env.secret("AWS_SECRET_ACCESS_KEY").is_some()
            && self.file.storage.s3.secret_access_key_file.is_none()
        {
            return Err(Error::config(format!(
                "{what} runs custos in another process, which cannot be given the S3 secret key from the environment"
            ))
            .hint("set secret_access_key_file in custos.toml"));
        }
        Ok(())
    }

    /// The crypto-period from `[keys] max_age` (default 90 days).
    pub fn key_max_age(&self) -> Result<std::time::Duration> {
        match &self.file.keys.max_age {
            None => Ok(custos_ops::keys::DEFAULT_MAX_AGE),
            Some(s) => humantime::parse_duration(s).map_err(|e| {
                Error::config(format!(
                    "[keys] max_age `{s}` is not a duration like 90d: {e}"
                ))
            }),
        }
    }

    /// The repository location as one string for every process on this host (local
    /// paths made absolute): it names the async WAL spool.
    pub fn location_key(&self) -> String {
        let url = self.repo_url.clone().unwrap_or_default();
        if url.contains("://") {
            url
        } else {
            std::path::absolute(&url)
                .map(|p| p.display().to_string())
                .unwrap_or(url)
        }
    }

    /// The global flags that make another custos process use the same repository and
    /// config as this one (environment variables other than secrets are inherited).
    pub fn global_args(&self) -> Vec<String> {
        let mut a = vec![];
        if let Some(c) = &self.config_path {
            a.push("--config".to_string());
            a.push(c.display().to_string());
        }
        if self.repo_url.is_some() && (self.repo_from_args || self.config_path.is_none()) {
            a.push("--repo".to_string());
            a.push(self.location_key());
        }
        if let Some(s) = &self.secondary {
            a.push("--secondary".to_string());
            a.push(s.clone());
        }
        a
    }

    /// A secondary of custos.toml by name; an unknown one names those there are.
    pub fn secondary_section(&self, name: &str) -> Result<&SecondarySection> {
        self.file
            .secondaries
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = self
                    .file
                    .secondaries
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect();
                Error::config(format!("no secondary named `{name}` in custos.toml")).hint(
                    if known.is_empty() {
                        "add a [[secondary]] section with name and url".to_string()
                    } else {
                        format!("the secondaries are: {}", known.join(", "))
                    },
                )
            })
    }

    /// Where a secondary is and how to reach it: its own [secondary.s3] settings where
    /// given, the primary's storage settings otherwise.
    pub fn secondary_storage(&self, s: &SecondarySection) -> Result<(Location, StorageOptions)> {
        let mut opts = self.storage.clone();
        if !s.object_lock {
            opts.object_lock = None;
        }
        if let Some(s3) = &s.s3 {
            if let Some(f) = &s3.ca_file {
                opts.s3.ca_pem = Some(read_ca(f)?);
            }
            opts.s3.endpoint = s3.endpoint.clone().or(opts.s3.endpoint);
            opts.s3.region = s3.region.clone().or(opts.s3.region);
            if let Some(k) = &s3.access_key_id {
                opts.s3.access_key_id = Some(k.clone());
                opts.s3.session_token = None;
                opts.s3.secret_access_key = match &s3.secret_access_key_file {
                    Some(p) => Some(
                        read_secret_file(
                            p,
                            &format!("the S3 secret key of secondary `{}`", s.name),
                        )?
                        .to_string(),
                    ),
                    None => None,
                };
            }
        }
        Ok((Location::parse(&s.url)?, opts))
    }

    /// `copy --check`'s default limit for a secondary (15 minutes).
    pub fn secondary_max_lag(&self, s: &SecondarySection) -> Result<std::time::Duration> {
        match &s.max_lag {
            None => Ok(std::time::Duration::from_secs(15 * 60)),
            Some(t) => humantime::parse_duration(t).map_err(|e| {
                Error::config(format!("[[secondary]] `{}` max_lag = \"{t}\": {e}", s.name))
            }),
        }
    }

    pub fn location(&self) -> Result<Location> {
        let url = self.repo_url.as_deref().ok_or_else(|| {
            Error::config("no repository given")
                .hint("pass --repo URL, set CUSTOS_REPO, or set [repository] url in custos.toml")
        })?;
        Location::parse(url)
    }

    /// The password of the key to open, from (in order) CUSTOS_PASSWORD,
    /// CUSTOS_PASSWORD_FILE, CUSTOS_PASSWORD_COMMAND, the config file, or a prompt.
    pub fn password(&self, env: &Env, prompt: &str) -> Result<Zeroizing<String>> {
        if let Some(p) = env.secret("CUSTOS_PASSWORD") {
            return Ok(p.clone());
        }
        if let Some(f) = env
            .var("CUSTOS_PASSWORD_FILE")
            .map(PathBuf::from)
            .or_else(|| self.file.repository.password_file.clone())
        {
            return read_secret_file(&f, "the password");
        }
        if let Some(c) = env
            .var("CUSTOS_PASSWORD_COMMAND")
            .map(String::from)
            .or_else(|| self.file.repository.password_command.clone())
        {
            return run_password_command(&c);
        }
        prompt_password(
            prompt,
            "CUSTOS_PASSWORD_FILE (or CUSTOS_PASSWORD, CUSTOS_PASSWORD_COMMAND, password_file in custos.toml)",
        )
    }

    /// A new password (key add, key passwd) from CUSTOS_NEW_PASSWORD,
    /// CUSTOS_NEW_PASSWORD_FILE, or a prompt asked twice.
    pub fn new_password(&self, env: &Env) -> Result<Zeroizing<String>> {
        let p = if let Some(p) = env.secret("CUSTOS_NEW_PASSWORD") {
            p.clone()
        } else if let Some(f) = env.var("CUSTOS_NEW_PASSWORD_FILE") {
            read_secret_file(Path::new(f), "the new password")?
        } else {
            let a = prompt_password(
                "new password: ",
                "CUSTOS_NEW_PASSWORD_FILE (or CUSTOS_NEW_PASSWORD)",
            )?;
            let b = prompt_password(
                "new password again: ",
                "CUSTOS_NEW_PASSWORD_FILE (or CUSTOS_NEW_PASSWORD)",
            )?;
            if *a != *b {
                return Err(Error::config("the two passwords differ"));
            }
            a
        };
        if p.is_empty() {
            return Err(Error::config("the new password is empty"));
        }
        Ok(p)
    }
}

fn run_password_command(c: &str) -> Result<Zeroizing<String>> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(c)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::config(format!("cannot run the password command: {e}")))?;
    if !out.status.success() {
        return Err(
            Error::config(format!("the password command failed ({})", out.status))
                .hint("check CUSTOS_PASSWORD_COMMAND"),
        );
    }
    let s = Zeroizing::new(
        String::from_utf8(out.stdout)
            .map_err(|_| Error::config("the password command printed invalid UTF-8"))?,
    );
    Ok(Zeroizing::new(s.trim_end_matches(['\n', '\r']).to_string()))
}

/// Asks on the terminal; without one, says which variable gives the password instead.
fn prompt_password(prompt: &str, variables: &str) -> Result<Zeroizing<String>> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(Error::config(format!(
            "no {} given and no terminal to ask on",
            prompt.trim_end_matches(": ").trim_end_matches(" again")
        ))
        .hint(format!("set {variables}")));
    }
    rpassword::prompt_password(prompt)
        .map(Zeroizing::new)
        .map_err(|e| Error::config(format!("cannot read the password: {e}")))
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(s) => {
            let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
            format!("fix line {line} of the config file (see docs/config.md for the format)")
        }
        None => "see docs/config.md for the format".into(),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Quotes a word for `sh`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:+@=,".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The PEM file `ca_file` names (a CA certificate: no secret).
fn read_ca(p: &Path) -> Result<Vec<u8>> {
    std::fs::read(p).map_err(|e| {
        Error::config(format!("ca_file {}: cannot read it: {e}", p.display()))
            .hint("ca_file names the PEM file of the CA that signs the store's TLS certificate")
    })
}

/// A lock wait (`--lock-wait`, CUSTOS_LOCK_WAIT, `[repository] lock_wait`): a duration, or
/// zero when none is given.
pub fn lock_wait(v: Option<&str>) -> Result<std::time::Duration> {
    v.map_or(Ok(std::time::Duration::ZERO), |t| {
        humantime::parse_duration(t).map_err(|e| {
            Error::config(format!("lock wait `{t}`: {e}"))
                .hint("durations look like 30s, 10m or 1h")
        })
    })
}

/// What `custos config check` proves of a file's text without reading anything else
/// (password or secret files, the repository): it parses, its jobs' schedules parse and
/// name what exists, each schedule's next slot is found, its Object Lock section holds.
/// The fuzz target `custos_toml` runs it on any bytes; the suite replays its corpus.
#[allow(dead_code)] // the fuzz target and the corpus test call it; `config check` has the file
pub fn check_text(text: &str) -> Result<usize> {
    let file = ConfigFile::parse(text, Path::new("custos.toml"))?;
    let jobs = file.check_jobs()?;
    let now = chrono::Utc::now();
    for (_, s) in &jobs {
        let _ = s.next_after(now);
    }
    write_lock(&file)?;
    Ok(jobs.len())
}

/// The cache folder, unless other users may write into it: what it holds decides which
/// files a backup reads again (the files cache), which chunks it believes stored (the
/// on-disk index) and this host's trail anchor, so a folder anyone can change (a shared
/// `CUSTOS_CACHE_DIR` made mode 0777, or /tmp itself) is not used, and a warning says why.
/// The command then runs without a cache: slower, never wrong. A folder not there yet is
/// created 0700 by whoever first writes it. (One that belongs to another user is used: a
/// non-root user cannot write into it anyway, and root reads the database user's, e.g. the
/// WAL pusher's state for `pg check`.)
fn trusted_cache(dir: PathBuf) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(&dir) else {
        return Some(dir);
    };
    // Not a folder: writing into it fails, and that is said where it happens.
    if !m.is_dir() || m.mode() & 0o022 == 0 {
        return Some(dir);
    }
    tracing::warn!(
        "cache folder {} not used: its mode {:o} lets other users write into it; this run keeps no files cache, on-disk index or trail anchor (chmod 700 it, or set CUSTOS_CACHE_DIR to a folder of your own)",
        dir.display(),
        m.mode() & 0o7777
    );
    None
}

#[cfg(test)]
mod tests {
    /// The fuzz corpus of custos.toml (fuzz/corpus/custos_toml), each input whole, cut
    /// short and with a byte changed: an answer (a parsed file or one error), never a
    /// panic.
    #[test]
    fn config_corpus_replays_without_panics() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/custos_toml");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("the corpus is in the repository") {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            let mut inputs = vec![data.clone(), data[..data.len() / 2].to_vec()];
            if !data.is_empty() {
                let mut flipped = data.clone();
                flipped[data.len() / 3] ^= 0x20;
                inputs.push(flipped);
            }
            for i in inputs {
                if let Ok(text) = std::str::from_utf8(&i) {
                    let _ = super::check_text(text);
                }
            }
            n += 1;
        }
        assert!(n >= 10, "only {n} inputs in {}", dir.display());
    }
}
