//! `custos copy`: bring the secondaries of custos.toml up to date, or (`--check`) say how
//! far behind each is.

use clap::Args;
use custos_model::{ByteSize, Error, Kind, Result};
use custos_ops::maintenance::copy::Copier;

use crate::context::Ctx;

#[derive(Args)]
pub(crate) struct CopyArgs {
    /// Only this secondary ([[secondary]] name); default: every one
    #[arg(long, value_name = "NAME")]
    pub(crate) to: Option<String>,
    /// Copy nothing: list what each secondary lacks and how old it is; exit 20 when a
    /// secondary lacks something older than its max_lag
    #[arg(long)]
    pub(crate) check: bool,
    /// With --check: the limit, instead of [[secondary]] max_lag (default 15m)
    #[arg(long, value_name = "DURATION", requires = "check")]
    pub(crate) max_lag: Option<String>,
    /// Objects copied at once (default 8)
    #[arg(long, value_name = "N")]
    pub(crate) threads: Option<usize>,
}

fn names(ctx: &Ctx, to: Option<&str>) -> Result<Vec<String>> {
    match to {
        Some(n) => Ok(vec![ctx.settings.secondary_section(n)?.name.clone()]),
        None if ctx.settings.file.secondaries.is_empty() => Err(Error::config(
            "custos.toml names no secondary",
        )
        .hint("add a [[secondary]] section with name and url (another bucket, region, provider or path)")),
        None => Ok(ctx
            .settings
            .file
            .secondaries
            .iter()
            .map(|s| s.name.clone())
            .collect()),
    }
}

pub(crate) fn cmd_copy(ctx: &Ctx, a: &CopyArgs) -> Result<i32> {
    if ctx.settings.secondary.is_some() {
        return Err(
            Error::config("copy writes to secondaries: it runs against the primary")
                .hint("drop --secondary; name the target with `copy --to NAME`"),
        );
    }
    let targets = names(ctx, a.to.as_deref())?;
    if a.check {
        return check(ctx, a, &targets);
    }
    // Each secondary is claimed (its marker checked or written: no key needed) while the
    // key is derived.
    let primary = ctx.primary_storage()?;
    let secondaries = targets
        .iter()
        .map(|n| Ok((n.clone(), ctx.secondary_for_copy(n)?)))
        .collect::<Result<Vec<_>>>()?;
    let (repo, claimed) = std::thread::scope(|s| {
        let claims = s.spawn(|| {
            // Never claimed for a location that holds no repository (a mistyped url):
            // open reports that.
            if primary.size("config")?.is_none() {
                return Ok(());
            }
            secondaries.iter().try_for_each(|(n, st)| {
                custos_ops::maintenance::copy::claim(st, n, &primary.location())
                    .map_err(|e| e.context(format!("secondary `{n}`")))
            })
        });
        (ctx.open(), claims.join().expect("claim thread"))
    });
    let repo = repo?;
    claimed?;
    let progress = ctx.out.progress();
    let threads = a.threads.unwrap_or(8).max(1);
    let mut reports = vec![];
    let mut damaged = 0;
    for (name, secondary) in secondaries {
        let copier = Copier {
            primary: &repo,
            secondary,
            name: name.clone(),
            threads,
            progress: progress.as_ref(),
        };
        let r = copier
            .copy()
            .map_err(|e| e.context(format!("secondary `{name}`")))?;
        damaged += r.damaged.len();
        if !ctx.out.json {
            let n: u64 = r.copied.values().map(|c| c.objects).sum();
            let b: u64 = r.copied.values().map(|c| c.bytes).sum();
            println!(
                "secondary {name} ({}): copied {n} object(s), {} in {:.1} s; {} already there; in sync as of {}",
                r.location,
                ByteSize(b),
                r.seconds,
                r.present,
                r.in_sync_as_of.format("%Y-%m-%d %H:%M:%S UTC")
            );
            for (kind, c) in &r.copied {
                println!("  {kind}: {} object(s), {}", c.objects, ByteSize(c.bytes));
            }
            if r.removed_here > 0 {
                println!(
                    "  {} object(s) not copied: the secondary's own forget or prune removed them",
                    r.removed_here
                );
            }
            if r.tombstones_dropped > 0 {
                println!(
                    "  {} tombstoned name(s) dropped: the primary no longer holds them either",
                    r.tombstones_dropped
                );
            }
            if !r.keys_revoked.is_empty() {
                println!(
                    "  removed {} key file(s) the primary no longer has",
                    r.keys_revoked.len()
                );
            }
            for d in &r.damaged {
                eprintln!("custos: {d} on the primary does not match its name: not copied");
            }
        }
        reports.push(r);
    }
    ctx.touch(
        serde_json::json!({"secondaries": reports.iter().map(|r| serde_json::json!({
        "name": r.secondary,
        "objects": r.copied.values().map(|c| c.objects).sum::<u64>(),
        "bytes": r.copied.values().map(|c| c.bytes).sum::<u64>(),
        "in_sync_as_of": r.in_sync_as_of,
        "damaged": r.damaged,
    })).collect::<Vec<_>>()}),
    );
    if ctx.out.json {
        ctx.out.json(&serde_json::json!({"secondaries": reports}));
    }
    if damaged > 0 {
        return Err(Error::new(
            Kind::Partial,
            format!("{damaged} object(s) of the primary do not match their names and were not copied"),
        )
        .hint("run `custos verify --read-data` on the primary; the secondary holds every intact object"));
    }
    Ok(0)
}

