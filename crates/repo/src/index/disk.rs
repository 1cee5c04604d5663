//! The on-disk chunk index (format.md 5.3): the index objects of a repository decoded once
//! into sorted fixed-size records in files on the host, so a command's memory does not grow
//! with the number of chunks stored. The files are read with `pread`, never mapped (a mapped
//! page a command touched would count in its RSS until it ends). A lookup finds its block in
//! an in-memory table of every 128th record's sort key (`fences`, 6 MB at 100M chunks) and
//! reads that block (7 KB) in one `pread`; pack ids likewise (`pack-fences`).
//!
//! A build folder holds `records` (one record per chunk location, sorted by a keyed hash of
//! the chunk id), `packs` (one record per pack, by position), `pack-ids` (pack id to
//! position, sorted), `keys` (the packs' wrapped data keys), `file-packs` (the positions
//! each index object names), `by-pack` (the records again, grouped by pack and sorted by
//! offset, with `pack-blobs` giving each pack's first record and count: what `verify` reads
//! pack by pack, and the numbering of copies prune marks used; always the deduplicated
//! records grouped by pack, so a pack holds what any object listing it lists, never only
//! what the first one did: written as each pack is first listed, and for the packs listed
//! again made from the records at the end) and `meta.json` (what the build covers,
//! written last).
//!
//! The records are sorted by a hash keyed with a random key of the build, not by chunk id:
//! a backup key may store any chunk ids, and ids it ground to share a prefix would
//! otherwise pile into one partition of the build's sort. Building reads records into 256
//! partitions on disk and sorts each in memory; `pack-ids` is sorted the same way (by the
//! keyed hash of the pack id, in 64 partitions). Its memory is a partition (~1/256 of the
//! records) plus an 8-byte entry per pack in a hash table (the keyed hash's first 4 bytes
//! to the position; a hit is confirmed against the id in `packs`, and the few ids whose 4
//! bytes another pack took first go to a small map): about 10-20 bytes a pack, 38 MB for
//! the 3 million packs of 100 million chunks.
//!
//! The folder is the host's own state, like the files cache: it is written 0700 and what it
//! says is checked where it matters (every blob read is checked against its id; `verify`
//! never uses it and builds its own from the repository).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use custos_model::{ChunkId, Id, IndexId, PackId, RepoId};
use serde::{Deserialize, Serialize};
use std::io::Result;

use super::{Attribution, IndexFile, IndexPack, PackMeta};
use crate::blob::{BlobKind, BlobLoc};

/// h (8, big-endian) | chunk id (32) | pack position (4) | offset (4) | length (4) |
/// raw length (4) | kind (1) | compressed (1).
const RECORD: usize = 58;
/// id (32) | size (8) | writer (32) | flags (1) | key length (2) | key offset (8).
const PACK: usize = 83;
/// h (8, big-endian: the keyed hash of the pack id) | id (32) | position (4).
const PACK_ID: usize = 44;
const PACK_ID_PARTS: usize = 64;
/// first record in `by-pack` (8) | count (4).
const PACK_BLOBS: usize = 12;
const PARTS: usize = 256;
/// One record in this many has its sort key in `fences` (and one entry of `pack-ids` in
/// `pack-fences`): 6 MB of memory at 100M chunks, and a lookup reads one block of 7 KB.
const FENCE: u64 = 128;
const VERSION: u32 = 4;

const HAS_WRITER: u8 = 1;
const VOUCHED: u8 = 2;
const TRUSTED: u8 = 4;

/// What a build covers and for whom (trust depends on the reading key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskMeta {
    pub version: u32,
    pub repo: String,
    /// The signing key (hex) of the key that built it: "trusted" is relative to it.
    pub reader: Option<String>,
    pub authority: Option<String>,
    /// The key of the records' sort hash (hex).
    pub hkey: String,
    pub files: Vec<IndexId>,
    /// Damaged copies the authority named: (pack position, chunk).
    pub bad: Vec<(u32, ChunkId)>,
    pub records: u64,
    pub packs: u64,
}

pub struct DiskIndex {
    pub meta: DiskMeta,
    dir: PathBuf,
    hkey: [u8; 32],
    /// Every file is read with `pread`, never mapped: a mapped page a command touches
    /// counts in its RSS until it ends, and prune and verify go through every pack (a
    /// mapped `by-pack` alone is 5.8 GB at 100M chunks). The files are opened with the
    /// rest: another command on this host may remove the folder once a newer build is
    /// published, and what is open stays readable.
    records: File,
    packs: File,
    pack_ids: File,
    keys: File,
    by_pack: File,
    pack_blobs: File,
    file_packs: File,
    /// The sort key of every [`FENCE`]th record, and of every [`FENCE`]th entry of
    /// `pack-ids`: a lookup finds its block in memory and reads it in one `pread`.
    record_fences: Vec<u64>,
    pack_fences: Vec<u64>,
    keys_len: u64,
    by_pack_len: u64,
    /// Holds the folder of a build made for one command (no cache folder).
    _temp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for DiskIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DiskIndex({}, {} records, {} packs)",
            self.dir.display(),
            self.meta.records,
            self.meta.packs
        )
    }
}

/// The records of the last few packs [`DiskIndex::slot_of`] read, kept by its caller:
/// marking goes file by file, and a file's chunks lie in a few packs (one per packer that
/// wrote it), one after another, so most lookups need no read of `by-pack` at all.
#[derive(Debug, Default)]
pub struct Spans(Vec<(u32, u64, Vec<u8>)>, usize);

impl Spans {
    const KEPT: usize = 4;

    /// Keeps a pack's records in place of the oldest kept; returns where.
    fn keep(&mut self, pos: u32, first: u64, span: Vec<u8>) -> usize {
        if self.0.len() < Self::KEPT {
            self.0.push((pos, first, span));
            return self.0.len() - 1;
        }
        let k = self.1 % Self::KEPT;
        self.1 += 1;
        self.0[k] = (pos, first, span);
        k
    }
}

fn damaged(dir: &Path, what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the on-disk index in {} is damaged ({what})", dir.display()),
    )
}

/// `path`, opened and checked to hold `len` bytes.
fn open_sized(path: &Path, len: u64) -> Result<File> {
    let f = File::open(path)?;
    if f.metadata()?.len() != len {
        return Err(damaged(path, "a file has the wrong size"));
    }
    Ok(f)
}

fn read_at(f: &File, at: u64, len: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(f, &mut b, at)?;
    Ok(b)
}

/// The sort keys of every [`FENCE`]th entry of a sorted file of `n` entries of `size`
/// bytes, as written by [`write_fences`].
fn read_fences(path: &Path, n: u64) -> Result<Vec<u64>> {
    let raw = std::fs::read(path)?;
    if raw.len() as u64 != n.div_ceil(FENCE) * 8 {
        return Err(damaged(path, "its fences do not match its records"));
    }
    Ok(raw
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn id_at(b: &[u8], at: usize) -> Id {
    Id(b[at..at + 32].try_into().expect("32 bytes"))
}

/// A pack's key in the build's table: the first 4 bytes of its sort key.
fn table_key(h: &[u8; 8]) -> u32 {
    u32::from_be_bytes([h[0], h[1], h[2], h[3]])
}

/// The sort key of a chunk id (records) or a pack id (`pack-ids`).
fn hash(hkey: &[u8; 32], id: &Id) -> [u8; 8] {
    blake3::keyed_hash(hkey, &id.0).as_bytes()[..8]
        .try_into()
        .expect("8 bytes")
}

fn encode_record(h: [u8; 8], id: &ChunkId, l: &BlobLoc) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..8].copy_from_slice(&h);
    r[8..40].copy_from_slice(&id.0 .0);
    r[40..44].copy_from_slice(&l.pack.to_le_bytes());
    r[44..48].copy_from_slice(&l.offset.to_le_bytes());
    r[48..52].copy_from_slice(&l.length.to_le_bytes());
    r[52..56].copy_from_slice(&l.raw_length.to_le_bytes());
    r[56] = matches!(l.kind, BlobKind::Tree) as u8;
    r[57] = l.compressed as u8;
    r
}

