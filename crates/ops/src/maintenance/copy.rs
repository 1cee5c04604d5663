//! `custos copy`: brings a secondary repository up to date with the primary, byte for
//! byte, and `copy --check`: how far behind it is.
//!
//! Objects are already encrypted, so copying decrypts nothing: a backup key runs it (it
//! takes locks and signs the trail entry, nothing else). Every object the primary has and
//! the secondary lacks is read, checked against its name where the name is its hash
//! (packs, index, snapshots), and written create-only, in an order that keeps the
//! secondary a valid repository after a kill at any point: the marker, key files, the
//! config, then WAL (oldest first, so that every prefix is a restorable run), packs,
//! index objects, snapshots and the trail (in sequence). A rerun copies what is still
//! missing. Deletes are never copied (a secondary outlives an erased primary), with one
//! exception: a key file the primary removed is removed here too, so a revoked key opens
//! neither copy.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use custos_model::{Error, Kind, Result};
use custos_repo::Repository;
use custos_storage::guard::{self, Marker};
use custos_storage::{DynStorage, Entry, PutMode, PutOutcome, Received};
use serde::Serialize;

use crate::progress::Progress;

/// The phases of a copy, in order.
const ORDER: [&str; 8] = [
    "keys",
    "keyring",
    "config",
    "wal",
    "data",
    "index",
    "snapshots",
    "audit",
];

/// Folders that are never copied: each repository's own locks and temp files, and a
/// secondary's own marker and tombstones.
fn not_copied(path: &str) -> bool {
    let top = path.split('/').next().unwrap_or("");
    path == guard::MARKER || [".tmp", "locks", guard::TOMBSTONES].contains(&top)
}

fn phase_of(path: &str) -> &'static str {
    let top = if path.contains('/') {
        path.split('/').next().unwrap_or("")
    } else {
        path
    };
    ORDER.iter().find(|p| **p == top).copied().unwrap_or("")
}

