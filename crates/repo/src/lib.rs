//! The repository: the only writer of repository objects.
//!
//! It owns the object names, the encodings (`format`), the write order (packs, then the
//! index that points at them, then the snapshot that references their chunks) and the
//! delete order (prune removes a pack from the index before deleting it). Storage below
//! sees only ciphertext; callers above see chunks, snapshots and reports.

pub mod blob;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod index;
pub mod keyfile;
pub mod keyring;
pub mod lock;
pub mod pack;
pub mod repository;
pub mod snapshot;
pub mod trail;
pub mod wal;
pub mod writer;

pub use blob::{BlobKind, BlobLoc, PackEntry};
pub use index::Index;
pub use repository::{OpenOptions, Repository};
pub use snapshot::{Snapshot, SnapshotBody, SnapshotSummary};
pub use writer::{BlobWriter, WriteStats};

/// Objects of `dir` named by a fixed-width hex number (trail entries, keyring
/// generations), as numbers, ascending.
pub fn numbered_objects(
    storage: &custos_storage::DynStorage,
    dir: &str,
    digits: usize,
) -> custos_model::Result<Vec<u64>> {
    let mut v: Vec<u64> = storage
        .list(dir)?
        .into_iter()
        .filter_map(|e| {
            let name = e.path.rsplit('/').next()?;
            (name.len() == digits)
                .then(|| u64::from_str_radix(name, 16).ok())
                .flatten()
        })
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// Object folders in storage.
pub mod paths {
    use custos_model::{IndexId, KeyId, LockId, PackId, SnapshotId};

    pub const CONFIG: &str = "config";
    pub const KEYS: &str = "keys";
    pub const DATA: &str = "data";
    pub const INDEX: &str = "index";
    pub const SNAPSHOTS: &str = "snapshots";
    pub const LOCKS: &str = "locks";
    pub const WAL: &str = "wal";

    /// Above this many packs, [`data_listings`] lists `data/` one shard at a time.
    pub const SHARDED_LISTING_ABOVE: usize = 1 << 16;

    /// Where to list the packs of a repository holding about `packs` of them: `data/` at
    /// once, or, above [`SHARDED_LISTING_ABOVE`], each of its 256 shards in turn, so no
    /// listing holds millions of entries (3 million packs at 100M chunks).
    pub fn data_listings(packs: usize) -> Vec<String> {
        if packs <= SHARDED_LISTING_ABOVE {
            return vec![DATA.to_string()];
        }
        (0..=255u8).map(|b| format!("{DATA}/{b:02x}")).collect()
    }

    pub fn pack(id: &PackId) -> String {
        let h = id.to_hex();
        format!("{DATA}/{}/{h}", &h[..2])
    }
    pub fn index(id: &IndexId) -> String {
        format!("{INDEX}/{id}")
    }
    pub fn snapshot(id: &SnapshotId) -> String {
        format!("{SNAPSHOTS}/{id}")
    }
    pub fn key(id: &KeyId) -> String {
        format!("{KEYS}/{id}")
    }
    /// A WAL segment or history file of the cluster with this system identifier.
    pub fn wal(system_id: u64, name: &str) -> String {
        format!("{WAL}/{system_id:016x}/{name}")
    }
    pub fn lock(id: &LockId) -> String {
        format!("{LOCKS}/{id}")
    }
    /// The id part of a listed path (`data/ab/abcd...` -> `abcd...`).
    pub fn id_of(path: &str) -> Option<custos_model::Id> {
        path.rsplit('/').next()?.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::paths;

    #[test]
    fn a_sharded_listing_of_data_covers_every_pack_and_nothing_twice() {
        assert_eq!(paths::data_listings(10), vec![paths::DATA.to_string()]);
        let shards = paths::data_listings(paths::SHARDED_LISTING_ABOVE + 1);
        assert_eq!(shards.len(), 256);
        for _ in 0..1000 {
            let p = paths::pack(&custos_model::PackId(custos_model::Id(rand::random())));
            let holding: Vec<_> = shards
                .iter()
                .filter(|s| p.starts_with(&format!("{s}/")))
                .collect();
            assert_eq!(holding.len(), 1, "{p} is in {holding:?}");
        }
    }
}