fn decode_record(r: &[u8]) -> (ChunkId, BlobLoc) {
    (
        ChunkId(id_at(r, 8)),
        BlobLoc {
            pack: u32_at(r, 40),
            offset: u32_at(r, 44),
            length: u32_at(r, 48),
            raw_length: u32_at(r, 52),
            kind: if r[56] == 1 {
                BlobKind::Tree
            } else {
                BlobKind::Data
            },
            compressed: r[57] == 1,
        },
    )
}

impl DiskIndex {
    /// The build `base/current` names, if it is complete and made for this repository
    /// and these keys.
    pub fn open_current(
        base: &Path,
        repo: &RepoId,
        reader: Option<[u8; 32]>,
        authority: Option<[u8; 32]>,
    ) -> Result<DiskIndex> {
        // A build published between reading the pointer and opening the folder it named
        // (another command on this host) may have removed that folder: read it again.
        let mut tries = 0;
        let d = loop {
            let name = std::fs::read_to_string(base.join("current"))?;
            let name = name.trim();
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return Err(damaged(base, "its pointer names no build"));
            }
            match DiskIndex::open(&base.join(name), None) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => tries += 1,
                r => break r?,
            }
        };
        if d.meta.repo != repo.to_hex()
            || d.meta.reader != reader.map(hex::encode)
            || d.meta.authority != authority.map(hex::encode)
        {
            return Err(damaged(base, "it was built for another repository or key"));
        }
        Ok(d)
    }

    fn open(dir: &Path, temp: Option<tempfile::TempDir>) -> Result<DiskIndex> {
        let meta: DiskMeta = serde_json::from_slice(&std::fs::read(dir.join("meta.json"))?)
            .map_err(|_| damaged(dir, "its description does not parse"))?;
        if meta.version != VERSION {
            return Err(damaged(dir, "another version wrote it"));
        }
        let hkey: [u8; 32] = hex::decode(&meta.hkey)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| damaged(dir, "its sort key is unreadable"))?;
        let records = open_sized(&dir.join("records"), meta.records * RECORD as u64)?;
        let packs = open_sized(&dir.join("packs"), meta.packs * PACK as u64)?;
        let pack_ids = open_sized(&dir.join("pack-ids"), meta.packs * PACK_ID as u64)?;
        let pack_blobs = open_sized(&dir.join("pack-blobs"), meta.packs * PACK_BLOBS as u64)?;
        let keys = File::open(dir.join("keys"))?;
        let keys_len = keys.metadata()?.len();
        // Every record once, grouped by pack.
        let by_pack_len = meta.records * RECORD as u64;
        let by_pack = open_sized(&dir.join("by-pack"), by_pack_len)?;
        let record_fences = read_fences(&dir.join("fences"), meta.records)?;
        let pack_fences = read_fences(&dir.join("pack-fences"), meta.packs)?;
        if meta.bad.iter().any(|(p, _)| u64::from(*p) >= meta.packs) {
            return Err(damaged(dir, "a damaged copy names no pack"));
        }
        Ok(DiskIndex {
            meta,
            dir: dir.to_path_buf(),
            hkey,
            records,
            packs,
            pack_ids,
            keys,
            by_pack,
            pack_blobs,
            file_packs: File::open(dir.join("file-packs"))?,
            record_fences,
            pack_fences,
            keys_len,
            by_pack_len,
            _temp: temp,
        })
    }

    pub fn pack_count(&self) -> u32 {
        self.meta.packs as u32
    }

    fn warn(&self, e: &std::io::Error) {
        tracing::warn!("on-disk index {}: {e}", self.dir.display());
    }

    /// Every location of `id` the build holds, in build order. A location naming a pack
    /// outside the build (a damaged cache) is left out, and so is everything when the
    /// build cannot be read (a chunk then looks new: stored again, never lost).
    pub fn lookup(&self, id: &ChunkId) -> Vec<BlobLoc> {
        self.lookup_checked(id).unwrap_or_else(|e| {
            self.warn(&e);
            vec![]
        })
    }

    /// The block of a sorted file of `n` entries of `size` bytes that holds the first
    /// entry whose sort key (its first 8 bytes) is not below `key`, found by `fences`:
    /// the number of its first entry and its bytes (one `pread`).
    fn block(f: &File, fences: &[u64], n: u64, size: usize, key: u64) -> Result<(u64, Vec<u8>)> {
        Self::block_at(f, fences.partition_point(|f| *f < key) as u64, n, size)
    }

    /// The block of [`DiskIndex::block`] by its fence number `j`: the first fence not below
    /// the key.
    fn block_at(f: &File, j: u64, n: u64, size: usize) -> Result<(u64, Vec<u8>)> {
        // Fence j is entry j * FENCE. Every entry before the block's start is below key
        // (its fence is); the first not below lies at or before the next fence.
        let first = if j == 0 { 0 } else { (j - 1) * FENCE };
        let end = (j * FENCE + 1).min(n);
        let bytes = read_at(f, first * size as u64, (end - first) as usize * size)?;
        Ok((first, bytes))
    }

    /// As [`DiskIndex::lookup`], with an error when the build cannot be read: for prune,
    /// to which a chunk that looks absent is a chunk to delete.
    pub fn lookup_checked(&self, id: &ChunkId) -> Result<Vec<BlobLoc>> {
        let found = self.lookup_many(std::slice::from_ref(id))?;
        Ok(found.into_iter().map(|(_, l)| l).collect())
    }

    /// [`DiskIndex::lookup_checked`] of each of `ids`: every location found, with the
    /// place in `ids` of the id it is a copy of. They are looked up in the records' own
    /// order, so ids whose records share a block cost one `pread` between them: prune
    /// marks in batches of many thousands, and reads each block of `records` once a batch
    /// rather than once a reference.
    pub fn lookup_many(&self, ids: &[ChunkId]) -> Result<Vec<(usize, BlobLoc)>> {
        let mut out = vec![];
        let n = self.meta.records;
        if n == 0 {
            return Ok(out);
        }
        let mut order: Vec<(u64, usize)> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (u64::from_be_bytes(hash(&self.hkey, &id.0)), i))
            .collect();
        order.sort_unstable();
        // The block last read: the fence index it was found by, its first entry, its bytes.
        let mut held: Option<(usize, u64, Vec<u8>)> = None;
        for (key, i) in order {
            let j = self.record_fences.partition_point(|f| *f < key);
            if held.as_ref().is_none_or(|(hj, ..)| *hj != j) {
                let (first, bytes) = Self::block_at(&self.records, j as u64, n, RECORD)?;
                held = Some((j, first, bytes));
            }
            let (_, first, block) = held.as_ref().expect("a block is held");
            self.find(&ids[i], key.to_be_bytes(), *first, block, &mut |l| {
                out.push((i, l))
            })?;
        }
        Ok(out)
    }

    /// The locations of `id` (keyed hash `h`) from the block of `records` that holds the
    /// first entry not below `h`, starting at entry `first`.
    fn find(
        &self,
        id: &ChunkId,
        h: [u8; 8],
        first: u64,
        block: &[u8],
        found: &mut dyn FnMut(BlobLoc),
    ) -> Result<()> {
        let n = self.meta.records;
        let in_block = block.len() / RECORD;
        let mut at = (0..in_block)
            .find(|i| block[i * RECORD..i * RECORD + 8] >= h[..])
            .unwrap_or(in_block) as u64;
        // The run of h may go on past the block (copies of one chunk, or a shared h).
        while first + at < n {
            let r: std::borrow::Cow<[u8]> = if (at as usize) < in_block {
                std::borrow::Cow::Borrowed(&block[at as usize * RECORD..(at as usize + 1) * RECORD])
            } else {
                std::borrow::Cow::Owned(read_at(
                    &self.records,
                    (first + at) * RECORD as u64,
                    RECORD,
                )?)
            };
            if r[..8] != h[..] {
                break;
            }
            let (cid, loc) = decode_record(&r);
            if cid == *id && loc.pack < self.pack_count() {
                found(loc);
            }
            at += 1;
        }
        Ok(())
    }

    pub fn pack_at(&self, pos: u32) -> PackMeta {
        let r = match read_at(&self.packs, u64::from(pos) * PACK as u64, PACK) {
            Ok(r) => r,
            Err(e) => {
                // Read as a pack nobody can open: reading it then fails as with a wrong key.
                self.warn(&e);
                return PackMeta {
                    id: PackId(Id([0; 32])),
                    size: 0,
                    key: vec![],
                    writer: None,
                    vouched: false,
                    trusted: false,
                };
            }
        };
        let a = attribution_of(&r);
        let len = u16::from_le_bytes([r[73], r[74]]);
        let off = u64_at(&r, 75);
        // A key outside the keys file (a damaged cache) reads as none: opening the pack
        // then fails as it would with a wrong key.
        let key = match off.checked_add(u64::from(len)) {
            Some(end) if end <= self.keys_len => {
                read_at(&self.keys, off, usize::from(len)).unwrap_or_default()
            }
            _ => vec![],
        };
        PackMeta {
            id: PackId(id_at(&r, 0)),
            size: u64_at(&r, 32),
            key,
            writer: a.writer,
            vouched: a.vouched,
            trusted: a.trusted,
        }
    }

    /// How many records `by-pack` holds: the build's copies, numbered pack by pack.
    pub fn copies(&self) -> u64 {
        self.by_pack_len / RECORD as u64
    }

    /// The records of the pack at `pos` in `by-pack`: the number of the first and their
    /// bytes. A range outside the file (a damaged cache) reads as none.
    fn pack_span(&self, pos: u32) -> Option<(u64, Vec<u8>)> {
        if u64::from(pos) >= self.meta.packs {
            return None;
        }
        self.pack_span_checked(pos).map_err(|e| self.warn(&e)).ok()
    }

    fn pack_span_checked(&self, pos: u32) -> Result<(u64, Vec<u8>)> {
        let r = read_at(
            &self.pack_blobs,
            u64::from(pos) * PACK_BLOBS as u64,
            PACK_BLOBS,
        )?;
        let first = u64_at(&r, 0);
        let n = u64::from(u32_at(&r, 8));
        if first.checked_add(n).is_none_or(|end| end > self.copies()) {
            return Err(damaged(
                &self.dir,
                "a pack's records lie outside its records",
            ));
        }
        let span = read_at(&self.by_pack, first * RECORD as u64, (n as usize) * RECORD)?;
        Ok((first, span))
    }

    /// The blobs of the pack at `pos`, by offset (every object naming it adds to them), and
    /// the number of the first in `by-pack` (see [`DiskIndex::copies`]).
    pub fn pack_blobs(&self, pos: u32) -> (u64, Vec<(ChunkId, BlobLoc)>) {
        let Some((first, span)) = self.pack_span(pos) else {
            return (0, vec![]);
        };
        let blobs = span
            .chunks_exact(RECORD)
            .map(decode_record)
            .map(|(id, mut l)| {
                l.pack = pos;
                (id, l)
            })
            .collect();
        (first, blobs)
    }

    /// The number in `by-pack` of the copy of `id` at `offset` in the pack at `pos`; the
    /// pack's records are taken from `spans` when it holds them, else read (two `pread`s)
    /// and kept there.
    pub fn slot_of(&self, pos: u32, id: &ChunkId, offset: u32, spans: &mut Spans) -> Option<u64> {
        let k = match spans.0.iter().position(|(p, ..)| *p == pos) {
            Some(k) => k,
            None => {
                let (first, span) = self.pack_span(pos)?;
                spans.keep(pos, first, span)
            }
        };
        let (_, first, span) = &spans.0[k];
        let (first, span) = (*first, span);
        let n = span.len() / RECORD;
        let at = |i: usize| decode_record(&span[i * RECORD..(i + 1) * RECORD]);
        // Sorted by offset when built; look at every record if the search misses.
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if at(mid).1.offset < offset {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let hit = |i: usize| {
            let (c, l) = at(i);
            c == *id && l.offset == offset
        };
        let i = if lo < n && hit(lo) {
            lo
        } else {
            (0..n).find(|i| hit(*i))?
        };
        Some(first + i as u64)
    }

    pub fn pack_pos(&self, id: &PackId) -> Option<u32> {
        let n = self.meta.packs;
        if n == 0 {
            return None;
        }
        let mut key = [0u8; 40];
        key[..8].copy_from_slice(&hash(&self.hkey, &id.0));
        key[8..].copy_from_slice(&id.0 .0);
        let h = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
        let (_, block) = Self::block(&self.pack_ids, &self.pack_fences, n, PACK_ID, h)
            .map_err(|e| self.warn(&e))
            .ok()?;
        // Ids are unique, so the block holds the entry if any does (an h shared across the
        // block's end: the rest of the run read one by one).
        let mut found = None;
        for r in block.chunks_exact(PACK_ID) {
            if r[..40] == key[..] {
                found = Some(u32_at(r, 40));
                break;
            }
        }
        if found.is_none() {
            found = self.pack_pos_after_block(&key, h);
        }
        found.filter(|pos| *pos < self.pack_count())
    }

    /// [`DiskIndex::pack_pos`] for an id whose keyed hash runs past its block: read on
    /// entry by entry (rare: ids sharing 8 bytes of keyed hash across a fence).
    fn pack_pos_after_block(&self, key: &[u8; 40], h: u64) -> Option<u32> {
        let n = self.meta.packs;
        let j = self.pack_fences.partition_point(|f| *f < h) as u64;
        let mut i = (j * FENCE + 1).min(n);
        while i < n {
            let r = read_at(&self.pack_ids, i * PACK_ID as u64, PACK_ID).ok()?;
            if r[..8] != key[..8] {
                return None;
            }
            if r[..40] == key[..] {
                return Some(u32_at(&r, 40));
            }
            i += 1;
        }
        None
    }

    /// The packs each index object of the build names.
    pub fn file_packs(&self) -> Result<HashMap<IndexId, Vec<PackId>>> {
        // Read at offsets: the handle is shared by every call.
        let mut raw = vec![0u8; self.file_packs.metadata()?.len() as usize];
        std::os::unix::fs::FileExt::read_exact_at(&self.file_packs, &mut raw, 0)?;
        let mut out = HashMap::new();
        let mut at = 0usize;
        for f in &self.meta.files {
            if at + 4 > raw.len() {
                return Err(damaged(&self.dir, "its list of packs per object is short"));
            }
            let n = u32_at(&raw, at) as usize;
            at += 4;
            if raw.len() < at + n * 4 {
                return Err(damaged(&self.dir, "its list of packs per object is short"));
            }
            let mut packs = Vec::with_capacity(n);
            for i in 0..n {
                let pos = u32_at(&raw, at + i * 4);
                if pos >= self.pack_count() {
                    return Err(damaged(
                        &self.dir,
                        "an object names a pack it does not hold",
                    ));
                }
                packs.push(self.pack_at(pos).id);
            }
            at += n * 4;
            out.insert(*f, packs);
        }
        Ok(out)
    }
}

