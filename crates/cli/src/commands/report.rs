//! `custos report --from D --to D --format html|json|pdf [--out FILE]` (the auditor's
//! report; its hash goes into the trail), `custos report verify FILE` (is this copy one
//! custos issued, unchanged?), and `custos report daily` (the agent's daily reports).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use custos_model::{Error, Kind, Result};

use crate::commands::agent::ReportCommand;
use crate::context::Ctx;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct ReportArgs {
    #[command(subcommand)]
    pub(crate) cmd: Option<ReportSub>,
    /// The period's first day (YYYY-MM-DD, UTC) or time (RFC 3339); default 30 days ago
    #[arg(long, value_name = "DATE")]
    pub(crate) from: Option<String>,
    /// The period's end (exclusive); default now
    #[arg(long, value_name = "DATE")]
    pub(crate) to: Option<String>,
    /// html (self-contained, inline SVG charts), json, or pdf (rendered from the HTML by
    /// headless Chromium)
    #[arg(long, default_value = "html", value_parser = ["html", "json", "pdf"])]
    pub(crate) format: String,
    /// Write here (default: standard output; pdf needs a file)
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum ReportSub {
    #[command(flatten)]
    Agent(ReportCommand),
    /// Check a report file: custos issued it from this repository and it is unchanged
    /// (its hash is in the signed trail)
    #[command(after_help = "Example:\n  custos report verify backup-report-2026-11.pdf")]
    Verify {
        /// The report file (html, json or pdf) as it was handed over
        file: PathBuf,
    },
}

fn parse_day(s: &str, what: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| {
            Error::config(format!(
                "{what} `{s}` is neither a day (2026-11-01) nor a time (2026-11-01T00:00:00Z)"
            ))
        })
}

pub(crate) fn trail_name(a: &ReportArgs) -> Option<String> {
    match &a.cmd {
        Some(ReportSub::Agent(_)) => Some("report daily".into()),
        Some(ReportSub::Verify { .. }) => None,
        None => Some("report".into()),
    }
}

pub(crate) fn cmd_report(ctx: &Ctx, a: &ReportArgs) -> Result<i32> {
    match &a.cmd {
        Some(ReportSub::Agent(c)) => return crate::commands::agent::cmd_report(ctx, c),
        Some(ReportSub::Verify { file }) => return verify(ctx, file),
        None => {}
    }
    let now = custos_model::clock::now();
    let to =
        a.to.as_deref()
            .map(|s| parse_day(s, "--to"))
            .transpose()?
            .unwrap_or(now);
    let from = a
        .from
        .as_deref()
        .map(|s| parse_day(s, "--from"))
        .transpose()?
        .unwrap_or(to - chrono::Duration::days(30));
    if from >= to {
        return Err(Error::config("--from must be before --to"));
    }
    if a.format == "pdf" && a.out.is_none() {
        return Err(Error::config("a PDF report needs --out FILE"));
    }
    let repo = ctx.open()?;
    let file = &ctx.settings.file;
    let mut scheduled = vec![];
    for (j, schedule) in file.check_jobs()? {
        // Slots due in the period, up to now.
        let end = to.min(now);
        let mut n = 0u64;
        let mut t = from - chrono::Duration::seconds(1);
        while let Some(next) = schedule.next_after(t) {
            if next >= end || n > 1_000_000 {
                break;
            }
            n += 1;
            t = next;
        }
        scheduled.push(custos_agent::audit::Scheduled {
            job: j.name.clone(),
            run: j.run.clone(),
            due: n,
        });
    }
    let r = custos_agent::audit::build(
        &repo,
        &custos_agent::audit::Inputs {
            from,
            to,
            scheduled,
            policy: file.retention.clone(),
            floors: ctx.settings.audit_log_min_retention()?,
            object_lock: file
                .object_lock
                .as_ref()
                .map(|l| format!("{} mode, every object dated from the policy", l.mode)),
            secondaries: file.secondaries.iter().map(|s| s.name.clone()).collect(),
            location: repo.storage.location(),
        },
    )?;
    let bytes: Vec<u8> = match a.format.as_str() {
        "json" => serde_json::to_vec_pretty(&r).expect("serializable"),
        "html" => custos_agent::audit::html(&r).into_bytes(),
        _ => pdf(&custos_agent::audit::html(&r))?,
    };
    let hash = blake3::hash(&bytes).to_hex().to_string();
    match &a.out {
        Some(p) => std::fs::write(p, &bytes)
            .map_err(|e| custos_model::error::io_error(Kind::Config, p, e))?,
        None => {
            use std::io::Write;
            std::io::stdout()
                .write_all(&bytes)
                .map_err(|e| Error::internal(e.to_string()))?;
        }
    }
    ctx.touch(serde_json::json!({"report": hash, "format": a.format, "from": from, "to": to}));
    if let Some(p) = &a.out {
        if !ctx.out.quiet {
            eprintln!(
                "custos: report for {} to {} written to {}; its BLAKE3 {} is in the trail (`custos report verify {}`)",
                from.format("%Y-%m-%d"),
                to.format("%Y-%m-%d"),
                p.display(),
                &hash[..16],
                p.display()
            );
        }
    }
    Ok(0)
}

