//! Verification: structure (every referenced chunk is indexed, every indexed pack exists
//! with the indexed size, every snapshot authenticates) and content. With a restore key,
//! a sample of the blobs no restore key has checked yet is decrypted and checked against
//! its id on every run, because a backup key can store any bytes under any id (format.md
//! 5.1); with `--read-data`, every selected pack is re-hashed and (restore key) every blob
//! of it checked.
//!
//! What a restore key finds is recorded for every writer: one index object signed by the
//! repository's authority vouches for the packs whose every blob was right (backups of
//! every key then deduplicate against them) and names the damaged copies (no backup
//! deduplicates against those: the next one stores the chunk again, and readers read
//! another copy). Nothing else is changed.

use std::collections::HashSet;

use custos_model::{ChunkId, Error, Id, PackId, Result};
use custos_repo::{pack, paths, Repository};
use serde::Serialize;

use crate::progress::Progress;

/// How many checked chunk ids `verify` remembers before it starts over (~50 MB).
const CHECKED_MAX: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyReport {
    pub snapshots: u64,
    /// Archived WAL files checked (all with --read-data, else layout only).
    pub wal_files: u64,
    /// Operation-trail entries read back, authenticated and chained.
    pub trail_entries: u64,
    pub packs: u64,
    pub packs_read: u64,
    pub chunks_read: u64,
    pub bytes_read: u64,
    /// Whether blob contents were decrypted (restore role) or only pack hashes checked.
    pub decrypted: bool,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    /// Keys past the crypto-period (also among the warnings).
    pub key_findings: Vec<String>,
    /// Blobs of packs no restore key had vouched for, checked on this run (restore key).
    pub sampled: u64,
    /// Packs this run vouched for: every blob read and right.
    pub vouched: u64,
    /// Copies of chunks found damaged (recorded: backups store these chunks again).
    pub damaged: Vec<String>,
    /// The snapshots proven restorable: every pack read whole and every blob decrypted
    /// and right (a full `--read-data` with a restore key and no error). Its trail entry
    /// names them; `forget` never removes the newest of each source (retention interlock).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub verified: Vec<custos_model::SnapshotId>,
}

/// Blobs of packs nobody vouched for that a verification without `--read-data` checks.
pub const SAMPLE: usize = 64;

pub struct VerifyOptions<'a> {
    pub read_data: bool,
    /// Fraction of packs to read (0 < f <= 1).
    pub subset: f64,
    pub progress: &'a dyn Progress,
    /// The crypto-period: keys older than this are reported.
    pub key_max_age: std::time::Duration,
    /// Record what was read whole (vouched packs, damaged copies) in the index. Off on a
    /// secondary, which only `copy` writes: the primary's verify records it, and copy
    /// brings the record.
    pub record: bool,
    /// A secondary: its trail is the primary's as of the last `copy`, while wal-push
    /// writes WAL objects (anchored in the primary's trail) to it at once. A WAL anchor
    /// past its trail's end is expected there; other bytes under its number are not.
    pub trail_may_lag: bool,
}

