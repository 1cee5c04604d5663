//! `custos verify`, `forget`, `prune` and `unlock`: keeping the repository sound.

use clap::Args;
use custos_model::path::escape as esc;
use custos_model::retention::RetentionPolicy;
use custos_model::{ByteSize, Error, Result};
use custos_ops::maintenance::{forget, prune, verify};

use crate::context::Ctx;
use crate::output;

/// The flags of `custos verify`.
#[derive(Args)]
pub(crate) struct VerifyArgs {
    /// Read every pack back: re-hash it and (restore key) decrypt and check every blob
    #[arg(long)]
    pub(crate) read_data: bool,
    /// Read only part of the data: a percentage like 10%
    #[arg(long, value_name = "PERCENT", requires = "read_data")]
    pub(crate) subset: Option<String>,
    /// Instead: restore this table snapshot into a scratch database on the server of
    /// --db-url, prove it (counts, digest, neighbours, recall), and drop the database
    #[arg(long, value_name = "SNAPSHOT", conflicts_with = "read_data")]
    pub(crate) table: Option<String>,
    /// With --table: the server to make the scratch database on
    #[arg(long, requires = "table")]
    pub(crate) db_url: Option<String>,
}

/// The flags of `custos forget`.
#[derive(Args)]
pub(crate) struct ForgetArgs {
    /// Remove these snapshots (ids or unique prefixes) instead of applying a policy.
    /// Example: `custos forget 3f2a9c01 --dry-run`
    pub(crate) snapshots: Vec<String>,
    #[command(flatten)]
    pub(crate) policy: PolicyArgs,
    /// Show what would be kept and removed, and why; change nothing
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Run prune afterwards
    #[arg(long)]
    pub(crate) prune: bool,
}

/// The flags of `custos prune`.
#[derive(Args)]
pub(crate) struct PruneArgs {
    /// Show what would be deleted and rewritten; change nothing
    #[arg(long)]
    pub(crate) dry_run: bool,
}

#[derive(Args, Clone, Default)]
pub(crate) struct PolicyArgs {
    /// Keep the N newest snapshots of each group
    #[arg(long, value_name = "N")]
    pub(crate) keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N days that have one
    #[arg(long, value_name = "N")]
    pub(crate) keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last N weeks that have one
    #[arg(long, value_name = "N")]
    pub(crate) keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the last N months that have one
    #[arg(long, value_name = "N")]
    pub(crate) keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the last N years that have one
    #[arg(long, value_name = "N")]
    pub(crate) keep_yearly: Option<u32>,
    /// Keep all snapshots within this duration of the newest (e.g. 7d)
    #[arg(long, value_name = "DURATION")]
    pub(crate) keep_within: Option<String>,
}

