//! `custos backup config`: the configuration sources of custos.toml (`env`, `terraform`,
//! `logs`); `custos restore env`: an env file with the plain values and the secrets as
//! references.

use std::path::PathBuf;

use clap::Args;
use custos_model::{Error, Result};
use custos_ops::backup::{BackupOptions, BackupReport};
use custos_ops::config::{self, terraform};
use custos_repo::snapshot::SourceKind;

use crate::commands::backup::print_backup;
use crate::context::Ctx;
use crate::settings::SourceSection;

#[derive(Args)]
pub(crate) struct EnvRestoreArgs {
    /// The env snapshot: an id (prefix) or `latest`
    pub(crate) snapshot: String,
    /// The env file to write (must not exist; written 0600)
    #[arg(long)]
    pub(crate) to: PathBuf,
    /// With `latest`: the latest snapshot of this source
    #[arg(long)]
    pub(crate) source: Option<String>,
}

/// Whether a source kind is configuration (`backup config` runs these).
pub(crate) fn is_config(kind: &str) -> bool {
    matches!(kind, "env" | "terraform" | "logs")
}

/// Backs up one configuration source, printing what it found.
pub(crate) fn backup_source(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    s: &SourceSection,
    opts: &BackupOptions,
) -> Result<BackupReport> {
    match s.kind.as_str() {
        "env" => {
            if s.allow.is_empty() {
                return Err(Error::config(format!(
                    "env source `{}` has no `allow` list: name the variables to keep (globs like APP_*)",
                    s.name
                )));
            }
            let r = config::backup_env(
                repo,
                &config::EnvOptions {
                    name: s.name.clone(),
                    allow: s.allow.clone(),
                    plain: s.plain.clone(),
                    env_file: s.env_file.clone(),
                    vars: std::env::vars().collect(),
                    secrets_ref: s.secrets_ref.clone(),
                    list_command: s.list_command.clone(),
                },
                opts,
            )?;
            if !ctx.out.json {
                print_backup(ctx, &r.backup);
                println!(
                    "  env        {} variables: {} values, {} secrets kept as references only ({})",
                    r.facts.variables,
                    r.facts.values,
                    r.facts.references,
                    r.references.join(", ")
                );
                if r.facts.secret_names > 0 {
                    println!(
                        "  secrets    {} names listed by the secrets manager",
                        r.facts.secret_names
                    );
                }
            }
            Ok(r.backup)
        }
        "terraform" => {
            let dir = s.dir.clone().ok_or_else(|| {
                Error::config(format!(
                    "terraform source `{}` needs `dir`, its configuration folder",
                    s.name
                ))
            })?;
            let r = terraform::backup_terraform(
                repo,
                &terraform::TerraformOptions {
                    name: s.name.clone(),
                    command: s
                        .command
                        .clone()
                        .unwrap_or_else(|| "terraform state pull".into()),
                    dir,
                },
                opts,
            )?;
            for w in &r.facts.warnings {
                eprintln!("custos: warning: terraform `{}`: {w}", s.name);
            }
            if !ctx.out.json {
                print_backup(ctx, &r.backup);
                println!(
                    "  terraform  state serial {}, lineage {}, Terraform {}, {} resources",
                    r.facts.serial, r.facts.lineage, r.facts.terraform_version, r.facts.resources
                );
            }
            Ok(r.backup)
        }
        "logs" => {
            let paths: Vec<PathBuf> = s.paths.iter().map(PathBuf::from).collect();
            let r = custos_ops::files::backup::backup_files(repo, &paths, opts)?;
            if !ctx.out.json {
                print_backup(ctx, &r);
            }
            Ok(r)
        }
        other => Err(Error::config(format!(
            "source `{}` has kind `{other}`, not a configuration source (env, terraform, logs)",
            s.name
        ))),
    }
}

