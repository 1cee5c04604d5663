//! A secondary copy of a repository, as the commands that run against it see it.
//!
//! A secondary (`custos copy`) holds the primary's objects byte for byte. Nothing but
//! `copy` adds to it: anything else that wrote there (a backup, a trail entry) would make
//! it differ from the primary under a name the primary also uses. So every other command
//! sees it through [`Secondary`]: read-only ([`Access::ReadOnly`]: locks aside, which
//! readers take), or, for `forget` and `prune` run explicitly on it
//! ([`Access::Maintenance`]), with every snapshot and WAL file it deletes remembered in a
//! tombstone (`tombstones/<id>`), so that the next `copy` does not bring back from the
//! primary what the secondary's own retention removed.
//!
//! A tombstone carries a MAC under a key derived from the repository's keys
//! ([`TombstoneKey`]): whoever can only write the secondary's storage cannot make copy
//! skip an object (a planted tombstone naming the WAL segments to come would otherwise
//! keep them off the secondary for good, and out of `copy --check`'s lag).

use std::sync::{Arc, Mutex, OnceLock};

use custos_model::{Error, Kind, Result};
use serde::{Deserialize, Serialize};

use crate::{DynStorage, Entry, PutMode, PutOutcome, Storage};

/// The object that marks a repository as a secondary (plain JSON, written first by `copy`).
pub const MARKER: &str = "secondary";
/// The folder of tombstones.
pub const TOMBSTONES: &str = "tombstones";

/// What a secondary's marker says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    pub version: u32,
    /// The secondary's name in custos.toml.
    pub name: String,
    /// Where the primary is (a location, never credentials).
    pub primary: String,
    pub created: chrono::DateTime<chrono::Utc>,
}

/// The marker of a storage, if it is a secondary. A marker that does not parse is an
/// error: whatever wrote it, the storage is not a plain repository.
pub fn marker(storage: &dyn Storage) -> Result<Option<Marker>> {
    match crate::get_bounded(storage, MARKER, 1 << 20, "the secondary marker") {
        Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            Error::integrity(format!(
                "{}: the secondary marker `{MARKER}` is malformed: {e}",
                storage.location()
            ))
            .hint("only `custos copy` writes it; compare the location with the primary and run `custos copy` again")
        }),
        Err(e) if e.kind == Kind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The key of tombstones' MACs (the repository's, derived from its meta key: every key of
/// the repository holds it, its storage alone does not).
pub type TombstoneKey = [u8; 32];

/// A tombstone: objects a secondary's own forget or prune removed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tombstone {
    pub version: u32,
    pub time: chrono::DateTime<chrono::Utc>,
    pub command: String,
    pub names: Vec<String>,
    /// BLAKE3 keyed hash (hex) of this JSON without `mac`, under the [`TombstoneKey`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Tombstone {
    fn mac_of(&self, key: &TombstoneKey) -> String {
        self.expected_mac(key).to_hex().to_string()
    }

    fn expected_mac(&self, key: &TombstoneKey) -> blake3::Hash {
        let bare = Tombstone {
            mac: None,
            ..self.clone()
        };
        let bytes = serde_json::to_vec(&bare).expect("serializable");
        blake3::keyed_hash(key, &bytes)
    }

    /// Whether `mac` is this tombstone's under `key` (compared in constant time).
    fn authentic(&self, key: &TombstoneKey) -> bool {
        self.mac
            .as_deref()
            .and_then(|m| blake3::Hash::from_hex(m).ok())
            .is_some_and(|m| m == self.expected_mac(key))
    }
}

/// What the tombstones of a secondary hold, and the objects that hold it.
#[derive(Debug, Default)]
pub struct Tombstones {
    pub names: std::collections::HashSet<String>,
    /// The tombstone objects read (ones that did not parse or authenticate are not among
    /// them).
    pub objects: Vec<String>,
    /// Tombstone objects ignored: malformed, without a MAC or with a wrong one.
    pub rejected: Vec<String>,
}

/// Every name the tombstones of a secondary hold.
pub fn tombstoned(
    storage: &dyn Storage,
    key: &TombstoneKey,
) -> Result<std::collections::HashSet<String>> {
    Ok(read_tombstones(storage, key)?.names)
}

