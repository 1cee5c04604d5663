//! The index: where every stored chunk lives (pack, offset, length), each pack's wrapped
//! data key, and who vouches for each pack. Index objects are sealed with the meta key, so
//! writers of every role can deduplicate against them without being able to read chunk
//! contents.
//!
//! Invariant: an index object is written only after every pack it names is durably stored.
//!
//! Trust (format.md 5.1): every writer holds the id key, so a backup key can store any
//! bytes under the id of content another host will back up; a host that deduplicated
//! against them would never store its data. Each index object is therefore signed by its
//! writer, and a pack counts for deduplication only when the reader wrote it (the object
//! is signed with the reader's own signing key) or a restore key vouched for it (the
//! repository's authority signed an object marking it `vouched`: a restore key read every
//! blob of it and found each matches its id). Chunks a restore key found damaged are
//! listed by the authority and never deduplicated against. The index keeps every place a
//! chunk is stored, best first, so a reader that meets a damaged copy reads another.

pub mod disk;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use custos_model::{ChunkId, IndexId, PackId, Result};
use serde::{Deserialize, Serialize};

use crate::blob::{BlobLoc, PackEntry};
use crate::format::b64;
use disk::DiskIndex;

/// Encoded form of one index object.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct IndexFile {
    pub packs: Vec<IndexPack>,
    /// The Ed25519 public key (hex) that signed this object: whoever wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signer: Option<String>,
    /// Chunks a restore key found damaged, with the pack holding the damaged copy. Only
    /// believed when the authority signed the object.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bad: Vec<(PackId, ChunkId)>,
    /// Ed25519 signature (hex) of `signer`: with `sig_v` 2, over `"custos index sig v2"
    /// ||` the BLAKE3 hash of the object's JSON without `sig` and `sig_v`; with `sig_v`
    /// absent (1, older objects), over [`IndexFile::signed_bytes`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
    /// How `sig` was made (format.md 5). Outside what is signed: a signature made one way
    /// does not verify the other way, so changing it only invalidates the object.
    #[serde(default = "sig_v1", skip_serializing_if = "before_v2")]
    pub sig_v: u32,
}

fn sig_v1() -> u32 {
    1
}

fn before_v2(v: &u32) -> bool {
    *v < 2
}

/// What a version-2 signature signs: a domain string and the BLAKE3 hash of the JSON. The
/// JSON of an index object at 100,000 blobs is ~15 MB; Ed25519 over it directly hashes it
/// with SHA-512 (once to verify, twice to sign: ~600 MB/s), BLAKE3 at several GB/s.
const SIG_V2: &[u8] = b"custos index sig v2";

