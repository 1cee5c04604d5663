//! `custos pg check`: is WAL archiving working, and is the archive complete?
//!
//! Reads archive settings and `pg_stat_archiver` from the cluster, computes the archiving
//! lag (how long the oldest segment waiting to be archived has waited; zero when nothing
//! waits), and walks the repository's WAL objects of the cluster for gaps. The seed's
//! alert: lag past 15 minutes is a failure.

use std::time::Duration;

use custos_model::Result;
use custos_repo::Repository;
use custos_sources::postgres::db::{ArchiverStatus, ConnectOptions, Db};
use custos_sources::postgres::wal::segment_number;
use serde::Serialize;

pub const DEFAULT_MAX_LAG: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Serialize)]
pub struct PgCheckReport {
    pub ok: bool,
    pub archiver: ArchiverStatus,
    /// Complete segments written but not yet archived.
    pub pending_segments: u64,
    pub lag_seconds: u64,
    pub max_lag_seconds: u64,
    pub archived_in_repository: u64,
    pub oldest_archived: Option<String>,
    pub newest_archived: Option<String>,
    /// Ranges of segments missing from the repository between the oldest and the newest.
    pub gaps: Vec<String>,
    /// 1 when the async pusher's last round failed (see `spool_last_error`).
    pub spool_waiting: u64,
    pub spool_oldest_seconds: u64,
    pub spool_last_error: Option<String>,
    pub problems: Vec<String>,
}

/// Complete segments waiting to be archived, and how long since the last one was (0 when
/// none waits; None when none was ever archived).
pub fn pending_and_lag(a: &ArchiverStatus) -> (u64, Option<u64>) {
    // Best: the archive_status folder, which says what waits and since when. A name in
    // pg_stat_archiver that is not a segment (a `.backup` or `.history` file) tells
    // nothing about the segments.
    if let Some(n) = a.ready_files {
        let lag = match a.oldest_ready {
            Some(t) if n > 0 => (a.now - t).num_seconds().max(0) as u64,
            _ => 0,
        };
        return (n, Some(lag));
    }
    let seg_size = a.segment_size.max(1 << 20);
    let current = segment_number(&a.current_wal, seg_size);
    let last = a
        .last_archived_wal
        .as_deref()
        .and_then(|n| segment_number(n.get(..24).unwrap_or(n), seg_size));
    let pending = match (current, last) {
        (Some((tc, c)), Some((tl, l))) if tc == tl => c.saturating_sub(l + 1),
        (Some((_, c)), None) => c.saturating_sub(1),
        _ => 0,
    };
    let lag = if pending == 0 {
        Some(0)
    } else {
        a.last_archived_time
            .map(|t| (a.now - t).num_seconds().max(0) as u64)
    };
    (pending, lag)
}

