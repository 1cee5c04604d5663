//! The `custos` binary: arguments, settings, output and exit codes. All work is done by
//! the library crates; this is the only place that reads the environment, prints or exits.

mod commands;
mod context;
mod output;
mod settings;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use custos_model::{Error, Kind, Result};
use output::Out;
use settings::{Env, Settings};

use commands::audit::AuditCommand;
use commands::backup::BackupCommand;
use commands::key::KeyCommand;
use commands::pg::PgCommand;
use commands::restore::RestoreCommand;
use context::Ctx;

#[derive(Parser)]
#[command(
    name = "custos",
    version,
    about = "Encrypted, deduplicated, verifiable backups",
    max_term_width = 100
)]
struct Cli {
    /// Repository location: a path, s3://bucket/prefix, or another OpenDAL scheme [env: CUSTOS_REPO]
    #[arg(long, global = true)]
    repo: Option<String>,
    /// Config file (TOML) [env: CUSTOS_CONFIG]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Run against this secondary of custos.toml instead of the primary (read, restore,
    /// verify; forget and prune its own retention); recorded in the primary's trail.
    /// With wal-push: write each file to it as well before acknowledging
    #[arg(long, global = true, value_name = "NAME")]
    secondary: Option<String>,
    /// Restore: ask the store to bring back the archived (GLACIER, DEEP_ARCHIVE) objects
    /// the restore needs, all at once, and wait (exit 21) until they are readable
    #[arg(long, global = true)]
    request_cold: bool,
    /// When another operation holds a conflicting lock (prune's exclusive lock, or
    /// backups while prune wants it), wait up to this long for it (30s, 10m) instead of
    /// failing with exit 11 [env: CUSTOS_LOCK_WAIT; [repository] lock_wait]
    #[arg(long, global = true, value_name = "DURATION")]
    lock_wait: Option<String>,
    /// Print one JSON document on stdout instead of text
    #[arg(long, global = true)]
    json: bool,
    /// No progress bars and less text
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Log more (repeat for more detail); logs go to stderr [env: CUSTOS_LOG]
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a repository and its restore key (password from CUSTOS_PASSWORD* or a prompt)
    #[command(
        after_help = "Example:\n  custos init --owner postgres    # a local repository for the archive_command of postgres"
    )]
    Init(commands::init::InitArgs),
    /// Manage the keys that open the repository
    #[command(subcommand)]
    Key(KeyCommand),
    /// Back up a source
    #[command(subcommand)]
    Backup(BackupCommand),
    /// The repository at a glance: per database cluster its newest backup, age, restorable
    /// window and WAL gaps; per source its newest snapshot; the repository's size.
    /// Example: `custos info --json | jq '.clusters[] | .newest.age_seconds'`
    #[command(after_help = "Example:\n  custos info --json | jq '.clusters[].newest.age_seconds'")]
    Info,
    /// List snapshots
    #[command(after_help = "Example:\n  custos snapshots --source /srv/documents --json")]
    Snapshots(commands::snapshots::SnapshotsArgs),
    /// The recovery points `backup all` recorded: one id binding each source's snapshot
    /// and the database's WAL position
    #[command(after_help = "Example:\n  custos points --json")]
    Points,
    /// List the contents of a snapshot
    #[command(after_help = "Example:\n  custos ls latest --source /srv/documents")]
    Ls(commands::snapshots::LsArgs),
    /// Restore a snapshot
    #[command(subcommand)]
    Restore(RestoreCommand),
    /// Check the repository; with --read-data, read back and authenticate stored data
    #[command(after_help = "Example:\n  custos verify --read-data --subset 10%")]
    Verify(commands::maintenance::VerifyArgs),
    /// custos.toml: write one to start from, check one
    #[command(subcommand)]
    Config(commands::config::ConfigCommand),
    /// The application's audit-log exports: prove their chain
    #[command(subcommand, name = "audit-log")]
    AuditLog(commands::tables::AuditLogCommand),
    /// Remove snapshots by retention policy (flags, or [retention] in custos.toml)
    #[command(
        after_help = "Example:\n  custos forget --keep-daily 30 --keep-weekly 12 --keep-monthly 12 --keep-yearly 7 --dry-run"
    )]
    Forget(commands::maintenance::ForgetArgs),
    /// Remove data that no snapshot references
    #[command(after_help = "Example:\n  custos prune --dry-run")]
    Prune(commands::maintenance::PruneArgs),
    /// Bring the secondaries of custos.toml up to date with the primary, byte for byte;
    /// with --check, say how far behind each is
    #[command(
        after_help = "Example:\n  custos copy --to dr-region\n  custos copy --check --max-lag 5m --json"
    )]
    Copy(commands::copy::CopyArgs),
    /// Remove stale locks left by crashed processes
    #[command(after_help = "Example:\n  custos unlock")]
    Unlock,
    /// The operation trail: who did what to the repository, hash-chained and signed
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print the AWS IAM policy that enforces a role at the storage layer
    #[command(
        after_help = "Example:\n  custos iam-policy --role backup --bucket backups --prefix prod > backup-policy.json"
    )]
    IamPolicy(commands::key::IamPolicyArgs),
    /// Print the bucket settings custos expects (Object Lock default, versioning, the
    /// seed's hot/warm/cold lifecycle tiers) for you to apply
    #[command(
        name = "bucket-policy",
        after_help = "Example:\n  custos bucket-policy --bucket backups --prefix prod --cold-class GLACIER > bucket.json"
    )]
    BucketPolicy(commands::lock::BucketPolicyArgs),
    /// Restore drills into scratch places custos creates and removes: proven, timed
    /// (RTO, RPO) and recorded
    #[command(subcommand)]
    Drill(commands::drill::DrillCommand),
    /// S3 Object Lock: the dates that keep each snapshot's objects from deletion
    #[command(subcommand)]
    Lock(commands::lock::LockCommand),
    /// The chunk index: rewrite its objects as few ones of bounded size
    #[command(subcommand)]
    Index(commands::maintenance::IndexCommand),
    /// PostgreSQL checks
    #[command(subcommand)]
    Pg(PgCommand),
    /// Run the schedule of custos.toml's [[job]]s in the foreground, with /metrics,
    /// /healthz, /readyz, a status page, alerts and the daily report
    #[command(
        after_help = "Example:\n  custos --config /etc/custos/custos.toml agent --listen 127.0.0.1:9187"
    )]
    Agent(commands::agent::AgentArgs),
    /// Alert sinks of custos.toml
    #[command(subcommand)]
    Alert(commands::agent::AlertCommand),
    /// The auditor's report for a period (html, json, pdf; its hash into the trail);
    /// `report verify FILE`; `report daily`: the agent's daily reports
    #[command(
        after_help = "Example:\n  custos report --from 2026-11-01 --to 2026-12-01 --format pdf --out backup-report-2026-11.pdf\n  custos report verify backup-report-2026-11.pdf"
    )]
    Report(commands::report::ReportArgs),
    /// Archive one WAL file: use as archive_command = 'custos wal-push %p'
    #[command(
        after_help = "Example:\n  archive_command = '/usr/local/bin/custos --config /etc/custos/db.toml wal-push --async %p'"
    )]
    WalPush(commands::pg::WalPushArgs),
    /// Fetch one archived WAL file: use as restore_command = 'custos wal-fetch %f %p'
    #[command(
        after_help = "Example:\n  restore_command = '/usr/local/bin/custos --config /etc/custos/db.toml wal-fetch %f %p'"
    )]
    WalFetch(commands::pg::WalFetchArgs),
}

