//! The auditor's report: for a period, from the signed operation trail and the repository
//! as it is, what was scheduled against what ran, the encryption and its keys, every
//! verification and drill (RTO and RPO as charts), retention against the policy, the
//! secondaries, the trail's own verification, and each failure with how it was resolved.
//! It never holds data from inside a backup: names of jobs, sources, snapshot ids, counts,
//! times.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use custos_model::Result;
use custos_repo::Repository;
use serde::Serialize;

/// What the configuration says: the jobs and how many runs each was due in the period.
#[derive(Debug, Clone, Serialize)]
pub struct Scheduled {
    pub job: String,
    pub run: String,
    pub due: u64,
}

pub struct Inputs {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub scheduled: Vec<Scheduled>,
    pub policy: Option<custos_model::retention::RetentionPolicy>,
    pub floors: custos_ops::maintenance::forget::MinRetention,
    pub object_lock: Option<String>,
    pub secondaries: Vec<String>,
    pub location: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct JobRow {
    pub job: String,
    pub run: String,
    pub due: u64,
    pub ok: u64,
    pub failed: u64,
    pub last_ok: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KeyRow {
    pub id: String,
    pub role: String,
    pub created: DateTime<Utc>,
    pub age_days: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub time: DateTime<Utc>,
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillRow {
    pub time: DateTime<Utc>,
    pub kind: String,
    pub ok: bool,
    pub rto_seconds: Option<f64>,
    pub rpo_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub time: DateTime<Utc>,
    pub command: String,
    /// The agent's job, when the agent ran it.
    pub job: Option<String>,
    pub result: String,
    /// The next success of the same job (or command run by hand), which resolved it.
    pub resolved_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrailSummary {
    pub entries: u64,
    pub entries_in_period: u64,
    pub intact: bool,
    pub problems: Vec<String>,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// BLAKE3 of the stored bytes of the first and last entry of the period.
    pub first_hash: Option<String>,
    pub last_hash: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub generated: DateTime<Utc>,
    pub repository: String,
    pub jobs: Vec<JobRow>,
    /// Backups recorded in the period by kind of source (command), ok and failed.
    pub backups: BTreeMap<String, (u64, u64)>,
    pub algorithms: Vec<String>,
    pub keys: Vec<KeyRow>,
    pub rotations: Vec<DateTime<Utc>>,
    /// The newest split of the restore key: (threshold, count). Never the shares.
    pub shares: Option<(u64, u64)>,
    pub verifies: Vec<Event>,
    pub drills: Vec<DrillRow>,
    pub policy: Option<custos_model::retention::RetentionPolicy>,
    /// Snapshots kept now, by the rule that keeps them (daily, weekly, ...).
    pub kept_by_rule: BTreeMap<String, u64>,
    pub snapshots: u64,
    pub audit_log_minimum_days: i64,
    pub object_lock: Option<String>,
    pub copies: Vec<Event>,
    pub trail: TrailSummary,
    pub failures: Vec<Failure>,
}

fn num(v: &serde_json::Value) -> Option<f64> {
    v.as_f64()
}

pub fn build(repo: &Repository, i: &Inputs) -> Result<AuditReport> {
    let now = Utc::now();
    let read = repo.trail_verify()?;
    let mut problems = vec![];
    let entries: Vec<(u64, custos_repo::trail::Entry)> = read
        .iter()
        .filter_map(|r| {
            for p in &r.problems {
                problems.push(format!("entry {}: {p}", r.seq));
            }
            r.entry.clone().map(|e| (r.seq, e))
        })
        .collect();
    let in_period: Vec<&(u64, custos_repo::trail::Entry)> = entries
        .iter()
        .filter(|(_, e)| e.time >= i.from && e.time < i.to)
        .collect();
    // Scheduled against ran: the agent's job entries by job name.
    let mut jobs: Vec<JobRow> = i
        .scheduled
        .iter()
        .map(|s| JobRow {
            job: s.job.clone(),
            run: s.run.clone(),
            due: s.due,
            ok: 0,
            failed: 0,
            last_ok: None,
        })
        .collect();
    let mut backups: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut verifies = vec![];
    let mut drills = vec![];
    let mut rotations = vec![];
    let mut copies = vec![];
    let mut failures: Vec<Failure> = vec![];
    // The last failure message of a command an agent job started, by job: the job's
    // own entry says only how it ended.
    let mut job_error: BTreeMap<String, String> = BTreeMap::new();
    for (_, e) in &in_period {
        let ok = e.result == "ok";
        let job = e.touched.get("job").and_then(|j| j.as_str());
        if e.command == "agent job" {
            let name = job.unwrap_or("");
            if let Some(j) = jobs.iter_mut().find(|j| j.job == name) {
                if ok {
                    j.ok += 1;
                    j.last_ok = Some(j.last_ok.map_or(e.time, |t| t.max(e.time)));
                } else {
                    j.failed += 1;
                }
            }
            if !ok {
                failures.push(Failure {
                    time: e.time,
                    command: e.command.clone(),
                    job: Some(name.to_string()),
                    result: match job_error.remove(name) {
                        Some(m) => format!("{}: {m}", e.result),
                        None => e.result.clone(),
                    },
                    resolved_at: None,
                });
            }
            continue;
        }
        if e.command.starts_with("backup ") {
            let b = backups.entry(e.command.clone()).or_default();
            if ok {
                b.0 += 1
            } else {
                b.1 += 1
            }
        }
        if e.command == "verify" || e.command == "audit verify" || e.command == "audit-log verify" {
            verifies.push(Event {
                time: e.time,
                what: e.command.clone(),
                ok,
                detail: if ok {
                    let n = e.touched["verified"].as_array().map_or(0, |v| v.len());
                    if n > 0 {
                        format!("read every byte back; {n} snapshot(s) proven restorable")
                    } else {
                        "structure checked".into()
                    }
                } else {
                    e.result.clone()
                },
            });
        }
        if e.command.starts_with("drill ") && e.command != "drill list" {
            drills.push(DrillRow {
                time: e.time,
                kind: e.command.trim_start_matches("drill ").to_string(),
                ok: ok && e.touched["ok"] == true,
                rto_seconds: num(&e.touched["rto_seconds"]),
                rpo_seconds: num(&e.touched["rpo_seconds"]),
            });
        }
        if e.command == "key rotate" && ok {
            rotations.push(e.time);
        }
        if e.command == "copy" {
            copies.push(Event {
                time: e.time,
                what: "copy".into(),
                ok,
                detail: if ok {
                    "secondaries brought up to date".into()
                } else {
                    e.result.clone()
                },
            });
        }
        if !ok {
            match job {
                // Listed once, as its job's failure (above).
                Some(j) => {
                    job_error.insert(j.to_string(), e.result.clone());
                }
                None => failures.push(Failure {
                    time: e.time,
                    command: e.command.clone(),
                    job: None,
                    result: e.result.clone(),
                    resolved_at: None,
                }),
            }
        }
    }
    // A failure is resolved by the next success of the same job, or of the same command
    // run by hand.
    for f in &mut failures {
        f.resolved_at = entries
            .iter()
            .map(|(_, e)| e)
            .find(|e| {
                e.time > f.time
                    && e.result == "ok"
                    && e.command == f.command
                    && e.touched.get("job").and_then(|j| j.as_str()) == f.job.as_deref()
            })
            .map(|e| e.time);
    }
    let shares = entries
        .iter()
        .rev()
        .find(|(_, e)| e.command == "key split" && e.result == "ok")
        .and_then(|(_, e)| {
            Some((
                e.touched["threshold"].as_u64()?,
                e.touched["shares"].as_u64()?,
            ))
        });
    let keys = Repository::key_files(&repo.storage)?
        .into_iter()
        .map(|k| KeyRow {
            id: k.id.short(),
            role: k.role.as_str().to_string(),
            created: k.created,
            age_days: (now - k.created).num_days(),
        })
        .collect();
    // Retention as it stands: what the policy keeps, by rule.
    let mut kept_by_rule: BTreeMap<String, u64> = BTreeMap::new();
    let mut snapshots = 0;
    if let Some(p) = &i.policy {
        let plan = custos_ops::maintenance::forget::plan_at(
            repo,
            custos_ops::maintenance::forget::Selection::Policy(p),
            &i.floors,
            now,
        )?;
        for g in &plan.groups {
            for d in &g.decisions {
                snapshots += 1;
                if !d.keep {
                    *kept_by_rule.entry("due for removal".into()).or_default() += 1;
                    continue;
                }
                for r in &d.reasons {
                    let rule = r
                        .trim_start_matches("incremental: ")
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .trim_end_matches(':');
                    *kept_by_rule.entry(rule.to_string()).or_default() += 1;
                }
            }
        }
    } else {
        snapshots = repo.snapshots_for_reading()?.len() as u64;
    }
    // The trail: its verification, and the hashes that pin the period's first and last
    // entries (anyone holding the repository can recompute them).
    let hash_of = |seq: u64| -> Option<String> {
        let (hash, _) = custos_repo::trail::hash_entry(&*repo.storage, seq).ok()?;
        Some(hash.to_hex().to_string())
    };
    let first_seq = in_period.first().map(|(s, _)| *s);
    let last_seq = in_period.last().map(|(s, _)| *s);
    let trail = TrailSummary {
        entries: read.len() as u64,
        entries_in_period: in_period.len() as u64,
        intact: problems.is_empty(),
        problems,
        first_seq,
        last_seq,
        first_hash: first_seq.and_then(hash_of),
        last_hash: last_seq.and_then(hash_of),
    };
    Ok(AuditReport {
        from: i.from,
        to: i.to,
        generated: now,
        repository: i.location.clone(),
        jobs,
        backups,
        algorithms: vec![
            "AES-256-GCM (every blob, index, snapshot, key file)".into(),
            "HPKE X25519-HKDF-SHA256 / AES-256-GCM (per-pack data keys)".into(),
            "Argon2id (key files from passwords)".into(),
            "BLAKE3 (content ids, the trail's hash chain)".into(),
            "Ed25519 (trail and index signatures)".into(),
        ],
        keys,
        rotations,
        shares,
        verifies,
        drills,
        policy: i.policy.clone(),
        kept_by_rule,
        snapshots,
        audit_log_minimum_days: i.floors.audit_log_default.num_days(),
        object_lock: i.object_lock.clone(),
        copies,
        trail,
        failures,
    })
}

/// A line chart of one drill measure over the period, as SVG coordinates.
fn chart(
    id: &str,
    title: &str,
    drills: &[DrillRow],
    f: impl Fn(&DrillRow) -> Option<f64>,
) -> Option<serde_json::Value> {
    let pts: Vec<(DateTime<Utc>, f64, bool)> = drills
        .iter()
        .filter_map(|d| Some((d.time, f(d)?, d.ok)))
        .collect();
    if pts.is_empty() {
        return None;
    }
    let (t0, t1) = (pts[0].0, pts[pts.len() - 1].0);
    let span = (t1 - t0).num_seconds().max(1) as f64;
    let max = pts.iter().map(|p| p.1).fold(0.0_f64, f64::max).max(1e-9);
    let by_index = span < 60.0 && pts.len() > 1;
    let xy: Vec<(f64, f64, bool)> = pts
        .iter()
        .enumerate()
        .map(|(i, (t, v, ok))| {
            if by_index {
                let x = 40.0 + 470.0 * i as f64 / (pts.len() - 1) as f64;
                return (x, 150.0 - 120.0 * v / max, *ok);
            }
            let x = 40.0
                + 470.0
                    * if pts.len() == 1 {
                        0.5
                    } else {
                        (*t - t0).num_seconds() as f64 / span
                    };
            (x, 150.0 - 120.0 * v / max, *ok)
        })
        .collect();
    Some(serde_json::json!({
        "id": id,
        "title": title,
        "max": format!("{max:.1} s"),
        "points": xy.iter().map(|(x, y, _)| format!("{x:.1},{y:.1}")).collect::<Vec<_>>().join(" "),
        "dots": xy.iter().map(|(x, y, ok)| serde_json::json!([format!("{x:.1}"), format!("{y:.1}"), ok])).collect::<Vec<_>>(),
        "first": t0.format("%Y-%m-%d").to_string(),
        "last": t1.format("%Y-%m-%d").to_string(),
    }))
}

/// The report as one self-contained HTML page (inline CSS and SVG, no script).
pub fn html(r: &AuditReport) -> String {
    let mut env = minijinja::Environment::new();
    // Times as a person reads them: minutes, UTC.
    env.add_filter("when", |t: String| -> String {
        DateTime::parse_from_rfc3339(&t)
            .map(|t| {
                t.with_timezone(&Utc)
                    .format("%Y-%m-%d %H:%M UTC")
                    .to_string()
            })
            .unwrap_or(t)
    });
    env.add_template("audit.html", include_str!("../templates/audit.html"))
        .expect("the audit template parses");
    let due: u64 = r.jobs.iter().map(|j| j.due).sum();
    let ran: u64 = r.jobs.iter().map(|j| j.ok.min(j.due)).sum();
    let charts: Vec<serde_json::Value> = [
        chart("rto-chart", "RTO of each drill", &r.drills, |d| {
            d.rto_seconds
        }),
        chart("rpo-chart", "RPO of each drill", &r.drills, |d| {
            d.rpo_seconds
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    let fmt = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M").to_string();
    env.get_template("audit.html")
        .expect("registered")
        .render(minijinja::context! {
            r => r,
            from => fmt(r.from),
            to => fmt(r.to),
            generated => fmt(r.generated),
            due => due,
            ran => ran,
            verify_failed => r.verifies.iter().filter(|v| !v.ok).count(),
            drill_failed => r.drills.iter().filter(|d| !d.ok).count(),
            unresolved => r.failures.iter().filter(|f| f.resolved_at.is_none()).count(),
            charts => charts,
        })
        .unwrap_or_else(|e| {
            format!("<!DOCTYPE html><title>custos</title><p>the report failed to render: {e}</p>")
        })
}
