//! Verification: structure (every referenced chunk is indexed, every indexed pack exists
//! with the indexed size, every snapshot authenticates) and, with `--read-data`, content
//! (every selected pack re-hashed; with a restore key every blob decrypted and checked
//! against its id). Verification never changes the repository.

use std::collections::{HashMap, HashSet};

use custos_model::{ChunkId, Error, Id, PackId, Result};
use custos_repo::{pack, paths, Repository};
use serde::Serialize;

use crate::progress::Progress;

#[derive(Debug, Clone, Serialize, Default)]
pub struct VerifyReport {
    pub snapshots: u64,
    /// Archived WAL files checked (all with --read-data, else layout only).
    pub wal_files: u64,
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
}

pub struct VerifyOptions<'a> {
    pub read_data: bool,
    /// Fraction of packs to read (0 < f <= 1).
    pub subset: f64,
    pub progress: &'a dyn Progress,
    /// The crypto-period: keys older than this are reported.
    pub key_max_age: std::time::Duration,
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
    // A repository readable by other local users is a finding, whatever its encryption.
    for f in repo.storage.permission_findings()? {
        r.errors.push(format!("permissions: {f}"));
    }
    let stored: HashMap<PackId, u64> = repo
        .storage
        .list(paths::DATA)?
        .into_iter()
        .filter_map(|e| paths::id_of(&e.path).map(|id| (PackId(id), e.size)))
        .collect();
    let index = match repo.load_index() {
        Ok(i) => i,
        Err(e) => {
            r.errors.push(format!("index: {}", e.message));
            return Ok(r);
        }
    };
    r.packs = index.packs.len() as u64;
    for p in &index.packs {
        match stored.get(&p.id) {
            None => r.errors.push(format!(
                "pack {} is in the index but missing from storage",
                p.id
            )),
            Some(s) if *s != p.size => r.errors.push(format!(
                "pack {} has {} bytes in storage, the index says {}",
                p.id, s, p.size
            )),
            _ => {}
        }
    }
    let unindexed = stored.keys().filter(|id| index.pack(id).is_none()).count();
    if unindexed > 0 {
        r.warnings.push(format!("{unindexed} pack(s) are not in the index (left by an interrupted run; `custos prune` removes them)"));
    }

    let snapshots = match repo.snapshots() {
        Ok(s) => s,
        Err(e) => {
            r.errors.push(format!("snapshots: {}", e.message));
            return Ok(r);
        }
    };
    r.snapshots = snapshots.len() as u64;
    if repo.keys.secret.is_some() {
        let mut checked: HashSet<ChunkId> = HashSet::new();
        for s in &snapshots {
            let refs = match crate::manifest::referenced_chunks(repo, &index, &s.id) {
                Ok(r) => r,
                Err(e) => {
                    r.errors.push(format!("snapshot {}: {}", s.id, e.message));
                    continue;
                }
            };
            for id in refs {
                if checked.insert(id) && !index.contains(&id) {
                    r.errors.push(format!(
                        "snapshot {} references chunk {} which is not in the index",
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

    // Archived WAL: layout and label of every object; with --read-data and a restore key,
    // decrypted and checked against its digest.
    let wal = repo.wal_objects()?;
    let decrypt = opts.read_data && repo.keys.secret.is_some();
    let checks =
        custos_repo::repository::parallel_map(&wal, repo.threads() + 1, |(sys, name, _)| {
            Ok(repo
                .wal_check(*sys, name, decrypt)
                .err()
                .map(|e| format!("wal {sys:016x}/{name}: {}", e.message)))
        })?;
    r.wal_files = wal.len() as u64;
    r.errors.extend(checks.into_iter().flatten());

    if opts.read_data {
        let mut packs: Vec<&custos_repo::index::PackMeta> = index
            .packs
            .iter()
            .filter(|p| stored.contains_key(&p.id))
            .collect();
        if opts.subset < 1.0 {
            use rand::seq::SliceRandom;
            packs.shuffle(&mut rand::rng());
            let n = ((packs.len() as f64) * opts.subset).ceil() as usize;
            packs.truncate(n.max(1).min(packs.len()));
        }
        let by_pack = index.by_pack();
        opts.progress
            .start("verify", Some(packs.iter().map(|p| p.size).sum()));
        let results = custos_repo::repository::parallel_map(
            &packs,
            repo.threads() + 1,
            |p| -> Result<(Vec<String>, u64)> {
                let bytes = match repo.storage.get(&paths::pack(&p.id)) {
                    Ok(b) => b,
                    Err(e) => return Ok((vec![format!("pack {}: {}", p.id, e.message)], 0)),
                };
                opts.progress.add(bytes.len() as u64);
                Ok(check_pack(repo, p, &bytes, &by_pack[&p.id]))
            },
        )?;
        opts.progress.finish();
        for (p, (errs, n)) in packs.iter().zip(results) {
            r.packs_read += 1;
            r.bytes_read += p.size;
            r.chunks_read += n;
            r.errors.extend(errs);
        }
    }
    Ok(r)
}

fn check_pack(
    repo: &Repository,
    p: &custos_repo::index::PackMeta,
    bytes: &[u8],
    blobs: &[(ChunkId, custos_repo::BlobLoc)],
) -> (Vec<String>, u64) {
    let mut errs = vec![];
    if Id::of_bytes(bytes) != p.id.0 {
        errs.push(format!(
            "pack {} does not match its hash: its content was altered or damaged",
            p.id
        ));
        return (errs, 0);
    }
    let (header, wrapped) = match pack::parse_trailer(bytes, &format!("pack {}", p.id)) {
        Ok(x) => x,
        Err(e) => return (vec![e.message], 0),
    };
    // After `key rotate --rewrap` the index holds the key re-wrapped to the new pair and
    // the trailer the original: opening the header with the index's key (below, restore
    // keys) proves it is the right one.
    if wrapped != p.key && repo.keys.generation == 0 {
        errs.push(format!(
            "pack {}: its data key differs from the index",
            p.id
        ));
    }
    if repo.keys.secret.is_none() {
        return (errs, 0);
    }
    let dek = match repo.pack_key(p) {
        Ok(k) => k,
        Err(e) => return (vec![format!("pack {}: {}", p.id, e.message)], 0),
    };
    match pack::open_header(&dek, &bytes[header], &format!("pack {}", p.id)) {
        Ok(entries) => {
            let listed: HashSet<ChunkId> = entries.iter().map(|e| e.id).collect();
            for (id, _) in blobs {
                if !listed.contains(id) {
                    errs.push(format!(
                        "pack {}: chunk {} is indexed but not in the pack header",
                        p.id, id
                    ));
                }
            }
        }
        Err(e) => errs.push(e.message),
    }
    let mut n = 0;
    for (id, loc) in blobs {
        let Some(sealed) = bytes.get(loc.range()) else {
            errs.push(format!("pack {}: chunk {} lies past the end", p.id, id));
            continue;
        };
        match pack::open_blob(&dek, &repo.keys.id_key, id, loc, sealed) {
            Ok(_) => n += 1,
            Err(e) => errs.push(format!("pack {}: {}", p.id, e.message)),
        }
    }
    (errs, n)
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