pub fn verify(repo: &Repository, opts: &VerifyOptions) -> Result<VerifyReport> {
    let _lock = repo.lock(false, "verify")?;
    let mut r = VerifyReport {
        decrypted: repo.keys.secret.is_some(),
        ..Default::default()
    };
    // Keys past the crypto-period: reported, never fatal.
    for k in crate::keys::ages(repo, opts.key_max_age, chrono::Utc::now())? {
        if let Some(f) = k.finding(opts.key_max_age) {
            r.warnings.push(f.clone());
            r.key_findings.push(f);
        }
    }
    // A damaged key file is found now, not on the day its password is needed.
    let (_, damaged_keys) = Repository::key_files_and_damage(&repo.storage)?;
    for (p, why) in damaged_keys {
        r.errors.push(format!("key file {p} is damaged ({why})"));
    }
    // A key generation or re-wrap table that does not verify was planted (or damaged).
    for p in &repo.keyring_problems() {
        r.errors.push(format!("keyring: {p}"));
    }
    // A repository readable by other local users is a finding, whatever its encryption.
    for f in repo.storage.permission_findings()? {
        r.errors.push(format!("permissions: {f}"));
    }
    // A damaged index object is reported and left out: the rest is still checked (the
    // packs it named show as unindexed, the snapshots that need them as such).
    let index = match repo.load_index_for_verify() {
        Ok((i, skipped)) => {
            for p in &skipped {
                r.errors.push(format!(
                    "index: {p} (`custos index rebuild` indexes its packs again from their headers)"
                ));
            }
            i
        }
        Err(e) => {
            r.errors.push(format!("index: {}", e.message));
            return Ok(r);
        }
    };
    r.packs = index.pack_count() as u64;
    // Which indexed packs are stored, by position: a bit each, not a map of every stored
    // pack (3 million at 100M chunks). A large repository is listed one shard at a time.
    let mut stored = vec![false; index.pack_count()];
    let mut unindexed = 0usize;
    for shard in &paths::data_listings(index.pack_count()) {
        for e in repo.storage.list(shard)? {
            let Some(id) = paths::id_of(&e.path).map(PackId) else {
                continue;
            };
            match index.pack_pos_of(&id) {
                None => unindexed += 1,
                Some(pos) => {
                    stored[pos as usize] = true;
                    let p = index.pack_at(pos);
                    if p.size != e.size {
                        r.errors.push(format!(
                            "pack {} has {} bytes in storage, the index says {}",
                            p.id, e.size, p.size
                        ));
                    }
                }
            }
        }
    }
    for (pos, _) in stored.iter().enumerate().filter(|(_, s)| !**s) {
        r.errors.push(format!(
            "pack {} is in the index but missing from storage",
            index.pack_at(pos as u32).id
        ));
    }
    if index.damaged_copies() > 0 {
        r.warnings.push(format!(
            "{} damaged cop(ies) of chunks are recorded: readers use other copies, backups store those chunks again, and `custos prune` removes them",
            index.damaged_copies()
        ));
    }
    if unindexed > 0 {
        r.warnings.push(format!("{unindexed} pack(s) are not in the index (left by an interrupted run, or named by an index object that is gone: `custos index rebuild` indexes them again, `custos prune` removes what no snapshot needs)"));
    }

    // Each snapshot that does not decode is named, and the rest are still checked.
    let (snapshots, damaged) = repo.snapshots_in_storage()?;
    r.errors
        .extend(damaged.iter().map(|(_, e)| e.message.clone()));
    r.snapshots = snapshots.len() as u64;
    if repo.keys.secret.is_some() {
        // Chunks checked already (snapshots share most of theirs), forgotten when the set
        // holds a million: memory stays bounded, and a chunk checked again costs a lookup.
        let mut checked: HashSet<ChunkId> = HashSet::new();
        // Problems found, each reported once (few: not bounded by the cap).
        let mut reported: HashSet<(bool, ChunkId)> = HashSet::new();
        for s in &snapshots {
            let refs = match crate::manifest::referenced_chunks(repo, &index, &s.id) {
                Ok(r) => r,
                Err(e) => {
                    r.errors.push(format!("snapshot {}: {}", s.id, e.message));
                    continue;
                }
            };
            for id in refs {
                if checked.len() >= CHECKED_MAX {
                    checked.clear();
                }
                if !checked.insert(id) {
                    continue;
                }
                let missing = !index.contains(&id);
                if (missing || !index.holds_intact(&id)) && !reported.insert((missing, id)) {
                    continue;
                }
                if missing {
                    r.errors.push(format!(
                        "snapshot {} references chunk {} which is not in the index",
                        s.id, id
                    ));
                } else if !index.holds_intact(&id) {
                    r.errors.push(format!(
                        "snapshot {} references chunk {} whose every stored copy is damaged",
                        s.id, id
                    ));
                }
            }
        }
    } else {
        r.warnings.push(
            "backup-role key: snapshot contents were not checked (they need a restore key)".into(),
        );
    }

    // WAL continuity, offline: every backup must find the WAL it needs, and the archive
    // must have no hole after the oldest backup's start (a hole caps how far every older
    // backup can be recovered).
    let backups: Vec<&custos_repo::snapshot::PgInfo> = snapshots
        .iter()
        .filter_map(|s| s.summary.pg.as_ref())
        .collect();
    let wal = repo.wal_objects()?;
    let archives = crate::postgres::archive::archives(repo, backups.iter().copied(), &wal)?;
    for (sys, a) in &archives {
        let mine: Vec<_> = snapshots
            .iter()
            .filter(|s| s.summary.pg.as_ref().is_some_and(|p| p.system_id == *sys))
            .collect();
        for s in &mine {
            let p = s.summary.pg.as_ref().expect("filtered");
            let w = a.window(repo, p)?;
            if !w.missing.is_empty() {
                r.errors.push(format!(
                    "snapshot {}: WAL it needs to become consistent is missing: {}",
                    s.id,
                    w.missing.join(", ")
                ));
            }
        }
        // From where the oldest backup needs the archive (past its own WAL, if it holds it).
        let needed_from = |p: &custos_repo::snapshot::PgInfo| {
            let lsn = if p.wal_included {
                custos_model::Lsn(p.stop_lsn.0.saturating_sub(1))
            } else {
                p.start_lsn
            };
            lsn.segment(a.segment_size)
        };
        if let Some(oldest) = mine
            .iter()
            .filter_map(|s| s.summary.pg.as_ref())
            .min_by_key(|p| needed_from(p))
        {
            for g in a.gaps(oldest.timeline, needed_from(oldest)) {
                r.errors.push(format!(
                    "WAL archive of cluster {sys}: {g} is missing; no backup taken before it can be recovered past it"
                ));
            }
        }
    }

    // Archived WAL: layout and label of every object; with --read-data and a restore key,
    // decrypted and checked against its digest.
    let decrypt = opts.read_data && repo.keys.secret.is_some();
    let checks =
        custos_repo::repository::parallel_map(&wal, repo.threads() + 1, |(sys, name, size)| {
            Ok(repo
                .wal_check(*sys, name, *size, decrypt)
                .map_err(|e| format!("wal {sys:016x}/{name}: {}", e.message)))
        })?;
    r.wal_files = wal.len() as u64;
    // The trail heads the WAL objects' labels record (format.md 11.1), checked with the
    // trail below.
    let mut wal_anchors = vec![];
    for (c, (sys, name, _)) in checks.into_iter().zip(&wal) {
        match c {
            Ok(Some(a)) => wal_anchors.push((format!("wal {sys:016x}/{name}"), a)),
            Ok(None) => {}
            Err(e) => r.errors.push(e),
        }
    }

    let restore_key = repo.keys.secret.is_some();
    // What this run found: per pack, whether every blob was read and right; damaged copies.
    let mut read_whole: std::collections::HashSet<PackId> = Default::default();
    let mut damaged: Vec<(PackId, ChunkId)> = vec![];
    if opts.read_data {
        // Positions (4 bytes a pack), each pack's description read when its turn comes.
        let mut packs: Vec<u32> = (0..index.pack_count() as u32)
            .filter(|pos| stored[*pos as usize])
            .collect();
        if opts.subset < 1.0 {
            use rand::seq::SliceRandom;
            packs.shuffle(&mut rand::rng());
            let n = ((packs.len() as f64) * opts.subset).ceil() as usize;
            packs.truncate(n.max(1).min(packs.len()));
        }
        opts.progress.start(
            "verify",
            Some(packs.iter().map(|p| index.pack_at(*p).size).sum()),
        );
        for batch in packs.chunks(1024) {
            let batch: Vec<custos_repo::index::PackMeta> =
                batch.iter().map(|p| index.pack_at(*p)).collect();
            let results = custos_repo::repository::parallel_map(
                &batch,
                repo.threads() + 1,
                |p| -> Result<Checked> {
                    // No more than the indexed size and a byte: a pack that storage
                    // holds larger is already reported above, and is not read whole.
                    let bytes = match repo.storage.get_prefix(&paths::pack(&p.id), p.size + 1) {
                        Ok(b) if b.len() as u64 > p.size => {
                            return Ok(Checked {
                                errors: vec![format!(
                                    "pack {}: larger in storage than indexed ({} bytes): not read",
                                    p.id, p.size
                                )],
                                ..Default::default()
                            })
                        }
                        Ok(b) => b,
                        Err(e) => {
                            return Ok(Checked {
                                errors: vec![format!("pack {}: {}", p.id, e.message)],
                                ..Default::default()
                            })
                        }
                    };
                    opts.progress.add(bytes.len() as u64);
                    // Copies already recorded as damaged are not reported again.
                    let all = index.blobs_of(&p.id);
                    let blobs: Vec<_> = all
                        .iter()
                        .filter(|(id, l)| !index.is_bad(id, l))
                        .copied()
                        .collect();
                    let known = blobs.len() < all.len();
                    Ok(check_pack(repo, p, &bytes, &blobs, known))
                },
            )?;
            for (p, c) in batch.iter().zip(results) {
                r.packs_read += 1;
                r.bytes_read += p.size;
                r.chunks_read += c.good;
                if restore_key && c.errors.is_empty() {
                    read_whole.insert(p.id);
                }
                r.errors.extend(c.errors);
                damaged.extend(c.damaged.into_iter().map(|id| (p.id, id)));
            }
        }
        opts.progress.finish();
    } else if restore_key {
        // A sample of what no restore key has checked: blobs a backup key stored.
        use rand::seq::SliceRandom;
        // A uniform sample (reservoir), pack by pack: memory does not grow with the index.
        let mut unchecked: Vec<(PackId, ChunkId, custos_repo::BlobLoc)> = vec![];
        let mut seen = 0usize;
        for (pos, m) in index.packs().enumerate() {
            if m.vouched || !stored[pos] {
                continue;
            }
            for (id, l) in index.blobs_of(&m.id) {
                if index.is_bad(&id, &l) {
                    continue;
                }
                seen += 1;
                if unchecked.len() < SAMPLE {
                    unchecked.push((m.id, id, l));
                } else {
                    let j = rand::Rng::random_range(&mut rand::rng(), 0..seen);
                    if j < SAMPLE {
                        unchecked[j] = (m.id, id, l);
                    }
                }
            }
        }
        unchecked.shuffle(&mut rand::rng());
        let results = custos_repo::repository::parallel_map(
            &unchecked,
            repo.threads() * 2,
            |(pack, id, loc)| -> Result<Option<String>> {
                let meta = index.pack(pack).expect("from the index");
                let checked = repo.pack_key(&meta).and_then(|dek| {
                    let sealed = repo.storage.get_range(
                        &paths::pack(pack),
                        u64::from(loc.offset),
                        u64::from(loc.length),
                    )?;
                    pack::open_blob(&dek, &repo.keys.id_key, id, loc, &sealed)
                });
                Ok(match checked {
                    Ok(_) => None,
                    Err(e) if e.kind == custos_model::Kind::Integrity => Some(e.message),
                    Err(e) => return Err(e),
                })
            },
        )?;
        r.sampled = unchecked.len() as u64;
        for ((pack, id, _), bad) in unchecked.iter().zip(results) {
            if let Some(m) = bad {
                r.errors.push(format!("pack {pack}: {m}"));
                damaged.push((*pack, *id));
            }
        }
    }
    if restore_key {
        let unvouched = index
            .packs()
            .filter(|p| !p.vouched && !read_whole.contains(&p.id))
            .count();
        if unvouched > 0 {
            r.warnings.push(format!(
                "{unvouched} pack(s) were written by backup keys and not yet read whole by a restore key: each host deduplicates only against its own until `custos verify --read-data` vouches for them"
            ));
        }
        r.vouched = attest(repo, &index, &read_whole, &damaged, &mut r, opts.record)?;
    }
    let whole = opts.read_data && opts.subset >= 1.0 && restore_key;
    // The application's audit-log exports: every chain complete (and, read with a
    // restore key under --read-data, every export's rows those its hash names).
    if snapshots
        .iter()
        .any(|s| s.summary.kind == custos_repo::snapshot::SourceKind::AuditLog)
    {
        let floors = crate::maintenance::forget::MinRetention::default();
        let chains = crate::tables::audit::verify_chains(
            repo,
            None,
            opts.read_data && restore_key,
            floors.audit_log_default,
            chrono::Utc::now(),
        )?;
        for c in chains {
            for p in c.problems {
                r.errors.push(format!("audit-log {}: {p}", c.chain));
            }
        }
    }
    // The operation trail (format.md 11), with or without --read-data: every entry read
    // back whole, authenticated, chained and signed; every snapshot's anchor still in it.
    match repo.trail_verify() {
        Ok(read) => {
            r.trail_entries = read.len() as u64;
            for t in &read {
                for p in &t.problems {
                    r.errors.push(format!("trail entry {}: {p}", t.seq));
                }
            }
            for p in repo.trail_anchor_problems(&read, &wal_anchors, opts.trail_may_lag)? {
                r.errors.push(format!("trail: {p}"));
            }
        }
        Err(e) => r.errors.push(format!("trail: {}", e.message)),
    }
    if whole && r.errors.is_empty() && r.damaged.is_empty() {
        r.verified = snapshots.iter().map(|s| s.id).collect();
    }
    Ok(r)
}

