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
        DrillCommand::List => list(ctx),
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
    let d = &ctx.settings.file.drill;
    let repo = ctx.open_to_restore()?;
    repo.require_restore("drill")?;
    let target = match &target_time {
        Some(t) => custos_ops::postgres::restore::Target::Time(
            crate::commands::restore::parse_target_time(t)?,
        ),
        None => custos_ops::postgres::restore::Target::Latest,
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let progress = ctx.out.progress();
    let r = drill::db(
        &repo,
        &drill::DbDrillOptions {
            target,
            snapshot,
            cluster,
            scratch_parent: scratch
                .or_else(|| d.scratch.clone())
                .unwrap_or_else(std::env::temp_dir),
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
                Some(t) => humantime::parse_duration(t).map_err(|e| {
                    Error::config(format!("[drill] recovery_timeout = \"{t}\": {e}"))
                })?,
                None => std::time::Duration::from_secs(3600),
            },
            progress: progress.as_ref(),
        },
    )?;
    let mut touched = serde_json::to_value(&r).unwrap_or_default();
    if r.ok {
        // A passed drill proves the snapshot restorable: the retention interlock keeps it.
        touched["verified"] = serde_json::json!([r.snapshot]);
    }
    ctx.touch(touched);
    if ctx.out.json {
        ctx.out.json(&r);
    } else {
        println!(
            "drill db: snapshot {} restored into a scratch cluster: {}",
            &r.snapshot[..r.snapshot.len().min(8)],
            if r.ok { "passed" } else { "FAILED" }
        );
        for p in &r.phases {
            println!("  {:<20} {:>8.1} s", p.name, p.seconds);
        }
        println!("  RTO (until it answered queries): {:.1} s", r.rto_seconds);
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
    }
    match &r.failure {
        None => Ok(0),
        Some(f) => Err(Error::new(Kind::Check, format!("the drill failed: {f}"))
            .hint("the restored copy did not prove itself: look at the failing check; `custos verify --read-data` checks the stored data")),
    }
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