/// Reads every tombstone of a secondary. One that does not parse or whose MAC does not
/// verify is ignored with a warning: a tombstone only makes copy skip names, so ignoring
/// one only makes copy bring objects again (which the secondary's next prune removes),
/// while trusting a planted one would keep objects off the secondary unnoticed. Ignored
/// ones are left in place, as evidence.
pub fn read_tombstones(storage: &dyn Storage, key: &TombstoneKey) -> Result<Tombstones> {
    let mut out = Tombstones::default();
    for entry in storage.list(TOMBSTONES)? {
        // Merged tombstones name what forgets removed (tens of bytes a name).
        let why = match crate::get_listed(storage, &entry, 256 << 20, "tombstone")
            .and_then(|b| serde_json::from_slice::<Tombstone>(&b).map_err(|e| Error::integrity(format!("it is malformed: {e}"))))
        {
            Err(e) if e.kind != Kind::Integrity => return Err(e),
            Err(e) => e.message,
            Ok(t) => match &t.mac {
                Some(_) if t.authentic(key) => {
                    out.names.extend(t.names);
                    out.objects.push(entry.path);
                    continue;
                }
                Some(_) => "its MAC does not verify (it was altered, or written by someone without this repository's keys)".to_string(),
                None => "it carries no MAC (written by someone without this repository's keys, or by a custos before tombstones had one)".to_string(),
            },
        };
        tracing::warn!(
            "{}: tombstone {} ignored, so copy brings back what it names: {why}",
            storage.location(),
            entry.path
        );
        out.rejected.push(entry.path);
    }
    Ok(out)
}

/// Fuzzing: a tombstone as a secondary holds it (parsed, its MAC checked under a fixed
/// key), and a secondary's marker.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    if let Ok(t) = serde_json::from_slice::<Tombstone>(data) {
        let _ = t.authentic(&[5u8; 32]);
    }
    let _ = serde_json::from_slice::<Marker>(data);
}

/// Tombstone objects beyond which `copy` merges them into one even when every name is
/// still needed: what copy reads each run stays a few objects, not one per forget ever run.
pub const MERGE_OVER: usize = 8;

/// Rewrites a secondary's tombstones as one holding only the names `needed` keeps (those
/// the primary still holds: a name the primary removed too can never be copied back), when
/// some are no longer needed or there are more than [`MERGE_OVER`] objects. The new
/// tombstone is written before the old ones are deleted, so a crash in between leaves
/// both (the same names, or more); only the objects in `t` are deleted, so a tombstone a
/// forget wrote meanwhile stays. Returns how many names were dropped, or `None` when
/// nothing was rewritten.
pub fn compact_tombstones(
    storage: &dyn Storage,
    key: &TombstoneKey,
    t: &Tombstones,
    needed: impl Fn(&str) -> bool,
    command: &str,
) -> Result<Option<usize>> {
    let mut kept: Vec<String> = t.names.iter().filter(|n| needed(n)).cloned().collect();
    let dropped = t.names.len() - kept.len();
    if dropped == 0 && t.objects.len() <= MERGE_OVER {
        return Ok(None);
    }
    kept.sort();
    write_tombstone(storage, key, command, kept)?;
    for path in &t.objects {
        storage.delete(path)?;
    }
    Ok(Some(dropped))
}

