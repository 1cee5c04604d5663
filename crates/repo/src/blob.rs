//! What a blob is and where it lies: its kind, its entry in a pack's header, and its
//! compact location in the index. The pack (which writes entries) and the index (which
//! keeps locations) both speak of blobs; neither imports the other.

use custos_model::ChunkId;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum BlobKind {
    /// File, stream or database content.
    Data,
    /// Manifests (the encoded file tree of a snapshot).
    Tree,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    pub kind: BlobKind,
    pub offset: u32,
    pub length: u32,
    pub raw_length: u32,
    pub compressed: bool,
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

impl PackEntry {
    /// Where this blob lies, in the pack at position `pack` of an index.
    pub fn loc(&self, pack: u32) -> BlobLoc {
        BlobLoc {
            pack,
            offset: self.offset,
            length: self.length,
            raw_length: self.raw_length,
            kind: self.kind,
            compressed: self.compressed,
        }
    }
}

impl BlobLoc {
    /// Where the blob's stored bytes sit in its pack.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset as usize..(self.offset + self.length) as usize
    }
}
