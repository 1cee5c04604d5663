//! `custos pg check`, `wal-push` and `wal-fetch`: PostgreSQL's archiving.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use custos_model::{Error, Kind, Result};

use crate::context::Ctx;
use crate::output;

/// The flags of `custos wal-push`.
#[derive(Args)]
pub(crate) struct WalPushArgs {
    /// The WAL file (PostgreSQL's %p: a path under pg_wal)
    #[arg(required_unless_present = "drain")]
    pub(crate) path: Option<PathBuf>,
    /// Data directory of the cluster [env: PGDATA; default: the current directory,
    /// where PostgreSQL runs archive_command]
    #[arg(long)]
    pub(crate) pgdata: Option<PathBuf>,
    /// A background pusher reads ahead every file PostgreSQL has ready and uploads in
    /// parallel; this call answers once the repository holds its file
    #[arg(long = "async")]
    pub(crate) is_async: bool,
    /// With --async: how long to wait for the pusher before failing (PostgreSQL retries)
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub(crate) async_timeout: String,
    /// Upload what waits in the spool, then exit once it stays empty (started by --async)
    #[arg(long, hide = true)]
    pub(crate) drain: bool,
}

/// The flags of `custos wal-fetch`.
#[derive(Args)]
pub(crate) struct WalFetchArgs {
    /// The WAL file's name (PostgreSQL's %f)
    pub(crate) name: String,
    /// Where to write it (PostgreSQL's %p)
    pub(crate) dest: PathBuf,
    /// Data directory of the cluster being recovered [env: PGDATA; default: the current directory]
    #[arg(long)]
    pub(crate) pgdata: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum PgCommand {
    /// Archiving health: settings, pg_stat_archiver, lag, and gaps in the archived WAL.
    /// Exits 20 when something is wrong (for monitors: --json).
    #[command(
        after_help = "Example:\n  custos pg check --max-lag 15m --max-backup-age 26h --json"
    )]
    Check {
        /// Connection string; otherwise PGHOST, PGPORT, PGUSER, PGDATABASE
        #[arg(long)]
        db_url: Option<String>,
        /// Fail when segments have waited longer than this to be archived
        #[arg(long, default_value = "15m")]
        max_lag: String,
        /// Fail when the cluster's newest base backup is older than this (like 26h)
        #[arg(long, value_name = "DURATION")]
        max_backup_age: Option<String>,
    },
}

