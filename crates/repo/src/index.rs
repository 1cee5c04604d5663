//! The index: where every stored chunk lives (pack, offset, length) and each pack's wrapped
//! data key. Index objects are sealed with the meta key, so writers of every role can
//! deduplicate against them without being able to read chunk contents.
//!
//! Invariant: an index object is written only after every pack it names is durably stored.

use std::collections::HashMap;

use custos_model::{ChunkId, IndexId, PackId};
use serde::{Deserialize, Serialize};

use crate::format::b64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum BlobKind {
    /// File, stream or database content.
    Data,
    /// Manifests (the encoded file tree of a snapshot).
    Tree,
}

/// Encoded form of one index object.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct IndexFile {
    pub packs: Vec<IndexPack>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexPack {
    pub id: PackId,
    pub size: u64,
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    pub blobs: Vec<crate::pack::PackEntry>,
}

/// Location of one blob, compact (48 bytes with its key) because the map holds every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobLoc {
    pub pack: u32,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
    pub kind: BlobKind,
    pub compressed: bool,
}

impl BlobLoc {
    /// Where the blob's stored bytes sit in its pack.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset as usize..(self.offset + self.length) as usize
    }
}

#[derive(Debug, Clone)]
pub struct PackMeta {
    pub id: PackId,
    pub size: u64,
    pub key: Vec<u8>,
}

/// The whole index in memory.
#[derive(Debug, Default, Clone)]
pub struct Index {
    pub packs: Vec<PackMeta>,
    pack_pos: HashMap<PackId, u32>,
    pub blobs: HashMap<ChunkId, BlobLoc>,
    /// Index objects this was loaded from.
    pub files: Vec<IndexId>,
}

impl Index {
    pub fn add_pack(&mut self, p: &IndexPack) {
        let pos = match self.pack_pos.get(&p.id) {
            Some(pos) => *pos,
            None => {
                let pos = self.packs.len() as u32;
                self.packs.push(PackMeta {
                    id: p.id,
                    size: p.size,
                    key: p.key.clone(),
                });
                self.pack_pos.insert(p.id, pos);
                pos
            }
        };
        for b in &p.blobs {
            self.blobs.entry(b.id).or_insert(BlobLoc {
                pack: pos,
                offset: b.offset,
                length: b.length,
                raw_length: b.raw_length,
                kind: b.kind,
                compressed: b.compressed,
            });
        }
    }

    pub fn get(&self, id: &ChunkId) -> Option<(&PackMeta, &BlobLoc)> {
        self.blobs
            .get(id)
            .map(|l| (&self.packs[l.pack as usize], l))
    }

    pub fn contains(&self, id: &ChunkId) -> bool {
        self.blobs.contains_key(id)
    }

    pub fn pack(&self, id: &PackId) -> Option<&PackMeta> {
        self.pack_pos.get(id).map(|p| &self.packs[*p as usize])
    }

    /// Blobs grouped by pack, for verification and prune.
    pub fn by_pack(&self) -> HashMap<PackId, Vec<(ChunkId, BlobLoc)>> {
        let mut out: HashMap<PackId, Vec<(ChunkId, BlobLoc)>> = HashMap::new();
        for p in &self.packs {
            out.entry(p.id).or_default();
        }
        for (id, loc) in &self.blobs {
            out.entry(self.packs[loc.pack as usize].id)
                .or_default()
                .push((*id, *loc));
        }
        for v in out.values_mut() {
            v.sort_by_key(|(_, l)| l.offset);
        }
        out
    }

    /// Re-encodes the packs named in `keep` (all if `None`) as index-file content.
    pub fn to_files(&self, keep: Option<&std::collections::HashSet<PackId>>) -> IndexFile {
        let by_pack = self.by_pack();
        let mut f = IndexFile::default();
        for p in &self.packs {
            if keep.is_some_and(|k| !k.contains(&p.id)) {
                continue;
            }
            let blobs = by_pack[&p.id]
                .iter()
                .map(|(id, l)| crate::pack::PackEntry {
                    id: *id,
                    kind: l.kind,
                    offset: l.offset,
                    length: l.length,
                    raw_length: l.raw_length,
                    compressed: l.compressed,
                })
                .collect();
            f.packs.push(IndexPack {
                id: p.id,
                size: p.size,
                key: p.key.clone(),
                blobs,
            });
        }
        f
    }
}