impl IndexFile {
    /// What the signature covers: the object without its signature (serialized from a
    /// borrowed view: an index object can list hundreds of thousands of blobs).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut m = vec![];
        self.write_signed(&mut m).expect("writing to memory");
        m
    }

    /// Writes what a version-1 signature covers: a domain string, then [`Self::write_json`].
    fn write_signed(&self, mut w: impl std::io::Write) -> std::io::Result<()> {
        w.write_all(b"custos index sig v1")?;
        self.write_json(w)
    }

    /// The BLAKE3 hash of the JSON a signature covers.
    fn json_hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        self.write_json(&mut h).expect("writing to a hasher");
        *h.finalize().as_bytes()
    }

    /// What a version-2 signature signs.
    fn signed_v2(&self) -> Vec<u8> {
        [SIG_V2, &self.json_hash()[..]].concat()
    }

    /// Writes the JSON of the packs, the signer and the damaged copies (the stored object
    /// without `sig` and `sig_v`).
    fn write_json(&self, w: impl std::io::Write) -> std::io::Result<()> {
        use std::io::Write;
        #[derive(Serialize)]
        struct Unsigned<'a> {
            packs: &'a [IndexPack],
            #[serde(skip_serializing_if = "Option::is_none")]
            signer: &'a Option<String>,
            #[serde(skip_serializing_if = "<[_]>::is_empty")]
            bad: &'a [(PackId, ChunkId)],
        }
        // Buffered: serde writes a JSON token at a time.
        let mut w = std::io::BufWriter::with_capacity(64 << 10, w);
        serde_json::to_writer(
            &mut w,
            &Unsigned {
                packs: &self.packs,
                signer: &self.signer,
                bad: &self.bad,
            },
        )?;
        w.flush()
    }

    /// Signs the object (version 2).
    pub fn sign(&mut self, seed: &[u8; 32]) {
        self.sign_as(seed, 2);
    }

    /// Signs the object as custos did before version 2 (tests of older objects).
    #[doc(hidden)]
    pub fn sign_v1(&mut self, seed: &[u8; 32]) {
        self.sign_as(seed, 1);
    }

    fn sign_as(&mut self, seed: &[u8; 32], version: u32) {
        self.signer = Some(hex::encode(custos_crypto::sign::public_of(seed)));
        self.sig = None;
        self.sig_v = version;
        let signed = if version == 2 {
            self.signed_v2()
        } else {
            self.signed_bytes()
        };
        self.sig = Some(hex::encode(custos_crypto::sign::sign(seed, &signed)));
    }

    /// The public key whose signature over this object verifies, if one does.
    pub fn verified_signer(&self) -> Option<[u8; 32]> {
        let public: [u8; 32] = hex::decode(self.signer.as_deref()?).ok()?.try_into().ok()?;
        let sig = hex::decode(self.sig.as_deref()?).ok()?;
        let ok = match self.sig_v {
            2 => custos_crypto::sign::verify(&public, &self.signed_v2(), &sig),
            // Hashed as it is written: never the whole signed form in memory.
            1 => custos_crypto::sign::verify_written(&public, &sig, |w| self.write_signed(w)),
            _ => false,
        };
        ok.then_some(public)
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IndexPack {
    pub id: PackId,
    pub size: u64,
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    pub blobs: Vec<PackEntry>,
    /// In an object the authority signed: the signing key (hex) of whoever wrote the pack
    /// (prune keeps it when it rewrites the index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    /// In an object the authority signed: a restore key read every blob of the pack and
    /// found each matches its id (or wrote the pack itself).
    #[serde(default, skip_serializing_if = "is_false")]
    pub vouched: bool,
}

#[derive(Debug, Clone)]
pub struct PackMeta {
    pub id: PackId,
    pub size: u64,
    pub key: Vec<u8>,
    /// Who wrote the pack, as far as a signature shows (None: no valid signature).
    pub writer: Option<[u8; 32]>,
    /// A restore key read every blob of it and found each right.
    pub vouched: bool,
    /// Whether the key that loaded the index deduplicates against it: it wrote it, or a
    /// restore key vouched for it.
    pub trusted: bool,
}

/// Who stands behind a pack listed in one index object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attribution {
    pub writer: Option<[u8; 32]>,
    pub vouched: bool,
    pub trusted: bool,
}

impl Attribution {
    /// The best of what two objects listing one pack say of it.
    pub fn join(self, o: Attribution) -> Attribution {
        Attribution {
            writer: self.writer.or(o.writer),
            vouched: self.vouched | o.vouched,
            trusted: self.trusted | o.trusted,
        }
    }
}

impl PackMeta {
    /// A pack as an index object lists it, with what the object's signature backs.
    pub fn listed(p: &IndexPack, a: Attribution) -> PackMeta {
        PackMeta {
            id: p.id,
            size: p.size,
            key: p.key.clone(),
            writer: a.writer,
            vouched: a.vouched,
            trusted: a.trusted,
        }
    }

    /// Who stands behind it.
    pub fn attribution(&self) -> Attribution {
        Attribution {
            writer: self.writer,
            vouched: self.vouched,
            trusted: self.trusted,
        }
    }
}

/// The index: an on-disk build of most index objects (see [`disk`]) and, in memory, the
/// objects written since it was built. Pack positions number the build's packs first, then
/// those held in memory.
#[derive(Debug, Default, Clone)]
pub struct Index {
    disk: Option<Arc<DiskIndex>>,
    /// Packs held in memory (position = the build's pack count + place here).
    packs: Vec<PackMeta>,
    pack_pos: HashMap<PackId, u32>,
    /// Each chunk's first location held in memory.
    blobs: HashMap<ChunkId, BlobLoc>,
    /// Its other locations held in memory.
    extra: HashMap<ChunkId, Vec<BlobLoc>>,
    /// Copies a restore key found damaged: (pack position, chunk).
    bad: HashSet<(u32, ChunkId)>,
    /// Index objects this was loaded from.
    pub files: Vec<IndexId>,
    /// The packs each index object held in memory names.
    mem_file_packs: HashMap<IndexId, Vec<PackId>>,
    /// The blobs held in memory by pack, made when first asked.
    mem_by_pack: std::sync::OnceLock<MemCopies>,
}