pub(crate) fn backup_config(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    source: Option<&str>,
) -> Result<i32> {
    let sources: Vec<&SourceSection> = ctx
        .settings
        .file
        .sources
        .iter()
        .filter(|s| is_config(&s.kind) && source.is_none_or(|n| s.name == n))
        .collect();
    if sources.is_empty() {
        return Err(Error::config(match source {
            Some(n) => format!("custos.toml has no env, terraform or logs source named `{n}`"),
            None => "custos.toml defines no env, terraform or logs [[source]]".into(),
        })
        .hint("see docs/config.md"));
    }
    let progress = ctx.out.progress();
    let mut reports = vec![];
    for s in sources {
        let opts = BackupOptions {
            tags: vec![s.name.clone()],
            time: None,
            cache_dir: ctx.settings.cache_dir.clone(),
            progress: progress.as_ref(),
        };
        reports.push(
            backup_source(ctx, repo, s, &opts)
                .map_err(|e| e.context(format!("source `{}`", s.name)))?,
        );
    }
    if ctx.out.json {
        ctx.out.json(&reports);
    }
    Ok(0)
}

pub(crate) fn restore_env(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    a: EnvRestoreArgs,
) -> Result<i32> {
    let snap = repo.find_snapshot(&a.snapshot, |s| {
        s.kind == SourceKind::Env && a.source.as_deref().is_none_or(|n| s.source == n)
    })?;
    ctx.cold_gate(repo, &snap)?;
    let text = config::env_file(repo, &snap)?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&a.to)
        .map_err(|e| {
            Error::config(format!("cannot create {}: {e}", a.to.display()))
                .hint("name a file that does not exist yet")
        })?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::internal(format!("writing {}: {e}", a.to.display())))?;
    ctx.touch(serde_json::json!({"snapshot": snap.id, "to": a.to}));
    if ctx.out.json {
        ctx.out
            .json(&serde_json::json!({"snapshot": snap.id, "to": a.to}));
    } else {
        println!(
            "environment `{}` of snapshot {} written to {} (secrets as references, to set from the secrets manager)",
            snap.summary.source,
            snap.id.short(),
            a.to.display()
        );
    }
    Ok(0)
}

#[derive(clap::Subcommand)]
pub(crate) enum ConfigCommand {
    /// Write a commented custos.toml to start from
    #[command(
        after_help = "Example:\n  custos config init --profile healthcare --to /etc/custos/custos.toml"
    )]
    Init {
        /// healthcare: the seed's sources, its whole frequency matrix as jobs, and its
        /// retention (30 daily, 12 weekly, 12 monthly, 7 yearly; audit log 6 years)
        #[arg(long, value_parser = ["healthcare"], default_value = "healthcare")]
        profile: String,
        /// The file to write (must not exist)
        #[arg(long)]
        to: PathBuf,
    },
    /// Check custos.toml: every job's schedule, what it runs, its timeout; print when each
    /// job runs next
    #[command(after_help = "Example:\n  custos --config /etc/custos/custos.toml config check")]
    Check,
}

/// The seed's (`backup-procedures.md`) sources, frequency matrix and retention.
pub(crate) const HEALTHCARE: &str = r#"# custos.toml for the healthcare AI platform, from the seed's backup procedures.
# Every time is UTC. Fill in the places marked CHANGE; secrets never go in this file
# (passwords from password_file, PGPASSWORD or ~/.pgpass, S3 keys and Vercel's token
# from the environment). `custos config check` validates it.

[repository]
url = "s3://CHANGE-backups/prod"
password_file = "/etc/custos/backup.pw"      # a backup-role key: writes, cannot read back
cache_dir = "/var/cache/custos"

[storage.s3]
region = "us-east-1"

[postgres]                                   # the cluster whose WAL is archived continuously
name = "clinical"                            # (archive_command = 'custos wal-push --async %p')
host = "/var/run/postgresql"

[retention]                                  # the seed: 30 daily, 12 weekly, 12 monthly, 7 yearly
keep_daily = 30
keep_weekly = 12
keep_monthly = 12
keep_yearly = 7

[retention_incremental]                      # hourly incrementals: 7 days, as the seed's cleanup
keep_within = "7d"                           # (fulls follow [retention]; every backup is complete
                                             # on its own, so no kept one loses a parent)

# The seed keeps long-term copies in WORM storage. On an S3 bucket created with Object Lock
# (`custos bucket-policy` prints its settings), every object is written with a retain-until
# date from [retention]; the lock-refresh job extends promoted snapshots' dates.
# [object_lock]
# mode = "compliance"                        # or "governance" (a user granted the bypass may delete early)