pub(crate) fn cmd_verify(ctx: &Ctx, read_data: bool, subset: Option<&str>) -> Result<i32> {
    let subset = match subset {
        None => 1.0,
        Some(s) => {
            let v: f64 = s.trim_end_matches('%').parse().map_err(|_| {
                Error::config(format!("--subset `{s}` is not a percentage like 10%"))
            })?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(Error::config("--subset must be between 0% and 100%"));
            }
            v / 100.0
        }
    };
    let repo = ctx.open()?;
    let progress = ctx.out.progress();
    let r = verify::verify(
        &repo,
        &verify::VerifyOptions {
            read_data,
            subset,
            progress: progress.as_ref(),
            key_max_age: ctx.settings.key_max_age()?,
            record: !ctx.on_secondary(),
            trail_may_lag: ctx.on_secondary(),
        },
    )?;
    ctx.touch(serde_json::json!({"read_data": read_data, "errors": r.errors.len(), "bytes_read": r.bytes_read, "vouched": r.vouched, "damaged": r.damaged, "verified": r.verified}));
    if ctx.out.json {
        ctx.out.json(&r);
    } else {
        println!(
            "{} snapshots, {} packs, {} archived WAL files, {} trail entries",
            r.snapshots, r.packs, r.wal_files, r.trail_entries
        );
        if read_data {
            println!(
                "read {} packs ({}), {} chunks {}",
                r.packs_read,
                ByteSize(r.bytes_read),
                r.chunks_read,
                if r.decrypted {
                    "decrypted and checked"
                } else {
                    "(pack hashes only: backup key)"
                }
            );
        }
        if r.sampled > 0 {
            println!(
                "checked {} chunks of packs no restore key had read (--read-data reads all)",
                r.sampled
            );
        }
        if r.vouched > 0 {
            println!(
                "vouched for {} pack(s): every backup key may now deduplicate against them",
                r.vouched
            );
        }
        if !r.damaged.is_empty() {
            println!(
                "recorded {} damaged cop(ies): the next backup of that data stores it again",
                r.damaged.len()
            );
        }
        for w in &r.warnings {
            println!("warning: {w}");
        }
        for f in &r.key_findings {
            eprintln!("custos: warning: {f}");
        }
        for e in &r.errors {
            println!("error: {e}");
        }
        if r.errors.is_empty() {
            println!("no problems found");
        }
    }
    match verify::integrity_error(&r) {
        Some(e) => {
            if !ctx.out.json {
                output::error(&e, false);
            }
            Ok(e.kind.exit_code())
        }
        None => Ok(0),
    }
}

pub(crate) fn policy_from(ctx: &Ctx, a: &PolicyArgs) -> Result<RetentionPolicy> {
    let any = a.keep_last.is_some()
        || a.keep_daily.is_some()
        || a.keep_weekly.is_some()
        || a.keep_monthly.is_some()
        || a.keep_yearly.is_some()
        || a.keep_within.is_some();
    if !any {
        return ctx.settings.file.retention.clone().ok_or_else(|| {
            Error::config("no retention policy given")
                .hint("pass --keep-daily N etc., or set [retention] in custos.toml")
        });
    }
    Ok(RetentionPolicy {
        keep_last: a.keep_last.unwrap_or(0),
        keep_daily: a.keep_daily.unwrap_or(0),
        keep_weekly: a.keep_weekly.unwrap_or(0),
        keep_monthly: a.keep_monthly.unwrap_or(0),
        keep_yearly: a.keep_yearly.unwrap_or(0),
        keep_within: a
            .keep_within
            .as_deref()
            .map(|s| {
                humantime::parse_duration(s)
                    .map_err(|e| Error::config(format!("--keep-within `{s}`: {e}")))
            })
            .transpose()?,
    })
}

