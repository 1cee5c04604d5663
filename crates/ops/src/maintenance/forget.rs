//! Forget: retention applied per group, as a plan that says why each snapshot is kept or
//! removed, then carried out by deleting the removed snapshots' objects. Data is freed
//! later by prune.
//!
//! Groups: snapshots of a folder, bucket or stream by kind, source and host; PostgreSQL
//! backups by cluster (system identifier), whatever host or standby took them, so that a
//! failover or backups from a standby do not double what is kept. For a cluster the plan
//! also says how its recovery window shrinks: from when it can be restored before and
//! after, and how many archived WAL files prune will then drop.

use chrono::{DateTime, Utc};
use custos_model::retention::{self, Candidate, Decision, RetentionPolicy};
use custos_model::{Result, SnapshotId};
use custos_repo::{paths, Repository};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct GroupPlan {
    pub kind: String,
    /// The source; for PostgreSQL, the cluster's name (or system identifier).
    pub source: String,
    /// The host (every host, for a PostgreSQL cluster: `*`).
    pub host: String,
    /// PostgreSQL: the cluster's system identifier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_id: Option<String>,
    pub decisions: Vec<Decision<SnapshotId>>,
    /// PostgreSQL: how the recovery window changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowChange>,
}

/// The recovery window of a cluster before and after a forget (and the prune after it).
#[derive(Debug, Clone, Serialize)]
pub struct WindowChange {
    /// The earliest time a restore can reach now, and once the plan is carried out.
    pub from_before: Option<DateTime<Utc>>,
    pub from_after: Option<DateTime<Utc>>,
    /// The latest (unchanged by forget).
    pub until: Option<DateTime<Utc>>,
    /// Archived WAL files no kept backup needs any more: prune deletes them.
    pub wal_freed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ForgetPlan {
    /// None when snapshots were named instead.
    pub policy: Option<RetentionPolicy>,
    pub groups: Vec<GroupPlan>,
}

impl ForgetPlan {
    pub fn removed(&self) -> Vec<SnapshotId> {
        self.groups
            .iter()
            .flat_map(|g| g.decisions.iter().filter(|d| !d.keep).map(|d| d.item))
            .collect()
    }
}

/// What decides: a retention policy, or the snapshots named (removed whatever their age;
/// the rest of their groups kept).
pub enum Selection<'a> {
    Policy(&'a RetentionPolicy),
    Named(&'a [SnapshotId]),
}

/// Minimum retention per kind of source, which `forget` obeys whatever it is told: an
/// audit-log export younger than its minimum is kept (the seed's six years).
#[derive(Debug, Clone)]
pub struct MinRetention {
    /// For audit-log exports, by table (`schema.table`), else `audit_log_default`.
    pub audit_log: std::collections::HashMap<String, chrono::Duration>,
    pub audit_log_default: chrono::Duration,
    /// A policy of its own for PostgreSQL incrementals (the seed keeps hourly ones 7
    /// days): with it, a cluster's full backups follow the main policy and its
    /// incrementals this one. Every backup is complete on its own (format 6.2: an
    /// incremental names every block it needs), so removing an incremental or a full
    /// never breaks a kept one; prune keeps the WAL from the oldest kept backup on.
    pub incremental: Option<RetentionPolicy>,
    /// The retention interlock: the snapshots the newest clean, whole `verify
    /// --read-data` proved restorable, and when. The newest of them in each group is kept
    /// whatever the policy or the command line says.
    pub verified: Option<(DateTime<Utc>, std::collections::HashSet<SnapshotId>)>,
}

impl Default for MinRetention {
    fn default() -> Self {
        MinRetention {
            audit_log: Default::default(),
            audit_log_default: crate::tables::parse_retention(AUDIT_LOG_MIN_RETENTION)
                .expect("valid"),
            incremental: None,
            verified: None,
        }
    }
}

/// The source name of the agent's daily reports (stream snapshots): evidence, kept at
/// least as long as the audit log whatever the policy says.
pub const REPORT_SOURCE: &str = "custos-report-daily";

/// The seed keeps audit logs six years.
pub const AUDIT_LOG_MIN_RETENTION: &str = "6y";

/// How many trail entries, from the newest, forget reads to find the last verification.
const VERIFY_LOOKBACK: usize = 20_000;

/// What the newest clean, whole `verify --read-data` proved restorable: its time and the
/// snapshots it read, from its trail entry, trusted only when a restore key signed it.
/// `secondary`: the verification of that secondary (`--secondary NAME`), else of the
/// primary.
pub fn last_verified(
    repo: &Repository,
    secondary: Option<&str>,
) -> Result<Option<(DateTime<Utc>, std::collections::HashSet<SnapshotId>)>> {
    let found = repo.trail_newest(custos_crypto::Role::Restore, VERIFY_LOOKBACK, |e| {
        (e.command == "verify" || e.command.starts_with("drill "))
            && e.result == "ok"
            && e.touched.get("secondary").and_then(|s| s.as_str()) == secondary
            && e.touched
                .get("verified")
                .and_then(|v| v.as_array())
                .is_some_and(|v| !v.is_empty())
    })?;
    Ok(found.map(|(_, e)| {
        let ids = e.touched["verified"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str()?.parse().ok())
            .collect();
        (e.time, ids)
    }))
}

pub fn plan(repo: &Repository, selection: Selection) -> Result<ForgetPlan> {
    plan_at(
        repo,
        selection,
        &MinRetention::default(),
        custos_model::clock::now(),
    )
}

pub fn plan_at(
    repo: &Repository,
    selection: Selection,
    floors: &MinRetention,
    now: DateTime<Utc>,
) -> Result<ForgetPlan> {
    // By policy every snapshot must decode (what forget cannot read it cannot count);
    // named, an unreadable one can be removed (what `custos verify` tells to do with it).
    let (snaps, damaged) = match &selection {
        Selection::Policy(_) => (repo.snapshots()?, vec![]),
        Selection::Named(_) => repo.snapshots_checked()?,
    };
    // Listed once, for every cluster's recovery window, when there are database backups.
    let wal = if snaps.iter().any(|s| s.summary.pg.is_some()) {
        repo.wal_objects()?
    } else {
        vec![]
    };
    type Key = (String, String, String, Option<u64>);
    let mut groups: std::collections::BTreeMap<Key, Vec<&custos_repo::Snapshot>> =
        Default::default();
    for s in &snaps {
        let key = match &s.summary.pg {
            Some(p) => (
                "postgres".to_string(),
                p.cluster.clone().unwrap_or_else(|| p.system_id.to_string()),
                "*".to_string(),
                Some(p.system_id),
            ),
            None => (
                s.summary.kind.as_str().to_string(),
                s.summary.source.clone(),
                s.summary.host.clone(),
                None,
            ),
        };
        groups.entry(key).or_default().push(s);
    }
    // One name per cluster: the newest backup's, whatever older ones were called.
    let mut merged: std::collections::BTreeMap<Key, Vec<&custos_repo::Snapshot>> =
        Default::default();
    for ((kind, source, host, sys), list) in groups {
        let key = match sys {
            Some(id) => {
                let newest = snaps
                    .iter()
                    .filter(|s| s.summary.pg.as_ref().is_some_and(|p| p.system_id == id))
                    .max_by_key(|s| s.summary.time)
                    .and_then(|s| s.summary.pg.as_ref()?.cluster.clone())
                    .unwrap_or_else(|| id.to_string());
                (kind, newest, host, sys)
            }
            None => (kind, source, host, sys),
        };
        merged.entry(key).or_default().extend(list);
    }
    let mut out = vec![];
    for ((kind, source, host, sys), list) in merged {
        let candidates: Vec<Candidate<SnapshotId>> = list
            .iter()
            .map(|s| Candidate {
                item: s.id,
                time: s.summary.time,
            })
            .collect();
        let mut decisions = match &selection {
            Selection::Policy(p) => match (&floors.incremental, sys) {
                (Some(inc), Some(_)) => {
                    let typed = candidates
                        .into_iter()
                        .map(|c| {
                            let inc = list.iter().any(|s| {
                                s.id == c.item
                                    && s.summary.pg.as_ref().is_some_and(|p| {
                                        p.backup_type
                                            == custos_repo::snapshot::PgBackupType::Incremental
                                    })
                            });
                            (c, inc)
                        })
                        .collect();
                    retention::apply_by_type(p, inc, typed)
                }
                _ => retention::apply(p, candidates),
            },
            Selection::Named(ids) => {
                let mut d: Vec<Decision<SnapshotId>> = candidates
                    .into_iter()
                    .map(|c| {
                        let named = ids.contains(&c.item);
                        Decision {
                            item: c.item,
                            time: c.time,
                            keep: !named,
                            reasons: vec![if named {
                                "named on the command line".into()
                            } else {
                                "not named".into()
                            }],
                            kept_until: None,
                        }
                    })
                    .collect();
                d.sort_by_key(|x| std::cmp::Reverse(x.time));
                d
            }
        };
        decisions.sort_by_key(|x| std::cmp::Reverse(x.time));
        let report =
            kind == custos_repo::snapshot::SourceKind::Stream.as_str() && source == REPORT_SOURCE;
        if kind == custos_repo::snapshot::SourceKind::AuditLog.as_str() || report {
            let min = if report {
                floors.audit_log_default
            } else {
                floors
                    .audit_log
                    .iter()
                    .find(|(t, _)| crate::backup::names_table(&source, t))
                    .map(|(_, d)| *d)
                    .unwrap_or(floors.audit_log_default)
            };
            for d in decisions.iter_mut() {
                d.keep_until(custos_model::clock::later(d.time, min));
            }
            for d in decisions.iter_mut().filter(|d| !d.keep) {
                let until = custos_model::clock::later(d.time, min);
                if until > now {
                    d.keep = true;
                    d.reasons = vec![format!(
                        "kept: {} minimum retention until {}",
                        if report { "daily report" } else { "audit-log" },
                        until.format("%Y-%m-%d")
                    )];
                }
            }
        }
        // The retention interlock: the newest snapshot of the group that was last proven
        // restorable stays, whatever the policy or the command line says.
        if let Some((when, ids)) = &floors.verified {
            if let Some(d) = decisions.iter_mut().find(|d| ids.contains(&d.item)) {
                if !d.keep {
                    d.keep = true;
                    d.reasons = vec![format!(
                        "kept: the newest snapshot of this source proven restorable (verify --read-data at {})",
                        when.format("%Y-%m-%d %H:%M UTC")
                    )];
                }
            }
        }
        // Object Lock: what the store will not delete yet is kept, with its date.
        for d in decisions.iter_mut().filter(|d| !d.keep) {
            if let Some(until) = super::lock::held_until(repo, &paths::snapshot(&d.item), now)? {
                d.keep = true;
                d.reasons = vec![format!(
                    "kept until {} by Object Lock",
                    until.format("%Y-%m-%d %H:%M:%S UTC")
                )];
            }
        }
        let window = match sys {
            Some(id) => Some(window_change(repo, &snaps, id, &decisions, &wal)?),
            None => None,
        };
        out.push(GroupPlan {
            kind,
            source,
            host,
            system_id: sys.map(|s| s.to_string()),
            decisions,
            window,
        });
    }
    if let Selection::Named(ids) = selection {
        let named: Vec<&(SnapshotId, custos_model::Error)> =
            damaged.iter().filter(|d| ids.contains(&d.0)).collect();
        if !named.is_empty() {
            out.push(unreadable_group(repo, &named, now)?);
        }
        let listed: Vec<SnapshotId> = out
            .iter()
            .flat_map(|g| g.decisions.iter().map(|d| d.item))
            .collect();
        if let Some(missing) = ids.iter().find(|i| !listed.contains(i)) {
            return Err(custos_model::Error::new(
                custos_model::Kind::NotFound,
                format!("there is no snapshot {}", missing.short()),
            ));
        }
        // Only the groups a named snapshot is in.
        out.retain(|g| g.decisions.iter().any(|d| ids.contains(&d.item)));
    }
    Ok(ForgetPlan {
        policy: match selection {
            Selection::Policy(p) => Some(p.clone()),
            Selection::Named(_) => None,
        },
        groups: out,
    })
}

/// The unreadable snapshots named on the command line: removed (unless Object Lock holds
/// them), dated by when their objects were written, as nothing else about them is known.
fn unreadable_group(
    repo: &Repository,
    named: &[&(SnapshotId, custos_model::Error)],
    now: DateTime<Utc>,
) -> Result<GroupPlan> {
    let written: std::collections::HashMap<String, DateTime<Utc>> = repo
        .storage
        .list(paths::SNAPSHOTS)?
        .into_iter()
        .filter_map(|e| Some((e.path, e.modified?.into())))
        .collect();
    let mut decisions = vec![];
    for (id, e) in named {
        let path = paths::snapshot(id);
        let mut d = Decision {
            item: *id,
            time: written.get(&path).copied().unwrap_or(now),
            keep: false,
            reasons: vec![format!(
                "named on the command line; it cannot be read: {}",
                e.message
            )],
            kept_until: None,
        };
        if let Some(until) = super::lock::held_until(repo, &path, now)? {
            d.keep = true;
            d.reasons = vec![format!(
                "kept until {} by Object Lock (it cannot be read: {})",
                until.format("%Y-%m-%d %H:%M:%S UTC"),
                e.message
            )];
        }
        decisions.push(d);
    }
    Ok(GroupPlan {
        kind: "unreadable".into(),
        source: "(its summary does not decode)".into(),
        host: "-".into(),
        system_id: None,
        decisions,
        window: None,
    })
}

/// How the recovery window of cluster `sys` changes when `decisions` are carried out.
fn window_change(
    repo: &Repository,
    snaps: &[custos_repo::Snapshot],
    sys: u64,
    decisions: &[Decision<SnapshotId>],
    wal: &crate::postgres::archive::WalObjects,
) -> Result<WindowChange> {
    let backups: Vec<(&custos_repo::snapshot::PgInfo, bool)> = snaps
        .iter()
        .filter_map(|s| {
            let p = s.summary.pg.as_ref().filter(|p| p.system_id == sys)?;
            let keep = decisions.iter().any(|d| d.item == s.id && d.keep);
            Some((p, keep))
        })
        .collect();
    let seg = backups[0].0.segment_size;
    let archive = crate::postgres::archive::Archive::load(repo, sys, seg, wal)?;
    let mut c = WindowChange {
        from_before: None,
        from_after: None,
        until: None,
        wal_freed: 0,
    };
    for (p, keep) in &backups {
        let w = archive.window(repo, p)?;
        if !w.missing.is_empty() {
            continue;
        }
        let earlier = |x: Option<DateTime<Utc>>| Some(x.map_or(w.from, |f| f.min(w.from)));
        c.from_before = earlier(c.from_before);
        if *keep {
            c.from_after = earlier(c.from_after);
        }
        c.until = match (c.until, w.until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    // What prune then drops: segments below the oldest kept backup's start (format.md 7a).
    if let Some(first) = backups
        .iter()
        .filter(|(_, keep)| *keep)
        .map(|(p, _)| p.start_lsn.segment(seg))
        .min()
    {
        c.wal_freed = wal
            .iter()
            .filter(|(s, name, _)| {
                *s == sys
                    && name
                        .get(..24)
                        .and_then(|n| custos_sources::postgres::wal::segment_number(n, seg))
                        .is_some_and(|(_, n)| n < first)
            })
            .count() as u64;
    }
    Ok(c)
}

pub fn execute(repo: &Repository, plan: &ForgetPlan) -> Result<usize> {
    repo.require_delete("forget snapshots")?;
    let _lock = repo.lock(false, "forget")?;
    let removed = plan.removed();
    for id in &removed {
        repo.storage.delete(&paths::snapshot(id))?;
    }
    Ok(removed.len())
}