/// `wal-push --async` (answer from the pusher's marker, starting the pusher if needed) and
/// `wal-push --drain` (the pusher).
pub(crate) fn wal_push_async(
    ctx: &Ctx,
    path: Option<&std::path::Path>,
    pgdata: &std::path::Path,
    timeout: std::time::Duration,
    drain: bool,
) -> Result<i32> {
    use custos_ops::postgres::wal::Spool;
    let cache = ctx.settings.cache_dir.clone().ok_or_else(|| {
        Error::config("wal-push --async needs a cache folder for its markers")
            .hint("set CUSTOS_CACHE_DIR or cache_dir in custos.toml")
    })?;
    ctx.settings.location()?;
    let pgdata = std::path::absolute(pgdata).unwrap_or_else(|_| pgdata.to_path_buf());
    let system_id = custos_sources::postgres::wal::system_id(&pgdata)?;
    let spool = Spool {
        dir: Spool::location(&cache, system_id, &ctx.settings.location_key()),
    };
    if drain {
        let Some(_lock) = spool.try_lock()? else {
            return Ok(0);
        };
        // Nobody reads this process's output: a failure goes where archive_command and
        // `pg check` look for it.
        let repo = ctx
            .open()
            .and_then(|r| r.require_write("archive WAL").map(|_| r))
            .inspect_err(|e| spool.pusher_failed(e))?;
        spool.pusher_started();
        let also = wal_secondaries(ctx).inspect_err(|e| spool.pusher_failed(e))?;
        let n = spool
            .drain(
                &repo,
                &pgdata,
                4,
                std::time::Duration::from_secs(3),
                &also,
                ctx.host_anchor().as_ref(),
            )
            .inspect_err(|e| spool.pusher_failed(e))?;
        ctx.touch(serde_json::json!({"system_id": system_id.to_string(), "files": n}));
        tracing::info!("WAL pusher: stored {n} file(s)");
        return Ok(0);
    }
    let path = path.expect("required by clap");
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::config(format!("{} names no WAL file", path.display())))?
        .to_string();
    custos_sources::postgres::wal::classify(&name)?;
    if spool.take_done(&name) {
        return Ok(0);
    }
    // The pusher is another process: it must open the repository from files and settings
    // alone, never from secrets in this process's environment.
    ctx.settings
        .check_secrets_by_reference(&ctx.env, "wal-push --async")?;
    if spool.try_lock()?.is_some() {
        spawn_pusher(ctx, &pgdata)?;
    }
    if spool.wait_done(&name, timeout)? {
        Ok(0)
    } else {
        let last = spool.last_error();
        Err(Error::new(
            Kind::Storage,
            format!(
                "{name} was not stored within {} s; PostgreSQL will retry it{}",
                timeout.as_secs(),
                last.map(|l| format!(". The pusher's last error: {l}"))
                    .unwrap_or_default()
            ),
        )
        .hint(format!(
            "`custos pg check` reports the archiver and the pusher; the pusher's errors go to {}",
            spool.dir.join(".last-error").display()
        )))
    }
}

/// The secondaries wal-push writes to as well, opened.
fn wal_secondaries(ctx: &Ctx) -> Result<Vec<(String, custos_storage::DynStorage)>> {
    ctx.settings
        .wal_secondaries
        .iter()
        .map(|n| Ok((n.clone(), ctx.secondary_raw(n)?)))
        .collect()
}

/// Niceness of the background WAL pusher.
pub(crate) const PUSHER_NICE: libc::c_int = 10;

/// Starts `custos wal-push --drain` detached (own session, no inherited output), so that
/// PostgreSQL's archiver does not wait for it.
pub(crate) fn spawn_pusher(ctx: &Ctx, pgdata: &std::path::Path) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()
        .map_err(|e| Error::internal(format!("cannot find the custos binary: {e}")))?;
    let mut c = std::process::Command::new(exe);
    c.args(ctx.settings.global_args());
    for s in &ctx.settings.wal_secondaries {
        c.arg("--secondary").arg(s);
    }
    c.arg("wal-push")
        .arg("--drain")
        .arg("--pgdata")
        .arg(std::path::absolute(pgdata).unwrap_or_else(|_| pgdata.to_path_buf()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: setsid and setpriority are async-signal-safe and have no preconditions.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            // Below PostgreSQL and its archiver: the archiver's own work between two
            // files (marking one done, starting the next archive_command) then waits for
            // no compression thread, and a busy database keeps its CPU. The pusher still
            // takes every idle cycle.
            libc::setpriority(libc::PRIO_PROCESS, 0, PUSHER_NICE);
            Ok(())
        });
    }
    c.spawn()
        .map_err(|e| Error::internal(format!("cannot start the WAL pusher: {e}")))?;
    Ok(())
}

