//! `custos snapshots`, `custos ls` and `custos info`: what the repository holds.

use clap::Args;
use custos_model::path::escape as esc;
use custos_model::{ByteSize, Result};
use custos_ops::restore;
use custos_repo::snapshot::SourceKind;

use crate::context::Ctx;

/// The flags of `custos snapshots`.
#[derive(Args)]
pub(crate) struct SnapshotsArgs {
    /// Only snapshots of this source
    #[arg(long)]
    pub(crate) source: Option<String>,
}

/// The flags of `custos ls`.
#[derive(Args)]
pub(crate) struct LsArgs {
    /// The snapshot: an id (prefix), or `latest` (the newest that is not a stream, as
    /// `restore files latest` picks it)
    pub(crate) snapshot: String,
    /// With `latest`: the latest snapshot of this source
    #[arg(long)]
    pub(crate) source: Option<String>,
}

/// An age for people: 3 d 4 h, 5 h 12 min, 40 s.
pub(crate) fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

pub(crate) fn cmd_info(ctx: &Ctx) -> Result<i32> {
    let repo = ctx.open()?;
    let r = custos_ops::maintenance::info::info(&repo, chrono::Utc::now())?;
    ctx.touch(serde_json::json!({"clusters": r.clusters.len(), "sources": r.sources.len()}));
    if ctx.out.json {
        ctx.out.json(&r);
        return Ok(0);
    }
    let x = &r.repository;
    println!(
        "repository {} ({}): {}; {} snapshots, {} in {} packs, {} WAL files ({})",
        x.location,
        &x.id[..8],
        ByteSize(x.bytes),
        x.snapshots,
        ByteSize(x.pack_bytes),
        x.packs,
        x.wal_files,
        ByteSize(x.wal_bytes)
    );
    let t = |d: &chrono::DateTime<chrono::Utc>| d.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    for c in &r.clusters {
        println!(
            "cluster {} (system id {}): {} backup(s); newest {} {} at {} ({} ago)",
            esc(c.name.as_deref().unwrap_or("-")),
            c.system_id,
            c.backups,
            c.newest.kind,
            &c.newest.snapshot[..8],
            t(&c.newest.time),
            age(c.newest.age_seconds)
        );
        println!(
            "  restorable from {} to {}",
            c.restorable_from.as_ref().map_or("nothing".into(), t),
            c.restorable_until
                .as_ref()
                .map_or("the newest backup's end (no later WAL archived)".into(), t)
        );
        println!(
            "  WAL: {} file(s), {} .. {}",
            c.wal_files,
            c.wal_oldest.as_deref().unwrap_or("-"),
            c.wal_newest.as_deref().unwrap_or("-")
        );
        for g in &c.gaps {
            println!("  WAL GAP: {g} missing: recovery cannot pass it");
        }
    }
    for s in &r.sources {
        println!(
            "{} {}: {} snapshot(s); newest {} at {} ({} ago), {}",
            s.kind,
            esc(&s.source),
            s.snapshots,
            &s.newest.snapshot[..8],
            t(&s.newest.time),
            age(s.newest.age_seconds),
            ByteSize(s.newest.bytes)
        );
    }
    Ok(0)
}

