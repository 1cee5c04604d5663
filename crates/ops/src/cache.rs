//! The local files cache: for each file of the last snapshot of a source, its fingerprint
//! (size, mtime, ctime, inode) and chunk ids, so an unchanged file is not read again.
//!
//! It lives on the backup host (like borg's files cache), not in the repository, because a
//! backup-role key cannot read snapshot contents. Paths are stored as keyed hashes, so the
//! cache reveals no file names. A missing or damaged cache only costs re-reading: chunk ids
//! are still checked against the index before they are trusted.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use custos_model::{ChunkId, SnapshotId};
use custos_sources::files::Fingerprint;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FilesCache {
    pub snapshot: Option<SnapshotId>,
    pub files: HashMap<String, (Fingerprint, Vec<ChunkId>)>,
    /// Page patches of relation files (database backups), by path.
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub pages: HashMap<String, custos_sources::files::PagePatches>,
}

pub fn path_key(id_key: &[u8; 32], path: &[u8]) -> String {
    blake3::keyed_hash(id_key, path).to_hex()[..32].to_string()
}

pub fn location(
    dir: &Path,
    repo: &custos_model::RepoId,
    source: &str,
    id_key: &[u8; 32],
) -> PathBuf {
    dir.join(repo.to_hex())
        .join(format!("files-{}", path_key(id_key, source.as_bytes())))
}

pub fn load(path: &Path) -> FilesCache {
    std::fs::read(path)
        .ok()
        .and_then(|b| zstd::stream::decode_all(&b[..]).ok())
        .and_then(|j| serde_json::from_slice(&j).ok())
        .unwrap_or_default()
}

pub fn save(path: &Path, cache: &FilesCache) {
    use std::os::unix::fs::DirBuilderExt;
    let Some(dir) = path.parent() else { return };
    if std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .is_err()
    {
        return;
    }
    let json = serde_json::to_vec(cache).expect("serializable");
    let Ok(z) = zstd::bulk::compress(&json, 3) else {
        return;
    };
    let tmp = path.with_extension("tmp");
    if write_private(&tmp, &z).is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, data))
}

/// Unit hashes of relation files as the last backup restores them (`pg_pages`), one file
/// per data file in a folder beside the files cache, bound to that backup's snapshot id.
/// They let an incremental store only the changed 1 KiB units of a changed page. A missing,
/// stale or damaged file only costs storing whole pages; each file carries a keyed hash of
/// its path and content, and one backup at a time uses the folder (an flock; a second one
/// of the same cluster stores whole pages).
pub struct UnitStore {
    /// The parent's folder, when it describes the parent.
    old: Option<PathBuf>,
    /// Where this backup's go; None when another backup holds the folder.
    new: Option<PathBuf>,
    dir: PathBuf,
    id_key: [u8; 32],
    pub seed: u64,
    _lock: Option<std::fs::File>,
}

impl UnitStore {
    /// `files_cache` is the files cache's location; `parent` the snapshot an incremental
    /// builds on.
    pub fn open(files_cache: &Path, parent: Option<SnapshotId>, id_key: &[u8; 32]) -> UnitStore {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        use std::os::unix::io::AsRawFd;
        let name = files_cache
            .file_name()
            .map(|n| n.to_string_lossy().replacen("files-", "units-", 1))
            .unwrap_or_else(|| "units".into());
        let dir = files_cache.with_file_name(name);
        let seed = u64::from_le_bytes(
            blake3::keyed_hash(id_key, b"custos unit hashes").as_bytes()[..8]
                .try_into()
                .expect("8 bytes"),
        );
        let mut store = UnitStore {
            old: None,
            new: None,
            dir: dir.clone(),
            id_key: *id_key,
            seed,
            _lock: None,
        };
        if let Some(parent) = dir.parent() {
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent);
        }
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.with_extension("lock"));
        let Ok(lock) = lock else { return store };
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return store;
        }
        store._lock = Some(lock);
        store.old = parent
            .filter(|p| {
                std::fs::read_to_string(dir.join("snapshot")).is_ok_and(|s| s.trim() == p.to_hex())
            })
            .map(|_| dir.clone());
        let new = dir.with_extension("new");
        let _ = std::fs::remove_dir_all(&new);
        if std::fs::DirBuilder::new().mode(0o700).create(&new).is_ok() {
            store.new = Some(new);
        }
        store
    }

    /// Whether hashes are kept for the next backup.
    pub fn enabled(&self) -> bool {
        self.new.is_some()
    }

    fn name(&self, path: &str) -> String {
        path_key(&self.id_key, path.as_bytes())
    }

    fn mac(&self, path: &str, data: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.id_key);
        h.update(b"custos unit file\0");
        h.update(path.as_bytes());
        h.update(&[0]);
        h.update(data);
        *h.finalize().as_bytes()
    }

    /// The parent's unit hashes of a file.
    pub fn load(&self, path: &str) -> Option<Vec<u64>> {
        let b = std::fs::read(self.old.as_ref()?.join(self.name(path))).ok()?;
        let (data, mac) = b.split_at_checked(b.len().checked_sub(32)?)?;
        if data.len() % 8 != 0 || mac != self.mac(path, data) {
            return None;
        }
        Some(
            data.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        )
    }

    /// Records a file's unit hashes for the next backup.
    pub fn save(&self, path: &str, units: &[u64]) {
        let Some(new) = &self.new else { return };
        let mut b = Vec::with_capacity(units.len() * 8 + 32);
        for u in units {
            b.extend_from_slice(&u.to_le_bytes());
        }
        let mac = self.mac(path, &b);
        b.extend_from_slice(&mac);
        let _ = write_private(&new.join(self.name(path)), &b);
    }

    /// Keeps the parent's unit hashes of a file taken unchanged.
    pub fn keep(&self, path: &str) {
        if let (Some(old), Some(new)) = (&self.old, &self.new) {
            let n = self.name(path);
            let _ = std::fs::hard_link(old.join(&n), new.join(&n));
        }
    }

    /// Binds the new hashes to the snapshot just saved and makes them current.
    pub fn commit(self, snapshot: SnapshotId) {
        let Some(new) = &self.new else { return };
        if std::fs::write(new.join("snapshot"), snapshot.to_hex()).is_err() {
            return;
        }
        let old = self.dir.with_extension("old");
        let _ = std::fs::remove_dir_all(&old);
        let _ = std::fs::rename(&self.dir, &old);
        if std::fs::rename(new, &self.dir).is_ok() {
            let _ = std::fs::remove_dir_all(&old);
        }
    }
}
