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

pub fn path_key(id_key: &[u8; 32], path: &str) -> String {
    blake3::keyed_hash(id_key, path.as_bytes()).to_hex()[..32].to_string()
}

pub fn location(
    dir: &Path,
    repo: &custos_model::RepoId,
    source: &str,
    id_key: &[u8; 32],
) -> PathBuf {
    dir.join(repo.to_hex())
        .join(format!("files-{}", path_key(id_key, source)))
}

pub fn load(path: &Path) -> FilesCache {
    std::fs::read(path)
        .ok()
        .and_then(|b| zstd::stream::decode_all(&b[..]).ok())
        .and_then(|j| serde_json::from_slice(&j).ok())
        .unwrap_or_default()
}

pub fn save(path: &Path, cache: &FilesCache) {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
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
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &z));
    if ok.is_ok() {
        let _ = std::fs::rename(&tmp, path);
    }
}