pub(crate) fn cmd_forget(
    ctx: &Ctx,
    named: &[String],
    a: &PolicyArgs,
    dry_run: bool,
    and_prune: bool,
) -> Result<i32> {
    let flags = a.keep_last.is_some()
        || a.keep_daily.is_some()
        || a.keep_weekly.is_some()
        || a.keep_monthly.is_some()
        || a.keep_yearly.is_some()
        || a.keep_within.is_some();
    if !named.is_empty() && flags {
        return Err(Error::config(
            "name snapshots to forget, or give a retention policy, not both",
        ));
    }
    let policy = if named.is_empty() {
        Some(policy_from(ctx, a)?)
    } else {
        None
    };
    let repo = ctx.open()?;
    if !dry_run {
        repo.require_delete("forget snapshots")?;
    }
    // A named snapshot may be one that cannot be read: forgetting it is the remedy.
    let ids = named
        .iter()
        .map(|n| repo.resolve_snapshot(n))
        .collect::<Result<Vec<_>>>()?;
    let plan = forget::plan_at(
        &repo,
        match &policy {
            Some(p) => forget::Selection::Policy(p),
            None => forget::Selection::Named(&ids),
        },
        &custos_ops::maintenance::forget::MinRetention {
            verified: forget::last_verified(&repo, ctx.settings.secondary.as_deref())?,
            ..ctx.settings.audit_log_min_retention()?
        },
        chrono::Utc::now(),
    )?;
    let removed = if dry_run {
        0
    } else {
        forget::execute(&repo, &plan)?
    };
    ctx.touch(serde_json::json!({"dry_run": dry_run, "removed": plan.removed()}));
    let mut prune_out = None;
    if and_prune && !dry_run {
        let progress = ctx.out.progress();
        prune_out = Some(prune::prune(&repo, false, progress.as_ref())?);
    }
    if ctx.out.json {
        ctx.out.json(&serde_json::json!({"dry_run": dry_run, "plan": plan, "removed": removed, "prune": prune_out}));
    } else {
        let t = |d: &Option<chrono::DateTime<chrono::Utc>>| {
            d.map_or("nothing".to_string(), |d| {
                d.format("%Y-%m-%d %H:%M:%S UTC").to_string()
            })
        };
        for g in &plan.groups {
            match &g.system_id {
                Some(sys) => println!(
                    "postgres cluster {} (system id {sys}, every host):",
                    esc(&g.source)
                ),
                None => println!("{} {} on {}:", g.kind, esc(&g.source), esc(&g.host)),
            }
            for d in &g.decisions {
                println!(
                    "  {} {}  {}  {}",
                    if d.keep { "keep  " } else { "remove" },
                    d.item.short(),
                    d.time.format("%Y-%m-%d %H:%M:%S"),
                    d.reasons.join("; ")
                );
            }
            if let Some(w) = &g.window {
                if w.from_before == w.from_after {
                    println!(
                        "  recovery window unchanged: from {} to {}",
                        t(&w.from_before),
                        t(&w.until)
                    );
                } else {
                    println!(
                        "  recovery window shrinks: from {} to {} becomes from {}; prune then deletes {} WAL file(s)",
                        t(&w.from_before),
                        t(&w.until),
                        t(&w.from_after),
                        w.wal_freed
                    );
                }
            }
        }
        let n = plan.removed().len();
        if dry_run {
            println!("dry run: {n} snapshot(s) would be removed");
        } else {
            println!("removed {removed} snapshot(s); run `custos prune` to free their data");
        }
        if let Some(line) = prune_out.as_ref().and_then(|(p, _)| held_line(&p.held)) {
            println!("{line}");
        }
        if let Some((_, Some(r))) = &prune_out {
            println!(
                "prune: deleted {} packs ({})",
                r.packs_deleted,
                ByteSize(r.bytes_deleted)
            );
        }
    }
    Ok(0)
}

pub(crate) fn cmd_prune(ctx: &Ctx, dry_run: bool) -> Result<i32> {
    let repo = ctx.open()?;
    let progress = ctx.out.progress();
    let (plan, report) = prune::prune(&repo, dry_run, progress.as_ref())?;
    ctx.touch(serde_json::json!({"dry_run": dry_run, "report": report}));
    if ctx.out.json {
        ctx.out
            .json(&serde_json::json!({"dry_run": dry_run, "plan": plan, "report": report}));
    } else {
        println!(
            "{} snapshots, {} packs; chunks used {}, unused {}",
            plan.snapshots, plan.packs, plan.chunks_used, plan.chunks_unused
        );
        println!(
            "{} {} unused pack(s), rewrite {} partly used, remove {} unindexed pack(s), {} temp file(s) and {} WAL file(s) older than every kept database backup; about {} freed",
            if dry_run { "would delete" } else { "delete" },
            plan.packs_delete.len(),
            plan.packs_repack.len(),
            plan.packs_unindexed.len(),
            plan.temp_files.len(),
            plan.wal_delete.len(),
            ByteSize(plan.bytes_freed_estimate)
        );
        if let Some(line) = held_line(&plan.held) {
            println!("{line}");
        }
        if let Some(r) = report {
            println!(
                "done: deleted {} packs ({}) and {} WAL file(s), wrote {} new packs with {} chunks",
                r.packs_deleted,
                ByteSize(r.bytes_deleted),
                r.wal_deleted,
                r.packs_written,
                r.chunks_repacked
            );
        }
    }
    Ok(0)
}

