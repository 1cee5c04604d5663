//! `custos info`: what the repository holds at a glance, for the DBA at 3 a.m. and for
//! monitoring. Per PostgreSQL cluster (by system identifier): the newest backup and its
//! age, the window it can be restored to with any WAL gap, the archived WAL range. Per
//! other source: the newest snapshot and its age. And the repository's size.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use custos_model::Result;
use custos_repo::{paths, Repository};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct InfoReport {
    pub repository: RepoInfo,
    pub clusters: Vec<ClusterInfo>,
    pub sources: Vec<SourceInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepoInfo {
    pub location: String,
    pub id: String,
    /// Every object's bytes: packs, index, snapshots, WAL, trail, keys.
    pub bytes: u64,
    pub packs: u64,
    pub pack_bytes: u64,
    pub snapshots: u64,
    pub wal_files: u64,
    pub wal_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Newest {
    pub snapshot: String,
    pub time: DateTime<Utc>,
    pub age_seconds: i64,
    /// `full` or `incremental` (PostgreSQL), else the snapshot kind.
    pub kind: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterInfo {
    #[serde(with = "custos_model::id::u64_text")]
    pub system_id: u64,
    pub name: Option<String>,
    pub backups: u64,
    pub newest: Newest,
    /// The earliest point any backup can be recovered to, and the latest (None: not
    /// known, or no WAL archived past the backups).
    pub restorable_from: Option<DateTime<Utc>>,
    pub restorable_until: Option<DateTime<Utc>>,
    /// Holes in the WAL archive after the oldest backup's start: recovery stops at each.
    pub gaps: Vec<String>,
    pub wal_oldest: Option<String>,
    pub wal_newest: Option<String>,
    pub wal_files: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceInfo {
    pub kind: String,
    pub source: String,
    pub snapshots: u64,
    pub newest: Newest,
}

pub fn info(repo: &Repository, now: DateTime<Utc>) -> Result<InfoReport> {
    let snaps = repo.snapshots_for_reading()?;
    let wal = repo.wal_objects()?;
    let sum = |dir: &str| -> Result<(u64, u64)> {
        let l = repo.storage.list(dir)?;
        Ok((l.len() as u64, l.iter().map(|e| e.size).sum()))
    };
    let (packs, pack_bytes) = sum(paths::DATA)?;
    let mut bytes = pack_bytes;
    for dir in [
        paths::INDEX,
        paths::SNAPSHOTS,
        paths::KEYS,
        "audit",
        "keyring",
        "locks",
    ] {
        bytes += sum(dir)?.1;
    }
    let wal_bytes: u64 = wal.iter().map(|(_, _, s)| s).sum();
    bytes += wal_bytes;
    let newest = |s: &custos_repo::Snapshot| Newest {
        snapshot: s.id.to_hex(),
        time: s.summary.time,
        age_seconds: (now - s.summary.time).num_seconds(),
        kind: s
            .summary
            .pg
            .as_ref()
            .map_or(s.summary.kind.as_str(), |p| p.backup_type.as_str())
            .to_string(),
        bytes: s.summary.stats.bytes,
    };

    let archives = crate::postgres::archive::archives(
        repo,
        snaps.iter().filter_map(|s| s.summary.pg.as_ref()),
        &wal,
    )?;
    let mut clusters = vec![];
    for (sys, archive) in &archives {
        let mine: Vec<&custos_repo::Snapshot> = snaps
            .iter()
            .filter(|s| s.summary.pg.as_ref().is_some_and(|p| p.system_id == *sys))
            .collect();
        let last = mine
            .iter()
            .max_by_key(|s| s.summary.time)
            .expect("a cluster has a backup");
        let mut from: Option<DateTime<Utc>> = None;
        let mut until: Option<DateTime<Utc>> = None;
        for s in &mine {
            let w = archive.window(repo, s.summary.pg.as_ref().expect("filtered"))?;
            if w.missing.is_empty() {
                from = Some(from.map_or(w.from, |f| f.min(w.from)));
                until = match (until, w.until) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        let oldest = mine
            .iter()
            .filter_map(|s| s.summary.pg.as_ref())
            .min_by_key(|p| p.start_lsn)
            .expect("a cluster has a backup");
        let mut names: Vec<&String> = wal
            .iter()
            .filter(|(s, n, _)| *s == *sys && n.len() == 24)
            .map(|(_, n, _)| n)
            .collect();
        names.sort();
        clusters.push(ClusterInfo {
            system_id: *sys,
            name: mine
                .iter()
                .rev()
                .find_map(|s| s.summary.pg.as_ref().and_then(|p| p.cluster.clone())),
            backups: mine.len() as u64,
            newest: newest(last),
            restorable_from: from,
            restorable_until: until,
            gaps: archive.gaps(
                oldest.timeline,
                oldest.start_lsn.segment(archive.segment_size),
            ),
            wal_oldest: names.first().map(|n| n.to_string()),
            wal_newest: names.last().map(|n| n.to_string()),
            wal_files: names.len() as u64,
        });
    }

    let mut by_source: BTreeMap<(String, String), Vec<&custos_repo::Snapshot>> = BTreeMap::new();
    for s in snaps.iter().filter(|s| s.summary.pg.is_none()) {
        by_source
            .entry((
                s.summary.kind.as_str().to_string(),
                s.summary.source.clone(),
            ))
            .or_default()
            .push(s);
    }
    let sources = by_source
        .into_iter()
        .map(|((kind, source), list)| SourceInfo {
            kind,
            source,
            snapshots: list.len() as u64,
            newest: newest(
                list.iter()
                    .max_by_key(|s| s.summary.time)
                    .expect("a group has a snapshot"),
            ),
        })
        .collect();
    Ok(InfoReport {
        repository: RepoInfo {
            location: repo.storage.location(),
            id: repo.config.id.to_hex(),
            bytes,
            packs,
            pack_bytes,
            snapshots: snaps.len() as u64,
            wal_files: wal.len() as u64,
            wal_bytes,
        },
        clusters,
        sources,
    })
}
