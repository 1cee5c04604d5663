//! The daily report (the seed's "daily reports document archive continuity metrics"):
//! for one UTC day, what ran against what was scheduled, the archive's continuity (gaps,
//! the largest lag the agent saw), bytes, failures and open alerts. Stored in the
//! repository as a stream snapshot of source [`REPORT_SOURCE`] tagged `date=YYYY-MM-DD`
//! (encrypted and verified like any backup; its content one JSON document holding the
//! report and its HTML), signed into the trail, and sent to the alert sinks. `forget`
//! keeps reports as long as audit-log exports (six years by default): they are evidence.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, NaiveDate, Utc};
use custos_model::Result;
use serde::{Deserialize, Serialize};

use crate::alerts::{Firing, Notification};
use crate::observe::RepoHandle;
use crate::state::Outcome;
use crate::Shared;

pub use custos_ops::maintenance::forget::REPORT_SOURCE;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobDay {
    pub job: String,
    pub run: String,
    pub schedule: String,
    pub scheduled: u32,
    pub started: u32,
    pub ok: u32,
    pub failed: u32,
    pub bytes_read: u64,
    pub bytes_stored: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Continuity {
    pub cluster: String,
    /// Probes of the archiver that day, and the largest lag they saw.
    pub samples: u32,
    pub max_lag_seconds: Option<f64>,
    /// Holes in the archived WAL, as the repository showed them when the report was made.
    pub gaps: Vec<String>,
    pub wal_files: Option<u64>,
    pub newest_segment: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub job: String,
    pub end: DateTime<Utc>,
    pub outcome: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DailyReport {
    pub date: NaiveDate,
    pub generated: DateTime<Utc>,
    pub host: String,
    pub jobs: Vec<JobDay>,
    pub continuity: Option<Continuity>,
    pub failures: Vec<Failure>,
    pub open_alerts: Vec<Firing>,
    pub repository_bytes: Option<u64>,
    pub snapshot: Option<String>,
}

impl DailyReport {
    pub fn missed(&self) -> u32 {
        self.jobs
            .iter()
            .map(|j| j.scheduled.saturating_sub(j.started))
            .sum()
    }
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
            && self.missed() == 0
            && self.continuity.as_ref().is_none_or(|c| c.gaps.is_empty())
    }
}

/// The report of `day` from the agent's state.
pub fn build(s: &Shared, day: NaiveDate, now: DateTime<Utc>) -> DailyReport {
    let from = day.and_hms_opt(0, 0, 0).expect("midnight").and_utc();
    let to = from + chrono::Duration::days(1);
    let in_day = |t: DateTime<Utc>| t >= from && t < to;
    let jobs = s
        .cfg
        .jobs
        .iter()
        .map(|j| {
            let mut scheduled = 0;
            let mut t = from - chrono::Duration::seconds(1);
            while let Some(n) = j.schedule.next_after(t) {
                if n >= to {
                    break;
                }
                scheduled += 1;
                t = n;
            }
            let runs: Vec<_> = s
                .store
                .history
                .iter()
                .filter(|r| r.job == j.name && in_day(r.slot))
                .collect();
            JobDay {
                job: j.name.clone(),
                run: j.run.clone(),
                schedule: j.schedule.describe(),
                scheduled,
                started: runs.len() as u32,
                ok: runs.iter().filter(|r| r.outcome == Outcome::Ok).count() as u32,
                failed: runs.iter().filter(|r| r.outcome != Outcome::Ok).count() as u32,
                bytes_read: runs.iter().map(|r| r.bytes_read).sum(),
                bytes_stored: runs.iter().map(|r| r.bytes_stored).sum(),
            }
        })
        .collect();
    let failures = s
        .store
        .history
        .iter()
        .filter(|r| in_day(r.end) && r.outcome != Outcome::Ok)
        .map(|r| Failure {
            job: r.job.clone(),
            end: r.end,
            outcome: r.outcome.as_str().into(),
            error: r.error_kind.clone(),
        })
        .collect();
    let samples: Vec<f64> = s
        .lag_samples
        .iter()
        .filter(|(t, _)| in_day(*t))
        .map(|(_, l)| *l)
        .filter(|l| l.is_finite())
        .collect();
    let cluster = s.observed.repo.as_ref().and_then(|r| {
        let sys = s.observed.wal.as_ref().map(|w| w.system_id);
        r.info
            .clusters
            .iter()
            .find(|c| Some(c.system_id) == sys || sys.is_none())
    });
    let continuity = (s.observed.wal.is_some() || cluster.is_some()).then(|| Continuity {
        cluster: s.cfg.cluster.clone(),
        samples: samples.len() as u32,
        max_lag_seconds: samples.iter().copied().reduce(f64::max),
        gaps: cluster.map(|c| c.gaps.clone()).unwrap_or_default(),
        wal_files: cluster.map(|c| c.wal_files),
        newest_segment: cluster.and_then(|c| c.wal_newest.clone()),
    });
    DailyReport {
        date: day,
        generated: now,
        host: s.host.clone(),
        jobs,
        continuity,
        failures,
        open_alerts: s.alerts.firing.values().cloned().collect(),
        repository_bytes: s.observed.repo.as_ref().map(|r| r.info.repository.bytes),
        snapshot: None,
    }
}

/// Builds, stores and signs the report of `day`.
pub fn write_daily(
    shared: &Arc<Mutex<Shared>>,
    repo: &RepoHandle,
    day: NaiveDate,
) -> Result<DailyReport> {
    let (mut rep, html) = {
        let s = shared.lock().unwrap();
        let rep = build(&s, day, s.now);
        let html = crate::page::report_html(&rep);
        (rep, html)
    };
    let doc = serde_json::json!({"report": rep, "html": html});
    let bytes = serde_json::to_vec(&doc).expect("serializes");
    // A fresh look at the keys once a day (a rotation since the agent started).
    repo.reset();
    let r = repo.get()?;
    let progress = custos_ops::progress::NoProgress;
    let saved = custos_ops::files::backup::backup_bytes(
        &r,
        REPORT_SOURCE,
        &bytes,
        &custos_ops::backup::BackupOptions {
            tags: vec![format!("date={day}")],
            time: None,
            cache_dir: None,
            progress: &progress,
        },
    )?;
    rep.snapshot = Some(saved.snapshot.to_string());
    repo.trail(
        "agent report daily",
        serde_json::json!({"date": day, "snapshot": saved.snapshot, "ok": rep.ok(), "missed": rep.missed(), "failures": rep.failures.len(), "bytes": bytes.len(), "blake3": blake3_hex(&bytes)}),
        "ok",
        custos_model::clock::now(),
    )?;
    shared.lock().unwrap().last_report = Some((day.to_string(), saved.snapshot.to_string()));
    Ok(rep)
}

fn blake3_hex(b: &[u8]) -> String {
    blake3::hash(b).to_hex().to_string()
}

/// What the sinks get: the day's summary.
pub fn notification(rep: &DailyReport, host: &str, now: DateTime<Utc>) -> Notification {
    let started: u32 = rep.jobs.iter().map(|j| j.started).sum();
    let scheduled: u32 = rep.jobs.iter().map(|j| j.scheduled).sum();
    Notification {
        status: "report".into(),
        alert: "daily_report".into(),
        subject: format!("day {}", rep.date),
        severity: if rep.ok() { "info" } else { "warning" }.into(),
        summary: format!(
            "daily report {}: {started}/{scheduled} scheduled runs started, {} failed, {} WAL gap(s), {} open alert(s)",
            rep.date,
            rep.failures.len(),
            rep.continuity.as_ref().map_or(0, |c| c.gaps.len()),
            rep.open_alerts.len()
        ),
        since: now,
        at: now,
        host: host.into(),
        repeat: false,
    }
}
