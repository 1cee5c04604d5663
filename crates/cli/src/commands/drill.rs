//! `custos drill db` (a restore into a scratch cluster, proven and timed, recorded in the
//! trail) and `custos drill list`.

use clap::Subcommand;
use custos_model::{Error, Kind, Result};
use custos_ops::drill;

use crate::context::Ctx;

#[derive(Subcommand)]
pub(crate) enum DrillCommand {
    /// Restore a database backup into a scratch cluster custos starts on a free port and
    /// removes after: recovery to the target, pg_amcheck, the smoke checks of [drill];
    /// RTO per phase and RPO; recorded in the trail. Exit 20 when a check fails
    #[command(
        after_help = "Example:\n  custos drill db --target-time '2026-12-04 02:00:00+00'\n  custos drill db --json | jq '.rto_seconds, .rpo_seconds'"
    )]
    Db {
        /// Restore this snapshot instead of the one the target picks
        #[arg(long)]
        snapshot: Option<String>,
        /// Recover to this time (with its zone) instead of the end of the archive
        #[arg(long, value_name = "TIME")]
        target_time: Option<String>,
        /// The cluster, when the repository holds several
        #[arg(long)]
        cluster: Option<String>,
        /// Where to make the scratch folder (default [drill] scratch, else the temp folder)
        #[arg(long, value_name = "DIR")]
        scratch: Option<std::path::PathBuf>,
        /// The PostgreSQL server binaries (default [drill] bin, [postgres] bin, else found
        /// by the backup's major version)
        #[arg(long, value_name = "DIR")]
        pg_bin: Option<std::path::PathBuf>,
    },
    /// Restore a files snapshot into a scratch folder custos removes after: every chunk
    /// checked against its id, what landed on disk counted; RTO and RPO; recorded
    #[command(after_help = "Example:\n  custos drill files --source /srv/documents")]
    Files {
        /// This snapshot (default: the newest files snapshot, of --source when given)
        #[arg(long)]
        snapshot: Option<String>,
        /// The newest snapshot of this source (a backed-up path)
        #[arg(long)]
        source: Option<String>,
        /// Where to make the scratch folder (default [drill] scratch, else the temp folder)
        #[arg(long, value_name = "DIR")]
        scratch: Option<std::path::PathBuf>,
    },
    /// Restore the vector store's table export into a scratch database (created and
    /// dropped on the server of [postgres] or --db-url) and prove it: rows, digest, exact
    /// neighbours, recall
    #[command(
        after_help = "Example:\n  custos drill vector --db-url 'host=/run/postgresql dbname=postgres'"
    )]
    Vector {
        /// This table snapshot (default: the newest)
        #[arg(long)]
        snapshot: Option<String>,
        /// The server the scratch database is made on (default [postgres] and libpq)
        #[arg(long, value_name = "URL")]
        db_url: Option<String>,
    },
    /// Read every audit-log export back and follow its chain from the first to the last
    #[command(name = "audit-log", after_help = "Example:\n  custos drill audit-log")]
    AuditLog,
    /// Every drill that has something to restore: db, vector, files (newest of each
    /// source), audit-log; one record
    #[command(after_help = "Example:\n  custos drill full --json")]
    Full {
        /// The server the vector drill's scratch database is made on
        #[arg(long, value_name = "URL")]
        db_url: Option<String>,
        /// Where to make scratch folders (default [drill] scratch, else the temp folder)
        #[arg(long, value_name = "DIR")]
        scratch: Option<std::path::PathBuf>,
    },
    /// The drills the trail records, newest last: what, which backup, result, RTO, RPO
    #[command(after_help = "Example:\n  custos drill list --json")]
    List,
}

pub(crate) fn cmd_drill(ctx: &Ctx, c: DrillCommand) -> Result<i32> {
    match c {
        DrillCommand::Db {
            snapshot,
            target_time,
            cluster,
            scratch,
            pg_bin,
        } => db(ctx, snapshot, target_time, cluster, scratch, pg_bin),
        DrillCommand::Files {
            snapshot,
            source,
            scratch,
        } => {
            let repo = ctx.open_to_restore()?;
            let snap = latest_files(&repo, snapshot.as_deref(), source.as_deref())?;
            ctx.cold_gate(&repo, &snap)?;
            let progress = ctx.out.progress();
            let r = drill::files(&repo, &snap, &scratch_of(ctx, scratch), progress.as_ref())?;
            finish(ctx, "files", vec![r])
        }
        DrillCommand::Vector { snapshot, db_url } => {
            let repo = ctx.open_to_restore()?;
            let snap = repo.find_snapshot(snapshot.as_deref().unwrap_or("latest"), |s| {
                s.kind == custos_repo::snapshot::SourceKind::Table
            })?;
            let r = drill::vector(&repo, &snap, &ctx.settings.db(db_url))?;
            finish(ctx, "vector", vec![r])
        }
        DrillCommand::AuditLog => {
            let repo = ctx.open_to_restore()?;
            let min = ctx.settings.audit_log_min_retention()?;
            let r = drill::audit_log(&repo, min.audit_log_default)?;
            finish(ctx, "audit-log", vec![r])
        }
        DrillCommand::Full { db_url, scratch } => full(ctx, db_url, scratch),
        DrillCommand::List => list(ctx),
    }
}