pub(crate) fn cmd_snapshots(ctx: &Ctx, source: Option<&str>) -> Result<i32> {
    let repo = ctx.open()?;
    let snaps: Vec<_> = repo
        .snapshots_for_reading()?
        .into_iter()
        .filter(|s| source.is_none_or(|src| s.summary.source == src))
        .collect();
    // Database backups restore to any time from their end to the end of the unbroken run
    // of archived WAL after them.
    let archives = custos_ops::postgres::archive::archives(
        &repo,
        snaps.iter().filter_map(|s| s.summary.pg.as_ref()),
        &repo.wal_objects()?,
    )?;
    let mut windows = std::collections::HashMap::new();
    for s in &snaps {
        if let Some(p) = &s.summary.pg {
            windows.insert(s.id, archives[&p.system_id].window(&repo, p)?);
        }
    }
    if ctx.out.json {
        let v: Vec<_> = snaps
            .iter()
            .map(|s| match windows.get(&s.id) {
                Some(w) => serde_json::json!({"id": s.id, "summary": s.summary, "restorable": {
                    "from": w.from,
                    "until": w.until,
                    "until_lsn": w.until_lsn,
                    "archive_end_segment": w.last_segment,
                    "gap": w.gap,
                    "missing": w.missing,
                }}),
                None => serde_json::json!({"id": s.id, "summary": s.summary}),
            })
            .collect();
        ctx.out.json(&v);
    } else {
        println!(
            "{:<10} {:<20} {:<8} {:<12} {:>10} {:>10}  source",
            "id", "time (UTC)", "kind", "host", "size", "added"
        );
        for s in &snaps {
            let m = &s.summary;
            println!(
                "{:<10} {:<20} {:<8} {:<12} {:>10} {:>10}  {}",
                s.id.short(),
                m.time.format("%Y-%m-%d %H:%M:%S"),
                m.kind.as_str(),
                esc(&m.host),
                ByteSize(m.stats.bytes).to_string(),
                ByteSize(m.stats.bytes_stored).to_string(),
                esc(&m.source)
            );
            if let Some(line) = facts_line(s) {
                println!("{:<10} {}", "", esc(&line));
            }
            if let (Some(p), Some(w)) = (&m.pg, windows.get(&s.id)) {
                let end = if !w.missing.is_empty() {
                    format!(
                        "nothing: WAL it needs is missing ({})",
                        w.missing.join(", ")
                    )
                } else {
                    let mut end = match (&w.last_segment, w.until) {
                        (Some(seg), Some(at)) => {
                            format!("{} (WAL to {seg})", at.format("%Y-%m-%d %H:%M:%S"))
                        }
                        (Some(seg), None) => format!("WAL {seg}"),
                        (None, _) if p.wal_included => {
                            "its own end (WAL included, none archived after it)".into()
                        }
                        (None, _) => "its own end: no WAL archived after it".into(),
                    };
                    if let Some(g) = &w.gap {
                        end.push_str(&format!("; WAL GAP: {g} missing, later WAL unreachable"));
                    }
                    end
                };
                println!(
                    "{:<10} {} LSN {}..{} TL {}; restorable from {} to {end}",
                    "",
                    p.backup_type.as_str(),
                    p.start_lsn,
                    p.stop_lsn,
                    p.timeline,
                    p.stop_time.format("%Y-%m-%d %H:%M:%S"),
                );
            }
        }
        println!("{} snapshot(s)", snaps.len());
    }
    Ok(0)
}

