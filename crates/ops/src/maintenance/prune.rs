//! Prune: removes data no snapshot references, in two phases.
//!
//! The plan is computed under the exclusive lock (no writer is running, so a pack missing
//! from the index is garbage from an interrupted run, never data a backup is about to
//! reference). Execution keeps restic's order: repacked chunks are written to new packs;
//! a new index naming every kept and new pack is written; only then are the old index
//! objects deleted, and only then the packs no index names. Killed at any point, the
//! repository stays valid: at worst it holds extra packs or duplicate index entries, which
//! the next prune removes.

use std::collections::HashSet;
use std::sync::Arc;

use custos_model::{ChunkId, IndexId, PackId, Result};
use custos_repo::index::Index;
use custos_repo::{paths, Repository};
use serde::Serialize;

use crate::progress::Progress;

/// A partly used pack is rewritten when more than this fraction of it is unused.
pub const MAX_UNUSED: f64 = 0.2;

#[derive(Debug, Clone, Serialize, Default)]
pub struct PrunePlan {
    pub snapshots: u64,
    pub packs: u64,
    pub chunks_used: u64,
    pub chunks_unused: u64,
    pub packs_delete: Vec<PackId>,
    pub packs_repack: Vec<PackId>,
    /// Packs in storage that no index names (left by an interrupted run).
    pub packs_unindexed: Vec<PackId>,
    pub bytes_freed_estimate: u64,
    #[serde(skip)]
    pub index_files: Vec<IndexId>,
    /// Index objects the store holds (Object Lock): they stay, and the new index leaves
    /// out the packs they name.
    #[serde(skip)]
    pub held_index: HashSet<String>,
    #[serde(skip)]
    used: Used,
    pub temp_files: Vec<String>,
    /// Archived WAL older than the start of the oldest PostgreSQL backup kept for its
    /// cluster: no kept backup can replay it.
    pub wal_delete: Vec<String>,
    pub wal_bytes: u64,
    /// Object Lock: objects prune would delete that the store holds until a later date
    /// (they stay, and so do the packs a held index object names).
    pub held: Vec<Held>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Held {
    pub path: String,
    pub until: chrono::DateTime<chrono::Utc>,
}

impl PrunePlan {
    pub fn is_empty(&self) -> bool {
        self.packs_delete.is_empty()
            && self.packs_repack.is_empty()
            && self.packs_unindexed.is_empty()
            && self.temp_files.is_empty()
            && self.wal_delete.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct PruneReport {
    pub packs_deleted: u64,
    pub packs_written: u64,
    pub chunks_repacked: u64,
    pub bytes_deleted: u64,
    pub wal_deleted: u64,
}

/// WAL objects no kept backup needs: per cluster, segments numbered below the segment
/// where its oldest kept backup starts (on any timeline: no kept backup reaches earlier).
/// Timeline history files stay. A cluster with no backup keeps all its WAL.
fn wal_to_delete(
    repo: &Repository,
    snapshots: &[custos_repo::Snapshot],
) -> Result<(Vec<String>, u64)> {
    let mut oldest: std::collections::HashMap<u64, u64> = Default::default();
    for s in snapshots {
        if let Some(pg) = &s.summary.pg {
            let seg = pg.start_lsn.segment(pg.segment_size);
            let e = oldest.entry(pg.system_id).or_insert(u64::MAX);
            *e = (*e).min(seg);
        }
    }
    let mut out = vec![];
    let mut bytes = 0;
    let segsize_of: std::collections::HashMap<u64, u64> = snapshots
        .iter()
        .filter_map(|s| s.summary.pg.as_ref().map(|p| (p.system_id, p.segment_size)))
        .collect();
    for (sys, name, size) in repo.wal_objects()? {
        let (Some(first), Some(segsize)) = (oldest.get(&sys), segsize_of.get(&sys)) else {
            continue;
        };
        // `.backup` and `.partial` files: by the segment they name.
        let Some((_, number)) = name
            .get(..24)
            .and_then(|n| custos_sources::postgres::wal::segment_number(n, *segsize))
        else {
            continue;
        };
        if number < *first {
            out.push(paths::wal(sys, &name));
            bytes += size;
        }
    }
    out.sort();
    Ok((out, bytes))
}

/// Which copies of chunks (numbered as [`Index::copies`] numbers them) some snapshot uses:
/// a bit each, 12 MB at 100 million chunks, where a set of chunk ids took gigabytes.
#[derive(Debug, Clone, Default)]
struct Used(Vec<u64>);

impl Used {
    fn new(copies: u64) -> Used {
        Used(vec![0; copies.div_ceil(64) as usize])
    }
    fn set(&mut self, n: u64) {
        if let Some(w) = self.0.get_mut((n / 64) as usize) {
            *w |= 1 << (n % 64);
        }
    }
    fn get(&self, n: u64) -> bool {
        self.0
            .get((n / 64) as usize)
            .is_some_and(|w| w & (1 << (n % 64)) != 0)
    }
}

/// How many chunk ids marking remembers having just looked up (then it forgets them all):
/// a snapshot mostly references what the one before it did. 8 MB.
const RECENT: usize = 200_000;

/// How many chunk ids marking looks up at once: sorted, a batch reads each block of the
/// on-disk records and each pack's records once, not once a reference. 6 MB of ids.
const BATCH: usize = 200_000;

/// Marks every copy of every chunk a snapshot references, streaming each manifest.
fn mark_used(
    repo: &Repository,
    index: &Index,
    snapshots: &[custos_repo::Snapshot],
    progress: &dyn Progress,
) -> Result<Used> {
    let mut used = Used::new(index.copies());
    let mut recent: HashSet<ChunkId> = HashSet::with_capacity(RECENT);
    let mut spans = custos_repo::index::disk::Spans::default();
    let mut batch: Vec<ChunkId> = Vec::with_capacity(BATCH);
    let mut mark = |batch: &mut Vec<ChunkId>, used: &mut Used| -> Result<()> {
        index
            .copy_numbers_many(batch, &mut spans)?
            .into_iter()
            .for_each(|n| used.set(n));
        batch.clear();
        Ok(())
    };
    let mut failed = None;
    progress.start("read snapshots", Some(snapshots.len() as u64));
    for s in snapshots {
        // Any unreadable snapshot stops prune: deleting on incomplete knowledge loses data.
        crate::manifest::for_each_reference(repo, index, &s.id, &mut |id| {
            if failed.is_some() {
                return;
            }
            if recent.len() >= RECENT {
                recent.clear();
            }
            if recent.insert(id) {
                batch.push(id);
                if batch.len() >= BATCH {
                    if let Err(e) = mark(&mut batch, &mut used) {
                        failed = Some(e);
                    }
                }
            }
        })
        .map_err(|e| e.context(format!("prune cannot read snapshot {}", s.id.short())))?;
        if let Some(e) = failed.take() {
            return Err(e);
        }
        progress.add(1);
    }
    mark(&mut batch, &mut used)?;
    progress.finish();
    Ok(used)
}

pub fn plan(repo: &Repository, index: &Index, progress: &dyn Progress) -> Result<PrunePlan> {
    let snapshots = repo.snapshots()?;
    let used = mark_used(repo, index, &snapshots, progress)?;
    let mut p = PrunePlan {
        snapshots: snapshots.len() as u64,
        packs: index.pack_count() as u64,
        index_files: index.files.clone(),
        ..Default::default()
    };
    // Pack by pack from the index's own order: only one pack's blobs at a time.
    for pos in 0..index.pack_count() as u32 {
        let (first, blobs) = index.pack_copies(pos);
        let pack = index.pack_at(pos);
        let (mut n_used, mut unused_bytes) = (0u64, 0u64);
        for (i, (id, l)) in blobs.iter().enumerate() {
            // A copy a restore key found damaged serves nothing: it counts as unused.
            if used.get(first + i as u64) && !index.is_bad(id, l) {
                n_used += 1;
            } else {
                unused_bytes += u64::from(l.length);
            }
        }
        p.chunks_used += n_used;
        p.chunks_unused += blobs.len() as u64 - n_used;
        if n_used == 0 {
            p.packs_delete.push(pack.id);
            p.bytes_freed_estimate += pack.size;
        } else if unused_bytes as f64 > MAX_UNUSED * pack.size as f64 {
            p.packs_repack.push(pack.id);
            p.bytes_freed_estimate += unused_bytes;
        }
    }
    for shard in &paths::data_listings(index.pack_count()) {
        for e in repo.storage.list(shard)? {
            if let Some(id) = paths::id_of(&e.path) {
                if index.pack_pos_of(&PackId(id)).is_none() {
                    p.packs_unindexed.push(PackId(id));
                    p.bytes_freed_estimate += e.size;
                }
            }
        }
    }
    p.temp_files = repo
        .storage
        .list(custos_storage::local::TEMP_DIR)?
        .into_iter()
        .map(|e| e.path)
        .collect();
    p.packs_delete.sort();
    p.packs_repack.sort();
    p.packs_unindexed.sort();
    p.used = used;
    let (wal, wal_bytes) = wal_to_delete(repo, &snapshots)?;
    p.wal_delete = wal;
    p.wal_bytes = wal_bytes;
    p.bytes_freed_estimate += wal_bytes;
    if repo.storage.object_lock().is_some() {
        hold_locked(repo, index, &mut p)?;
    }
    Ok(p)
}

/// Which of `paths` the store holds past `now`, each recorded in `out` with its date.
fn held(
    repo: &Repository,
    now: chrono::DateTime<chrono::Utc>,
    out: &mut Vec<Held>,
    paths: Vec<String>,
) -> Result<HashSet<String>> {
    let dates = custos_repo::repository::parallel_map(&paths, repo.threads() * 2, |x| {
        super::lock::held_until(repo, x, now)
    })?;
    let mut set = HashSet::new();
    for (x, d) in paths.into_iter().zip(dates) {
        if let Some(until) = d {
            out.push(Held {
                path: x.clone(),
                until,
            });
            set.insert(x);
        }
    }
    Ok(set)
}

/// The packs named by those of `files` whose paths are in `held` (Object Lock keeps those
/// index objects, so the packs they name must stay).
fn packs_named_by(
    index: &Index,
    files: &[IndexId],
    held: &HashSet<String>,
) -> Result<HashSet<PackId>> {
    if held.is_empty() {
        return Ok(HashSet::new());
    }
    let file_packs = index.file_packs()?;
    Ok(files
        .iter()
        .filter(|f| held.contains(&paths::index(f)))
        .flat_map(|f| file_packs.get(f).into_iter().flatten().copied())
        .collect())
}

/// Object Lock: takes out of the plan whatever the store holds until a later date. An
/// index object that must stay keeps the packs it names (the index is the union of its
/// objects: a pack it names must exist), so those are not deleted or repacked either.
fn hold_locked(repo: &Repository, index: &Index, p: &mut PrunePlan) -> Result<()> {
    let now = chrono::Utc::now();
    let index_held = held(
        repo,
        now,
        &mut p.held,
        p.index_files.iter().map(paths::index).collect(),
    )?;
    let pinned = packs_named_by(index, &p.index_files, &index_held)?;
    let candidates: Vec<String> = p
        .packs_delete
        .iter()
        .chain(&p.packs_repack)
        .chain(&p.packs_unindexed)
        .filter(|x| !pinned.contains(x))
        .map(paths::pack)
        .collect();
    let packs_held = held(repo, now, &mut p.held, candidates)?;
    let stays = |x: &PackId| pinned.contains(x) || packs_held.contains(&paths::pack(x));
    let freed = |v: &[PackId]| -> u64 {
        v.iter()
            .filter(|x| stays(x))
            .map(|x| index.pack(x).map(|m| m.size).unwrap_or(0))
            .sum()
    };
    p.bytes_freed_estimate = p
        .bytes_freed_estimate
        .saturating_sub(freed(&p.packs_delete) + freed(&p.packs_repack));
    p.packs_delete.retain(|x| !stays(x));
    p.packs_repack.retain(|x| !stays(x));
    p.packs_unindexed.retain(|x| !stays(x));
    p.held_index = index_held;
    let wal_held = held(repo, now, &mut p.held, p.wal_delete.clone())?;
    p.wal_delete.retain(|w| !wal_held.contains(w));
    p.held.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(())
}

/// Computes the plan under the exclusive lock and, unless `dry_run`, carries it out.
pub fn prune(
    repo: &Repository,
    dry_run: bool,
    progress: &dyn Progress,
) -> Result<(PrunePlan, Option<PruneReport>)> {
    if dry_run {
        repo.require_restore("prune")?;
    } else {
        repo.require_delete("prune")?;
    }
    let _lock = repo.lock(!dry_run, "prune")?;
    // What prune deletes is decided from the repository alone, never from a host's cache.
    let index = repo.load_index_fresh()?;
    let plan = plan(repo, &index, progress)?;
    if dry_run || plan.is_empty() {
        return Ok((plan, None));
    }
    let report = execute(repo, &index, &plan, progress)?;
    Ok((plan, Some(report)))
}

/// Writes the index objects naming every pack of `index` at the positions `keep` allows,
/// then `extra`: one pack at a time, never the whole index in memory.
fn write_index_of(
    repo: &Repository,
    index: &Index,
    keep: impl Fn(u32, &PackId) -> bool,
    extra: Vec<custos_repo::index::IndexPack>,
) -> Result<Vec<IndexId>> {
    let mut w = repo.index_objects();
    for pos in 0..index.pack_count() as u32 {
        if !keep(pos, &index.pack_at(pos).id) {
            continue;
        }
        let (p, bad) = index.encode_pack(pos);
        w.push(p, bad)?;
    }
    for p in extra {
        w.push(p, vec![])?;
    }
    w.finish(vec![])
}

fn execute(
    repo: &Repository,
    index: &Index,
    plan: &PrunePlan,
    progress: &dyn Progress,
) -> Result<PruneReport> {
    let mut report = PruneReport::default();
    // The packs that go, by position.
    let mut dropped = vec![false; index.pack_count()];
    for p in plan.packs_delete.iter().chain(&plan.packs_repack) {
        if let Some(pos) = index.pack_pos_of(p) {
            dropped[pos as usize] = true;
        }
    }
    let stays = |l: &custos_repo::BlobLoc| !dropped.get(l.pack as usize).copied().unwrap_or(true);

    // 1. Repack the used chunks of sparse packs into new packs: those with no intact copy
    // in a pack that stays (the writer itself skips what it already wrote).
    let writer = repo.writer(Arc::new(Index::default()));
    progress.start("repack", Some(plan.packs_repack.len() as u64));
    for pack in &plan.packs_repack {
        let Some(pos) = index.pack_pos_of(pack) else {
            continue;
        };
        let (first, blobs) = index.pack_copies(pos);
        for (i, (id, loc)) in blobs.iter().enumerate() {
            if !plan.used.get(first + i as u64) || index.is_bad(id, loc) {
                continue;
            }
            let kept_elsewhere = index
                .locations(id)
                .iter()
                .any(|(_, l)| stays(l) && !index.is_bad(id, l));
            if kept_elsewhere {
                continue;
            }
            let data = repo.read_blob(index, id)?;
            if writer.add(*id, loc.kind, data)? {
                report.chunks_repacked += 1;
            }
        }
        progress.add(1);
    }
    progress.finish();
    let (new_packs, ws) = writer.finish()?;
    report.packs_written = ws.packs;

    // 2. New index objects naming every pack that stays (with who wrote it, what a restore
    // key vouched for, and the damaged copies it holds) but those a held index object
    // names (they stay named there); 3. then the old index objects go.
    let in_held = packs_named_by(index, &plan.index_files, &plan.held_index)?;
    let me = repo.signing_public().map(hex::encode);
    let new_packs = new_packs
        .into_iter()
        .map(|mut p| {
            // Repacked blobs were each read and checked against their ids.
            p.writer = me.clone();
            p.vouched = true;
            p
        })
        .collect();
    let new_index = write_index_of(
        repo,
        index,
        |pos, id| !dropped[pos as usize] && !in_held.contains(id),
        new_packs,
    )?;
    let new_index: HashSet<IndexId> = new_index.into_iter().collect();
    for old in &plan.index_files {
        if !new_index.contains(old) && !plan.held_index.contains(&paths::index(old)) {
            repo.storage.delete(&paths::index(old))?;
        }
    }
    // 4. Only now delete packs that no index names.
    for pack in plan
        .packs_delete
        .iter()
        .chain(&plan.packs_repack)
        .chain(&plan.packs_unindexed)
    {
        let size = repo.storage.size(&paths::pack(pack))?.unwrap_or(0);
        repo.storage.delete(&paths::pack(pack))?;
        report.packs_deleted += 1;
        report.bytes_deleted += size;
    }
    for t in &plan.temp_files {
        repo.storage.delete(t)?;
    }
    for w in &plan.wal_delete {
        repo.storage.delete(w)?;
        report.wal_deleted += 1;
    }
    Ok(report)
}

/// What `index compact` did.
#[derive(Debug, Default, Serialize)]
pub struct CompactReport {
    /// Index objects before and after.
    pub objects_before: usize,
    pub objects_after: usize,
    /// Objects Object Lock keeps: left as they are (their packs stay named by them).
    pub held: usize,
    pub packs: usize,
}

/// `index compact`: rewrites the index objects as few objects of bounded size, so that a
/// command (and a new host's first build of the on-disk index) reads a number of objects
/// that grows with the repository's size, not with the number of backups ever taken.
/// Under the exclusive lock, with a key that may delete; the authority signs the new
/// objects and carries over who wrote each pack, what was vouched for and damaged copies.
pub fn compact_index(repo: &Repository) -> Result<CompactReport> {
    repo.require_delete("compact the index")?;
    let _lock = repo.lock(true, "index compact")?;
    let index = repo.load_index_fresh()?;
    let mut r = CompactReport {
        objects_before: index.files.len(),
        packs: index.pack_count(),
        ..Default::default()
    };
    let held_paths = held(
        repo,
        chrono::Utc::now(),
        &mut vec![],
        index.files.iter().map(paths::index).collect(),
    )?;
    r.held = held_paths.len();
    let movable: Vec<_> = index
        .files
        .iter()
        .filter(|f| !held_paths.contains(&paths::index(f)))
        .copied()
        .collect();
    let in_held = packs_named_by(&index, &index.files, &held_paths)?;
    let held_copies: u64 = in_held
        .iter()
        .filter_map(|p| index.pack_pos_of(p))
        .map(|pos| index.pack_copies(pos).1.len() as u64)
        .sum();
    let blobs = index.copies() - held_copies;
    let needed =
        (blobs.div_ceil(custos_repo::repository::INDEX_OBJECT_BLOBS as u64) as usize).max(1);
    if movable.len() <= needed {
        r.objects_after = r.objects_before;
        return Ok(r);
    }
    // New objects first, then the old ones go: an interruption leaves packs listed twice,
    // never a pack listed nowhere.
    let written = write_index_of(repo, &index, |_, id| !in_held.contains(id), vec![])?;
    for old in &movable {
        if !written.contains(old) {
            repo.storage.delete(&paths::index(old))?;
        }
    }
    r.objects_after = written.len() + r.held;
    Ok(r)
}

/// What `index rebuild` did.
#[derive(Debug, Default, Serialize)]
pub struct RebuildReport {
    /// Index objects that could not be read (altered, cut, not decryptable), removed.
    pub damaged: Vec<String>,
    /// Packs no readable index object named, indexed again from their headers.
    pub packs_recovered: u64,
    pub chunks_recovered: u64,
    /// Packs whose own header cannot be read: left for `prune` (nothing can use them).
    pub packs_unreadable: Vec<String>,
    pub objects_written: usize,
}

/// `index rebuild`: the repair for a damaged or missing index object. Under the exclusive
/// lock (no backup is between writing its packs and its index), with a key that may
/// delete: every index object is read; the packs no readable object names are indexed
/// again from their own headers, in new objects signed by the authority (first), then the
/// damaged objects are removed. A recovered pack is nobody's: backups do not deduplicate
/// against it until `verify --read-data` vouches for it, and every read checks each chunk
/// against its id, so a pack planted by a backup key gains nothing.
pub fn rebuild_index(repo: &Repository, progress: &dyn Progress) -> Result<RebuildReport> {
    repo.require_delete("rebuild the index")?;
    let _lock = repo.lock(true, "index rebuild")?;
    let mut r = RebuildReport::default();
    let mut named: HashSet<PackId> = HashSet::new();
    for e in repo.storage.list(paths::INDEX)? {
        match repo.read_index_object(&e.path) {
            Ok((_, f)) => named.extend(f.packs.iter().map(|p| p.id)),
            Err(err) if err.kind == custos_model::Kind::Integrity => {
                tracing::warn!("{}: {}", e.path, err.message);
                r.damaged.push(e.path);
            }
            Err(err) => return Err(err),
        }
    }
    let orphans: Vec<(PackId, u64)> = repo
        .storage
        .list(paths::DATA)?
        .into_iter()
        .filter_map(|e| Some((PackId(paths::id_of(&e.path)?), e.size)))
        .filter(|(id, _)| !named.contains(id))
        .collect();
    progress.start("read pack headers", Some(orphans.len() as u64));
    let read =
        custos_repo::repository::parallel_map(&orphans, repo.threads() * 2, |(id, size)| {
            Ok((*id, *size, repo.pack_header(id, *size)))
        })?;
    progress.finish();
    let mut content = custos_repo::index::IndexFile::default();
    for (id, size, header) in read {
        match header {
            Ok((blobs, key)) => {
                r.packs_recovered += 1;
                r.chunks_recovered += blobs.len() as u64;
                content.packs.push(custos_repo::index::IndexPack {
                    id,
                    size,
                    key,
                    blobs,
                    writer: None,
                    vouched: false,
                });
            }
            Err(e) if e.kind == custos_model::Kind::Integrity => {
                tracing::warn!("{}", e.message);
                r.packs_unreadable.push(paths::pack(&id));
            }
            Err(e) => return Err(e),
        }
    }
    if !content.packs.is_empty() {
        r.objects_written = repo.write_index_files(content)?.len();
    }
    for d in &r.damaged {
        repo.storage.delete(d)?;
    }
    r.packs_unreadable.sort();
    Ok(r)
}