/// Records, signed by the repository's authority, the packs read whole and found right
/// that no restore key had vouched for, and the damaged copies not yet known. Returns the
/// number of packs newly vouched for.
fn attest(
    repo: &Repository,
    index: &custos_repo::Index,
    read_whole: &std::collections::HashSet<PackId>,
    damaged: &[(PackId, ChunkId)],
    r: &mut VerifyReport,
    record: bool,
) -> Result<u64> {
    let new: std::collections::HashSet<PackId> = read_whole
        .iter()
        .filter(|p| index.pack(p).is_some_and(|m| !m.vouched))
        .copied()
        .collect();
    let bad: Vec<(PackId, ChunkId)> = damaged
        .iter()
        .filter(|(p, c)| {
            index
                .locations(c)
                .iter()
                .any(|(m, l)| m.id == *p && !index.is_bad(c, l))
        })
        .copied()
        .collect();
    r.damaged = bad
        .iter()
        .map(|(p, c)| format!("chunk {c} in pack {p}"))
        .collect();
    if new.is_empty() && bad.is_empty() || repo.keys.authority.is_none() || !record {
        return Ok(0);
    }
    // Written as they are encoded: a first `--read-data` may vouch for every pack.
    let mut positions: Vec<u32> = new.iter().filter_map(|p| index.pack_pos_of(p)).collect();
    positions.sort_unstable();
    let mut w = repo.index_objects();
    for pos in positions {
        let (mut p, _) = index.encode_pack(pos);
        p.vouched = true;
        w.push(p, vec![])?;
    }
    w.finish(bad)?;
    Ok(new.len() as u64)
}