/// `custos pg check`: exit 20 when something is wrong.
pub(crate) fn check(
    ctx: &Ctx,
    db_url: Option<String>,
    max_lag: String,
    max_backup_age: Option<String>,
) -> Result<i32> {
    let max_lag = humantime::parse_duration(&max_lag)
        .map_err(|e| Error::config(format!("--max-lag `{max_lag}`: {e}")))?;
    let max_backup_age = max_backup_age
        .map(|a| {
            humantime::parse_duration(&a)
                .map_err(|e| Error::config(format!("--max-backup-age `{a}`: {e}")))
        })
        .transpose()?;
    // A repository that does not open is one of the problems the check reports,
    // beside the archiver's own state.
    let repo = ctx.open();
    let location = ctx.settings.location_key();
    let spool = ctx
        .settings
        .cache_dir
        .as_deref()
        .map(|c| (c, location.as_str()));
    let r = custos_ops::postgres::check::check(
        repo.as_ref(),
        &ctx.settings.db(db_url),
        max_lag,
        max_backup_age,
        spool,
    )?;
    if ctx.out.json {
        ctx.out.json(&r);
    } else {
        let a = &r.archiver;
        println!(
            "cluster {} (PostgreSQL {}), archive_mode {}",
            a.system_id, a.server_version_num, a.archive_mode
        );
        println!(
            "archiver: {} archived, last {} at {}; {} failed",
            a.archived_count,
            a.last_archived_wal.as_deref().unwrap_or("none"),
            a.last_archived_time
                .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                .unwrap_or_else(|| "-".into()),
            a.failed_count
        );
        println!(
            "writing {}; {} segment(s) waiting, lag {} s (limit {} s)",
            a.current_wal, r.pending_segments, r.lag_seconds, r.max_lag_seconds
        );
        println!(
            "repository: {} segment(s), {} .. {}",
            r.archived_in_repository,
            r.oldest_archived.as_deref().unwrap_or("-"),
            r.newest_archived.as_deref().unwrap_or("-")
        );
        if r.spool_waiting > 0 {
            println!(
                "async spool: {} file(s) waiting, oldest {} s",
                r.spool_waiting, r.spool_oldest_seconds
            );
        }
        for p in &r.problems {
            println!("problem: {p}");
        }
        if r.ok {
            println!("WAL archiving is healthy");
        }
    }
    if r.ok {
        Ok(0)
    } else {
        if !ctx.out.json {
            output::error(
                &Error::new(
                    Kind::Check,
                    format!("{} problem(s) with WAL archiving", r.problems.len()),
                ),
                false,
            );
        }
        Ok(Kind::Check.exit_code())
    }
}

/// `custos wal-push`: archive_command.
pub(crate) fn wal_push(
    ctx: &Ctx,
    path: Option<PathBuf>,
    pgdata: Option<PathBuf>,
    is_async: bool,
    async_timeout: String,
    drain: bool,
) -> Result<i32> {
    let pgdata = ctx.settings.pgdata(pgdata);
    if drain || is_async {
        let timeout = humantime::parse_duration(&async_timeout)
            .map_err(|e| Error::config(format!("--async-timeout `{async_timeout}`: {e}")))?;
        return wal_push_async(ctx, path.as_deref(), &pgdata, timeout, drain);
    }
    let path = path.expect("required by clap");
    let repo = ctx.open()?;
    let also = wal_secondaries(ctx)?;
    let (name, outcome) =
        custos_ops::postgres::wal::push(&repo, &path, &pgdata, &also, ctx.host_anchor().as_ref())?;
    if ctx.out.json {
        ctx.out.json(&serde_json::json!({"file": name, "stored": outcome == custos_repo::wal::PushOutcome::Stored}));
    }
    Ok(0)
}

/// `custos wal-fetch`: restore_command.
pub(crate) fn wal_fetch(
    ctx: &Ctx,
    name: String,
    dest: PathBuf,
    pgdata: Option<PathBuf>,
) -> Result<i32> {
    let repo = ctx.open()?;
    let pgdata = ctx.settings.pgdata(pgdata);
    // PostgreSQL asks for files that do not exist at the end of recovery: answer
    // quickly and quietly.
    let found = custos_ops::postgres::wal::fetch(&repo, &name, &dest, &pgdata)?;
    ctx.touch(serde_json::json!({"file": name, "found": found}));
    if found {
        Ok(0)
    } else {
        Ok(Kind::NotFound.exit_code())
    }
}