/// glibc gives each thread that allocates its own heap (up to eight per core), and what
/// one thread frees stays in that heap: with the S3 client's worker threads, a first build
/// of the on-disk index at 10M entries peaked at 218-239 MB instead of 168-183 MB with one
/// heap per core, at the same speed (bench/RESULTS.md, scale run 7). MALLOC_ARENA_MAX,
/// when set, still decides.
///
/// And glibc raises the size from which it maps a block on its own (rather than taking it
/// from a heap) to the largest block freed so far: after a build freed its large buffers,
/// a backup's 16 MiB packs came from the heaps and stayed there, and the first command at
/// 100M entries peaked at 178-264 MB; with the size fixed at 12 MiB (packs mapped, smaller
/// buffers from the heaps as before), 139 MB at the same speed (bench/RESULTS.md, scale run
/// 12). GLIBC_TUNABLES or MALLOC_MMAP_THRESHOLD_, when set, still decide.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
            // SAFETY: mallopt only changes the allocator's parameters; called before any
            // other thread exists.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, cores as libc::c_int);
            }
        }
        let tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("mmap_threshold"));
        if !tuned && std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 12 << 20);
            }
        }
    }
}

fn main() {
    let env = Env::capture();
    // Repository files and caches are private whatever the caller's umask.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0o077) };
    limit_malloc_arenas();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => usage_error(e),
    };
    let filter = std::env::var("CUSTOS_LOG").unwrap_or_else(|_| match cli.verbose {
        // The store's retries are said with -v; by default only the error they end in.
        0 => "warn,opendal::layers::retry=error".into(),
        1 => "info".into(),
        _ => "debug".into(),
    });
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .init();
    let json = cli.json;
    let code = match run(cli, env) {
        Ok(code) => code,
        Err(e) => {
            output::error(&e, json);
            e.kind.exit_code()
        }
    };
    std::process::exit(code);
}

