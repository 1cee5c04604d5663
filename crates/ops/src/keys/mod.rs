//! Key ages against the crypto-period (`key_max_age`, 90 days by default, as the seed's
//! security policy asks): each key file (a credential) and the data key pair the
//! repository's data keys are wrapped to. An overdue key is reported, never enforced:
//! backups must keep running.

pub mod iam;

use std::time::Duration;

use chrono::{DateTime, Utc};
use custos_model::{KeyId, Result};
use custos_repo::Repository;
use serde::Serialize;

pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(90 * 24 * 3600);

#[derive(Debug, Clone, Serialize)]
pub struct KeyAge {
    /// `key file` (a password-sealed credential) or `data key pair`.
    pub what: String,
    pub id: Option<KeyId>,
    pub role: Option<String>,
    pub created: DateTime<Utc>,
    pub age_days: i64,
    pub overdue: bool,
}

impl KeyAge {
    pub fn finding(&self, max_age: Duration) -> Option<String> {
        self.overdue.then(|| {
            let who = match (&self.id, &self.role) {
                (Some(id), Some(role)) => format!("{role} key {}", id.short()),
                _ => self.what.clone(),
            };
            format!(
                "{who} is {} days old, past the crypto-period of {} days: {}",
                self.age_days,
                max_age.as_secs() / 86400,
                if self.id.is_some() {
                    "replace it (`custos key add`, then `custos key remove`)"
                } else {
                    "rotate it (`custos key rotate --rewrap`)"
                }
            )
        })
    }
}

pub fn ages(repo: &Repository, max_age: Duration, now: DateTime<Utc>) -> Result<Vec<KeyAge>> {
    let limit = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
    let age = |created: DateTime<Utc>| (now - created, now - created > limit);
    let mut out = vec![];
    let (d, overdue) = age(repo.pair_created);
    out.push(KeyAge {
        what: "data key pair".into(),
        id: None,
        role: None,
        created: repo.pair_created,
        age_days: d.num_days(),
        overdue,
    });
    for k in &repo.key_files {
        let (d, overdue) = age(k.created);
        out.push(KeyAge {
            what: "key file".into(),
            id: Some(k.id),
            role: Some(k.role.as_str().into()),
            created: k.created,
            age_days: d.num_days(),
            overdue,
        });
    }
    Ok(out)
}

/// One share of the restore key, as written to its own file.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ShareFile {
    pub format: String,
    pub version: u32,
    pub repository: custos_model::RepoId,
    /// Random id of this split: shares of different splits never combine.
    pub split: String,
    pub threshold: u8,
    pub shares: u8,
    pub index: u8,
    /// The share, base64.
    pub share: String,
    /// First 8 bytes of BLAKE3 of the share, hex: catches a mistyped or damaged share.
    pub checksum: String,
    /// The same share in groups of base32, for paper.
    pub printable: String,
}

const SHARE_MAGIC: &[u8; 8] = b"CSTSHRK1";