/// Writes one tombstone (create-only, under a name of its own).
fn write_tombstone(
    storage: &dyn Storage,
    key: &TombstoneKey,
    command: &str,
    names: Vec<String>,
) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let mut t = Tombstone {
        version: 1,
        time: chrono::Utc::now(),
        command: command.into(),
        names,
        mac: None,
    };
    t.mac = Some(t.mac_of(key));
    let bytes = serde_json::to_vec(&t).expect("serializable");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // A name already taken (two in the same nanosecond, or a clock set back) is not
    // success: the next nanosecond is tried.
    for n in nanos..nanos + 1000 {
        let path = format!("{TOMBSTONES}/{n:032x}{:08x}", std::process::id());
        if storage.put(&path, &bytes, PutMode::CreateOnly)? == PutOutcome::Created {
            return Ok(());
        }
    }
    Err(Error::new(
        Kind::Conflict,
        format!("{}: no free name for a tombstone", storage.location()),
    )
    .hint("run the command again"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads, and locks (restore, verify, snapshots take them).
    ReadOnly,
    /// forget and prune on the secondary: deletes (tombstoned) and prune's own writes.
    Maintenance,
}

pub struct Secondary {
    inner: DynStorage,
    name: String,
    access: Access,
    command: String,
    deleted: Mutex<Vec<String>>,
    /// Set once the repository is opened (its keys derive it): a maintained secondary
    /// writes tombstones only with it.
    key: Arc<OnceLock<TombstoneKey>>,
}

/// Deleted names kept in memory before a tombstone is written.
const FLUSH_EVERY: usize = 1000;

impl Secondary {
    pub fn new(inner: DynStorage, name: &str, access: Access, command: &str) -> Secondary {
        Secondary {
            inner,
            name: name.into(),
            access,
            command: command.into(),
            deleted: Mutex::new(vec![]),
            key: Arc::default(),
        }
    }

    /// Where the [`TombstoneKey`] goes once the repository's keys are open; until it is
    /// set, a maintained secondary deletes nothing it would have to tombstone.
    pub fn with_key(mut self, key: Arc<OnceLock<TombstoneKey>>) -> Secondary {
        self.key = key;
        self
    }

    fn refused(&self, path: &str) -> Error {
        Error::new(
            Kind::Permission,
            format!(
                "{} is the secondary `{}`: only `custos copy` writes to it (refused: `{path}`)",
                self.inner.location(),
                self.name
            ),
        )
        .hint("run backups, key changes and wal-push against the primary; `copy` brings them here. forget and prune run here with --secondary NAME")
    }

    /// Writes what was deleted since the last flush as one tombstone. Called every
    /// [`FLUSH_EVERY`] deletes and when dropped: a tombstone lost to a crash only makes the
    /// next copy bring objects back, which the next prune removes again.
    pub fn flush(&self) -> Result<()> {
        let names = std::mem::take(&mut *self.deleted.lock().unwrap());
        if names.is_empty() {
            return Ok(());
        }
        let key = self.key.get().ok_or_else(|| {
            Error::internal(format!(
                "{}: tombstone not written: the repository's keys are not open",
                self.inner.location()
            ))
        })?;
        write_tombstone(self.inner.as_ref(), key, &self.command, names)
    }
}

impl Drop for Secondary {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(
                "{}: tombstone not written: {}",
                self.inner.location(),
                e.message
            );
        }
    }
}

fn is_lock(path: &str) -> bool {
    path.starts_with("locks/")
}