/// Builds a [`DiskIndex`] from index objects (and, to add objects to one, from an older
/// build), with memory bounded by one partition of the records and a small entry per
/// pack.
pub struct Builder {
    base: PathBuf,
    tmp: PathBuf,
    temp: Option<tempfile::TempDir>,
    hkey: [u8; 32],
    parts: Vec<BufWriter<File>>,
    packs: BufWriter<File>,
    /// `packs` again, to read back a pack's id and update its attribution in place.
    packs_rw: File,
    keys: BufWriter<File>,
    key_off: u64,
    file_packs: BufWriter<File>,
    /// The pack ids, partitioned by their keyed hash, sorted at the end into `pack-ids`.
    pid_parts: Vec<BufWriter<File>>,
    /// Keyed hash of a pack id (first 4 bytes) to its position; the ids whose 4 bytes
    /// another pack took first are in `collided`.
    pack_pos: HashMap<u32, u32>,
    collided: HashMap<PackId, u32>,
    n_packs: u32,
    files: Vec<IndexId>,
    bad: Vec<(PackId, ChunkId)>,
    /// `by-pack` and `pack-blobs` as the packs come, each pack's records written as it is
    /// first listed (positions are given in that order): what they become unless some
    /// pack is listed again.
    direct: BufWriter<File>,
    direct_blobs: BufWriter<File>,
    direct_n: u64,
    /// The packs listed again (a bit per position): their records are taken from the
    /// deduplicated records instead, every listing's blobs joined.
    relisted: Vec<u64>,
}

