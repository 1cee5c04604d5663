//! `custos audit log` and `custos audit verify`: the operation trail.

use clap::Subcommand;
use custos_model::path::escape as esc;
use custos_model::{Error, Result};

use crate::commands::restore::parse_target_time;
use crate::context::Ctx;
use crate::output;

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// List the trail's entries (any key; audit keys exist for this)
    #[command(after_help = "Example:\n  custos audit log --since 30d")]
    Log {
        /// Only entries at or after this time (RFC 3339) or within this duration (like 7d)
        #[arg(long)]
        since: Option<String>,
    },
    /// Prove the trail complete and untampered; names the first bad entry (exit 14)
    #[command(after_help = "Example:\n  custos audit verify --json")]
    Verify,
}

pub(crate) fn cmd_audit(ctx: &Ctx, a: AuditCommand) -> Result<i32> {
    let repo = ctx.open()?;
    let read = repo.trail_verify()?;
    match a {
        AuditCommand::Log { since } => {
            let since = match since.as_deref() {
                None => None,
                Some(t) => Some(match humantime::parse_duration(t) {
                    Ok(d) => {
                        chrono::Utc::now()
                            - chrono::Duration::from_std(d)
                                .map_err(|e| Error::config(format!("--since `{t}`: {e}")))?
                    }
                    Err(_) => parse_target_time(t).map_err(|_| {
                        Error::config(format!(
                            "--since `{t}` is neither a time (2026-01-31T02:00:00Z) nor a duration (7d)"
                        ))
                    })?,
                }),
            };
            let shown: Vec<&custos_repo::trail::Read> = read
                .iter()
                .filter(|r| since.is_none_or(|s| r.entry.as_ref().is_none_or(|e| e.time >= s)))
                .collect();
            if ctx.out.json {
                ctx.out.json(&shown);
            } else {
                for r in &shown {
                    match &r.entry {
                        Some(e) => println!(
                            "{:>6} {} {:<8} {} {}@{} {:<18} {}{}",
                            r.seq,
                            e.time.format("%Y-%m-%d %H:%M:%S"),
                            esc(&e.role),
                            e.key.short(),
                            esc(&e.user),
                            esc(&e.host),
                            esc(&e.command),
                            esc(&e.result),
                            if e.touched.is_null() {
                                String::new()
                            } else {
                                format!(" {}", e.touched)
                            }
                        ),
                        None => println!("{:>6} <unreadable>", r.seq),
                    }
                    for p in &r.problems {
                        println!("       PROBLEM: {p}");
                    }
                }
            }
            Ok(0)
        }
        AuditCommand::Verify => {
            let bad: Vec<&custos_repo::trail::Read> =
                read.iter().filter(|r| !r.problems.is_empty()).collect();
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({
                    "entries": read.len(),
                    "ok": bad.is_empty(),
                    "first_bad": bad.first().map(|r| r.seq),
                    "problems": bad.iter().map(|r| serde_json::json!({"seq": r.seq, "problems": r.problems})).collect::<Vec<_>>(),
                }));
            } else {
                for r in &bad {
                    for p in &r.problems {
                        println!("entry {}: {p}", r.seq);
                    }
                }
            }
            ctx.touch(serde_json::json!({"entries": read.len(), "bad": bad.len()}));
            match bad.first() {
                None => {
                    if !ctx.out.json {
                        println!(
                            "the operation trail is complete and untampered: {} entries, each chained to the one before and signed by a known key",
                            read.len()
                        );
                    }
                    Ok(0)
                }
                Some(first) => {
                    let e = Error::integrity(format!(
                        "the operation trail is damaged: the first bad entry is {} ({})",
                        first.seq,
                        first.problems.join("; ")
                    ))
                    .hint("keep the repository as it is for investigation; compare with a replica's trail");
                    if !ctx.out.json {
                        output::error(&e, false);
                    }
                    Ok(e.kind.exit_code())
                }
            }
        }
    }
}