/// What reading one pack found.
#[derive(Default)]
struct Checked {
    errors: Vec<String>,
    /// Chunks whose copy in this pack is damaged.
    damaged: Vec<ChunkId>,
    good: u64,
}

fn check_pack(
    repo: &Repository,
    p: &custos_repo::index::PackMeta,
    bytes: &[u8],
    blobs: &[(ChunkId, custos_repo::BlobLoc)],
    known_damaged: bool,
) -> Checked {
    let mut c = Checked::default();
    // A pack with copies recorded as damaged does not match its hash either (when the
    // damage came later): that is already known.
    if Id::of_bytes(bytes) != p.id.0 && !known_damaged {
        c.errors.push(format!(
            "pack {} does not match its hash: its content was altered or damaged",
            p.id
        ));
        // Each blob is still checked on its own: the intact ones are fine, and the
        // damaged ones are recorded so that the next backup stores them again.
    }
    let header = match pack::parse_trailer(bytes, &format!("pack {}", p.id)) {
        Ok((header, wrapped)) => {
            // After `key rotate --rewrap` the index holds the key re-wrapped to the new
            // pair and the trailer the original: opening the header with the index's key
            // (below, restore keys) proves it is the right one.
            if wrapped != p.key && repo.keys.generation == 0 {
                c.errors.push(format!(
                    "pack {}: its data key differs from the index",
                    p.id
                ));
            }
            Some(header)
        }
        Err(e) => {
            c.errors.push(e.message);
            None
        }
    };
    if repo.keys.secret.is_none() {
        return c;
    }
    let dek = match repo.pack_key(p) {
        Ok(k) => k,
        Err(e) => {
            c.errors.push(format!("pack {}: {}", p.id, e.message));
            return c;
        }
    };
    if let Some(header) = header {
        match pack::open_header(&dek, &bytes[header], &format!("pack {}", p.id)) {
            Ok(entries) => {
                let listed: HashSet<ChunkId> = entries.iter().map(|e| e.id).collect();
                for (id, _) in blobs {
                    if !listed.contains(id) {
                        c.errors.push(format!(
                            "pack {}: chunk {} is indexed but not in the pack header",
                            p.id, id
                        ));
                    }
                }
            }
            Err(e) => c.errors.push(e.message),
        }
    }
    for (id, loc) in blobs {
        let Some(sealed) = bytes.get(loc.range()) else {
            c.errors
                .push(format!("pack {}: chunk {} lies past the end", p.id, id));
            c.damaged.push(*id);
            continue;
        };
        match pack::open_blob(&dek, &repo.keys.id_key, id, loc, sealed) {
            Ok(_) => c.good += 1,
            Err(e) => {
                c.errors.push(format!("pack {}: {}", p.id, e.message));
                c.damaged.push(*id);
            }
        }
    }
    c
}

pub fn integrity_error(r: &VerifyReport) -> Option<Error> {
    if r.errors.is_empty() {
        return None;
    }
    Some(Error::integrity(format!(
        "verification found {} problem(s); first: {}",
        r.errors.len(),
        r.errors[0]
    )))
}