impl Storage for Secondary {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put(&self, path: &str, data: &[u8], mode: PutMode) -> Result<PutOutcome> {
        if is_lock(path) || self.access == Access::Maintenance && !path.starts_with("audit/") {
            return self.inner.put(path, data, mode);
        }
        Err(self.refused(path))
    }
    fn put_tagged(
        &self,
        path: &str,
        data: bytes::Bytes,
        mode: PutMode,
        tag: Option<&str>,
    ) -> Result<PutOutcome> {
        if is_lock(path) || self.access == Access::Maintenance && !path.starts_with("audit/") {
            return self.inner.put_tagged(path, data, mode, tag);
        }
        Err(self.refused(path))
    }
    fn get(&self, path: &str) -> Result<Vec<u8>> {
        self.inner.get(path)
    }
    fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.inner.get_range(path, offset, len)
    }
    fn get_prefix(&self, path: &str, n: u64) -> Result<Vec<u8>> {
        self.inner.get_prefix(path, n)
    }
    fn size(&self, path: &str) -> Result<Option<u64>> {
        self.inner.size(path)
    }
    fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        self.inner.list(dir)
    }
    fn list_hex(&self, dir: &str) -> Result<Vec<Entry>> {
        self.inner.list_hex(dir)
    }
    fn list_split(&self, dir: &str, splits: &[String]) -> Result<Vec<Entry>> {
        self.inner.list_split(dir, splits)
    }
    fn delete(&self, path: &str) -> Result<()> {
        if is_lock(path) || path.starts_with(".tmp/") {
            return self.inner.delete(path);
        }
        let maintained = ["data/", "index/", "snapshots/", "wal/"];
        if self.access != Access::Maintenance || !maintained.iter().any(|k| path.starts_with(k)) {
            return Err(self.refused(path));
        }
        let tombstoned = path.starts_with("snapshots/") || path.starts_with("wal/");
        if tombstoned && self.key.get().is_none() {
            return Err(Error::internal(format!(
                "{}: `{path}` not deleted: its tombstone could not be written (the repository's keys are not open)",
                self.inner.location()
            )));
        }
        self.inner.delete(path)?;
        // Only snapshots and WAL are tombstoned. A pack or index object this prune found
        // unused may be needed again by a snapshot the primary wrote since (deduplicated
        // against it) and not copied yet: copy must be free to bring it back.
        if !tombstoned {
            return Ok(());
        }
        let full = {
            let mut d = self.deleted.lock().unwrap();
            d.push(path.to_string());
            d.len() >= FLUSH_EVERY
        };
        if full {
            self.flush()?;
        }
        Ok(())
    }
    fn permission_findings(&self) -> Result<Vec<String>> {
        self.inner.permission_findings()
    }
    fn check_writable(&self) -> Result<()> {
        self.inner.check_writable()
    }
    fn warm(&self, dir: &str) {
        self.inner.warm(dir)
    }
    /// Extending a retention only strengthens what the secondary keeps: allowed.
    fn object_lock(&self) -> Option<&dyn crate::ObjectLock> {
        self.inner.object_lock()
    }
    fn cold(&self, path: &str) -> Result<Option<crate::Cold>> {
        self.inner.cold(path)
    }
    fn request_restore(&self, path: &str, days: u32) -> Result<bool> {
        self.inner.request_restore(path, days)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::LocalStorage;
    use std::sync::Arc;

    const KEY: TombstoneKey = [7u8; 32];

    #[test]
    fn read_only_refuses_writes_but_locks_and_maintenance_leave_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let inner: DynStorage = Arc::new(LocalStorage::new(dir.path().to_path_buf()));
        inner
            .put("data/ab/ab01", b"pack", PutMode::CreateOnly)
            .unwrap();
        inner
            .put("snapshots/s1", b"snap", PutMode::CreateOnly)
            .unwrap();
        let ro = Secondary::new(inner.clone(), "dr", Access::ReadOnly, "restore");
        let e = ro
            .put("snapshots/new", b"x", PutMode::CreateOnly)
            .unwrap_err();
        assert_eq!(e.kind, Kind::Permission);
        assert!(e.message.contains("secondary `dr`"), "{}", e.message);
        assert!(ro.delete("data/ab/ab01").is_err());
        assert!(ro
            .put("audit/0000000000000001", b"e", PutMode::CreateOnly)
            .is_err());
        ro.put("locks/l1", b"lock", PutMode::Overwrite).unwrap();
        ro.delete("locks/l1").unwrap();
        assert_eq!(ro.get("data/ab/ab01").unwrap(), b"pack");
        drop(ro);
        assert!(tombstoned(inner.as_ref(), &KEY).unwrap().is_empty());

        inner
            .put(
                "wal/0000000000000001/000000010000000000000001",
                b"w",
                PutMode::CreateOnly,
            )
            .unwrap();
        // Until the repository's keys are open, nothing that needs a tombstone goes.
        let m = Secondary::new(inner.clone(), "dr", Access::Maintenance, "prune");
        assert!(m.delete("snapshots/s1").is_err());
        assert_eq!(inner.size("snapshots/s1").unwrap(), Some(4));
        let m = m.with_key(Arc::new(OnceLock::from(KEY)));
        m.delete("data/ab/ab01").unwrap();
        m.delete("snapshots/s1").unwrap();
        m.delete("wal/0000000000000001/000000010000000000000001")
            .unwrap();
        // The trail and keys are never the secondary's own to change.
        assert!(m
            .put("audit/0000000000000001", b"e", PutMode::CreateOnly)
            .is_err());
        assert!(m.delete("keys/k").is_err());
        drop(m);
        let t = tombstoned(inner.as_ref(), &KEY).unwrap();
        assert!(
            t.contains("snapshots/s1")
                && t.contains("wal/0000000000000001/000000010000000000000001"),
            "{t:?}"
        );
        // A pack may be needed again by a snapshot not yet copied: copy may bring it back.
        assert!(!t.contains("data/ab/ab01"), "{t:?}");
        assert_eq!(inner.size("data/ab/ab01").unwrap(), None);
    }

    #[test]
    fn compaction_drops_what_the_primary_removed_merges_many_and_spares_unread_ones() {
        let dir = tempfile::tempdir().unwrap();
        let st: DynStorage = Arc::new(LocalStorage::new(dir.path().to_path_buf()));
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        write_tombstone(
            st.as_ref(),
            &KEY,
            "forget",
            names(&["snapshots/a", "snapshots/b"]),
        )
        .unwrap();
        write_tombstone(
            st.as_ref(),
            &KEY,
            "forget",
            names(&["wal/1/s1", "wal/1/s2"]),
        )
        .unwrap();
        let t = read_tombstones(st.as_ref(), &KEY).unwrap();
        assert_eq!((t.names.len(), t.objects.len()), (4, 2));

        // Every name still held by the primary, two objects: nothing to do.
        assert_eq!(
            compact_tombstones(st.as_ref(), &KEY, &t, |_| true, "copy").unwrap(),
            None
        );
        assert_eq!(st.list(TOMBSTONES).unwrap().len(), 2);

        // The primary removed `snapshots/a` and `wal/1/s1` too; a forget wrote a third
        // tombstone after this copy read them: it is not touched.
        write_tombstone(st.as_ref(), &KEY, "forget", names(&["snapshots/c"])).unwrap();
        let gone = ["snapshots/a", "wal/1/s1"];
        let dropped =
            compact_tombstones(st.as_ref(), &KEY, &t, |n| !gone.contains(&n), "copy").unwrap();
        assert_eq!(dropped, Some(2));
        let after = read_tombstones(st.as_ref(), &KEY).unwrap();
        let mut held: Vec<_> = after.names.iter().cloned().collect();
        held.sort();
        assert_eq!(held, names(&["snapshots/b", "snapshots/c", "wal/1/s2"]));
        assert_eq!(after.objects.len(), 2);

        // Many tombstones, all still needed: merged into one with the same names.
        for i in 0..MERGE_OVER {
            write_tombstone(st.as_ref(), &KEY, "forget", vec![format!("wal/1/x{i}")]).unwrap();
        }
        let t = read_tombstones(st.as_ref(), &KEY).unwrap();
        assert_eq!(t.objects.len(), MERGE_OVER + 2);
        assert_eq!(
            compact_tombstones(st.as_ref(), &KEY, &t, |_| true, "copy").unwrap(),
            Some(0)
        );
        let merged = read_tombstones(st.as_ref(), &KEY).unwrap();
        assert_eq!(merged.objects.len(), 1);
        assert_eq!(merged.names, t.names);

        // A store that refuses deletes: an error, and every name still held (the new
        // tombstone and the old ones together).
        // (a maintained secondary refuses deletes outside data, index, snapshots and WAL)
        let nd = Secondary::new(st.clone(), "dr", Access::Maintenance, "copy");
        let before = read_tombstones(&nd, &KEY).unwrap();
        assert!(compact_tombstones(&nd, &KEY, &before, |n| n != "wal/1/x0", "copy").is_err());
        assert!(read_tombstones(&nd, &KEY)
            .unwrap()
            .names
            .is_superset(&before.names));

        // Nothing needed any more: no tombstone at all.
        let merged = read_tombstones(st.as_ref(), &KEY).unwrap();
        assert_eq!(merged.objects.len(), 2);
        let dropped = compact_tombstones(st.as_ref(), &KEY, &merged, |_| false, "copy").unwrap();
        assert_eq!(dropped, Some(merged.names.len()));
        assert!(st.list(TOMBSTONES).unwrap().is_empty());
    }

    #[test]
    fn a_tombstone_without_the_keys_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let st: DynStorage = Arc::new(LocalStorage::new(dir.path().to_path_buf()));
        write_tombstone(st.as_ref(), &KEY, "forget", vec!["snapshots/a".into()]).unwrap();
        // Planted by whoever can write the storage: no MAC, a MAC under another key, a
        // genuine one whose names were changed, and garbage.
        let plant = |name: &str, t: &Tombstone| {
            st.put(
                &format!("{TOMBSTONES}/{name}"),
                &serde_json::to_vec(t).unwrap(),
                PutMode::CreateOnly,
            )
            .unwrap();
        };
        let mut forged = Tombstone {
            version: 1,
            time: chrono::Utc::now(),
            command: "forget".into(),
            names: vec!["wal/1/000000010000000000000009".into()],
            mac: None,
        };
        plant("f0", &forged);
        forged.mac = Some(forged.mac_of(&[8u8; 32]));
        plant("f1", &forged);
        let genuine_path = st.list(TOMBSTONES).unwrap()[0].path.clone();
        let mut altered: Tombstone =
            serde_json::from_slice(&st.get(&genuine_path).unwrap()).unwrap();
        altered.names.push("snapshots/b".into());
        plant("f2", &altered);
        st.put(&format!("{TOMBSTONES}/f3"), b"{", PutMode::CreateOnly)
            .unwrap();

        let t = read_tombstones(st.as_ref(), &KEY).unwrap();
        assert_eq!(
            t.names,
            std::collections::HashSet::from(["snapshots/a".to_string()])
        );
        assert_eq!((t.objects.len(), t.rejected.len()), (1, 4));
        // Compaction rewrites only what it trusted; the planted ones stay as evidence.
        compact_tombstones(st.as_ref(), &KEY, &t, |_| false, "copy").unwrap();
        assert_eq!(st.list(TOMBSTONES).unwrap().len(), 4);
    }
}