/// The copies held in memory, by pack, numbered after the build's (see [`Index::copies`]).
#[derive(Debug, Default, Clone)]
struct MemCopies {
    /// By pack position less the build's pack count, each in pack order.
    packs: Vec<Vec<(ChunkId, BlobLoc)>>,
    /// The number of each pack's first copy.
    first: Vec<u64>,
}

impl Index {
    /// An index over an on-disk build (or none), to which objects written since are added.
    pub fn over(disk: Option<Arc<DiskIndex>>) -> Index {
        let mut i = Index::default();
        if let Some(d) = &disk {
            i.files = d.meta.files.clone();
            i.bad = d.meta.bad.iter().copied().collect();
        }
        i.disk = disk;
        i
    }

    /// Whether the on-disk build holds this pack.
    pub fn on_disk(&self, id: &PackId) -> bool {
        self.disk.as_ref().is_some_and(|d| d.pack_pos(id).is_some())
    }

    fn base(&self) -> u32 {
        self.disk.as_ref().map_or(0, |d| d.pack_count())
    }

    /// Adds the packs of an index object one may not trust (see [`Index::add_pack_from`]).
    pub fn add_pack(&mut self, p: &IndexPack) {
        self.add_pack_from(p, Attribution::default());
    }

    /// Records which packs an index object held in memory names.
    pub fn add_file(&mut self, id: IndexId, f: &IndexFile) {
        self.files.push(id);
        self.mem_file_packs
            .insert(id, f.packs.iter().map(|p| p.id).collect());
    }