/// `custos index ...`.
#[derive(clap::Subcommand)]
pub(crate) enum IndexCommand {
    /// Rewrite the index objects as few objects of at most 100,000 chunks each (objects
    /// Object Lock holds stay), so commands read a number of objects that does not grow
    /// with the number of backups ever taken. Needs a key that may delete; `prune` does
    /// the same as it goes
    #[command(after_help = "Example:\n  custos index compact")]
    Compact,
    /// Repair a damaged or missing index object: the packs no readable index object
    /// names are indexed again from their own headers, then the damaged objects are
    /// removed. Needs a key that may delete; run `verify --read-data` after it
    #[command(
        after_help = "Example:\n  CUSTOS_PASSWORD_FILE=/etc/custos/restore.pw custos index rebuild"
    )]
    Rebuild,
}

pub(crate) fn cmd_index_rebuild(ctx: &Ctx) -> Result<i32> {
    let repo = ctx.open()?;
    let progress = ctx.out.progress();
    let r = prune::rebuild_index(&repo, progress.as_ref())?;
    ctx.touch(serde_json::json!({"report": r}));
    if ctx.out.json {
        ctx.out.json(&r);
        return Ok(0);
    }
    if r.damaged.is_empty() && r.packs_recovered == 0 {
        println!("the index names every readable pack: nothing to rebuild");
    } else {
        println!(
            "index rebuilt: {} pack(s) and {} chunk(s) indexed again from their headers into {} object(s); {} damaged object(s) removed",
            r.packs_recovered,
            r.chunks_recovered,
            r.objects_written,
            r.damaged.len()
        );
        println!("run `custos verify --read-data`: it checks the data and vouches for the recovered packs, so backups deduplicate against them again");
    }
    if !r.packs_unreadable.is_empty() {
        println!(
            "{} pack(s) whose header cannot be read are left for `custos prune`: {}",
            r.packs_unreadable.len(),
            r.packs_unreadable.join(", ")
        );
    }
    Ok(0)
}

pub(crate) fn cmd_index_compact(ctx: &Ctx) -> Result<i32> {
    let repo = ctx.open()?;
    let r = prune::compact_index(&repo)?;
    ctx.touch(serde_json::json!({"report": r}));
    if ctx.out.json {
        ctx.out.json(&r);
    } else if r.objects_after == r.objects_before {
        println!(
            "the index is already compact: {} object(s) for {} pack(s)",
            r.objects_before, r.packs
        );
    } else {
        println!(
            "index: {} object(s) rewritten as {} for {} pack(s){}",
            r.objects_before,
            r.objects_after,
            r.packs,
            if r.held > 0 {
                format!(" ({} held by Object Lock left as they are)", r.held)
            } else {
                String::new()
            }
        );
    }
    Ok(0)
}

/// What Object Lock kept from prune: how many objects of each kind, until when.
fn held_line(held: &[prune::Held]) -> Option<String> {
    let first = held.iter().map(|h| h.until).min()?;
    let last = held.iter().map(|h| h.until).max()?;
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for h in held {
        *kinds
            .entry(h.path.split('/').next().unwrap_or(""))
            .or_default() += 1;
    }
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let f = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    Some(if first == last {
        format!(
            "kept until {} by Object Lock: {} object(s) ({})",
            f(first),
            held.len(),
            kinds.join(", ")
        )
    } else {
        format!(
            "kept by Object Lock: {} object(s) ({}), the first until {}, the last until {}",
            held.len(),
            kinds.join(", "),
            f(first),
            f(last)
        )
    })
}

/// `custos unlock`: stale locks go.
pub(crate) fn unlock(ctx: &Ctx) -> Result<i32> {
    let repo = ctx.open()?;
    let n = custos_repo::lock::remove_stale(&repo.storage, &repo.keys.meta_key, &repo.opts.host)?;
    if ctx.out.json {
        ctx.out.json(&serde_json::json!({ "removed_locks": n }));
    } else {
        println!("removed {n} stale lock(s)");
    }
    Ok(0)
}