fn private_dir(p: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)?;
    Ok(())
}

impl Builder {
    /// A build that will become `base/current` (`base` is the cache folder of this
    /// repository and key), or, with `None`, one in a temporary folder for this command.
    pub fn new(base: Option<&Path>) -> Result<Builder> {
        let (base, temp) = match base {
            Some(b) => {
                private_dir(b)?;
                (b.to_path_buf(), None)
            }
            None => {
                let t = tempfile::Builder::new().prefix("custos-index").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let tmp = base.join(format!(".build-{}", hex::encode(rand::random::<[u8; 8]>())));
        private_dir(&tmp)?;
        let create = |name: &str| -> Result<BufWriter<File>> {
            Ok(BufWriter::with_capacity(
                1 << 16,
                File::create(tmp.join(name))?,
            ))
        };
        let mut parts = Vec::with_capacity(PARTS);
        for i in 0..PARTS {
            parts.push(BufWriter::with_capacity(
                1 << 14,
                File::create(tmp.join(format!("part-{i:02x}")))?,
            ));
        }
        let mut pid_parts = Vec::with_capacity(PACK_ID_PARTS);
        for i in 0..PACK_ID_PARTS {
            pid_parts.push(BufWriter::with_capacity(
                1 << 14,
                File::create(tmp.join(format!("pid-{i:02x}")))?,
            ));
        }
        let packs = create("packs")?;
        let packs_rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(tmp.join("packs"))?;
        let (direct, direct_blobs) = (create("by-pack.direct")?, create("pack-blobs.direct")?);
        Ok(Builder {
            packs,
            packs_rw,
            keys: create("keys")?,
            file_packs: create("file-packs")?,
            pid_parts,
            base,
            tmp,
            temp,
            hkey: rand::random(),
            parts,
            key_off: 0,
            pack_pos: HashMap::new(),
            collided: HashMap::new(),
            n_packs: 0,
            files: vec![],
            bad: vec![],
            direct,
            direct_blobs,
            direct_n: 0,
            relisted: vec![],
        })
    }

    /// The records of the pack just written at `pos` as one object lists them: each
    /// chunk once (its first listing: the records' dedup keeps the same), by offset.
    fn add_pack_records(&mut self, pos: u32, mut blobs: Vec<(ChunkId, BlobLoc)>) -> Result<()> {
        debug_assert_eq!(pos + 1, self.n_packs, "records follow their pack");
        let mut seen = std::collections::HashSet::with_capacity(blobs.len());
        blobs.retain(|(id, _)| seen.insert(*id));
        blobs.sort_by(|a, b| (a.1.offset, &a.0 .0 .0).cmp(&(b.1.offset, &b.0 .0 .0)));
        let first = self.direct_n;
        for (id, loc) in &blobs {
            let h = hash(&self.hkey, &id.0);
            let r = encode_record(h, id, loc);
            self.parts[h[0] as usize].write_all(&r)?;
            self.direct.write_all(&r)?;
        }
        self.direct_n += blobs.len() as u64;
        self.direct_blobs.write_all(&first.to_le_bytes())?;
        self.direct_blobs
            .write_all(&(blobs.len() as u32).to_le_bytes())
    }

    fn relist(&mut self, pos: u32) {
        let (w, bit) = (pos as usize / 64, pos % 64);
        if self.relisted.len() <= w {
            self.relisted.resize(w + 1, 0);
        }
        self.relisted[w] |= 1 << bit;
    }

    fn is_relisted(&self, pos: u32) -> bool {
        self.relisted
            .get(pos as usize / 64)
            .is_some_and(|w| w & (1 << (pos % 64)) != 0)
    }

    fn add_record(&mut self, id: &ChunkId, loc: &BlobLoc) -> Result<()> {
        let h = hash(&self.hkey, &id.0);
        self.parts[h[0] as usize].write_all(&encode_record(h, id, loc))?;
        Ok(())
    }

    /// The position of a pack already written, if it was.
    fn find_pack(&mut self, id: &PackId) -> Result<Option<u32>> {
        if let Some(pos) = self.collided.get(id) {
            return Ok(Some(*pos));
        }
        let Some(&pos) = self.pack_pos.get(&table_key(&hash(&self.hkey, &id.0))) else {
            return Ok(None);
        };
        self.packs.flush()?;
        let mut stored = [0u8; 32];
        std::os::unix::fs::FileExt::read_exact_at(
            &self.packs_rw,
            &mut stored,
            u64::from(pos) * PACK as u64,
        )?;
        Ok((stored == id.0 .0).then_some(pos))
    }

    /// Joins what another object says of who stands behind a pack already written.
    fn upgrade(&mut self, pos: u32, a: Attribution) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.packs.flush()?;
        let at = u64::from(pos) * PACK as u64;
        let mut r = [0u8; PACK];
        self.packs_rw.read_exact_at(&mut r, at)?;
        let was = attribution_of(&r);
        let joined = was.join(a);
        if joined != was {
            put_attribution(&mut r, joined);
            self.packs_rw.write_all_at(&r, at)?;
        }
        Ok(())
    }

    fn write_pack(&mut self, m: &PackMeta) -> Result<u32> {
        let pos = self.n_packs;
        let key_len = u16::try_from(m.key.len())
            .map_err(|_| damaged(&self.tmp, "a pack's key is oversized"))?;
        let mut r = [0u8; PACK];
        r[..32].copy_from_slice(&m.id.0 .0);
        r[32..40].copy_from_slice(&m.size.to_le_bytes());
        put_attribution(&mut r, m.attribution());
        r[73..75].copy_from_slice(&key_len.to_le_bytes());
        r[75..83].copy_from_slice(&self.key_off.to_le_bytes());
        self.packs.write_all(&r)?;
        self.keys.write_all(&m.key)?;
        self.key_off += m.key.len() as u64;
        let h = hash(&self.hkey, &m.id.0);
        match self.pack_pos.entry(table_key(&h)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(pos);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.collided.insert(m.id, pos);
            }
        }
        let mut r = [0u8; PACK_ID];
        r[..8].copy_from_slice(&h);
        r[8..40].copy_from_slice(&m.id.0 .0);
        r[40..].copy_from_slice(&pos.to_le_bytes());
        self.pid_parts[h[0] as usize * PACK_ID_PARTS / 256].write_all(&r)?;
        self.n_packs += 1;
        Ok(pos)
    }