/// A command line clap refused: its message on stderr as clap writes it, and with --json
/// (anywhere on the line) the error document on stdout too; exit 2. Help and version
/// requests print as usual.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let json = std::env::args_os().any(|a| a == "--json");
    let _ = e.print();
    if json {
        let text = e.render().to_string();
        let first = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("invalid command line")
            .trim_start_matches("error: ")
            .to_string();
        let err = Error::config(first).hint("see `custos --help` or `custos COMMAND --help`");
        println!(
            "{}",
            serde_json::json!({"error": {"code": err.kind.code(), "kind": err.kind.name(), "message": err.message, "hint": err.hint, "retryable": false}})
        );
    }
    std::process::exit(Kind::Config.exit_code());
}

fn run(cli: Cli, env: Env) -> Result<i32> {
    let mut settings = Settings::resolve(&env, cli.config.as_deref(), cli.repo.as_deref())?;
    if let Some(w) = cli.lock_wait.as_deref() {
        settings.lock_wait = settings::lock_wait(Some(w))?;
    }
    settings.wal_secondaries = settings
        .file
        .secondaries
        .iter()
        .filter(|s| s.wal)
        .map(|s| s.name.clone())
        .collect();
    if let (Some(name), Command::WalPush(_)) = (&cli.secondary, &cli.command) {
        // wal-push --secondary NAME: the file goes there too before it is acknowledged.
        settings.secondary_section(name)?;
        if !settings.wal_secondaries.contains(name) {
            settings.wal_secondaries.push(name.clone());
        }
    } else if let Some(name) = &cli.secondary {
        if cli.repo.is_some() {
            return Err(Error::config("--secondary and --repo both name the repository to use")
                .hint("give one: --secondary NAME for a secondary of custos.toml, --repo URL for any repository"));
        }
        settings.secondary_section(name)?;
        if let Some(what) = writes_the_repository(&cli.command) {
            return Err(Error::config(format!(
                "`{what}` writes to the repository: it runs against the primary, not the secondary `{name}`"
            ))
            .hint("drop --secondary; `custos copy` brings what it writes to the secondaries"));
        }
        settings.secondary = Some(name.clone());
    }
    // forget and prune may delete on a secondary (its own retention); nothing else writes.
    let access = match cli.command {
        Command::Forget(_) | Command::Prune(_) | Command::Index(_) => {
            custos_storage::guard::Access::Maintenance
        }
        _ => custos_storage::guard::Access::ReadOnly,
    };
    let ctx = Ctx {
        env,
        settings,
        out: Out {
            json: cli.json,
            quiet: cli.quiet,
        },
        trail: Default::default(),
        touched: Default::default(),
        introduces: Default::default(),
        authority: Default::default(),
        secondary_access: std::cell::Cell::new(access),
        unnamed_secondary: Default::default(),
        request_cold: cli.request_cold,
        // Every command first checks the trail still holds what this host last wrote;
        // not the commands that investigate or accept a trail that fails that, nor WAL
        // archiving and recovery (PostgreSQL's, one segment at a time).
        check_trail: !matches!(
            cli.command,
            Command::Audit(_) | Command::Init(_) | Command::WalPush(_) | Command::WalFetch(_)
        ),
        tombstone_key: Default::default(),
    };
    let name = match (&cli.command, &cli.secondary) {
        // Recovery from a secondary asks for one WAL file after another: none of them
        // waits on the primary's trail (which may be what was lost). The restore that
        // set recovery up is recorded.
        (Command::WalFetch(_), Some(_)) => None,
        (c, _) => trail_name(c),
    };
    let result = dispatch(&ctx, cli.command);
    let recorded = match name {
        Some(name) => ctx.record(&name, &result),
        None => Ok(()),
    };
    match (result, recorded) {
        (r, Ok(())) => r,
        (Ok(_), Err(e)) => Err(e),
        (Err(e), Err(unrecorded)) => {
            eprintln!("custos: warning: {}", unrecorded.message);
            Err(e)
        }
    }
}

/// The commands that add to a repository (and so never run against a secondary: only
/// `copy` writes there), by name.
fn writes_the_repository(c: &Command) -> Option<&'static str> {
    Some(match c {
        Command::Init(_) => "init",
        Command::Backup(_) => "backup",
        Command::Copy(_) => "copy",
        Command::Agent(_) => "agent",
        Command::Key(KeyCommand::List | KeyCommand::Status) => return None,
        Command::Key(_) => "key",
        _ => return None,
    })
}