[drill]                                      # restore drills: scratch copies custos creates and removes
scratch = "/var/lib/custos/drill"            # room for a copy of the database (CHANGE)
# bin = "/usr/lib/postgresql/16/bin"         # default: the backup's major version, found
[[drill.check]]                              # smoke SQL the restored copy must answer (CHANGE)
name = "patients are there"
sql = "SELECT count(*) > 0 FROM patients"
expect = "t"

[agent]                                      # `custos agent`: runs the [[job]]s below
listen = "127.0.0.1:9187"                    # /metrics, /healthz, /readyz, status page at /
state_dir = "/var/lib/custos/agent"
wal_lag_alert = "15m"                        # the seed's alert: WAL archiving lapses past 15 minutes
alert_repeat = "4h"
daily_report = "5 0 * * *"                   # the day before, into the repository and the sinks
# token_file = "/etc/custos/agent.token"     # needed to listen beyond 127.0.0.1

[[alert]]                                    # every alert and resolution, as JSON on stdin
kind = "command"
command = "logger -t custos-alert"

# [[alert]]                                  # Slack: the webhook URL carries a secret, so a file
# kind = "slack"
# url_file = "/etc/custos/slack-webhook.url"

# The seed keeps every backup at a second, distant site as fresh as the first. Uncomment,
# point it at another region or provider (CHANGE), then `custos copy` once by hand.
# [[secondary]]
# name = "dr"
# url = "s3://CHANGE-dr-bucket/prod"
# wal = true                                 # wal-push writes each segment there too before PostgreSQL may recycle it
# max_lag = "15m"                            # copy --check and the agent's secondary_behind alert
# object_lock = true                         # write there with [object_lock]'s dates too
# [secondary.s3]                             # its own store and credentials (else [storage.s3])
# endpoint = "https://s3.CHANGE-region.amazonaws.com"
# region = "CHANGE-region"
# access_key_id = "CHANGE"
# secret_access_key_file = "/etc/custos/s3-dr.secret"

[[source]]                                   # vector store: rows, digest, sample neighbours
name = "vector-store"
kind = "table"
tables = ["document_embeddings"]

[[source]]                                   # the application's audit log, exported exactly once
name = "audit-log"
kind = "audit-log"
table = "audit_log"
order_by = "id"
min_retention = "6y"                         # the seed keeps audit logs six years

[[source]]                                   # clinical documents (token: BLOB_READ_WRITE_TOKEN)
name = "documents"
kind = "files"
paths = ["vercel_blob://CHANGE-documents"]

[[source]]                                   # environment: values, secrets as references only
name = "platform-env"
kind = "env"
allow = ["APP_*", "NEXT_PUBLIC_*", "DATABASE_URL", "SUPABASE_*", "STRIPE_*", "OPENAI_*"]
secrets_ref = "aws-secretsmanager:prod/healthcare"

[[source]]                                   # Terraform state and configuration
name = "terraform"
kind = "terraform"
dir = "/srv/CHANGE-infra/prod"

[[source]]                                   # system logs
name = "system-logs"
kind = "logs"
paths = ["/var/log/CHANGE-platform"]

# The frequency matrix. Transaction logs are continuous (archive_command), not a job.
[[job]]                                      # database incremental, hourly at :00
name = "db-incremental"
run = "postgres-incremental"
schedule = "0 * * * *"
timeout = "50m"

[[job]]                                      # database full, daily at 02:00 (low traffic)
name = "db-full"
run = "postgres-full"
schedule = "0 2 * * *"
timeout = "3h"

[[job]]                                      # vector store, hourly and daily
name = "vector-store-hourly"
run = "vector-store"
schedule = "15 * * * *"
timeout = "45m"
retries = 2

[[job]]                                      # the seed's daily vector-store verification
name = "vector-store-verify"
run = "verify-table"
schedule = "0 4 * * *"
timeout = "2h"

[[job]]                                      # file storage, hourly (unchanged blobs are not stored again)
name = "documents-hourly"
run = "documents"
schedule = "30 * * * *"
timeout = "50m"
retries = 2

