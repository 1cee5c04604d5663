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
    #[command(
        after_help = "Example:\n  custos audit verify --expect-head 48211:9f3c0a...e1 --json"
    )]
    Verify {
        /// A head witnessed earlier (`custos audit head` printed it, SEQ:HASH): the trail
        /// must still hold that entry with those bytes
        #[arg(long, value_name = "SEQ:HASH")]
        expect_head: Vec<String>,
    },
    /// Print the trail's head (SEQ:HASH) for a witness outside the repository: a ticket,
    /// the daily report, another system; `audit verify --expect-head` checks it later
    #[command(after_help = "Example:\n  custos audit head --json")]
    Head {
        /// This host goes on from the trail as it is now, though it no longer holds the
        /// entry this host last wrote (a repository restored from an older copy on
        /// purpose); recorded in the trail
        #[arg(long)]
        accept: bool,
    },
}

pub(crate) fn cmd_audit(ctx: &Ctx, a: AuditCommand) -> Result<i32> {
    let repo = ctx.open()?;
    match a {
        AuditCommand::Head { accept } => {
            let trail = ctx.trail.borrow();
            let (was, head) = match (accept, trail.as_ref()) {
                (true, Some((w, _, _))) => w.accept_head()?,
                (true, None) => {
                    return Err(Error::config(
                        "this repository's operations are not recorded here: nothing to accept",
                    ))
                }
                (false, _) => (None, custos_repo::trail::head_of(&repo.storage, None)?),
            };
            drop(trail);
            if accept {
                ctx.touch(serde_json::json!({"host_had": was, "head": head}));
            }
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({
                    "head": head.as_ref().map(|h| h.to_string()),
                    "seq": head.as_ref().map(|h| h.seq),
                    "hash": head.as_ref().map(|h| h.hash.clone()),
                    "repository": repo.storage.location(),
                }));
            } else {
                match &head {
                    Some(h) => println!("{h}"),
                    None => println!("the trail is empty"),
                }
                if accept && !ctx.out.quiet {
                    eprintln!(
                        "custos: this host goes on from entry {} (it had written up to {})",
                        head.as_ref().map_or(0, |h| h.seq),
                        was.map_or("none".to_string(), |w| w.to_string())
                    );
                }
            }
            Ok(0)
        }
        AuditCommand::Log { since } => {
            let since = match since.as_deref() {
                None => None,
                Some(t) => Some(match humantime::parse_duration(t) {
                    Ok(d) => {
                        custos_model::clock::now()
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
            // A period reads only its own entries; the whole trail is read (and proven)
            // without one.
            let read = match since {
                Some(s) => repo.trail_since(s)?,
                None => repo.trail_verify()?,
            };
            let shown: Vec<&custos_repo::trail::Read> = read.iter().collect();
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
        AuditCommand::Verify { expect_head } => {
            let expected = expect_head
                .iter()
                .map(|h| h.parse::<custos_repo::trail::Anchor>())
                .collect::<Result<Vec<_>>>()?;
            let read = repo.trail_verify()?;
            // What the trail's own chain cannot show: entries removed from its end. Every
            // snapshot's anchor, each cluster's newest WAL object's and each witnessed
            // head must still be in it. These are not faults of one entry: the entries
            // read may all be sound, the trail is only shorter (or its end rewritten).
            let mut cut =
                repo.trail_anchor_problems(&read, &repo.wal_newest_anchors()?, ctx.on_secondary())?;
            cut.extend(expected.iter().filter_map(|a| repo.trail_holds(&read, a)));
            let last = read.last().map_or(0, |r| r.seq);
            let bad: Vec<&custos_repo::trail::Read> =
                read.iter().filter(|r| !r.problems.is_empty()).collect();
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({
                    "entries": read.len(),
                    "ok": bad.is_empty() && cut.is_empty(),
                    "first_bad": bad.first().map(|r| r.seq),
                    "problems": bad.iter().map(|r| serde_json::json!({"seq": r.seq, "problems": r.problems})).collect::<Vec<_>>(),
                    "last": last,
                    "cut": cut,
                }));
            } else {
                for r in &bad {
                    for p in &r.problems {
                        println!("entry {}: {p}", r.seq);
                    }
                }
                for p in &cut {
                    println!("after entry {last}: {p}");
                }
            }
            ctx.touch(
                serde_json::json!({"entries": read.len(), "bad": bad.len(), "cut": cut.len()}),
            );
            let hint =
                "keep the repository as it is for investigation; compare with a replica's trail";
            let e = match (bad.first(), cut.is_empty()) {
                (None, true) => {
                    if !ctx.out.json {
                        println!(
                            "the operation trail is complete and untampered: {} entries, each chained to the one before and signed by a known key; it holds the head every snapshot saw{}",
                            read.len(),
                            if expected.is_empty() { "" } else { " and the witnessed head(s)" }
                        );
                    }
                    return Ok(0);
                }
                (Some(first), _) => Error::integrity(format!(
                    "the operation trail is damaged: the first bad entry is {} ({}){}",
                    first.seq,
                    first.problems.join("; "),
                    if cut.is_empty() {
                        String::new()
                    } else {
                        format!("; and after entry {last}: {}", cut.join("; "))
                    }
                )),
                (None, false) => Error::integrity(format!(
                    "the operation trail was cut short or its end rewritten: its {} entries chain and are signed, but {}",
                    read.len(),
                    cut.join("; ")
                )),
            };
            let e = e.hint(hint);
            if !ctx.out.json {
                output::error(&e, false);
            }
            Ok(e.kind.exit_code())
        }
    }
}