/// The name a command is recorded under in the trail; None for the per-file archive
/// commands (their batches are recorded by the async pusher) and the trail's own reads.
fn trail_name(c: &Command) -> Option<String> {
    Some(match c {
        Command::Init(_) => "init".into(),
        Command::Key(k) => match k {
            KeyCommand::List => "key list",
            KeyCommand::Status => "key status",
            KeyCommand::Split { .. } => "key split",
            KeyCommand::Rotate { .. } => "key rotate",
            KeyCommand::Recover { .. } => "key recover",
            KeyCommand::Add { .. } => "key add",
            KeyCommand::Remove { .. } => "key remove",
            KeyCommand::Passwd { .. } => "key passwd",
        }
        .into(),
        Command::Backup(b) => match b {
            BackupCommand::Files { .. } => "backup files",
            BackupCommand::Stream { .. } => "backup stream",
            BackupCommand::Postgres { .. } => "backup postgres",
            BackupCommand::Config { .. } => "backup config",
            BackupCommand::Table(_) => "backup table",
            BackupCommand::AuditLog(_) => "backup audit-log",
            BackupCommand::Dump(_) => "backup dump",
            BackupCommand::All { .. } => "backup all",
        }
        .into(),
        Command::Snapshots(_) => "snapshots".into(),
        Command::Info => "info".into(),
        Command::Points => return None,
        Command::Ls(_) => "ls".into(),
        Command::Restore(r) => match r {
            RestoreCommand::Files { .. } => "restore files",
            RestoreCommand::Postgres { .. } => "restore postgres",
            RestoreCommand::Stream { .. } => "restore stream",
            RestoreCommand::Env(_) => "restore env",
            RestoreCommand::Table(_) => "restore table",
            RestoreCommand::AuditLog(_) => "restore audit-log",
            RestoreCommand::Dump(_) => "restore dump",
            RestoreCommand::All { .. } => "restore all",
        }
        .into(),
        Command::Verify(_) => "verify".into(),
        Command::AuditLog(_) => "audit-log verify".into(),
        Command::Forget(_) => "forget".into(),
        Command::Prune(_) => "prune".into(),
        Command::Index(commands::maintenance::IndexCommand::Compact) => "index compact".into(),
        Command::Index(commands::maintenance::IndexCommand::Rebuild) => "index rebuild".into(),
        Command::Unlock => "unlock".into(),
        Command::Copy(c) if c.check => return None,
        Command::Copy(_) => "copy".into(),
        Command::Pg(_) => "pg check".into(),
        Command::WalPush(commands::pg::WalPushArgs { drain: true, .. }) => "wal-push batch".into(),
        // Each decryption with a restore key is recorded; each synchronous push is not (one
        // per segment; the async pusher records its batches).
        Command::WalFetch(_) => "wal-fetch".into(),
        Command::WalPush(_) => return None,
        Command::Audit(AuditCommand::Log { .. }) => "audit log".into(),
        Command::Audit(AuditCommand::Verify { .. }) => "audit verify".into(),
        Command::Audit(AuditCommand::Head { accept: true }) => "audit head accept".into(),
        Command::Audit(AuditCommand::Head { .. }) => return None,
        Command::IamPolicy(_) | Command::BucketPolicy(_) => return None,
        Command::Lock(commands::lock::LockCommand::Status) => return None,
        Command::Drill(commands::drill::DrillCommand::List) => return None,
        Command::Drill(commands::drill::DrillCommand::Db { .. }) => "drill db".into(),
        Command::Drill(commands::drill::DrillCommand::Files { .. }) => "drill files".into(),
        Command::Drill(commands::drill::DrillCommand::Vector { .. }) => "drill vector".into(),
        Command::Drill(commands::drill::DrillCommand::AuditLog) => "drill audit-log".into(),
        Command::Drill(commands::drill::DrillCommand::Full { .. }) => "drill full".into(),
        Command::Lock(commands::lock::LockCommand::Refresh) => "lock refresh".into(),
        Command::Config(_) => return None,
        // The agent signs its own entries (each job run, alert and report).
        Command::Agent(_) | Command::Alert(_) => return None,
        Command::Report(r) => return commands::report::trail_name(r),
    })
}