    /// Starts from an older build (before any object is added): its packs keep their
    /// positions and their records.
    pub fn seed(&mut self, old: &DiskIndex) -> Result<()> {
        assert_eq!(self.n_packs, 0, "a build is seeded first");
        for pos in 0..old.pack_count() {
            self.write_pack(&old.pack_at(pos))?;
            let (_, span) = old.pack_span_checked(pos)?;
            self.add_pack_records(pos, span.chunks_exact(RECORD).map(decode_record).collect())?;
        }
        for (pack, packs) in old.file_packs()? {
            self.files.push(pack);
            let mut pos = Vec::with_capacity(packs.len());
            for p in &packs {
                pos.push(
                    self.find_pack(p)?
                        .ok_or_else(|| damaged(&self.tmp, "an object names a pack it lacks"))?,
                );
            }
            self.write_file_packs(pos)?;
        }
        for (pos, chunk) in &old.meta.bad {
            self.bad.push((old.pack_at(*pos).id, *chunk));
        }
        Ok(())
    }

    fn write_file_packs(&mut self, pos: Vec<u32>) -> Result<()> {
        self.file_packs
            .write_all(&(pos.len() as u32).to_le_bytes())?;
        for p in pos {
            self.file_packs.write_all(&p.to_le_bytes())?;
        }
        Ok(())
    }

    /// Adds one index object: `attr` says what its signature backs for each pack, `bad`
    /// whether its list of damaged copies counts (the authority signed it).
    pub fn add_file(
        &mut self,
        id: IndexId,
        f: &IndexFile,
        attr: impl Fn(&IndexPack) -> Attribution,
        bad: bool,
    ) -> Result<()> {
        let mut positions = Vec::with_capacity(f.packs.len());
        for p in &f.packs {
            let a = attr(p);
            let pos = match self.find_pack(&p.id)? {
                Some(pos) => {
                    self.upgrade(pos, a)?;
                    self.relist(pos);
                    for b in &p.blobs {
                        self.add_record(&b.id, &b.loc(pos))?;
                    }
                    pos
                }
                None => {
                    let pos = self.write_pack(&PackMeta::listed(p, a))?;
                    self.add_pack_records(
                        pos,
                        p.blobs.iter().map(|b| (b.id, b.loc(pos))).collect(),
                    )?;
                    pos
                }
            };
            positions.push(pos);
        }
        self.files.push(id);
        self.write_file_packs(positions)?;
        if bad {
            self.bad.extend(f.bad.iter().copied());
        }
        Ok(())
    }

    /// `by-pack` and `pack-blobs` from the records (deduplicated, so exactly what lookups
    /// find: every object listing a pack adds to it, whichever came first), partitioned by
    /// pack position: each partition sorted in memory by (position, offset).
    fn write_by_pack(&mut self, parts: Vec<BufWriter<File>>, suffix: &str) -> Result<()> {
        let mut by_pack = BufWriter::with_capacity(
            1 << 16,
            File::create(self.tmp.join(format!("by-pack{suffix}")))?,
        );
        let mut pack_blobs = BufWriter::with_capacity(
            1 << 16,
            File::create(self.tmp.join(format!("pack-blobs{suffix}")))?,
        );
        let mut entry = |first: u64, n: u64| -> Result<()> {
            pack_blobs.write_all(&first.to_le_bytes())?;
            pack_blobs.write_all(&(n as u32).to_le_bytes())
        };
        // The next pack whose entry is not written, and the records written.
        let (mut next, mut written) = (0u32, 0u64);
        for (i, w) in parts.into_iter().enumerate() {
            let raw = take_part(w, &self.tmp.join(format!("bypos-{i:02x}")))?;
            let mut rs: Vec<&[u8]> = raw.chunks_exact(RECORD).collect();
            rs.sort_by(|a, b| {
                (u32_at(a, 40), u32_at(a, 44), &a[8..40]).cmp(&(
                    u32_at(b, 40),
                    u32_at(b, 44),
                    &b[8..40],
                ))
            });
            let mut k = 0;
            while k < rs.len() {
                let pos = u32_at(rs[k], 40);
                while next < pos {
                    entry(written, 0)?;
                    next += 1;
                }
                let first = written;
                while k < rs.len() && u32_at(rs[k], 40) == pos {
                    by_pack.write_all(rs[k])?;
                    written += 1;
                    k += 1;
                }
                entry(first, written - first)?;
                next = pos + 1;
            }
        }
        while next < self.n_packs {
            entry(written, 0)?;
            next += 1;
        }
        by_pack.flush()?;
        pack_blobs.flush()?;
        Ok(())
    }

    /// `by-pack` and `pack-blobs` from the packs' first listings, and for the packs listed
    /// again from the records (`.again`, every listing joined): both read in order.
    fn join_by_pack(&mut self) -> Result<()> {
        use std::io::{BufReader, Read};
        let open = |name: &str| -> Result<BufReader<File>> {
            Ok(BufReader::with_capacity(
                1 << 16,
                File::open(self.tmp.join(name))?,
            ))
        };
        let (mut d, mut db) = (open("by-pack.direct")?, open("pack-blobs.direct")?);
        let (mut a, mut ab) = (open("by-pack.again")?, open("pack-blobs.again")?);
        let mut by_pack =
            BufWriter::with_capacity(1 << 16, File::create(self.tmp.join("by-pack"))?);
        let mut pack_blobs =
            BufWriter::with_capacity(1 << 16, File::create(self.tmp.join("pack-blobs"))?);
        let (mut entry, mut span) = ([0u8; PACK_BLOBS], Vec::new());
        let mut take = |recs: &mut BufReader<File>, blobs: &mut BufReader<File>, keep: bool| {
            blobs.read_exact(&mut entry)?;
            let n = u32_at(&entry, 8) as usize;
            let mut b = vec![0u8; n * RECORD];
            recs.read_exact(&mut b)?;
            Result::Ok(keep.then_some(b))
        };
        let mut written = 0u64;
        for pos in 0..self.n_packs {
            let again = self.is_relisted(pos);
            let first = take(&mut d, &mut db, !again)?;
            let second = take(&mut a, &mut ab, again)?;
            span.clear();
            span.extend(first.into_iter().chain(second).flatten());
            by_pack.write_all(&span)?;
            pack_blobs.write_all(&written.to_le_bytes())?;
            pack_blobs.write_all(&((span.len() / RECORD) as u32).to_le_bytes())?;
            written += (span.len() / RECORD) as u64;
        }
        by_pack.flush()?;
        pack_blobs.flush()?;
        for name in [
            "by-pack.direct",
            "pack-blobs.direct",
            "by-pack.again",
            "pack-blobs.again",
        ] {
            std::fs::remove_file(self.tmp.join(name))?;
        }
        Ok(())
    }