/// What a table, audit-log, dump or configuration snapshot records, in one line.
fn facts_line(s: &custos_repo::Snapshot) -> Option<String> {
    use custos_ops::config::terraform;
    use custos_ops::tables::{audit, dump};
    if let Some(f) = terraform::facts_of(s) {
        return Some(format!(
            "terraform state serial {}, lineage {}, Terraform {}",
            f.serial, f.lineage, f.terraform_version
        ));
    }
    if let Some(f) = audit::facts_of(s) {
        return Some(format!(
            "audit-log export {} of {}: {} rows, links to {}",
            f.seq,
            f.table,
            f.rows,
            f.prev
                .as_deref()
                .map(|p| p.get(..12).unwrap_or(p))
                .unwrap_or("nothing (first)")
        ));
    }
    if let Some(f) = dump::facts_of(s) {
        return Some(format!(
            "logical dump of {} (PostgreSQL {}, pg_dump {}), {} tables, {} rows",
            f.database,
            custos_sources::postgres::tables::version_text(f.server_version_num),
            f.pg_dump_version,
            f.tables.len(),
            f.tables.iter().fold(0u64, |n, t| n.saturating_add(t.rows))
        ));
    }
    let table: Option<custos_ops::tables::export::TablesFacts> =
        custos_ops::backup::facts(s, custos_repo::snapshot::SourceKind::Table);
    if let Some(f) = table {
        return Some(format!(
            "rows as of LSN {}: {}",
            f.lsn,
            f.tables
                .iter()
                .map(|t| format!("{} {} rows", t.table, t.rows))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    None
}

pub(crate) fn cmd_ls(ctx: &Ctx, spec: &str, source: Option<&str>) -> Result<i32> {
    let repo = ctx.open()?;
    // `latest` is what `restore files latest` restores: the newest that is not a stream
    // (a stream is listed by its id, or with --source).
    let snap = repo.find_snapshot(spec, |s: &custos_repo::SnapshotSummary| match source {
        Some(src) => s.source == src,
        None => s.kind != SourceKind::Stream,
    })?;
    repo.require_restore("list the contents of a snapshot")?;
    if !ctx.out.json {
        eprintln!(
            "snapshot {} of {} {}, {}",
            snap.id.short(),
            snap.summary.kind.as_str(),
            esc(&snap.summary.source),
            snap.summary.time.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    let index = repo.load_index_for_reading()?;
    let entries = restore::list(&repo, &snap, &index)?;
    ctx.touch(serde_json::json!({"snapshot": snap.id}));
    if ctx.out.json {
        let v: Vec<_> = entries
            .iter()
            .map(|e| serde_json::json!({"path": e.path, "kind": e.kind, "mode": format!("{:o}", e.mode), "size": e.size, "mtime_ns": e.mtime_ns, "target": e.target}))
            .collect();
        ctx.out.json(&v);
    } else {
        for e in entries {
            let kind = match e.kind {
                custos_sources::files::EntryKind::Dir => 'd',
                custos_sources::files::EntryKind::Symlink => 'l',
                custos_sources::files::EntryKind::File => '-',
                custos_sources::files::EntryKind::Other => '?',
            };
            let target = e.target.map(|t| format!(" -> {t}")).unwrap_or_default();
            println!("{kind}{:04o} {:>12} {}{}", e.mode, e.size, e.path, target);
        }
    }
    Ok(0)
}

/// The recovery points `backup all` recorded in the trail, oldest first, each with
/// whether that run succeeded.
pub(crate) fn points(repo: &custos_repo::Repository) -> Result<Vec<(serde_json::Value, bool)>> {
    Ok(repo
        .trail_verify()?
        .into_iter()
        .filter_map(|r| r.entry)
        .filter(|e| e.command == "backup all" && e.touched.get("point").is_some())
        .map(|e| (e.touched["point"].clone(), e.result == "ok"))
        .collect())
}

/// `custos points`: the recovery points `backup all` recorded in the trail, newest last:
/// its id, time, each part's snapshot and where the database's WAL was.
pub(crate) fn cmd_points(ctx: &Ctx) -> Result<i32> {
    let repo = ctx.open()?;
    let points: Vec<serde_json::Value> = points(&repo)?.into_iter().map(|(p, _)| p).collect();
    if ctx.out.json {
        ctx.out.json(&points);
        return Ok(0);
    }
    if points.is_empty() {
        println!("no recovery point yet: `custos backup all` records one");
    }
    for p in &points {
        println!(
            "{}  {}  {} part(s){}",
            p["id"].as_str().unwrap_or(""),
            p["time"].as_str().unwrap_or(""),
            p["parts"].as_array().map_or(0, |a| a.len()),
            p["database"]["lsn"]
                .as_str()
                .map(|l| format!(", database WAL {l}"))
                .unwrap_or_default()
        );
        for part in p["parts"].as_array().into_iter().flatten() {
            println!(
                "    {:<10} {:<8} {}",
                part["kind"].as_str().unwrap_or(""),
                part["snapshot"]
                    .as_str()
                    .map_or("", |s| &s[..s.len().min(8)]),
                custos_model::path::escape(part["source"].as_str().unwrap_or(""))
            );
        }
    }
    Ok(0)
}