/// `copy --check`: parity of each secondary, nothing copied.
fn check(ctx: &Ctx, a: &CopyArgs, targets: &[String]) -> Result<i32> {
    let repo = ctx.open()?;
    let progress = ctx.out.progress();
    let threads = a.threads.unwrap_or(8).max(1);
    let mut reports = vec![];
    let mut behind = vec![];
    for name in targets {
        let sec = ctx.settings.secondary_section(name)?;
        let limit = match &a.max_lag {
            Some(t) => humantime::parse_duration(t)
                .map_err(|e| Error::config(format!("--max-lag `{t}`: {e}")))?,
            None => ctx.settings.secondary_max_lag(sec)?,
        };
        let copier = Copier {
            primary: &repo,
            secondary: ctx.secondary_raw(name)?,
            name: name.clone(),
            threads,
            progress: progress.as_ref(),
        };
        let r = copier.check()?;
        let over = match r.lag_seconds {
            Some(l) => l > limit.as_secs_f64(),
            None => true,
        };
        if over || !r.initialised {
            behind.push(name.clone());
        }
        if !ctx.out.json {
            let lag = r
                .lag_seconds
                .map(|l| format!("{l:.0} s"))
                .unwrap_or_else(|| "unknown (the store gives no times)".into());
            let verdict = if !r.initialised {
                "NOT A COPY YET (run custos copy)"
            } else if over {
                "BEHIND"
            } else {
                "ok"
            };
            println!(
                "secondary {name} ({}): {verdict}; lag {lag} (limit {} s)",
                r.location,
                limit.as_secs()
            );
            for (kind, m) in &r.missing {
                println!(
                    "  lacks {} {kind} object(s), {}, the oldest {}",
                    m.objects,
                    ByteSize(m.bytes),
                    m.oldest_seconds
                        .map(|s| format!("{s:.0} s old"))
                        .unwrap_or_else(|| "of unknown age".into())
                );
            }
            if !r.keys_to_revoke.is_empty() {
                println!(
                    "  still holds {} key file(s) the primary removed (the next copy removes them)",
                    r.keys_to_revoke.len()
                );
            }
        }
        reports.push(
            serde_json::json!({"report": r, "max_lag_seconds": limit.as_secs(), "behind": over}),
        );
    }
    if ctx.out.json {
        ctx.out.json(&serde_json::json!({"secondaries": reports}));
    }
    // Read only: nothing for the trail.
    ctx.trail.borrow_mut().take();
    Ok(if behind.is_empty() {
        0
    } else {
        Kind::Check.exit_code()
    })
}