[[job]]                                      # configuration, daily (a weekly full is the same run)
name = "config-daily"
run = "config"
schedule = "0 3 * * *"
timeout = "30m"

[[job]]                                      # audit logs, hourly; kept 6 years by min_retention
name = "audit-log-hourly"
run = "audit-log"
schedule = "5 * * * *"
timeout = "30m"
retries = 3

[[job]]                                      # system logs, daily
name = "system-logs-daily"
run = "system-logs"
schedule = "45 1 * * *"
timeout = "1h"

[[job]]                                      # retention, daily after the full backup
name = "forget"
run = "forget"
schedule = "0 6 * * *"
timeout = "1h"

[[job]]                                      # frees what forget released; takes the exclusive lock
name = "prune"
run = "prune"
schedule = "0 7 * * SUN"
timeout = "6h"

# [[job]]                                    # the second site: everything the first has, continuously
# name = "copy"
# run = "copy"
# schedule = "* * * * *"
# timeout = "1h"

# [[job]]                                    # Object Lock: extend promoted snapshots' dates
# name = "lock-refresh"                      # (with [object_lock] above), daily
# run = "lock-refresh"
# schedule = "30 6 * * *"
# timeout = "2h"

[[job]]                                      # the seed's recovery tests: weekly database drill
name = "drill-db"                            # (scratch cluster, pg_amcheck, RTO/RPO; [drill] below)
run = "drill-db"
schedule = "0 9 * * SAT"
timeout = "6h"

[[job]]                                      # monthly vector store drill (rows, digest, neighbours)
name = "drill-vector"
run = "drill-vector"
schedule = "0 10 1 * *"
timeout = "6h"

[[job]]                                      # quarterly full-system drill
name = "drill-full"
run = "drill-full"
schedule = "0 11 1 1,4,7,10 *"
timeout = "12h"

[[job]]                                      # the repository's structure, daily
name = "verify"
run = "verify"
schedule = "0 5 * * *"
timeout = "2h"

[[job]]                                      # every byte read back, weekly
name = "verify-read-data"
run = "verify-read-data"
schedule = "0 8 * * SAT"
timeout = "6h"
"#;

pub(crate) fn cmd_config(ctx: &Ctx, c: ConfigCommand) -> Result<i32> {
    match c {
        ConfigCommand::Init { profile, to } => {
            debug_assert_eq!(profile, "healthcare");
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&to)
                .map_err(|e| {
                    Error::config(format!("cannot create {}: {e}", to.display()))
                        .hint("name a file that does not exist yet")
                })?;
            f.write_all(HEALTHCARE.as_bytes())
                .map_err(|e| Error::internal(format!("writing {}: {e}", to.display())))?;
            if !ctx.out.quiet {
                println!(
                    "wrote {} (profile {profile}): fill in the places marked CHANGE, then run `custos --config {} config check`",
                    to.display(),
                    to.display()
                );
            }
            Ok(0)
        }
        ConfigCommand::Check => {
            let jobs = ctx.settings.file.check_jobs()?;
            // The agent's settings and sinks too (what `custos agent` would refuse).
            crate::commands::agent::agent_config(&ctx.settings.file, &ctx.settings, None)?;
            let now = chrono::Utc::now();
            if ctx.out.json {
                let v: Vec<_> = jobs
                    .iter()
                    .map(|(j, s)| serde_json::json!({"name": j.name, "run": j.run, "schedule": s.expr(), "zone": j.zone, "timeout": j.timeout, "retries": j.retries.unwrap_or(0), "next": s.next_after(now)}))
                    .collect();
                ctx.out.json(
                    &serde_json::json!({"sources": ctx.settings.file.sources.len(), "jobs": v}),
                );
            } else {
                println!(
                    "{} source(s), {} job(s); every schedule parses and names what exists",
                    ctx.settings.file.sources.len(),
                    jobs.len()
                );
                for (j, s) in &jobs {
                    println!(
                        "  {:<22} {:<22} {:<14} next {}",
                        j.name,
                        j.run,
                        s.expr(),
                        s.next_after(now)
                            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
                            .unwrap_or_else(|| "never".into())
                    );
                }
            }
            Ok(0)
        }
    }
}