/// HTML to PDF with headless Chromium.
fn pdf(html: &str) -> Result<Vec<u8>> {
    let dir = tempfile::tempdir().map_err(|e| Error::internal(e.to_string()))?;
    let page = dir.path().join("report.html");
    let out = dir.path().join("report.pdf");
    std::fs::write(&page, html).map_err(|e| Error::internal(e.to_string()))?;
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            std::process::Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .ok_or_else(|| {
            Error::config(
                "a PDF report is rendered by headless Chromium, which is not installed here",
            )
            .hint(
                "install it (Debian: apt install chromium), or write --format html and print that",
            )
        })?;
    let o = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--no-pdf-header-footer",
        ])
        .arg(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ))
        .arg(format!("--print-to-pdf={}", out.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .map_err(|e| Error::internal(format!("cannot run {chromium}: {e}")))?;
    match std::fs::read(&out) {
        Ok(b) if b.starts_with(b"%PDF") => Ok(b),
        _ => Err(Error::internal(format!(
            "{chromium} did not print the report: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
    }
}

fn verify(ctx: &Ctx, file: &std::path::Path) -> Result<i32> {
    let bytes =
        std::fs::read(file).map_err(|e| custos_model::error::io_error(Kind::Config, file, e))?;
    let hash = blake3::hash(&bytes).to_hex().to_string();
    let repo = ctx.open()?;
    let found = repo
        .trail_verify()?
        .into_iter()
        .filter_map(|r| r.entry)
        .find(|e| {
            e.command == "report" && e.result == "ok" && e.touched["report"] == hash.as_str()
        });
    match found {
        Some(e) => {
            if ctx.out.json {
                ctx.out.json(&serde_json::json!({"issued": e.time, "by_key": e.key, "role": e.role, "host": e.host, "period": [e.touched["from"], e.touched["to"]], "format": e.touched["format"], "blake3": hash}));
            } else {
                println!(
                    "{}: issued by custos at {} (key {}, {} on {}) for {} to {}; unchanged since (BLAKE3 {})",
                    file.display(),
                    e.time.format("%Y-%m-%d %H:%M:%S UTC"),
                    e.key.short(),
                    e.role,
                    custos_model::path::escape(&e.host),
                    e.touched["from"].as_str().unwrap_or("?"),
                    e.touched["to"].as_str().unwrap_or("?"),
                    &hash[..16]
                );
            }
            Ok(0)
        }
        None => Err(Error::integrity(format!(
            "{}: no report with this content was issued from this repository (BLAKE3 {}): it was changed, or it comes from elsewhere",
            file.display(),
            &hash[..16]
        ))
        .hint("ask for the report again, or compare it with the one custos wrote (`custos audit log` lists each report's hash)")),
    }
}