/// Objects named by their BLAKE3 hash: checked against the name before they are written.
fn hash_named(path: &str) -> Option<&str> {
    let top = path.split('/').next()?;
    ["data", "index", "snapshots"]
        .contains(&top)
        .then(|| path.rsplit('/').next())
        .flatten()
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Count {
    pub objects: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct CopyReport {
    pub secondary: String,
    pub location: String,
    /// When the primary was listed: the secondary holds everything the primary held then.
    pub in_sync_as_of: DateTime<Utc>,
    /// Copied, per folder.
    pub copied: BTreeMap<String, Count>,
    /// Present on both already.
    pub present: u64,
    /// Skipped: the secondary's own forget or prune removed them (tombstones).
    pub removed_here: u64,
    /// Tombstoned names dropped: the primary no longer holds them either.
    pub tombstones_dropped: u64,
    /// Listed on the primary, gone when read (a forget meanwhile).
    pub vanished: u64,
    /// Key files the primary no longer has, removed from the secondary.
    pub keys_revoked: Vec<String>,
    /// Objects of the primary that do not match their name: not copied, and after them
    /// no index object, snapshot or trail entry (they could name one).
    pub damaged: Vec<String>,
    pub seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct Missing {
    pub objects: u64,
    pub bytes: u64,
    /// Age of the oldest missing object (by the store's time), seconds.
    pub oldest_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ParityReport {
    pub secondary: String,
    pub location: String,
    pub checked_at: DateTime<Utc>,
    /// Whether the secondary is a repository yet (its config was copied).
    pub initialised: bool,
    /// What the primary holds that the secondary lacks, per folder.
    pub missing: BTreeMap<String, Missing>,
    /// How long the secondary has lacked something the primary holds: the age of the
    /// oldest missing object; 0 in parity. None when the store gives no times.
    pub lag_seconds: Option<f64>,
    /// Key files still on the secondary that the primary removed.
    pub keys_to_revoke: Vec<String>,
}

pub struct Copier<'a> {
    pub primary: &'a Repository,
    pub secondary: DynStorage,
    /// The secondary's name in custos.toml.
    pub name: String,
    pub threads: usize,
    pub progress: &'a dyn Progress,
}

/// Every object of the repository's folders (docs/format.md section 1) and its config.
/// A folder the format gains must be added to [`ORDER`].
fn listing(storage: &DynStorage) -> Result<HashMap<String, Entry>> {
    let mut out = HashMap::new();
    // The folders at once: on an object store each listing is a round trip or more.
    let dirs: Vec<&str> = ORDER.iter().copied().filter(|d| *d != "config").collect();
    let lists = custos_repo::repository::parallel_map(&dirs, dirs.len(), |d| storage.list(d))?;
    for e in lists.into_iter().flatten() {
        if !not_copied(&e.path) {
            out.insert(e.path.clone(), e);
        }
    }
    if let Some(size) = storage.size("config")? {
        out.insert(
            "config".into(),
            Entry {
                path: "config".into(),
                size,
                modified: None,
                md5: None,
            },
        );
    }
    Ok(out)
}

/// Sorts the paths of one phase: WAL and the trail in their own order (oldest first).
fn sorted(mut v: Vec<Entry>) -> Vec<Entry> {
    v.sort_by(|a, b| a.path.cmp(&b.path));
    v
}

/// Makes `secondary` the copy `name` of the repository at `primary`, or checks that it
/// is: its marker names that primary (written on first use; an empty location only).
/// Needs no key, so `copy` runs it while the key is derived.
pub fn claim(secondary: &DynStorage, name: &str, primary: &str) -> Result<()> {
    match guard::marker(secondary.as_ref())? {
        Some(m) if m.primary != primary => Err(Error::new(
            Kind::Conflict,
            format!(
                "{} is the secondary `{}` of {}, not of {primary}",
                secondary.location(),
                m.name,
                m.primary
            ),
        )
        .hint("check [[secondary]] url in custos.toml: each secondary copies one primary")),
        Some(_) => Ok(()),
        None => {
            let m = Marker {
                version: 1,
                name: name.to_string(),
                primary: primary.to_string(),
                created: Utc::now(),
            };
            if secondary.size("config")?.is_some() {
                return Err(Error::new(
                    Kind::Conflict,
                    format!(
                        "{} holds a repository that is not a secondary: copy writes only to a location of its own",
                        secondary.location()
                    ),
                )
                .hint("name an empty location as the secondary's url"));
            }
            let bytes = serde_json::to_vec_pretty(&m).expect("serializable");
            secondary.put(guard::MARKER, &bytes, PutMode::CreateOnly)?;
            Ok(())
        }
    }
}

impl Copier<'_> {
    fn marker_check(&self) -> Result<()> {
        claim(
            &self.secondary,
            &self.name,
            &self.primary.storage.location(),
        )
    }

    /// `copy --check`: what the secondary lacks, without copying.
    pub fn check(&self) -> Result<ParityReport> {
        let now = SystemTime::now();
        let primary = listing(&self.primary.storage)?;
        let secondary = listing(&self.secondary)?;
        trail_cut(
            (&self.primary.storage, &primary),
            (&self.secondary, &secondary),
            &self.name,
        )?;
        let removed = guard::tombstoned(self.secondary.as_ref(), &self.primary.tombstone_key())?;
        let mut missing: BTreeMap<String, Missing> = BTreeMap::new();
        let mut oldest: Option<f64> = None;
        let mut unknown_time = false;
        for (path, e) in &primary {
            if secondary.contains_key(path) || removed.contains(path) {
                continue;
            }
            let m = missing.entry(phase_name(path)).or_insert(Missing {
                objects: 0,
                bytes: 0,
                oldest_seconds: None,
            });
            m.objects += 1;
            m.bytes += e.size;
            // A time ahead of this host's clock counts as now.
            match e
                .modified
                .map(|t| now.duration_since(t).unwrap_or_default())
            {
                Some(age) => {
                    let a = age.as_secs_f64();
                    m.oldest_seconds = Some(m.oldest_seconds.map_or(a, |o: f64| o.max(a)));
                    oldest = Some(oldest.map_or(a, |o| o.max(a)));
                }
                None => unknown_time = true,
            }
        }
        let lag_seconds = if missing.is_empty() {
            Some(0.0)
        } else if unknown_time {
            None
        } else {
            oldest
        };
        Ok(ParityReport {
            secondary: self.name.clone(),
            location: self.secondary.location(),
            checked_at: Utc::now(),
            initialised: secondary.contains_key("config"),
            missing,
            lag_seconds,
            keys_to_revoke: keys_to_revoke(&primary, &secondary),
        })
    }

    /// Brings the secondary up to date.
    pub fn copy(&self) -> Result<CopyReport> {
        let start = std::time::Instant::now();
        self.marker_check()?;
        // Shared locks on both: no prune removes what is being copied, nor what a copy
        // has just written.
        // (Both at once: each is a write and a listing.)
        let (primary_lock, secondary_lock) = std::thread::scope(|s| {
            let p = s.spawn(|| self.primary.lock(false, "copy"));
            let q = self.primary.lock_on(self.secondary.clone(), false, "copy");
            (p.join().expect("lock thread"), q)
        });
        let (_primary_lock, _secondary_lock) = (primary_lock?, secondary_lock?);
        let in_sync_as_of = Utc::now();
        tracing::info!("copy to `{}`: locked both; listing", self.name);
        let (primary, secondary) = std::thread::scope(|s| {
            let p = s.spawn(|| listing(&self.primary.storage));
            let q = listing(&self.secondary);
            (p.join().expect("listing thread"), q)
        });
        let (primary, secondary) = (primary?, secondary?);
        trail_cut(
            (&self.primary.storage, &primary),
            (&self.secondary, &secondary),
            &self.name,
        )?;
        let tombstones =
            guard::read_tombstones(self.secondary.as_ref(), &self.primary.tombstone_key())?;
        let removed = &tombstones.names;
        tracing::info!(
            "copy to `{}`: listed {} object(s) on the primary, {} on the secondary",
            self.name,
            primary.len(),
            secondary.len()
        );
        if !primary.keys().any(|p| p.starts_with("keys/")) || !primary.contains_key("config") {
            return Err(Error::new(
                Kind::Integrity,
                format!(
                    "{}: the primary lists no config or no key file; nothing is copied",
                    self.primary.storage.location()
                ),
            )
            .hint("check the primary's location and that its listing works (custos verify)"));
        }
        let mut phases: BTreeMap<usize, Vec<Entry>> = BTreeMap::new();
        let mut present = 0u64;
        let mut removed_here = 0u64;
        let mut conflicts = vec![];
        for (path, e) in &primary {
            if let Some(s) = secondary.get(path) {
                present += 1;
                // The same name is the same object only if it is its hash; others must
                // at least agree in size (a trail entry or segment written elsewhere).
                if hash_named(path).is_none() && s.size != e.size {
                    conflicts.push(path.clone());
                }
                continue;
            }
            if removed.contains(path) {
                removed_here += 1;
                continue;
            }
            let phase = phase_of(path);
            let i = ORDER
                .iter()
                .position(|p| *p == phase)
                .unwrap_or(ORDER.len());
            phases.entry(i).or_default().push(e.clone());
        }
        if !conflicts.is_empty() {
            conflicts.sort();
            return Err(Error::new(
                Kind::Conflict,
                format!(
                    "{} object(s) on the secondary `{}` differ from the primary's under the same name, such as `{}`: something other than copy wrote to it",
                    conflicts.len(),
                    self.name,
                    conflicts[0]
                ),
            )
            .hint("run `custos audit verify` and `custos verify` on both; the secondary must not be written to directly"));
        }
        let total: u64 = phases.values().flatten().map(|e| e.size).sum();
        self.progress.start("copy", Some(total));
        let copied: std::sync::Mutex<BTreeMap<String, Count>> = Default::default();
        let vanished = AtomicU64::new(0);
        let damaged = std::sync::Mutex::new(vec![]);
        for (_, entries) in phases {
            let entries = sorted(entries);
            // An index must never name a pack the secondary lacks: after a damaged pack
            // nothing that could name it is copied (WAL and packs already were).
            if !damaged.lock().unwrap().is_empty() {
                break;
            }
            // The trail and WAL in order (a kill leaves a prefix); the rest in parallel.
            tracing::info!(
                "copy to `{}`: {} {} object(s)",
                self.name,
                entries.len(),
                phase_name(&entries[0].path)
            );
            // (WAL copied in parallel would leave holes behind a kill, which verify reports.)
            let ordered = matches!(phase_of(&entries[0].path), "audit" | "wal");
            let threads = if ordered { 1 } else { self.threads };
            custos_repo::repository::parallel_map(&entries, threads, |e| {
                let count = |n: u64| {
                    let mut c = copied.lock().unwrap();
                    let k = c.entry(phase_name(&e.path)).or_default();
                    k.objects += 1;
                    k.bytes += n;
                    self.progress.add(n);
                };
                // Between two object stores the object streams from GET to PUT.
                match self
                    .secondary
                    .receive(self.primary.storage.as_ref(), e, hash_named(&e.path))
                {
                    None => {}
                    Some(Err(err)) if err.kind == Kind::NotFound => {
                        vanished.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    Some(Err(err)) => return Err(err),
                    Some(Ok(Received::Mismatch)) => {
                        damaged.lock().unwrap().push(e.path.clone());
                        return Ok(());
                    }
                    Some(Ok(Received::Created)) => {
                        count(e.size);
                        return Ok(());
                    }
                    Some(Ok(Received::AlreadyExists)) => {
                        // Another copy got there first: the same bytes, or a conflict.
                        let bytes = self.primary.storage.get(&e.path)?;
                        same_or_conflict(&self.secondary, &self.name, &e.path, &bytes)?;
                        count(bytes.len() as u64);
                        return Ok(());
                    }
                }
                let bytes = match self.primary.storage.get(&e.path) {
                    Ok(b) => b,
                    Err(err) if err.kind == Kind::NotFound => {
                        vanished.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    Err(err) => return Err(err),
                };
                if let Some(name) = hash_named(&e.path) {
                    if blake3::hash(&bytes).to_hex().as_str() != name {
                        damaged.lock().unwrap().push(e.path.clone());
                        return Ok(());
                    }
                }
                let bytes = bytes::Bytes::from(bytes);
                // The primary's MD5 of the object, when it lists one, is what the
                // secondary must say it stored: checked end to end, nothing hashed here.
                match self
                    .secondary
                    .put_checked(&e.path, bytes.clone(), e.md5.as_deref())?
                {
                    PutOutcome::Created => {}
                    // Another copy got there first: the same bytes, or a conflict.
                    PutOutcome::AlreadyExists => {
                        same_or_conflict(&self.secondary, &self.name, &e.path, &bytes)?
                    }
                }
                count(bytes.len() as u64);
                Ok(())
            })?;
        }
        // Revoked keys last: the primary's current keys are all here by now.
        let revoke = keys_to_revoke(&primary, &secondary);
        for k in &revoke {
            self.secondary.delete(k)?;
        }
        // Tombstones: a name the primary no longer holds either cannot come back, so it
        // is dropped; many tombstones become one. What copy reads stays the size of what
        // the primary still keeps, not of every forget the secondary ever ran.
        // Housekeeping: a store that refuses it (credentials without delete) leaves the
        // tombstones as they were, which is only slower, so it does not fail the copy.
        let tombstones_dropped = match guard::compact_tombstones(
            self.secondary.as_ref(),
            &self.primary.tombstone_key(),
            &tombstones,
            |n| primary.contains_key(n),
            "copy",
        ) {
            Ok(n) => n.unwrap_or(0) as u64,
            Err(e) => {
                tracing::warn!(
                    "copy to `{}`: tombstones not compacted: {}",
                    self.name,
                    e.message
                );
                0
            }
        };
        self.progress.finish();
        let damaged = damaged.into_inner().unwrap();
        Ok(CopyReport {
            secondary: self.name.clone(),
            location: self.secondary.location(),
            in_sync_as_of,
            copied: copied.into_inner().unwrap(),
            present,
            removed_here,
            tombstones_dropped,
            vanished: vanished.into_inner(),
            keys_revoked: revoke,
            damaged,
            seconds: start.elapsed().as_secs_f64(),
        })
    }
}

/// An object a copy found already on the secondary must be the primary's bytes.
fn same_or_conflict(secondary: &DynStorage, name: &str, path: &str, bytes: &[u8]) -> Result<()> {
    if secondary.get_prefix(path, bytes.len() as u64 + 1)? != bytes {
        return Err(Error::new(
            Kind::Conflict,
            format!("`{path}` on the secondary `{name}` differs from the primary's"),
        ));
    }
    Ok(())
}

/// The highest trail number in a listing (0: none).
fn trail_end(listing: &HashMap<String, Entry>) -> u64 {
    listing
        .keys()
        .filter_map(|p| p.strip_prefix("audit/"))
        .filter_map(|n| u64::from_str_radix(n, 16).ok())
        .max()
        .unwrap_or(0)
}

/// Each site's trail checks the other's: the secondary's is a copy of the primary's, so
/// the primary must hold the secondary's last entry, with the same bytes. When it ends
/// before it, entries were removed from the primary's end; other bytes under that number
/// mean they were removed and the number taken again.
fn trail_cut(
    primary: (&DynStorage, &HashMap<String, Entry>),
    secondary: (&DynStorage, &HashMap<String, Entry>),
    name: &str,
) -> Result<()> {
    let (p, s) = (trail_end(primary.1), trail_end(secondary.1));
    if s == 0 {
        return Ok(());
    }
    let hint = || {
        format!("nothing was copied. Run `custos audit verify` on both (`--secondary {name}`); the secondary's trail is the evidence, keep it")
    };
    if s > p {
        return Err(Error::integrity(format!(
            "the primary's operation trail ends at entry {p}, but the secondary `{name}` holds entries up to {s}, copied from it: entries were removed from the primary's trail"
        ))
        .hint(hint()));
    }
    let path = custos_repo::trail::path(s);
    if primary.0.get(&path)? != secondary.0.get(&path)? {
        return Err(Error::integrity(format!(
            "entry {s} of the operation trail differs between the primary and the secondary `{name}`, which copied it: entries were removed from the primary's trail and their numbers taken again, or something other than copy wrote to the secondary"
        ))
        .hint(hint()));
    }
    Ok(())
}

fn phase_name(path: &str) -> String {
    match phase_of(path) {
        "" => path.split('/').next().unwrap_or(path).to_string(),
        p => p.to_string(),
    }
}

fn keys_to_revoke(
    primary: &HashMap<String, Entry>,
    secondary: &HashMap<String, Entry>,
) -> Vec<String> {
    let mut v: Vec<String> = secondary
        .keys()
        .filter(|p| p.starts_with("keys/") && !primary.contains_key(*p))
        .cloned()
        .collect();
    v.sort();
    v
}

/// Writes one WAL object the primary holds to a secondary as well (`wal-push
/// --secondary`): byte for byte, create-only; the same object already there is success.
pub fn copy_object(primary: &DynStorage, secondary: &DynStorage, path: &str) -> Result<()> {
    let bytes = primary.get(path)?;
    put_same(secondary, path, &bytes)
}

/// Writes `bytes` create-only; an object already there must be the same bytes.
pub fn put_same(secondary: &DynStorage, path: &str, bytes: &[u8]) -> Result<()> {
    match secondary.put_checked(path, bytes::Bytes::copy_from_slice(bytes), None)? {
        PutOutcome::Created => Ok(()),
        PutOutcome::AlreadyExists if secondary.get_prefix(path, bytes.len() as u64 + 1)? == bytes => {
            Ok(())
        }
        PutOutcome::AlreadyExists => Err(Error::new(
            Kind::Conflict,
            format!("{}: `{path}` exists with other content", secondary.location()),
        )
        .hint("the secondary holds a different file under this name: run `custos verify --read-data` on it")),
    }
}