fn scratch_of(ctx: &Ctx, flag: Option<std::path::PathBuf>) -> std::path::PathBuf {
    flag.or_else(|| ctx.settings.file.drill.scratch.clone())
        .unwrap_or_else(std::env::temp_dir)
}

fn latest_files(
    repo: &custos_repo::Repository,
    spec: Option<&str>,
    source: Option<&str>,
) -> Result<custos_repo::Snapshot> {
    repo.find_snapshot(spec.unwrap_or("latest"), |s| {
        s.kind == custos_repo::snapshot::SourceKind::Files && source.is_none_or(|x| s.source == x)
    })
}

/// Every drill with something to restore, one after the other; a failed one does not stop
/// the rest.
fn full(ctx: &Ctx, db_url: Option<String>, scratch: Option<std::path::PathBuf>) -> Result<i32> {
    use custos_repo::snapshot::SourceKind;
    let repo = ctx.open_to_restore()?;
    let snaps = repo.snapshots_for_reading()?;
    let mut reports = vec![];
    let failed = |kind: &str, e: Error| drill::DrillReport::failed(kind, e.message);
    if snaps.iter().any(|s| s.summary.pg.is_some()) {
        let progress = ctx.out.progress();
        reports.push(
            db_drill(
                ctx,
                &repo,
                None,
                None,
                None,
                scratch.clone(),
                None,
                progress.as_ref(),
            )
            .unwrap_or_else(|e| failed("db", e)),
        );
    }
    if snaps.iter().any(|s| s.summary.kind == SourceKind::Table) {
        let r = repo
            .find_snapshot("latest", |s| s.kind == SourceKind::Table)
            .and_then(|snap| drill::vector(&repo, &snap, &ctx.settings.db(db_url.clone())));
        reports.push(r.unwrap_or_else(|e| failed("vector", e)));
    }
    let mut sources: Vec<&str> = snaps
        .iter()
        .filter(|s| s.summary.kind == SourceKind::Files)
        .map(|s| s.summary.source.as_str())
        .collect();
    sources.sort();
    sources.dedup();
    for src in sources {
        let progress = ctx.out.progress();
        let r = latest_files(&repo, None, Some(src)).and_then(|snap| {
            drill::files(
                &repo,
                &snap,
                &scratch_of(ctx, scratch.clone()),
                progress.as_ref(),
            )
        });
        reports.push(r.unwrap_or_else(|e| failed("files", e)));
    }
    if snaps.iter().any(|s| s.summary.kind == SourceKind::AuditLog) {
        let min = ctx.settings.audit_log_min_retention()?;
        reports.push(
            drill::audit_log(&repo, min.audit_log_default)
                .unwrap_or_else(|e| failed("audit-log", e)),
        );
    }
    if reports.is_empty() {
        return Err(Error::new(
            Kind::NotFound,
            "nothing to drill: the repository holds no backup",
        )
        .hint("back something up first"));
    }
    finish(ctx, "full", reports)
}

/// Prints and records drills (one record for the command), and fails (exit 20) when one
/// did not pass.
fn finish(ctx: &Ctx, kind: &str, reports: Vec<drill::DrillReport>) -> Result<i32> {
    let ok = reports.iter().all(|r| r.ok);
    let verified: Vec<&str> = reports
        .iter()
        .filter(|r| r.ok && !r.snapshot.is_empty())
        .map(|r| r.snapshot.as_str())
        .collect();
    let mut touched = if reports.len() == 1 {
        serde_json::to_value(&reports[0]).unwrap_or_default()
    } else {
        serde_json::json!({"kind": kind, "ok": ok, "parts": reports,
            "rto_seconds": reports.iter().map(|r| r.rto_seconds).sum::<f64>(),
            "rpo_seconds": reports.iter().filter_map(|r| r.rpo_seconds).fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x))))})
    };
    if !verified.is_empty() {
        // A passed drill proves its snapshot restorable: the retention interlock keeps it.
        touched["verified"] = serde_json::json!(verified);
    }
    ctx.touch(touched.clone());
    if ctx.out.json {
        ctx.out.json(&touched);
    } else {
        for r in &reports {
            print_one(r);
        }
    }
    match reports.iter().find_map(|r| r.failure.as_ref().map(|f| (r.kind.clone(), f))) {
        None => Ok(0),
        Some((k, f)) => Err(Error::new(Kind::Check, format!("the {k} drill failed: {f}"))
            .hint("the restored copy did not prove itself: look at the failing check; `custos verify --read-data` checks the stored data")),
    }
}