    /// Sorts the records, writes the description last and makes the build current.
    pub fn finish(
        mut self,
        repo: &RepoId,
        reader: Option<[u8; 32]>,
        authority: Option<[u8; 32]>,
    ) -> Result<DiskIndex> {
        self.packs.flush()?;
        self.keys.flush()?;
        self.file_packs.flush()?;
        let mut bad = Vec::with_capacity(self.bad.len());
        for (p, c) in std::mem::take(&mut self.bad) {
            if let Some(pos) = self.find_pack(&p)? {
                bad.push((pos, c));
            }
        }
        // The table and its sort are no longer needed: freed before the records' sort.
        self.pack_pos = HashMap::new();
        self.collided = HashMap::new();
        self.direct.flush()?;
        self.direct_blobs.flush()?;
        // Records: each partition sorted in memory, in hash order; each record of a pack
        // listed again also goes to one of 256 partitions by pack position, for `by-pack`.
        let mut out = BufWriter::with_capacity(1 << 16, File::create(self.tmp.join("records"))?);
        let mut records = 0u64;
        let mut fences = BufWriter::new(File::create(self.tmp.join("fences"))?);
        let n_packs = u64::from(self.n_packs);
        let relisted = !self.relisted.is_empty();
        let mut by_parts = Vec::with_capacity(PARTS);
        for i in 0..PARTS {
            if !relisted {
                break;
            }
            by_parts.push(BufWriter::with_capacity(
                1 << 14,
                File::create(self.tmp.join(format!("bypos-{i:02x}")))?,
            ));
        }
        let parts = std::mem::take(&mut self.parts);
        for (i, w) in parts.into_iter().enumerate() {
            let raw = take_part(w, &self.tmp.join(format!("part-{i:02x}")))?;
            let mut rs: Vec<&[u8]> = raw.chunks_exact(RECORD).collect();
            rs.sort_by(|a, b| {
                a[..40]
                    .cmp(&b[..40])
                    .then(u32_at(a, 40).cmp(&u32_at(b, 40)))
            });
            rs.dedup_by(|a, b| a[..44] == b[..44]);
            for r in rs {
                if records.is_multiple_of(FENCE) {
                    fences.write_all(&r[..8])?;
                }
                out.write_all(r)?;
                records += 1;
                let pos = u32_at(r, 40);
                if relisted && u64::from(pos) < n_packs && self.is_relisted(pos) {
                    by_parts[(u64::from(pos) * PARTS as u64 / n_packs) as usize].write_all(r)?;
                }
            }
        }
        out.flush()?;
        drop(out);
        fences.flush()?;
        drop(fences);
        if relisted {
            self.write_by_pack(by_parts, ".again")?;
            self.join_by_pack()?;
        } else {
            std::fs::rename(self.tmp.join("by-pack.direct"), self.tmp.join("by-pack"))?;
            std::fs::rename(
                self.tmp.join("pack-blobs.direct"),
                self.tmp.join("pack-blobs"),
            )?;
        }
        // Pack ids: each partition sorted in memory, in (keyed hash, id) order.
        let mut w = BufWriter::new(File::create(self.tmp.join("pack-ids"))?);
        let mut fences = BufWriter::new(File::create(self.tmp.join("pack-fences"))?);
        let parts = std::mem::take(&mut self.pid_parts);
        let mut n = 0u64;
        for (i, p) in parts.into_iter().enumerate() {
            let raw = take_part(p, &self.tmp.join(format!("pid-{i:02x}")))?;
            let mut rs: Vec<&[u8]> = raw.chunks_exact(PACK_ID).collect();
            rs.sort_by(|a, b| a[..40].cmp(&b[..40]));
            for r in rs {
                if n.is_multiple_of(FENCE) {
                    fences.write_all(&r[..8])?;
                }
                w.write_all(r)?;
                n += 1;
            }
        }
        w.flush()?;
        fences.flush()?;
        drop((w, fences));
        let meta = DiskMeta {
            version: VERSION,
            repo: repo.to_hex(),
            reader: reader.map(hex::encode),
            authority: authority.map(hex::encode),
            hkey: hex::encode(self.hkey),
            files: std::mem::take(&mut self.files),
            bad,
            records,
            packs: u64::from(self.n_packs),
        };
        let mut m = File::create(self.tmp.join("meta.json"))?;
        m.write_all(&serde_json::to_vec(&meta).expect("serializable"))?;
        m.sync_all()?;
        // Opened (every file mapped or held open) before it is published: another command
        // on this host that publishes its own build next removes this folder, and what is
        // open stays readable.
        let mut built = DiskIndex::open(&self.tmp, self.temp.take())?;
        let name = format!("b-{}", hex::encode(rand::random::<[u8; 8]>()));
        let done = self.base.join(&name);
        if built._temp.is_some() {
            std::fs::rename(&self.tmp, &done)?;
        } else {
            // Publishing and removing older builds, one command of this host at a time:
            // none removes a build another has moved in place but not yet published.
            let _publishing = publish_lock(&self.base)?;
            std::fs::rename(&self.tmp, &done)?;
            let ptr = self.base.join(format!(".current-{name}"));
            std::fs::write(&ptr, &name)?;
            std::fs::rename(&ptr, self.base.join("current"))?;
            // Older builds: a command that opened one keeps it until it ends.
            if let Ok(rd) = std::fs::read_dir(&self.base) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let stale_build = n.starts_with(".build-")
                        && e.metadata()
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|t| t.elapsed().ok())
                            .is_some_and(|age| age.as_secs() > 86_400);
                    if (n.starts_with("b-") && n != name) || stale_build {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        built.dir = done;
        Ok(built)
    }
}

/// An exclusive lock on the cache folder `base` for publishing a build (held while the
/// returned file is open).
fn publish_lock(base: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(base.join(".publish"))?;
    // SAFETY: flock on a descriptor this function owns; released when it is closed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// The content of a partition the build wrote through `w` at `path`, which is removed.
fn take_part(mut w: BufWriter<File>, path: &Path) -> Result<Vec<u8>> {
    w.flush()?;
    drop(w);
    let raw = std::fs::read(path)?;
    std::fs::remove_file(path)?;
    Ok(raw)
}

impl Drop for Builder {
    fn drop(&mut self) {
        // An abandoned build leaves nothing behind.
        if self.tmp.exists() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Who stands behind the pack of a pack record (writer at 40..72, flags at 72).
fn attribution_of(r: &[u8]) -> Attribution {
    let flags = r[72];
    Attribution {
        writer: (flags & HAS_WRITER != 0).then(|| r[40..72].try_into().expect("32 bytes")),
        vouched: flags & VOUCHED != 0,
        trusted: flags & TRUSTED != 0,
    }
}

fn put_attribution(r: &mut [u8], a: Attribution) {
    r[40..72].copy_from_slice(&a.writer.unwrap_or([0; 32]));
    r[72] = (if a.writer.is_some() { HAS_WRITER } else { 0 })
        | (if a.vouched { VOUCHED } else { 0 })
        | (if a.trusted { TRUSTED } else { 0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every chunk is found at its place and no other, at sizes where the first guess is
    /// off by more than the first window, and one id absent is not found.
    #[test]
    fn every_chunk_is_found_where_it_lies_and_an_absent_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Builder::new(Some(dir.path())).unwrap();
        let mut f = IndexFile::default();
        let mut n = 0u32;
        for p in 0..2000u32 {
            let blobs = (0..100u32)
                .map(|i| {
                    n += 1;
                    crate::blob::PackEntry {
                        id: ChunkId(Id(*blake3::hash(&n.to_le_bytes()).as_bytes())),
                        kind: BlobKind::Data,
                        offset: i * 10,
                        length: 10,
                        raw_length: n,
                        compressed: false,
                    }
                })
                .collect();
            f.packs.push(IndexPack {
                id: PackId(Id(*blake3::hash(&p.to_be_bytes()).as_bytes())),
                size: 1000,
                key: vec![1, 2, 3],
                blobs,
                writer: None,
                vouched: false,
            });
        }
        b.add_file(IndexId(Id([9; 32])), &f, |_| Attribution::default(), false)
            .unwrap();
        let d = b.finish(&RepoId(Id([1; 32])), None, None).unwrap();
        assert_eq!(d.meta.records, 200_000);
        for (pos, p) in f.packs.iter().enumerate() {
            for e in &p.blobs {
                let found = d.lookup(&e.id);
                assert_eq!(found.len(), 1);
                assert_eq!(
                    (found[0].pack, found[0].raw_length),
                    (pos as u32, e.raw_length)
                );
            }
            assert_eq!(d.pack_pos(&p.id), Some(pos as u32));
            assert_eq!(d.pack_blobs(pos as u32).1.len(), 100);
        }
        // Many at once, in any order, absent ones among them: each as looked up alone.
        let mut ids: Vec<ChunkId> = f
            .packs
            .iter()
            .rev()
            .flat_map(|p| p.blobs.iter().map(|e| e.id))
            .collect();
        for k in (0..ids.len()).step_by(997) {
            ids.insert(k, ChunkId(Id([k as u8; 32])));
        }
        let mut many = vec![vec![]; ids.len()];
        for (i, l) in d.lookup_many(&ids).unwrap() {
            many[i].push(l);
        }
        for (id, got) in ids.iter().zip(&many) {
            assert_eq!(*got, d.lookup(id), "{id}");
        }
        assert_eq!(many.iter().filter(|l| l.len() == 1).count(), 200_000);
        // Copy numbers with one cache of spans across packs visited in turn (more packs
        // than it keeps, back and forth): each the copy's place in `by-pack`.
        let mut spans = Spans::default();
        for round in 0..3u32 {
            for i in 0..100usize {
                for pos in (0..7u32).map(|k| (k * 37 + round) % 2000) {
                    let e = &f.packs[pos as usize].blobs[i];
                    let (first, blobs) = d.pack_blobs(pos);
                    let at = blobs.iter().position(|(c, _)| *c == e.id).unwrap() as u64;
                    assert_eq!(
                        d.slot_of(pos, &e.id, e.offset, &mut spans),
                        Some(first + at)
                    );
                    // Another chunk at that offset is not this copy.
                    assert_eq!(
                        d.slot_of(pos, &ChunkId(Id([7; 32])), e.offset, &mut spans),
                        None
                    );
                }
            }
        }
        assert!(spans.0.len() <= Spans::KEPT);
        assert!(d.lookup(&ChunkId(Id([0xee; 32]))).is_empty());
        assert!(d.lookup(&ChunkId(Id([0; 32]))).is_empty());
        assert!(d.lookup(&ChunkId(Id([0xff; 32]))).is_empty());
    }

    fn pack(n: u8) -> IndexPack {
        IndexPack {
            id: PackId(Id([n; 32])),
            size: 100,
            key: vec![n],
            blobs: vec![crate::blob::PackEntry {
                id: ChunkId(Id([n ^ 0x80; 32])),
                kind: BlobKind::Data,
                offset: 0,
                length: 10,
                raw_length: 10,
                compressed: false,
            }],
            writer: None,
            vouched: false,
        }
    }

    /// Two packs whose keyed hashes share their first 4 bytes (a thousand of 3 million
    /// packs do; forced here by planting the second's key in the table) stay two packs; a pack
    /// listed again by a later object is one pack whose attribution is the best of both,
    /// written in place; and a build seeded from this one keeps it all.
    #[test]
    fn colliding_pack_hashes_and_packs_listed_twice_keep_their_places() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Builder::new(Some(dir.path())).unwrap();
        let (a, c) = (pack(1), pack(2));
        let first = IndexFile {
            packs: vec![a.clone()],
            ..Default::default()
        };
        b.add_file(
            IndexId(Id([1; 32])),
            &first,
            |_| Attribution::default(),
            false,
        )
        .unwrap();
        // c's hash now leads to a's position.
        let hc = table_key(&hash(&b.hkey, &c.id.0));
        b.pack_pos.insert(hc, 0);
        // The second object lists `a` again with one blob the first did not (and without
        // one it did): the pack holds what either lists.
        let mut a2 = a.clone();
        let mut extra = a2.blobs[0].clone();
        extra.id = ChunkId(Id([0xab; 32]));
        extra.offset = 1 << 30;
        a2.blobs.remove(0);
        a2.blobs.push(extra.clone());
        let second = IndexFile {
            packs: vec![c.clone(), a2],
            ..Default::default()
        };
        let vouch = |p: &IndexPack| Attribution {
            writer: Some([7; 32]),
            vouched: p.id == a.id,
            trusted: false,
        };
        b.add_file(IndexId(Id([2; 32])), &second, vouch, false)
            .unwrap();
        assert_eq!(b.collided.get(&c.id), Some(&1));
        let d = b.finish(&RepoId(Id([1; 32])), None, None).unwrap();
        assert_eq!(d.meta.packs, 2);
        assert_eq!(d.pack_pos(&a.id), Some(0));
        assert_eq!(d.pack_pos(&c.id), Some(1));
        assert_eq!(d.pack_pos(&PackId(Id([3; 32]))), None);
        let pa = d.pack_at(0);
        assert_eq!((pa.id, pa.key.clone()), (a.id, vec![1]));
        assert!(pa.vouched && pa.writer == Some([7; 32]), "{pa:?}");
        let pc = d.pack_at(1);
        assert_eq!((pc.id, pc.key.clone(), pc.vouched), (c.id, vec![2], false));
        assert_eq!(d.lookup(&a.blobs[0].id)[0].pack, 0);
        assert_eq!(d.lookup(&c.blobs[0].id)[0].pack, 1);
        assert_eq!(d.pack_blobs(1).1[0].0, c.blobs[0].id);
        let union = |d: &DiskIndex| -> Vec<(ChunkId, u32)> {
            d.pack_blobs(0)
                .1
                .iter()
                .map(|(c, l)| (*c, l.offset))
                .collect()
        };
        let mut want: Vec<(ChunkId, u32)> = a.blobs.iter().map(|b| (b.id, b.offset)).collect();
        want.push((extra.id, extra.offset));
        assert_eq!(union(&d), want);
        assert_eq!(d.copies(), (a.blobs.len() + 1 + c.blobs.len()) as u64);
        assert_eq!(
            d.slot_of(0, &extra.id, extra.offset, &mut Spans::default()),
            Some(a.blobs.len() as u64)
        );
        let fp = d.file_packs().unwrap();
        assert_eq!(fp[&IndexId(Id([2; 32]))], vec![c.id, a.id]);

        // Seeded into a new build with a new key: the same answers.
        let mut b2 = Builder::new(Some(dir.path())).unwrap();
        b2.seed(&d).unwrap();
        let d2 = b2.finish(&RepoId(Id([1; 32])), None, None).unwrap();
        assert_eq!(d2.pack_pos(&a.id), Some(0));
        assert_eq!(d2.pack_pos(&c.id), Some(1));
        assert!(d2.pack_at(0).vouched);
        assert_eq!(d2.file_packs().unwrap(), fp);
        assert_eq!(union(&d2), want);
    }

    /// `by-pack` is written as the packs are first listed and joined with the records of
    /// the packs listed again: whatever the order of the listings (blobs out of offset
    /// order, a chunk twice in one pack, packs listed again by later objects, a build seeded
    /// from another and then added to), every pack holds each chunk once at its first
    /// listing's place, by offset, numbered as lookups and `slot_of` find them.
    #[test]
    fn by_pack_holds_every_listing_joined_whatever_their_order() {
        use std::collections::BTreeMap;
        let entry = |id: u8, offset: u32| crate::blob::PackEntry {
            id: ChunkId(Id([id; 32])),
            kind: BlobKind::Data,
            offset,
            length: 7,
            raw_length: 7,
            compressed: true,
        };
        let listing = |p: u8, blobs: Vec<crate::blob::PackEntry>| IndexPack {
            id: PackId(Id([p; 32])),
            size: 100,
            key: vec![p],
            blobs,
            writer: None,
            vouched: false,
        };
        let objects: Vec<Vec<IndexPack>> = vec![
            vec![
                listing(
                    1,
                    vec![entry(10, 50), entry(11, 0), entry(10, 90), entry(12, 20)],
                ),
                listing(2, vec![entry(20, 0)]),
                listing(3, vec![]),
            ],
            vec![
                listing(4, vec![entry(40, 5), entry(41, 1)]),
                listing(1, vec![entry(13, 70), entry(11, 80), entry(14, 10)]),
            ],
            vec![
                listing(5, vec![entry(50, 0), entry(51, 0)]),
                listing(4, vec![entry(42, 3)]),
            ],
        ];
        // The model: per pack, each chunk at its first listing's offset.
        let model = |objs: &[Vec<IndexPack>]| {
            let mut m: BTreeMap<PackId, Vec<(ChunkId, u32)>> = BTreeMap::new();
            for o in objs {
                for p in o {
                    let v = m.entry(p.id).or_default();
                    for b in &p.blobs {
                        if !v.iter().any(|(c, _)| *c == b.id) {
                            v.push((b.id, b.offset));
                        }
                    }
                }
            }
            for v in m.values_mut() {
                v.sort_by_key(|a| (a.1, a.0 .0 .0));
            }
            m
        };
        let check = |d: &DiskIndex, objs: &[Vec<IndexPack>]| {
            let want = model(objs);
            assert_eq!(u64::from(d.pack_count()), want.len() as u64);
            let mut numbered = 0u64;
            for pos in 0..d.pack_count() {
                let id = d.pack_at(pos).id;
                let (first, blobs) = d.pack_blobs(pos);
                let got: Vec<(ChunkId, u32)> = blobs.iter().map(|(c, l)| (*c, l.offset)).collect();
                assert_eq!(got, want[&id], "pack {pos}");
                assert_eq!(first, numbered);
                for (i, (c, l)) in blobs.iter().enumerate() {
                    assert_eq!(
                        d.slot_of(pos, c, l.offset, &mut Spans::default()),
                        Some(first + i as u64)
                    );
                    assert!(d
                        .lookup(c)
                        .iter()
                        .any(|f| f.pack == pos && f.offset == l.offset));
                }
                numbered += blobs.len() as u64;
            }
            assert_eq!(d.copies(), numbered);
            assert_eq!(d.meta.records, numbered);
        };
        let add = |b: &mut Builder, objs: &[Vec<IndexPack>], from: u8| {
            for (i, o) in objs.iter().enumerate() {
                let f = IndexFile {
                    packs: o.clone(),
                    ..Default::default()
                };
                b.add_file(
                    IndexId(Id([from + i as u8; 32])),
                    &f,
                    |_| Attribution::default(),
                    false,
                )
                .unwrap();
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let repo = RepoId(Id([1; 32]));
        // Every pack listed once: `by-pack` is the first listings as written.
        let mut b = Builder::new(Some(dir.path())).unwrap();
        add(&mut b, &objects[..1], 1);
        let one = b.finish(&repo, None, None).unwrap();
        check(&one, &objects[..1]);
        // Listed again, in one build.
        let mut b = Builder::new(Some(dir.path())).unwrap();
        add(&mut b, &objects, 1);
        check(&b.finish(&repo, None, None).unwrap(), &objects);
        // Seeded from the first and added to: pack 1, seeded, listed again.
        let mut b = Builder::new(Some(dir.path())).unwrap();
        b.seed(&one).unwrap();
        add(&mut b, &objects[1..], 2);
        let seeded = b.finish(&repo, None, None).unwrap();
        check(&seeded, &objects);
        // And seeded again with nothing new: the same.
        let mut b = Builder::new(Some(dir.path())).unwrap();
        b.seed(&seeded).unwrap();
        check(&b.finish(&repo, None, None).unwrap(), &objects);
    }

    /// Commands of one host building in one cache folder at once (a backup, a base backup
    /// and the agent's jobs): publishing a build removes the older ones' folders, and a
    /// command holding an older one still reads all of it; the pointer names a whole build
    /// at every moment.
    #[test]
    fn a_build_removed_by_a_newer_one_stays_readable_to_the_command_holding_it() {
        let dir = tempfile::tempdir().unwrap();
        let repo = RepoId(Id([1; 32]));
        let f = IndexFile {
            packs: vec![pack(1), pack(2)],
            ..Default::default()
        };
        let object = IndexId(Id([5; 32]));
        let build = || {
            let mut b = Builder::new(Some(dir.path())).unwrap();
            b.add_file(object, &f, |_| Attribution::default(), false)
                .unwrap();
            b
        };
        let whole = |d: &DiskIndex| {
            assert_eq!(
                d.file_packs().unwrap()[&object],
                vec![pack(1).id, pack(2).id]
            );
            assert_eq!(d.lookup(&pack(2).blobs[0].id)[0].pack, 1);
            assert_eq!(d.pack_at(0).key, vec![1]);
        };
        let (a, b) = (build(), build());
        let da = a.finish(&repo, None, None).unwrap();
        let held = DiskIndex::open_current(dir.path(), &repo, None, None).unwrap();
        let db = b.finish(&repo, None, None).unwrap();
        assert!(!da.dir.exists(), "the older build's folder is removed");
        for d in [&da, &held, &db] {
            whole(d);
        }
        let builds = || {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with("b-")
                })
                .count()
        };
        assert_eq!(builds(), 1);
        // Four commands building, publishing and opening at once, five times over.
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..5 {
                        let d = build().finish(&repo, None, None).unwrap();
                        whole(&d);
                        whole(&DiskIndex::open_current(dir.path(), &repo, None, None).unwrap());
                    }
                });
            }
        });
        whole(&DiskIndex::open_current(dir.path(), &repo, None, None).unwrap());
        assert_eq!(builds(), 1);
    }
}