/// `spool`: the cache folder and repository location, to find this host's async spool.
/// `repo`: the repository, or why it could not be opened (the archiver's state is still
/// read and reported: it is what an operator needs when archiving breaks).
pub fn check(
    repo: std::result::Result<&Repository, &custos_model::Error>,
    conn: &ConnectOptions,
    max_lag: Duration,
    max_backup_age: Option<Duration>,
    spool: Option<(&std::path::Path, &str)>,
) -> Result<PgCheckReport> {
    let db = Db::connect(conn)?;
    if db.cluster_info()?.in_recovery {
        return Err(custos_model::Error::config(
            "the server is a standby: it does not archive WAL (its primary does), so its archiving cannot be checked here",
        )
        .hint("point `custos pg check` at the primary (PGHOST/PGPORT or --db-url); backups may still be taken from the standby"));
    }
    let a = db.archiver()?;
    let mut problems = vec![];
    let (mut spool_waiting, spool_oldest_seconds, mut spool_last_error) = (0, 0, None);
    if let Some((cache, location)) = spool {
        let sp = crate::postgres::wal::Spool {
            dir: crate::postgres::wal::Spool::location(cache, a.system_id, location),
        };
        spool_last_error = sp.last_error();
        if let Some(e) = &spool_last_error {
            spool_waiting = 1;
            problems.push(format!("the async WAL pusher is failing: {e}"));
        }
    }
    if a.archive_mode != "on" && a.archive_mode != "always" {
        problems.push(format!(
            "archive_mode is `{}`: set archive_mode = on and restart PostgreSQL",
            a.archive_mode
        ));
    }
    if !a.archive_command.contains("wal-push") {
        problems.push(format!(
            "archive_command `{}` does not call `custos wal-push %p`",
            a.archive_command
        ));
    }
    let seg_size = a.segment_size.max(1 << 20);
    let (pending, lag) = pending_and_lag(&a);
    let lag = lag.unwrap_or(u64::MAX);
    if pending > 0 && lag > max_lag.as_secs() {
        problems.push(format!(
            "WAL archiving lags: {pending} segment(s) waiting, last archived {} ago (limit {})",
            if lag == u64::MAX {
                "never".to_string()
            } else {
                humantime::format_duration(Duration::from_secs(lag)).to_string()
            },
            humantime::format_duration(max_lag)
        ));
    }
    if a.failed_count > 0 && a.last_failed_time > a.last_archived_time {
        problems.push(format!(
            "the archiver is failing: {} failure(s), the last for {} at {}; see the PostgreSQL log",
            a.failed_count,
            a.last_failed_wal.as_deref().unwrap_or("?"),
            a.last_failed_time
                .map(|t| t.to_rfc3339())
                .unwrap_or_default()
        ));
    }

    let repo = match repo {
        Ok(r) => r,
        Err(e) => {
            problems.push(format!(
                "the repository cannot be opened: {}{}",
                e.message,
                e.hint
                    .as_ref()
                    .map(|h| format!(" (hint: {h})"))
                    .unwrap_or_default()
            ));
            return Ok(PgCheckReport {
                ok: false,
                pending_segments: pending,
                lag_seconds: if lag == u64::MAX { 0 } else { lag },
                max_lag_seconds: max_lag.as_secs(),
                archived_in_repository: 0,
                oldest_archived: None,
                newest_archived: None,
                gaps: vec![],
                spool_waiting,
                spool_oldest_seconds,
                spool_last_error,
                problems,
                archiver: a,
            });
        }
    };
    // Continuity of this cluster's archive, offline, as a restore would follow it: from
    // where the oldest base backup needs it (or the oldest archived segment) on.
    let wal = repo.wal_objects()?;
    let names: Vec<String> = {
        let mut n: Vec<String> = wal
            .iter()
            .filter(|(sys, name, _)| {
                *sys == a.system_id && segment_number(name, seg_size).is_some()
            })
            .map(|(_, name, _)| name.clone())
            .collect();
        n.sort();
        n
    };
    let archive = crate::postgres::archive::Archive::load(repo, a.system_id, seg_size, &wal)?;
    let backups: Vec<custos_repo::snapshot::PgInfo> = repo
        .snapshots_for_reading()?
        .into_iter()
        .filter_map(|s| s.summary.pg)
        .filter(|p| p.system_id == a.system_id)
        .collect();
    if let Some(max) = max_backup_age {
        match backups.iter().map(|p| p.stop_time).max() {
            None => problems.push("the repository holds no base backup of this cluster".into()),
            Some(t) => {
                let age = (a.now - t).to_std().unwrap_or_default();
                if age > max {
                    problems.push(format!(
                        "the newest base backup ended {} ago, at {} (limit {})",
                        humantime::format_duration(Duration::from_secs(age.as_secs())),
                        t.to_rfc3339(),
                        humantime::format_duration(max)
                    ));
                }
            }
        }
    }
    let oldest_backup = backups.into_iter().min_by_key(|p| p.start_lsn);
    let mut gaps = vec![];
    match &oldest_backup {
        Some(b) => {
            let w = archive.window(repo, b)?;
            gaps.extend(w.missing.iter().cloned());
            let from = if b.wal_included {
                custos_model::Lsn(b.stop_lsn.0.saturating_sub(1)).segment(seg_size)
            } else {
                b.start_lsn.segment(seg_size)
            };
            for g in archive.gaps(b.timeline, from) {
                if !gaps.iter().any(|m| g.starts_with(m.as_str())) {
                    gaps.push(g);
                }
            }
        }
        None => {
            if let Some(t) = archive.timelines().first() {
                let first = archive.first_segment(*t).unwrap_or(0);
                gaps.extend(archive.gaps(*t, first));
            }
        }
    }
    for g in &gaps {
        problems.push(format!("WAL missing from the repository: {g}"));
    }
    if let Some(l) = &a.last_archived_wal {
        if l.len() == 24 && !names.contains(l) {
            problems.push(format!("PostgreSQL reports {l} archived, but the repository does not hold it: is archive_command pointing at another repository?"));
        }
    }
    Ok(PgCheckReport {
        ok: problems.is_empty(),
        pending_segments: pending,
        lag_seconds: if lag == u64::MAX { 0 } else { lag },
        max_lag_seconds: max_lag.as_secs(),
        archived_in_repository: names.len() as u64,
        oldest_archived: names.first().cloned(),
        newest_archived: names.last().cloned(),
        gaps,
        spool_waiting,
        spool_oldest_seconds,
        spool_last_error,
        problems,
        archiver: a,
    })
}