    /// Adds a pack as listed in an index object, with what that object's signature backs.
    /// A pack listed in several objects gets the best of what they say. (The loader never
    /// adds a pack the on-disk build holds: it builds anew instead.)
    pub fn add_pack_from(&mut self, p: &IndexPack, a: Attribution) {
        self.mem_by_pack = Default::default();
        let base = self.base();
        let pos = match self.pack_pos.get(&p.id) {
            Some(pos) => {
                let m = &mut self.packs[(*pos - base) as usize];
                let j = m.attribution().join(a);
                (m.writer, m.vouched, m.trusted) = (j.writer, j.vouched, j.trusted);
                *pos
            }
            None => {
                let pos = base + self.packs.len() as u32;
                self.packs.push(PackMeta::listed(p, a));
                self.pack_pos.insert(p.id, pos);
                pos
            }
        };
        for b in &p.blobs {
            let loc = b.loc(pos);
            match self.blobs.entry(b.id) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(loc);
                }
                std::collections::hash_map::Entry::Occupied(o) => {
                    if o.get().pack != pos {
                        let more = self.extra.entry(b.id).or_default();
                        if !more.iter().any(|l| l.pack == pos) {
                            more.push(loc);
                        }
                    }
                }
            }
        }
    }

    /// Marks the copy of `chunk` in `pack` damaged (a restore key found it so).
    pub fn mark_bad(&mut self, pack: &PackId, chunk: ChunkId) {
        if let Some(pos) = self.pack_pos_of(pack) {
            self.bad.insert((pos, chunk));
        }
    }

    /// How many copies are known to be damaged.
    pub fn damaged_copies(&self) -> usize {
        self.bad.len()
    }

    /// Whether the copy of `chunk` at `loc` was found damaged.
    pub fn is_bad(&self, chunk: &ChunkId, loc: &BlobLoc) -> bool {
        self.bad.contains(&(loc.pack, *chunk))
    }

    /// The pack at a position.
    pub fn pack_at(&self, pos: u32) -> PackMeta {
        let base = self.base();
        if pos < base {
            self.disk
                .as_ref()
                .expect("positions below base are on disk")
                .pack_at(pos)
        } else {
            self.packs[(pos - base) as usize].clone()
        }
    }

    /// The position of a pack (what [`Index::pack_at`] and a blob location name).
    pub fn pack_pos_of(&self, id: &PackId) -> Option<u32> {
        self.pack_pos
            .get(id)
            .copied()
            .or_else(|| self.disk.as_ref()?.pack_pos(id))
    }

    pub fn pack(&self, id: &PackId) -> Option<PackMeta> {
        self.pack_pos_of(id).map(|p| self.pack_at(p))
    }

    pub fn pack_count(&self) -> usize {
        self.base() as usize + self.packs.len()
    }

    /// Every pack.
    pub fn packs(&self) -> impl Iterator<Item = PackMeta> + '_ {
        (0..self.pack_count() as u32).map(|p| self.pack_at(p))
    }

    /// Every location of a chunk, best first: an intact copy in a trusted pack, then one
    /// in a vouched pack, damaged copies last; among equals, the order they were listed.
    fn locs(&self, id: &ChunkId) -> Vec<BlobLoc> {
        let mut all = self.disk.as_ref().map(|d| d.lookup(id)).unwrap_or_default();
        all.extend(self.blobs.get(id));
        all.extend(self.extra.get(id).into_iter().flatten());
        if all.len() > 1 || all.first().is_some_and(|l| self.is_bad(id, l)) {
            let mut ranked: Vec<_> = all
                .into_iter()
                .map(|l| {
                    let m = self.pack_at(l.pack);
                    ((!self.is_bad(id, &l), m.trusted, m.vouched), l)
                })
                .collect();
            ranked.sort_by_key(|(r, _)| std::cmp::Reverse(*r));
            all = ranked.into_iter().map(|(_, l)| l).collect();
        }
        all
    }

    /// The chunk's best location.
    pub fn loc(&self, id: &ChunkId) -> Option<BlobLoc> {
        self.locs(id).into_iter().next()
    }

    pub fn get(&self, id: &ChunkId) -> Option<(PackMeta, BlobLoc)> {
        self.loc(id).map(|l| (self.pack_at(l.pack), l))
    }

    /// Every location of a chunk, best first.
    pub fn locations(&self, id: &ChunkId) -> Vec<(PackMeta, BlobLoc)> {
        self.locs(id)
            .into_iter()
            .map(|l| (self.pack_at(l.pack), l))
            .collect()
    }

    /// Whether the chunk is stored anywhere (what a snapshot may reference).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.blobs.contains_key(id) || self.disk.as_ref().is_some_and(|d| !d.lookup(id).is_empty())
    }

    /// Whether a backup by the key that loaded the index may skip storing the chunk: an
    /// intact copy lies in a pack it trusts.
    pub fn holds_trusted(&self, id: &ChunkId) -> bool {
        self.loc(id)
            .is_some_and(|l| !self.is_bad(id, &l) && self.pack_at(l.pack).trusted)
    }

    /// Whether some copy of the chunk is not known to be damaged.
    pub fn holds_intact(&self, id: &ChunkId) -> bool {
        self.loc(id).is_some_and(|l| !self.is_bad(id, &l))
    }

    /// The packs each index object names (Object Lock dates an index object by them).
    pub fn file_packs(&self) -> Result<HashMap<IndexId, Vec<PackId>>> {
        let mut out = match &self.disk {
            Some(d) => d.file_packs().map_err(|e| {
                custos_model::Error::integrity(format!("{e}: remove that folder and run again"))
            })?,
            None => HashMap::new(),
        };
        out.extend(self.mem_file_packs.iter().map(|(k, v)| (*k, v.clone())));
        Ok(out)
    }

    fn mem_copies(&self) -> &MemCopies {
        self.mem_by_pack.get_or_init(|| {
            let mut m = MemCopies {
                packs: vec![vec![]; self.packs.len()],
                first: Vec::with_capacity(self.packs.len()),
            };
            let base = self.base();
            let all = self.blobs.iter().chain(
                self.extra
                    .iter()
                    .flat_map(|(id, ls)| ls.iter().map(move |l| (id, l))),
            );
            for (id, l) in all {
                m.packs[(l.pack - base) as usize].push((*id, *l));
            }
            let mut n = self.disk.as_ref().map_or(0, |d| d.copies());
            for v in &mut m.packs {
                v.sort_by_key(|(_, l)| l.offset);
                m.first.push(n);
                n += v.len() as u64;
            }
            m
        })
    }

    /// How many copies of chunks the index holds. Numbers `0..copies()` name them pack by
    /// pack ([`Index::pack_copies`]), so a bit per copy (what prune marks used) takes an
    /// eighth of a byte whatever the size of a chunk id.
    pub fn copies(&self) -> u64 {
        let m = self.mem_copies();
        let disk = self.disk.as_ref().map_or(0, |d| d.copies());
        m.first
            .last()
            .map_or(disk, |f| f + m.packs.last().map_or(0, |v| v.len() as u64))
    }

    /// The copies in the pack at `pos`, in pack order, and the number of the first: from
    /// the on-disk build without reading the rest of the index.
    pub fn pack_copies(&self, pos: u32) -> (u64, Vec<(ChunkId, BlobLoc)>) {
        let base = self.base();
        if pos < base {
            let d = self
                .disk
                .as_ref()
                .expect("positions below base are on disk");
            return d.pack_blobs(pos);
        }
        let m = self.mem_copies();
        let i = (pos - base) as usize;
        match (m.first.get(i), m.packs.get(i)) {
            (Some(f), Some(v)) => (*f, v.clone()),
            _ => (0, vec![]),
        }
    }

    /// The numbers of every copy of a chunk (see [`Index::copies`]). An error when the
    /// build cannot be read or does not number a copy it holds: to prune, a copy missed is
    /// a copy deleted. `spans`: the caller's cache of the packs' records last read.
    pub fn copy_numbers(&self, id: &ChunkId, spans: &mut disk::Spans) -> Result<Vec<u64>> {
        self.copy_numbers_many(std::slice::from_ref(id), spans)
    }

    /// The numbers of every copy of each of `ids`, all together (prune's marking, a batch
    /// at a time): the on-disk records are read in their order, then the packs' records
    /// in pack order, each block and each pack once a batch.
    pub fn copy_numbers_many(&self, ids: &[ChunkId], spans: &mut disk::Spans) -> Result<Vec<u64>> {
        let base = self.base();
        let unreadable = |e: String| {
            custos_model::Error::integrity(format!(
                "the on-disk index cannot be read ({e}); nothing was deleted: run again"
            ))
        };
        let mut copies: Vec<(BlobLoc, &ChunkId)> = match &self.disk {
            Some(d) => d
                .lookup_many(ids)
                .map_err(|e| unreadable(e.to_string()))?
                .into_iter()
                .map(|(i, l)| (l, &ids[i]))
                .collect(),
            None => vec![],
        };
        for id in ids {
            copies.extend(self.blobs.get(id).map(|l| (*l, id)));
            copies.extend(self.extra.get(id).into_iter().flatten().map(|l| (*l, id)));
        }
        copies.sort_unstable_by_key(|(l, _)| (l.pack, l.offset));
        copies
            .into_iter()
            .map(|(l, id)| {
                let n = if l.pack < base {
                    self.disk
                        .as_ref()
                        .and_then(|d| d.slot_of(l.pack, id, l.offset, spans))
                } else {
                    let m = self.mem_copies();
                    let i = (l.pack - base) as usize;
                    m.packs.get(i).and_then(|v| {
                        let at = v
                            .iter()
                            .position(|(c, x)| c == id && x.offset == l.offset)?;
                        Some(m.first[i] + at as u64)
                    })
                };
                n.ok_or_else(|| unreadable(format!("chunk {id} has no place in its pack")))
            })
            .collect()
    }

    /// The blobs of one pack, in pack order: from the on-disk build without reading the
    /// rest of the index, so `verify` goes pack by pack in bounded memory.
    pub fn blobs_of(&self, id: &PackId) -> Vec<(ChunkId, BlobLoc)> {
        match self.pack_pos_of(id) {
            Some(pos) => self.pack_copies(pos).1,
            None => vec![],
        }
    }

    /// Blobs grouped by pack (every copy of every chunk).
    pub fn by_pack(&self) -> HashMap<PackId, Vec<(ChunkId, BlobLoc)>> {
        (0..self.pack_count() as u32)
            .map(|pos| (self.pack_at(pos).id, self.pack_copies(pos).1))
            .collect()
    }

    /// The pack at `pos` as index-file content, with its attribution, and the chunks whose
    /// copy in it is damaged: for an object the authority signs (prune, compaction), which
    /// carries them over.
    pub fn encode_pack(&self, pos: u32) -> (IndexPack, Vec<ChunkId>) {
        let p = self.pack_at(pos);
        let mut bad = vec![];
        let blobs = self
            .pack_copies(pos)
            .1
            .iter()
            .map(|(id, l)| {
                if self.is_bad(id, l) {
                    bad.push(*id);
                }
                PackEntry {
                    id: *id,
                    kind: l.kind,
                    offset: l.offset,
                    length: l.length,
                    raw_length: l.raw_length,
                    compressed: l.compressed,
                }
            })
            .collect();
        let pack = IndexPack {
            id: p.id,
            size: p.size,
            key: p.key,
            blobs,
            writer: p.writer.map(hex::encode),
            vouched: p.vouched,
        };
        (pack, bad)
    }

    /// Re-encodes the packs named in `keep` (all if `None`) as index-file content (see
    /// [`Index::encode_pack`]). Holds all of it: for small sets of packs.
    pub fn to_files(&self, keep: Option<&HashSet<PackId>>) -> IndexFile {
        let mut f = IndexFile::default();
        let positions: Vec<u32> = match keep {
            Some(k) => {
                let mut v: Vec<u32> = k.iter().filter_map(|p| self.pack_pos_of(p)).collect();
                v.sort_unstable();
                v
            }
            None => (0..self.pack_count() as u32).collect(),
        };
        for pos in positions {
            let (p, bad) = self.encode_pack(pos);
            f.bad.extend(bad.into_iter().map(|c| (p.id, c)));
            f.packs.push(p);
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::BlobKind;

    fn pack(n: u8, chunks: &[u8]) -> IndexPack {
        IndexPack {
            id: PackId(custos_model::Id([n; 32])),
            size: 100,
            key: vec![],
            blobs: chunks
                .iter()
                .enumerate()
                .map(|(i, c)| PackEntry {
                    id: ChunkId(custos_model::Id([*c; 32])),
                    kind: BlobKind::Data,
                    offset: i as u32 * 10,
                    length: 10,
                    raw_length: 10,
                    compressed: false,
                })
                .collect(),
            writer: None,
            vouched: false,
        }
    }

    #[test]
    fn a_chunk_in_two_packs_is_read_from_the_trusted_intact_one_first_and_kept_in_both() {
        let c = ChunkId(custos_model::Id([7; 32]));
        let mut i = Index::default();
        // The attacker's copy comes first; the host's own copy second.
        i.add_pack(&pack(1, &[7, 8]));
        i.add_pack_from(
            &pack(2, &[7]),
            Attribution {
                trusted: true,
                ..Default::default()
            },
        );
        assert!(!i.holds_trusted(&ChunkId(custos_model::Id([8; 32]))));
        assert_eq!(i.get(&c).unwrap().0.id, PackId(custos_model::Id([2; 32])));
        assert!(i.holds_trusted(&c));
        assert_eq!(i.locations(&c).len(), 2);
        let by = i.by_pack();
        assert_eq!(by[&PackId(custos_model::Id([1; 32]))].len(), 2);
        assert_eq!(by[&PackId(custos_model::Id([2; 32]))].len(), 1);
        // A damaged copy goes last and is not deduplicated against.
        i.mark_bad(&PackId(custos_model::Id([2; 32])), c);
        assert_eq!(i.get(&c).unwrap().0.id, PackId(custos_model::Id([1; 32])));
        assert!(!i.holds_trusted(&c));
        assert_eq!(i.to_files(None).bad.len(), 1);
    }

    #[test]
    fn a_signature_covers_every_field_and_names_its_signer() {
        let seed = custos_crypto::sign::generate();
        // Both ways of signing: version 2 (what custos writes) and version 1 (objects
        // written before it), each read back from its stored JSON.
        for v in [2, 1] {
            let mut f = IndexFile {
                packs: vec![pack(1, &[1])],
                ..Default::default()
            };
            if v == 2 {
                f.sign(&seed);
            } else {
                f.sign_v1(&seed);
            }
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json.contains("\"sig_v\":2"), v == 2, "{json}");
            let f: IndexFile = serde_json::from_str(&json).unwrap();
            assert_eq!(f.sig_v, v);
            assert_eq!(
                f.verified_signer(),
                Some(custos_crypto::sign::public_of(&seed)),
                "v{v}"
            );
            let mut g = f.clone();
            g.packs[0].vouched = true;
            assert_eq!(g.verified_signer(), None, "v{v}");
            let mut h = f.clone();
            h.bad.push((
                PackId(custos_model::Id([1; 32])),
                ChunkId(custos_model::Id([1; 32])),
            ));
            assert_eq!(h.verified_signer(), None, "v{v}");
            let mut k = f.clone();
            k.signer = Some(hex::encode(custos_crypto::sign::public_of(
                &custos_crypto::sign::generate(),
            )));
            assert_eq!(k.verified_signer(), None, "v{v}");
            // The version is not signed: claiming the other one (or one that does not
            // exist) only makes the signature fail.
            for other in [3 - v, 0, 3] {
                let mut m = f.clone();
                m.sig_v = other;
                assert_eq!(m.verified_signer(), None, "v{v} as v{other}");
            }
        }
    }
}