fn b32(data: &[u8]) -> String {
    const A: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let mut buf = 0u32;
    let mut bits = 0;
    for &b in data {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(A[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(A[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out.as_bytes()
        .chunks(6)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("-")
}

/// Splits the restore key held by `repo` into `count` share files, any `threshold` of
/// which rebuild it.
pub fn split(repo: &Repository, threshold: u8, count: u8) -> Result<Vec<ShareFile>> {
    use base64::Engine;
    repo.require_restore("split the restore key")?;
    let mut material = repo
        .keys
        .for_role(custos_crypto::Role::Restore)
        .to_material();
    material.sign_seed = None;
    let json = zeroize::Zeroizing::new(serde_json::to_vec(&material).expect("serializable"));
    // magic || json || BLAKE3(json)[..16]: a wrong combination fails the check.
    let mut secret = zeroize::Zeroizing::new(SHARE_MAGIC.to_vec());
    secret.extend_from_slice(&json);
    secret.extend_from_slice(&blake3::hash(&json).as_bytes()[..16]);
    let shares = custos_crypto::shares::split(&secret, threshold, count)?;
    let mut split_id = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut split_id);
    Ok(shares
        .iter()
        .enumerate()
        .map(|(i, s)| ShareFile {
            format: "custos-key-share".into(),
            version: 1,
            repository: repo.config.id,
            split: hex::encode(split_id),
            threshold,
            shares: count,
            index: (i + 1) as u8,
            share: base64::engine::general_purpose::STANDARD.encode(s.as_slice()),
            checksum: hex::encode(&blake3::hash(s).as_bytes()[..8]),
            printable: b32(s),
        })
        .collect())
}

/// Rebuilds the restore key material from share files of one split of this repository.
pub fn recover(
    repo_id: custos_model::RepoId,
    files: &[(String, ShareFile)],
) -> Result<custos_crypto::MasterKeys> {
    use base64::Engine;
    use custos_model::Error;
    let first = &files
        .first()
        .ok_or_else(|| Error::config("no share files given"))?
        .1;
    let mut seen = std::collections::BTreeSet::new();
    let mut shares = vec![];
    for (name, f) in files {
        if f.format != "custos-key-share" {
            return Err(Error::config(format!("{name} is not a custos key share")));
        }
        if f.repository != repo_id {
            return Err(Error::config(format!(
                "{name} is a share of repository {}, not of this one ({})",
                f.repository.short(),
                repo_id.short()
            )));
        }
        if f.split != first.split || f.threshold != first.threshold {
            return Err(Error::config(format!(
                "{name} belongs to another split of the key than {}",
                files[0].0
            ))
            .hint("use shares made by the same `custos key split`"));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&f.share)
            .map_err(|_| Error::config(format!("{name}: the share is not valid base64")))?;
        if hex::encode(&blake3::hash(&bytes).as_bytes()[..8]) != f.checksum {
            return Err(Error::config(format!(
                "{name}: the share does not match its checksum (damaged or mistyped)"
            )));
        }
        if seen.insert(f.index) {
            shares.push(zeroize::Zeroizing::new(bytes));
        }
    }
    if shares.len() < first.threshold as usize {
        return Err(Error::config(format!(
            "{} different share(s) given; this split needs {} of its {}",
            shares.len(),
            first.threshold,
            first.shares
        ))
        .hint("dual authorization: bring the other share holders"));
    }
    let secret = custos_crypto::shares::combine(&shares, first.threshold)?;
    let bad =
        || Error::integrity("the shares combine to something that is not this repository's key");
    if secret.len() < 24 || &secret[..8] != SHARE_MAGIC {
        return Err(bad());
    }
    let (json, sum) = secret[8..].split_at(secret.len() - 8 - 16);
    if &blake3::hash(json).as_bytes()[..16] != sum {
        return Err(bad());
    }
    let material: custos_crypto::keys::KeyMaterial =
        serde_json::from_slice(json).map_err(|_| bad())?;
    custos_crypto::MasterKeys::from_material(&material)
}

#[derive(Debug, Clone, Serialize)]
pub struct RotateReport {
    pub generation: u32,
    pub rewrapped_packs: u64,
    pub rewrapped_snapshots: u64,
    pub rewrapped_wal: u64,
}

/// `key rotate`: a new data key pair for new data; with `rewrap`, every stored data key
/// re-wrapped to it (packs in a new index, snapshots and WAL in the keyring's re-wrap
/// table), so a key holding only the new secret reads everything.
pub fn rotate(repo: &mut Repository, rewrap: bool) -> Result<RotateReport> {
    repo.require_restore("rotate the data key pair")?;
    repo.require_write("rotate the data key pair")?;
    // Exclusive: no backup wraps to the old pair while the index is rewritten.
    let lock = repo.lock(rewrap, "key rotate")?;
    let generation = custos_repo::keyring::rotate(&repo.storage, &mut repo.keys)?;
    repo.pair_created = Utc::now();
    let mut report = RotateReport {
        generation,
        rewrapped_packs: 0,
        rewrapped_snapshots: 0,
        rewrapped_wal: 0,
    };
    if rewrap {
        rewrap_all(repo, &mut report)?;
    }
    drop(lock);
    Ok(report)
}

fn rewrap_all(repo: &mut Repository, report: &mut RotateReport) -> Result<()> {
    use base64::Engine;
    use custos_crypto::wrap;
    use custos_repo::{pack, paths, snapshot};
    let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
    // Packs: their keys live in the index; one new index replaces the old ones.
    let index = repo.load_index_fresh()?;
    // Who wrote each pack, what a restore key vouched for and which copies are damaged
    // carry over into the new object.
    let mut w = repo.index_objects();
    for pos in 0..index.pack_count() as u32 {
        let (mut p, bad) = index.encode_pack(pos);
        let what = format!("pack {}", p.id.short());
        let dek = repo.keys.unwrap(pack::KEY_AAD, &p.key, &what)?;
        p.key = wrap::wrap(&repo.keys.public, pack::KEY_AAD, &dek)?;
        report.rewrapped_packs += 1;
        w.push(p, bad)?;
    }
    let new_index = w.finish(vec![])?;
    for old in &index.files {
        if !new_index.contains(old) {
            repo.storage.delete(&paths::index(old))?;
        }
    }
    // Snapshots and WAL: their objects stay; the table holds their keys re-wrapped.
    let mut table = custos_repo::keyring::Rewrap {
        generation: repo.keys.generation,
        keys: Default::default(),
        sig: String::new(),
    };
    for s in repo.snapshots()? {
        let path = paths::snapshot(&s.id);
        let bytes = custos_storage::get_bounded(
            &*repo.storage,
            &path,
            custos_repo::repository::SNAPSHOT_MAX,
            "snapshot",
        )?;
        let stored = snapshot::wrapped_key(&s.id, &bytes)?;
        let wrapped = repo.rewrapped_key(&path).unwrap_or(stored);
        let what = format!("snapshot {}", s.id.short());
        let dek = repo.keys.unwrap(snapshot::KEY_AAD, &wrapped, &what)?;
        table.keys.insert(
            path,
            b64(&wrap::wrap(&repo.keys.public, snapshot::KEY_AAD, &dek)?),
        );
        report.rewrapped_snapshots += 1;
    }
    for (sys, name, _) in repo.wal_objects()? {
        let path = paths::wal(sys, &name);
        let stored = repo.wal_wrapped_key(sys, &name)?;
        let wrapped = repo.rewrapped_key(&path).unwrap_or(stored);
        let what = format!("archived {name}");
        let dek = repo
            .keys
            .unwrap(custos_repo::wal::KEY_AAD, &wrapped, &what)?;
        table.keys.insert(
            path,
            b64(&wrap::wrap(
                &repo.keys.public,
                custos_repo::wal::KEY_AAD,
                &dek,
            )?),
        );
        report.rewrapped_wal += 1;
    }
    custos_repo::keyring::store_rewrap(&repo.storage, &repo.keys, &table)?;
    repo.set_rewrap_table(table);
    Ok(())
}
