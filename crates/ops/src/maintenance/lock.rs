//! Object Lock dates: how long each object must stay, from the retention policy, and
//! `lock refresh`, which moves the store's retain-until dates up to them.
//!
//! Every object is written with the policy's shortest span (format.md 14). A snapshot's
//! date grows when a pick that keeps it becomes final: a daily becomes the month's monthly
//! once a later month has a snapshot, so nothing can take its place. Its date is then the
//! longest final pick's end (monthly: 12 months from its time), and so is the date of
//! every pack holding a chunk it references, of every index object naming such a pack,
//! and of every WAL file a kept backup would replay (prune keeps WAL from the oldest kept
//! backup on, so a WAL file is dated by the longest-kept backup that starts at or before
//! it). Dates only ever move later: the store refuses anything else.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, Utc};
use custos_model::{Error, Result, SnapshotId};
use custos_repo::{paths, repository::parallel_map, Repository};
use serde::Serialize;

use super::forget::{self, MinRetention, Selection};
use custos_model::retention::RetentionPolicy;

/// One snapshot's date.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotDate {
    pub id: SnapshotId,
    pub time: DateTime<Utc>,
    pub kind: String,
    pub source: String,
    /// What the policy's final picks ask for (at least its write span).
    pub until: DateTime<Utc>,
    /// Why: the picks that keep it.
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LockPlan {
    pub snapshots: Vec<SnapshotDate>,
    /// Every object custos dates, by path, with the date it must hold.
    #[serde(skip)]
    pub objects: BTreeMap<String, DateTime<Utc>>,
    /// The packs each snapshot's chunks lie in.
    #[serde(skip)]
    pub packs_of: HashMap<SnapshotId, Vec<String>>,
}

/// The dates the policy asks for. `write_span`: what every object got when written.
pub fn plan(
    repo: &Repository,
    policy: &RetentionPolicy,
    floors: &MinRetention,
    write_span: Duration,
    now: DateTime<Utc>,
) -> Result<LockPlan> {
    let groups = forget::plan_at(repo, Selection::Policy(policy), floors, now)?;
    let snaps = repo.snapshots()?;
    let index = repo.load_index_fresh()?;
    let mut out = LockPlan {
        snapshots: vec![],
        objects: BTreeMap::new(),
        packs_of: HashMap::new(),
    };
    let mut date_of: HashMap<SnapshotId, DateTime<Utc>> = HashMap::new();
    for g in &groups.groups {
        for d in &g.decisions {
            let floor = custos_model::clock::later(d.time, write_span);
            let until = whole_second(d.kept_until.map_or(floor, |u| u.max(floor)));
            date_of.insert(d.item, until);
            out.snapshots.push(SnapshotDate {
                id: d.item,
                time: d.time,
                kind: g.kind.clone(),
                source: g.source.clone(),
                until,
                reasons: d.reasons.clone(),
            });
        }
    }
    out.snapshots.sort_by_key(|s| s.time);
    let raise = |objects: &mut BTreeMap<String, DateTime<Utc>>, path: String, t| {
        let e = objects.entry(path).or_insert(t);
        if *e < t {
            *e = t;
        }
    };
    // Packs: each snapshot's chunks (every copy: a reader may need any of them).
    let ids: Vec<SnapshotId> = out.snapshots.iter().map(|s| s.id).collect();
    let refs = parallel_map(&ids, repo.threads(), |id| {
        crate::manifest::referenced_chunks(repo, &index, id)
            .map_err(|e| e.context(format!("cannot date the data of snapshot {}", id.short())))
    })?;
    let mut pack_date: HashMap<custos_model::PackId, DateTime<Utc>> = HashMap::new();
    for (id, chunks) in ids.iter().zip(refs) {
        let until = date_of[id];
        raise(&mut out.objects, paths::snapshot(id), until);
        let mut packs: Vec<custos_model::PackId> = chunks
            .iter()
            .flat_map(|c| index.locations(c).into_iter().map(|(p, _)| p.id))
            .collect();
        packs.sort();
        packs.dedup();
        for p in &packs {
            let e = pack_date.entry(*p).or_insert(until);
            *e = (*e).max(until);
        }
        out.packs_of
            .insert(*id, packs.iter().map(paths::pack).collect());
    }
    for (p, t) in &pack_date {
        raise(&mut out.objects, paths::pack(p), *t);
    }
    for (file, packs) in &index.file_packs()? {
        if let Some(t) = packs.iter().filter_map(|p| pack_date.get(p)).max() {
            raise(&mut out.objects, paths::index(file), *t);
        }
    }
    // WAL: per cluster, the longest date of the backups starting at or before it.
    let mut starts: HashMap<u64, Vec<(u64, DateTime<Utc>)>> = HashMap::new();
    let mut segsize: HashMap<u64, u64> = HashMap::new();
    for s in &snaps {
        if let (Some(pg), Some(t)) = (&s.summary.pg, date_of.get(&s.id)) {
            starts
                .entry(pg.system_id)
                .or_default()
                .push((pg.start_lsn.segment(pg.segment_size), *t));
            segsize.insert(pg.system_id, pg.segment_size);
        }
    }
    if !starts.is_empty() {
        for v in starts.values_mut() {
            v.sort();
            let mut best = DateTime::<Utc>::MIN_UTC;
            for x in v.iter_mut() {
                best = best.max(x.1);
                x.1 = best;
            }
        }
        for (sys, name, _) in repo.wal_objects()? {
            let (Some(v), Some(seg)) = (starts.get(&sys), segsize.get(&sys)) else {
                continue;
            };
            let Some((_, n)) = name
                .get(..24)
                .and_then(|n| custos_sources::postgres::wal::segment_number(n, *seg))
            else {
                continue;
            };
            if let Some((_, t)) = v.iter().rev().find(|(start, _)| *start <= n) {
                raise(&mut out.objects, paths::wal(sys, &name), *t);
            }
        }
    }
    Ok(out)
}