fn dispatch(ctx: &Ctx, command: Command) -> Result<i32> {
    match command {
        Command::Audit(a) => commands::audit::cmd_audit(ctx, a),
        Command::BucketPolicy(a) => commands::lock::bucket_policy(ctx, &a),
        Command::Lock(c) => commands::lock::cmd_lock(ctx, c),
        Command::Drill(c) => commands::drill::cmd_drill(ctx, c),
        Command::IamPolicy(commands::key::IamPolicyArgs {
            role,
            bucket,
            prefix,
            allow_delete,
        }) => commands::key::iam_policy(&role, &bucket, &prefix, allow_delete),
        Command::Init(commands::init::InitArgs {
            kdf,
            pack_size_mib,
            db_block_kib,
            owner,
        }) => commands::init::cmd_init(
            ctx,
            &kdf,
            pack_size_mib,
            db_block_kib.map(|k| k.parse::<u32>().expect("checked by clap") * 1024),
            owner.as_deref(),
        ),
        Command::Key(k) => commands::key::cmd_key(ctx, k),
        Command::Backup(b) => commands::backup::cmd_backup(ctx, b),
        Command::Snapshots(commands::snapshots::SnapshotsArgs { source }) => {
            commands::snapshots::cmd_snapshots(ctx, source.as_deref())
        }
        Command::Info => commands::snapshots::cmd_info(ctx),
        Command::Points => commands::snapshots::cmd_points(ctx),
        Command::Ls(commands::snapshots::LsArgs { snapshot, source }) => {
            commands::snapshots::cmd_ls(ctx, &snapshot, source.as_deref())
        }
        Command::Restore(r) => commands::restore::cmd_restore(ctx, r),
        Command::Verify(commands::maintenance::VerifyArgs {
            table: Some(spec),
            db_url,
            ..
        }) => {
            let repo = ctx.open()?;
            commands::tables::verify_table(ctx, &repo, &spec, db_url)
        }
        Command::Verify(commands::maintenance::VerifyArgs {
            read_data, subset, ..
        }) => commands::maintenance::cmd_verify(ctx, read_data, subset.as_deref()),
        Command::AuditLog(c) => commands::tables::cmd_audit_log(ctx, c),
        Command::Config(c) => commands::config::cmd_config(ctx, c),
        Command::Forget(commands::maintenance::ForgetArgs {
            snapshots,
            policy,
            dry_run,
            prune,
        }) => commands::maintenance::cmd_forget(ctx, &snapshots, &policy, dry_run, prune),
        Command::Prune(commands::maintenance::PruneArgs { dry_run }) => {
            commands::maintenance::cmd_prune(ctx, dry_run)
        }
        Command::Pg(PgCommand::Check {
            db_url,
            max_lag,
            max_backup_age,
        }) => commands::pg::check(ctx, db_url, max_lag, max_backup_age),
        Command::WalPush(commands::pg::WalPushArgs {
            path,
            pgdata,
            is_async,
            async_timeout,
            drain,
        }) => commands::pg::wal_push(ctx, path, pgdata, is_async, async_timeout, drain),
        Command::WalFetch(commands::pg::WalFetchArgs { name, dest, pgdata }) => {
            commands::pg::wal_fetch(ctx, name, dest, pgdata)
        }
        Command::Unlock => commands::maintenance::unlock(ctx),
        Command::Index(commands::maintenance::IndexCommand::Compact) => {
            commands::maintenance::cmd_index_compact(ctx)
        }
        Command::Index(commands::maintenance::IndexCommand::Rebuild) => {
            commands::maintenance::cmd_index_rebuild(ctx)
        }
        Command::Copy(a) => commands::copy::cmd_copy(ctx, &a),
        Command::Agent(a) => commands::agent::cmd_agent(ctx, &a),
        Command::Alert(a) => commands::agent::cmd_alert(ctx, &a),
        Command::Report(r) => commands::report::cmd_report(ctx, &r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument says what it is for, and every command shows an example.
    #[test]
    fn every_argument_has_help_and_every_command_an_example() {
        fn walk(c: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", c.get_name());
            for a in c.get_arguments() {
                let id = a.get_id().as_str();
                if ["help", "version"].contains(&id) || a.is_hide_set() {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path}: argument `{id}` has no help"));
                }
            }
            let subs: Vec<_> = c
                .get_subcommands()
                .filter(|s| s.get_name() != "help")
                .collect();
            if subs.is_empty() {
                let shown = format!(
                    "{}{}",
                    c.get_after_help()
                        .map(|h| h.to_string())
                        .unwrap_or_default(),
                    c.get_after_long_help()
                        .map(|h| h.to_string())
                        .unwrap_or_default()
                );
                if !shown.contains("Example") {
                    missing.push(format!("{path}: no example"));
                }
            }
            for s in subs {
                walk(s, &path, missing);
            }
        }
        let mut missing = vec![];
        walk(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