fn print_one(r: &drill::DrillReport) {
    println!(
        "drill {}: {}{}",
        r.kind,
        if r.snapshot.is_empty() {
            String::new()
        } else {
            format!("snapshot {} ", &r.snapshot[..r.snapshot.len().min(8)])
        },
        if r.ok { "passed" } else { "FAILED" }
    );
    for p in &r.phases {
        println!("  {:<26} {:>8.1} s", p.name, p.seconds);
    }
    println!("  RTO: {:.1} s", r.rto_seconds);
    if let (Some(t), Some(s)) = (r.recovered_to, r.rpo_seconds) {
        println!(
            "  RPO: recovered to {} ({:.0} s before the drill)",
            t.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
            s
        );
    }
    for c in &r.checks {
        println!(
            "  {} {}: {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    if let (Some(f), true) = (&r.failure, r.checks.iter().all(|c| c.ok)) {
        println!("  FAIL {f}");
    }
}

fn db(
    ctx: &Ctx,
    snapshot: Option<String>,
    target_time: Option<String>,
    cluster: Option<String>,
    scratch: Option<std::path::PathBuf>,
    pg_bin: Option<std::path::PathBuf>,
) -> Result<i32> {
    let repo = ctx.open_to_restore()?;
    let progress = ctx.out.progress();
    let r = db_drill(
        ctx,
        &repo,
        snapshot,
        target_time,
        cluster,
        scratch,
        pg_bin,
        progress.as_ref(),
    )?;
    finish(ctx, "db", vec![r])
}

#[allow(clippy::too_many_arguments)]
fn db_drill(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    snapshot: Option<String>,
    target_time: Option<String>,
    cluster: Option<String>,
    scratch: Option<std::path::PathBuf>,
    pg_bin: Option<std::path::PathBuf>,
    progress: &dyn custos_ops::progress::Progress,
) -> Result<drill::DrillReport> {
    repo.require_restore("drill")?;
    let target = match &target_time {
        Some(t) => custos_ops::postgres::restore::Target::Time(
            crate::commands::restore::parse_target_time(t)?,
        ),
        None => custos_ops::postgres::restore::Target::Latest,
    };
    let o = db_options(ctx, target, snapshot, cluster, scratch, pg_bin, progress)?;
    drill::db(repo, &o)
}

/// A scratch cluster's settings from [drill], the flags and the environment.
pub(crate) fn db_options<'a>(
    ctx: &Ctx,
    target: custos_ops::postgres::restore::Target,
    snapshot: Option<String>,
    cluster: Option<String>,
    scratch: Option<std::path::PathBuf>,
    pg_bin: Option<std::path::PathBuf>,
    progress: &'a dyn custos_ops::progress::Progress,
) -> Result<drill::DbDrillOptions<'a>> {
    let d = &ctx.settings.file.drill;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    Ok(drill::DbDrillOptions {
        target,
        snapshot,
        cluster,
        scratch_parent: scratch_of(ctx, scratch),
        bin: pg_bin
            .or_else(|| d.bin.clone())
            .or_else(|| ctx.settings.file.postgres.bin.clone()),
        os_user: root.then(|| d.os_user.clone().unwrap_or_else(|| "postgres".into())),
        db_user: d.db_user.clone().unwrap_or_else(|| "postgres".into()),
        restore_command: ctx.settings.restore_command(&ctx.env)?,
        command_needs: ctx.settings.restore_command_files(&ctx.env),
        checks: d
            .checks
            .iter()
            .map(|c| drill::SmokeCheck {
                name: c.name.clone(),
                sql: c.sql.clone(),
                expect: c.expect.clone(),
            })
            .collect(),
        recovery_timeout: match &d.recovery_timeout {
            Some(t) => humantime::parse_duration(t)
                .map_err(|e| Error::config(format!("[drill] recovery_timeout = \"{t}\": {e}")))?,
            None => std::time::Duration::from_secs(3600),
        },
        progress,
    })
}

fn list(ctx: &Ctx) -> Result<i32> {
    let repo = ctx.open()?;
    let read = repo.trail_verify()?;
    let drills: Vec<&custos_repo::trail::Entry> = read
        .iter()
        .filter_map(|r| r.entry.as_ref())
        .filter(|e| e.command.starts_with("drill ") && e.command != "drill list")
        .collect();
    if ctx.out.json {
        let v: Vec<serde_json::Value> = drills
            .iter()
            .map(|e| {
                serde_json::json!({"time": e.time, "command": e.command, "result": e.result,
                    "host": e.host, "key": e.key, "drill": e.touched})
            })
            .collect();
        ctx.out.json(&v);
        return Ok(0);
    }
    if drills.is_empty() {
        println!("no drill recorded: run `custos drill db`");
    }
    for e in drills {
        let t = &e.touched;
        println!(
            "{}  {:<9} snapshot {:<8} {:<6} RTO {:>7} RPO {:>7}  on {}",
            e.time.format("%Y-%m-%d %H:%M"),
            e.command,
            t["snapshot"].as_str().map_or("-", |s| &s[..s.len().min(8)]),
            if t["ok"] == true { "passed" } else { "FAILED" },
            t["rto_seconds"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.1} s")),
            t["rpo_seconds"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.0} s")),
            custos_model::path::escape(&e.host)
        );
    }
    Ok(0)
}