/// The next whole second at or after `t`: stores keep retain-until dates in seconds.
fn whole_second(t: DateTime<Utc>) -> DateTime<Utc> {
    let floor = DateTime::<Utc>::from_timestamp(t.timestamp(), 0).unwrap_or(t);
    if floor < t {
        custos_model::clock::later(floor, Duration::seconds(1))
    } else {
        floor
    }
}

/// What `lock refresh` did.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RefreshReport {
    pub checked: u64,
    pub extended: u64,
    /// Extended objects by kind (`data`, `index`, `snapshots`, `wal`).
    pub extended_by_kind: BTreeMap<String, u64>,
    /// Snapshots whose own object's date moved, with the new date.
    pub snapshots_extended: Vec<(SnapshotId, DateTime<Utc>)>,
}

fn lock_of(repo: &Repository) -> Result<&dyn custos_storage::ObjectLock> {
    repo.storage.object_lock().ok_or_else(|| {
        Error::config(format!(
            "{}: this repository is not written with Object Lock",
            repo.storage.location()
        ))
        .hint("Object Lock needs an S3 bucket created with it and [object_lock] in custos.toml (see `custos bucket-policy`)")
    })
}

/// Moves every dated object's retain-until up to what the plan asks; never down.
pub fn refresh(repo: &Repository, plan: &LockPlan) -> Result<RefreshReport> {
    let lock = lock_of(repo)?;
    let _guard = repo.lock(false, "lock refresh")?;
    let items: Vec<(&String, &DateTime<Utc>)> = plan.objects.iter().collect();
    let done = parallel_map(&items, repo.threads() * 2, |(path, want)| {
        let have = lock.retention(path)?;
        if have.is_some_and(|r| r.until >= **want) {
            return Ok(false);
        }
        match lock.extend(path, **want) {
            Ok(()) => Ok(true),
            Err(e) => Err(e.context(format!("cannot extend the Object Lock date of `{path}`"))),
        }
    })?;
    let mut r = RefreshReport {
        checked: items.len() as u64,
        ..Default::default()
    };
    for ((path, want), extended) in items.iter().zip(done) {
        if !extended {
            continue;
        }
        r.extended += 1;
        let kind = path.split('/').next().unwrap_or("").to_string();
        *r.extended_by_kind.entry(kind).or_default() += 1;
        if let Some(id) = path
            .strip_prefix("snapshots/")
            .and_then(|i| i.parse::<SnapshotId>().ok())
        {
            r.snapshots_extended.push((id, **want));
        }
    }
    Ok(r)
}

/// `lock status`: per snapshot, the date the policy asks for, and what the store holds
/// for its own object and for the latest of its packs: the earliest its data can go.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStatus {
    #[serde(flatten)]
    pub date: SnapshotDate,
    /// The store's retain-until of the snapshot object (`None`: no date, deletable).
    pub object_until: Option<DateTime<Utc>>,
    /// The latest retain-until among the packs holding its data.
    pub data_until: Option<DateTime<Utc>>,
    /// Whether the store's dates fall short of the policy's (run `lock refresh`).
    pub behind: bool,
}

pub fn status(repo: &Repository, plan: &LockPlan) -> Result<Vec<SnapshotStatus>> {
    let lock = lock_of(repo)?;
    let mut packs: Vec<&String> = plan.packs_of.values().flatten().collect();
    packs.sort();
    packs.dedup();
    let pack_until: HashMap<&String, Option<DateTime<Utc>>> = packs
        .iter()
        .zip(parallel_map(&packs, repo.threads() * 2, |p| {
            Ok(lock.retention(p)?.map(|r| r.until))
        })?)
        .map(|(p, t)| (*p, t))
        .collect();
    let objs = parallel_map(&plan.snapshots, repo.threads() * 2, |s| {
        Ok(lock.retention(&paths::snapshot(&s.id))?.map(|r| r.until))
    })?;
    let mut out = vec![];
    for (s, object_until) in plan.snapshots.iter().zip(objs) {
        let mine = plan.packs_of.get(&s.id);
        let data_until = mine
            .into_iter()
            .flatten()
            .filter_map(|p| pack_until.get(p).copied().flatten())
            .max();
        let short = |t: Option<DateTime<Utc>>| t.is_none_or(|t| t < s.until);
        let behind = short(object_until)
            || mine
                .into_iter()
                .flatten()
                .any(|p| short(pack_until.get(p).copied().flatten()));
        out.push(SnapshotStatus {
            date: s.clone(),
            object_until,
            data_until,
            behind,
        });
    }
    Ok(out)
}

/// The store's date for `path` when it is still in the future: what keeps it.
pub fn held_until(
    repo: &Repository,
    path: &str,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>> {
    let Some(lock) = repo.storage.object_lock() else {
        return Ok(None);
    };
    Ok(lock.retention(path)?.map(|r| r.until).filter(|t| *t > now))
}
