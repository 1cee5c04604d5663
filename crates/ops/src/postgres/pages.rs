//! Page-level incrementals (format.md 6.3): a relation's main-fork file that changed since
//! the parent backup keeps the parent's blocks and stores only the pages whose LSN says
//! they changed since the parent started, sixteen to a chunk so they compress together.
//!
//! Why the LSN is enough: every change to a main-fork page is WAL-logged and stamps the
//! page with the LSN of its record. A page whose LSN is older than the parent's start was
//! not changed while the parent read it nor since, so the parent holds it as it is now
//! (apart from hint bits, which PostgreSQL's own incremental backups skip as well). Pages
//! changed during the parent's read may be torn there, but their LSN is newer than the
//! parent's start, so they are taken again. New, damaged or insane pages count as changed.
//!
//! A block (16 pages) is stored whole again when three quarters of it would be patches, or
//! when its content is already in the repository, which also ends its patches.

use std::collections::{BTreeMap, HashMap};

use custos_model::{ChunkId, Error, Result};
use custos_sources::files::{Entry, PagePatches, Patch, PATCH_PAGE, PATCH_UNIT};

/// What the parent backup recorded for a file.
#[derive(Debug, Clone)]
pub struct ParentFile {
    pub size: u64,
    pub mtime_ns: i64,
    pub chunks: Vec<ChunkId>,
    pub pages: Option<PagePatches>,
    /// Bytes its chunks hold: `size`, or less for a file that grew past its blocks
    /// (format.md 6.3: zeros under patches).
    pub covered: u64,
}

impl ParentFile {
    /// The parent's record of `e`; `chunk_len` gives a chunk's plain length (from the
    /// index).
    pub fn of(e: &Entry, chunk_len: impl Fn(&ChunkId) -> Option<u64>) -> ParentFile {
        ParentFile {
            size: e.size,
            mtime_ns: e.mtime_ns,
            chunks: e.chunks.clone(),
            pages: e.pages.clone(),
            covered: covered(&e.chunks, e.size, chunk_len),
        }
    }
}

/// Bytes that `chunks` hold, at most `size` (`size` when a length is unknown).
pub fn covered(chunks: &[ChunkId], size: u64, chunk_len: impl Fn(&ChunkId) -> Option<u64>) -> u64 {
    chunks
        .iter()
        .map(&chunk_len)
        .sum::<Option<u64>>()
        .map_or(size, |n| n.min(size))
}

/// Pages per patch chunk: as many as a default block, compressed together.
const PATCH_PAGES: usize = 16;

/// Units per unit-patch chunk: as many bytes as a page patch chunk.
const PATCH_UNITS: usize = 128;

/// Units per page.
pub const UNITS: usize = PATCH_PAGE / PATCH_UNIT;

/// A unit hash that stands for "not known": that page is stored whole when it changes.
pub const UNKNOWN: u64 = 0;

/// The hash of one unit, seeded with a repository secret; never [`UNKNOWN`].
pub fn unit_hash(seed: u64, unit: &[u8]) -> u64 {
    match xxhash_rust::xxh3::xxh3_64_with_seed(unit, seed) {
        UNKNOWN => 1,
        h => h,
    }
}

/// Where the builder puts chunks: `hash` gives a chunk's id, `has` whether the repository
/// already holds it, `add` queues a new one.
pub struct Sink<'a> {
    pub hash: HashFn<'a>,
    pub has: HasFn<'a>,
    pub add: AddFn<'a>,
}

/// A chunk's id from its bytes.
pub type HashFn<'a> = Box<dyn Fn(&[u8]) -> ChunkId + Sync + 'a>;
/// Whether the repository already holds a chunk.
pub type HasFn<'a> = Box<dyn Fn(&ChunkId) -> bool + Sync + 'a>;
/// Queues a new chunk.
pub type AddFn<'a> = Box<dyn Fn(ChunkId, Vec<u8>) -> Result<()> + Sync + 'a>;

impl<'a> Sink<'a> {
    /// Data chunks of a backup: ids keyed by the repository, stored by `writer`.
    pub fn writer(
        repo: &'a custos_repo::Repository,
        writer: &'a custos_repo::BlobWriter,
    ) -> Sink<'a> {
        Sink {
            hash: Box::new(|d| repo.keys.chunk_id(d)),
            has: Box::new(|id| writer.has(id)),
            add: Box::new(|id, d| writer.add(id, custos_repo::BlobKind::Data, d).map(|_| ())),
        }
    }
}

/// Patches of one granularity (pages or units): the parent's, carried over with the slots
/// superseded here set to UNUSED, and this backup's, packed into chunks as they come.
#[derive(Default)]
struct Slots {
    carried: Vec<Patch>,
    slot_of: HashMap<u32, (usize, usize)>,
    pending: Vec<u8>,
    pending_ids: Vec<u32>,
    fresh: Vec<Patch>,
}

impl Slots {
    fn carry(list: &[Patch]) -> Slots {
        let mut s = Slots {
            carried: list.to_vec(),
            ..Default::default()
        };
        for (ci, p) in s.carried.iter().enumerate() {
            for (slot, k) in p.pages.iter().enumerate() {
                if *k != Patch::UNUSED {
                    s.slot_of.insert(*k, (ci, slot));
                }
            }
        }
        s
    }

    fn drop(&mut self, k: u32) {
        if let Some((ci, slot)) = self.slot_of.remove(&k) {
            self.carried[ci].pages[slot] = Patch::UNUSED;
        }
    }

    fn push(&mut self, k: u32, data: &[u8], per_chunk: usize, sink: &Sink) -> Result<()> {
        self.drop(k);
        self.pending.extend_from_slice(data);
        self.pending_ids.push(k);
        if self.pending_ids.len() == per_chunk {
            self.flush(sink)?;
        }
        Ok(())
    }

    fn flush(&mut self, sink: &Sink) -> Result<()> {
        if self.pending_ids.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.pending);
        let id = (sink.hash)(&data);
        (sink.add)(id, data)?;
        self.fresh.push(Patch {
            chunk: id,
            pages: std::mem::take(&mut self.pending_ids),
        });
        Ok(())
    }

    /// Every live patch, the parent's first, once slots at or beyond `limit` are dropped.
    fn finish(mut self, limit: u64, sink: &Sink) -> Result<Vec<Patch>> {
        self.flush(sink)?;
        let beyond: Vec<u32> = self
            .slot_of
            .keys()
            .copied()
            .filter(|k| u64::from(*k) >= limit)
            .collect();
        for k in beyond {
            self.drop(k);
        }
        let mut out: Vec<Patch> = self
            .carried
            .into_iter()
            .filter(|p| p.pages.iter().any(|x| *x != Patch::UNUSED))
            .collect();
        out.extend(self.fresh);
        Ok(out)
    }
}

/// Builds one file's blocks and page patches, block by block in order.
///
/// With unit hashes (`with_units`), a changed page whose parent version's unit hashes are
/// known stores only its changed 1 KiB units when at most half of them changed, and the
/// builder gives the unit hashes of the file as it will be restored, for the next backup.
pub struct FileBuilder<'p> {
    /// Page mode: the parent's record of the file. None: whole blocks only.
    parent: Option<&'p ParentFile>,
    block_size: u64,
    chunks: Vec<ChunkId>,
    pages: Slots,
    units: Slots,
    blocks: BTreeMap<u32, ChunkId>,
    /// Unit hashes: the seed, the parent's (of the file as the parent restores it), and
    /// this file's as it will be restored.
    seed: u64,
    parent_units: Option<&'p [u64]>,
    units_out: Option<Vec<u64>>,
    /// Pages stored as patches by this backup.
    pub pages_patched: u64,
    /// Pages of which this backup stored only the changed units.
    pub units_patched: u64,
}

impl<'p> FileBuilder<'p> {
    pub fn new(parent: Option<&'p ParentFile>, block_size: u64) -> FileBuilder<'p> {
        let pp = parent.and_then(|p| p.pages.as_ref());
        FileBuilder {
            parent,
            block_size,
            chunks: vec![],
            pages: pp.map(|p| Slots::carry(&p.patches)).unwrap_or_default(),
            units: pp.map(|p| Slots::carry(&p.units)).unwrap_or_default(),
            blocks: pp
                .map(|p| p.blocks.iter().copied().collect())
                .unwrap_or_default(),
            seed: 0,
            parent_units: None,
            units_out: None,
            pages_patched: 0,
            units_patched: 0,
        }
    }

    /// Tracks unit hashes (seeded with `seed`); `parent` are the parent's for this file,
    /// when known, eight per page.
    pub fn with_units(mut self, seed: u64, parent: Option<&'p [u64]>) -> FileBuilder<'p> {
        self.seed = seed;
        self.parent_units = parent.filter(|_| self.parent.is_some());
        self.units_out = Some(vec![]);
        self
    }

    fn pages_per_block(&self) -> u32 {
        (self.block_size / PATCH_PAGE as u64) as u32
    }

    /// The parent's block `i` when it has the same length as a block of `len` bytes.
    fn parent_block(&self, i: u32, len: usize) -> Option<ChunkId> {
        let p = self.parent?;
        let start = u64::from(i) * self.block_size;
        let plen = p.covered.checked_sub(start)?.min(self.block_size);
        (plen == len as u64 && len.is_multiple_of(PATCH_PAGE))
            .then(|| p.chunks.get(i as usize).copied())
            .flatten()
    }

    fn drop_page(&mut self, page: u32) {
        self.pages.drop(page);
        for u in 0..UNITS as u32 {
            self.units.drop(page * UNITS as u32 + u);
        }
    }

    fn drop_block(&mut self, i: u32) {
        let per = self.pages_per_block();
        for page in i * per..(i + 1) * per {
            self.drop_page(page);
        }
        self.blocks.remove(&i);
    }

    fn hashes(&self, page: &[u8]) -> [u64; UNITS] {
        let mut h = [UNKNOWN; UNITS];
        if page.len() == PATCH_PAGE {
            for (k, u) in page.chunks(PATCH_UNIT).enumerate() {
                h[k] = unit_hash(self.seed, u);
            }
        }
        h
    }

    /// The parent's unit hashes of `page`, when all are known.
    fn parent_hashes(&self, page: u32) -> Option<&'p [u64]> {
        let at = page as usize * UNITS;
        self.parent_units
            .and_then(|u| u.get(at..at + UNITS))
            .filter(|h| !h.contains(&UNKNOWN))
    }

    /// Records the unit hashes of pages stored as read.
    fn track_read(&mut self, data: &[u8]) {
        if self.units_out.is_none() {
            return;
        }
        let hs: Vec<[u64; UNITS]> = data.chunks(PATCH_PAGE).map(|p| self.hashes(p)).collect();
        let out = self.units_out.as_mut().expect("checked");
        for h in hs {
            out.extend_from_slice(&h);
        }
    }

    /// Records the parent's unit hashes of `n` pages from `first` (taken as the parent
    /// has them).
    fn track_parent(&mut self, first: u32, n: u32) {
        for page in first..first + n {
            let h = self.parent_hashes(page);
            if let Some(out) = self.units_out.as_mut() {
                match h {
                    Some(h) => out.extend_from_slice(h),
                    None => out.extend_from_slice(&[UNKNOWN; UNITS]),
                }
            }
        }
    }

    /// Block `i`, read now. `changed(k)` says whether its page `k` changed since the
    /// parent started (asked only in page mode).
    pub fn block(
        &mut self,
        i: u32,
        data: Vec<u8>,
        changed: impl Fn(usize, &[u8]) -> bool,
        sink: &Sink,
    ) -> Result<()> {
        let id = (sink.hash)(&data);
        let base = self.parent_block(i, data.len());
        if (sink.has)(&id) || base.is_none() {
            // Known content, or no parent block to patch: the block itself.
            self.track_read(&data);
            (sink.add)(id, data)?;
            self.chunks.push(id);
            self.drop_block(i);
            return Ok(());
        }
        let base = base.expect("checked");
        let per = self.pages_per_block();
        // Each changed page: its changed units when few and known, else the whole page.
        let mut plan: Vec<(usize, [u64; UNITS], Option<Vec<usize>>)> = vec![];
        for (k, page) in data.chunks(PATCH_PAGE).enumerate() {
            if !changed(k, page) {
                continue;
            }
            let h = self.hashes(page);
            let units = self.parent_hashes(i * per + k as u32).and_then(|old| {
                let diff: Vec<usize> = (0..UNITS).filter(|u| h[*u] != old[*u]).collect();
                (diff.len() * 2 <= UNITS).then_some(diff)
            });
            plan.push((k, h, units));
        }
        let n_pages = (data.len() / PATCH_PAGE) as u32;
        if plan.is_empty() {
            // As the parent has it (its patches for the block included).
            self.chunks.push(base);
            self.track_parent(i * per, n_pages);
            return Ok(());
        }
        let whole = plan.iter().filter(|p| p.2.is_none()).count();
        let live = (i * per..(i + 1) * per)
            .filter(|p| self.pages.slot_of.contains_key(p))
            .filter(|p| !plan.iter().any(|x| x.0 == (p - i * per) as usize))
            .count();
        if (whole + live) * 4 >= per as usize * 3 {
            self.track_read(&data);
            (sink.add)(id, data)?;
            self.chunks.push(id);
            self.drop_block(i);
            return Ok(());
        }
        self.chunks.push(base);
        let mut next = 0;
        for k in 0..n_pages as usize {
            let page = i * per + k as u32;
            let Some((_, h, units)) = plan.get(next).filter(|p| p.0 == k) else {
                self.track_parent(page, 1);
                continue;
            };
            next += 1;
            let bytes = &data[k * PATCH_PAGE..(k + 1) * PATCH_PAGE];
            match units {
                None => {
                    self.drop_page(page);
                    self.pages.push(page, bytes, PATCH_PAGES, sink)?;
                    self.pages_patched += 1;
                }
                Some(units) => {
                    for u in units {
                        let unit = page * UNITS as u32 + *u as u32;
                        let b = &bytes[u * PATCH_UNIT..(u + 1) * PATCH_UNIT];
                        self.units.push(unit, b, PATCH_UNITS, sink)?;
                    }
                    self.units_patched += u64::from(!units.is_empty());
                }
            }
            if let Some(out) = self.units_out.as_mut() {
                out.extend_from_slice(h);
            }
        }
        self.blocks.insert(i, id);
        Ok(())
    }

    /// Block `i` of `len` bytes, of which only `pages` (page index in the block, 8 KiB
    /// each) are known: a file PostgreSQL 17+ sent incrementally, its other pages as the
    /// parent has them. The parent's block with these pages patched over it; its content
    /// as restored is not known here, so `blocks` says nothing of it. `false` (nothing
    /// done) when the parent has no block `i` of `len` bytes.
    pub fn patch(
        &mut self,
        i: u32,
        len: usize,
        pages: &[(u32, &[u8])],
        sink: &Sink,
    ) -> Result<bool> {
        let Some(base) = self.parent_block(i, len) else {
            return Ok(false);
        };
        debug_assert!(self.units_out.is_none(), "unit hashes need every page");
        self.chunks.push(base);
        self.patch_pages(i, pages, sink)?;
        Ok(true)
    }

    /// Block `i` of a file PostgreSQL 17+ sent incrementally, past the point where its
    /// chunks can go on (the parent's block `i` is shorter than the file's, or the
    /// parent's chunks ended before it): the parent's block `i` when there is one and
    /// no chunk was given after it, then `pages` patched over it and the zeros beyond it
    /// (format.md 6.3). Every later block of the file goes here too.
    pub fn tail(&mut self, i: u32, pages: &[(u32, &[u8])], sink: &Sink) -> Result<()> {
        debug_assert!(self.units_out.is_none(), "unit hashes need every page");
        if let Some(id) = self.parent.and_then(|p| p.chunks.get(i as usize)) {
            if self.chunks.len() == i as usize {
                self.chunks.push(*id);
            }
        }
        self.patch_pages(i, pages, sink)
    }

    /// `pages` (index in block `i`, 8 KiB each) as page patches, superseding any earlier
    /// patch of theirs; the block's content as restored is no longer known.
    fn patch_pages(&mut self, i: u32, pages: &[(u32, &[u8])], sink: &Sink) -> Result<()> {
        self.blocks.remove(&i);
        let per = self.pages_per_block();
        for (k, bytes) in pages {
            let page = i * per + k;
            self.drop_page(page);
            self.pages.push(page, bytes, PATCH_PAGES, sink)?;
            self.pages_patched += 1;
        }
        Ok(())
    }

    /// Whether page `page` has a patch so far (its parent's still live, or this backup's).
    pub fn has_patch_at(&self, page: u32) -> bool {
        let units = page * UNITS as u32..(page + 1) * UNITS as u32;
        self.pages.slot_of.contains_key(&page)
            || self.pages.pending_ids.contains(&page)
            || self.pages.fresh.iter().any(|p| p.pages.contains(&page))
            || units.clone().any(|u| self.units.slot_of.contains_key(&u))
            || self.units.pending_ids.iter().any(|u| units.contains(u))
            || self
                .units
                .fresh
                .iter()
                .any(|p| p.pages.iter().any(|u| units.contains(u)))
    }

    /// Block `i`, not read (the server's WAL summaries say no page of it changed since the
    /// parent started): the parent's block and patches as they are.
    pub fn carry(&mut self, i: u32) -> Result<()> {
        let p = self.parent.expect("carry needs a parent");
        let id = p.chunks.get(i as usize).copied().ok_or_else(|| {
            Error::internal(format!("block {i} carried from a parent that lacks it"))
        })?;
        self.chunks.push(id);
        let per = self.pages_per_block();
        self.track_parent(i * per, per);
        Ok(())
    }

    /// The file's blocks and patches once every block up to `size` was given, and its unit
    /// hashes when tracked.
    #[allow(clippy::type_complexity)]
    pub fn finish(
        mut self,
        size: u64,
        sink: &Sink,
    ) -> Result<(Vec<ChunkId>, Option<PagePatches>, Option<Vec<u64>>)> {
        let pages = size.div_ceil(PATCH_PAGE as u64);
        let patches = self.pages.finish(pages, sink)?;
        let units = self.units.finish(pages * UNITS as u64, sink)?;
        let blocks = self.chunks.len() as u32;
        self.blocks.retain(|b, _| *b < blocks);
        if let Some(out) = self.units_out.as_mut() {
            out.truncate(pages as usize * UNITS);
        }
        let pp = (!patches.is_empty() || !units.is_empty()).then(|| PagePatches {
            patches,
            units,
            blocks: self.blocks.into_iter().collect(),
        });
        Ok((self.chunks, pp, self.units_out))
    }
}

/// One write of a restore: bytes `src..src+len` of a chunk to offset `dst` of the file,
/// which lies in the file's block `block`. Pieces are written in passes: blocks (0), then
/// page patches (1) over them, then unit patches (2) over those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub chunk: ChunkId,
    pub src: u64,
    pub dst: u64,
    pub len: u64,
    pub block: usize,
    pub pass: u8,
}

/// The "chunk" of a piece of zeros: no chunk has this id (ids are keyed hashes).
pub const ZERO_CHUNK: ChunkId = custos_model::ChunkId(custos_model::Id([0; 32]));

/// Zeros past a file's chunks are laid in pieces of at most this size.
const ZERO_SPAN: u64 = 128 << 10;

impl Piece {
    pub fn is_patch(&self) -> bool {
        self.pass > 0
    }

    /// Zeros (bytes past the file's chunks), not a chunk's bytes.
    pub fn is_zero(&self) -> bool {
        self.chunk == ZERO_CHUNK
    }
}

/// The passes of [`pieces`].
pub const PASSES: usize = 3;

/// How to lay a file down: its blocks whole, then its patch pages over them, then its unit
/// patches (so each block is one write, and the pieces of one pass may go in any order).
/// `chunk_len` gives a chunk's plain length (from the index).
pub fn pieces(e: &Entry, chunk_len: impl Fn(&ChunkId) -> Option<u64>) -> Result<Vec<Piece>> {
    let len_of = |id: &ChunkId| {
        chunk_len(id).ok_or_else(|| {
            Error::integrity(format!(
                "chunk {} of {} is not in the index",
                id.short(),
                e.path
            ))
            .hint("if an index object was lost or damaged, `custos index rebuild` indexes the packs again from their headers; `custos verify` names what else is missing")
        })
    };
    let mut out = Vec::with_capacity(e.chunks.len());
    let mut starts = Vec::with_capacity(e.chunks.len());
    let mut off = 0u64;
    for (k, id) in e.chunks.iter().enumerate() {
        let len = len_of(id)?;
        starts.push(off);
        out.push(Piece {
            chunk: *id,
            src: 0,
            dst: off,
            len,
            block: k,
            pass: 0,
        });
        off += len;
    }
    let Some(pages) = &e.pages else {
        return Ok(out);
    };
    if off > e.size {
        return Err(Error::integrity(format!(
            "{}: its chunks hold {off} bytes, more than its size ({})",
            e.path, e.size
        )));
    }
    pages
        .check(e.size)
        .map_err(|m| Error::integrity(format!("{}: {m}", e.path)))?;
    // Past the chunks (a file that grew since the blocks it keeps): zeros under patches.
    let mut at = off;
    while at < e.size {
        let len = ZERO_SPAN.min(e.size - at);
        starts.push(at);
        out.push(Piece {
            chunk: ZERO_CHUNK,
            src: 0,
            dst: at,
            len,
            block: starts.len() - 1,
            pass: 0,
        });
        at += len;
    }
    let block_of = |dst: u64| starts.partition_point(|s| *s <= dst).saturating_sub(1);
    // Units of a page that also has a page patch go after it (pass 2); other units touch
    // bytes no page patch does, so they go with the page patches (pass 1).
    let mut paged = vec![false; (e.size / PATCH_PAGE as u64) as usize + 1];
    for k in pages.patches.iter().flat_map(|p| p.pages.iter().copied()) {
        if let Some(b) = paged.get_mut(k as usize) {
            *b = true;
        }
    }
    for (list, unit, what) in [
        (&pages.patches, PATCH_PAGE as u64, "page"),
        (&pages.units, PATCH_UNIT as u64, "unit"),
    ] {
        for p in list {
            let n = len_of(&p.chunk)?;
            if n != p.pages.len() as u64 * unit {
                return Err(Error::integrity(format!(
                    "{}: a {what} patch of {} {what}s holds {n} bytes",
                    e.path,
                    p.pages.len()
                )));
            }
            for (slot, k) in p.pages.iter().enumerate() {
                if *k == Patch::UNUSED {
                    continue;
                }
                let dst = u64::from(*k) * unit;
                let pass = if unit == PATCH_PAGE as u64
                    || paged.get((*k / UNITS as u32) as usize) == Some(&true)
                {
                    1 + u8::from(unit != PATCH_PAGE as u64)
                } else {
                    1
                };
                let piece = Piece {
                    chunk: p.chunk,
                    src: slot as u64 * unit,
                    dst,
                    len: unit.min(e.size - dst),
                    block: block_of(dst),
                    pass,
                };
                // Neighbours in the chunk that are neighbours in the file: one write.
                match out.last_mut() {
                    Some(l)
                        if l.chunk == piece.chunk
                            && l.pass == piece.pass
                            && l.block == piece.block
                            && l.src + l.len == piece.src
                            && l.dst + l.len == piece.dst =>
                    {
                        l.len += piece.len
                    }
                    _ => out.push(piece),
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const B: u64 = 16 * PATCH_PAGE as u64;

    struct Store {
        chunks: Mutex<HashMap<ChunkId, Vec<u8>>>,
    }

    fn id_of(data: &[u8]) -> ChunkId {
        ChunkId(custos_model::Id::of_bytes(data))
    }

    /// A backup of `data`: the file's record, its unit hashes, and (pages, units) patched.
    fn build(
        store: &Store,
        parent: Option<(&ParentFile, Option<&[u64]>)>,
        data: &[u8],
        changed_pages: &std::collections::HashSet<u32>,
    ) -> (ParentFile, Vec<u64>, (u64, u64)) {
        let sink = sink(store);
        let mut b =
            FileBuilder::new(parent.map(|p| p.0), B).with_units(7, parent.and_then(|p| p.1));
        for (i, block) in data.chunks(B as usize).enumerate() {
            let i = i as u32;
            b.block(
                i,
                block.to_vec(),
                |k, _| changed_pages.contains(&(i * 16 + k as u32)),
                &sink,
            )
            .unwrap();
        }
        let patched = (b.pages_patched, b.units_patched);
        let (chunks, pages, units) = b.finish(data.len() as u64, &sink).unwrap();
        let units = units.unwrap();
        assert_eq!(units.len(), data.len() / PATCH_PAGE * UNITS);
        (
            ParentFile {
                size: data.len() as u64,
                mtime_ns: 0,
                chunks,
                pages,
                covered: data.len() as u64,
            },
            units,
            patched,
        )
    }

    fn sink(store: &Store) -> Sink<'_> {
        Sink {
            hash: Box::new(id_of),
            has: Box::new(|id| store.chunks.lock().unwrap().contains_key(id)),
            add: Box::new(|id, d| {
                store.chunks.lock().unwrap().insert(id, d);
                Ok(())
            }),
        }
    }

    fn entry(size: u64, chunks: Vec<ChunkId>, pages: Option<PagePatches>) -> Entry {
        Entry {
            path: "base/5/1".into(),
            kind: custos_sources::files::EntryKind::File,
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size,
            target: None,
            chunks,
            pages,
            etag: None,
        }
    }

    fn restore(store: &Store, f: &ParentFile) -> Vec<u8> {
        let e = entry(f.size, f.chunks.clone(), f.pages.clone());
        let chunks = store.chunks.lock().unwrap();
        let ps = pieces(&e, |id| chunks.get(id).map(|c| c.len() as u64)).unwrap();
        let mut out = vec![0xEEu8; f.size as usize];
        let mut written = vec![0u8; f.size as usize];
        // Blocks, then page patches, then unit patches, as a restore writes them; the
        // pieces of one pass in reverse order (any order must do).
        for pass in 0..PASSES as u8 {
            for p in ps.iter().rev().filter(|p| p.pass == pass) {
                let dst = p.dst as usize..(p.dst + p.len) as usize;
                if p.is_zero() {
                    out[dst.clone()].fill(0);
                } else {
                    let src = &chunks[&p.chunk][p.src as usize..(p.src + p.len) as usize];
                    out[dst.clone()].copy_from_slice(src);
                }
                for w in &mut written[dst] {
                    assert!(*w <= pass, "a byte written twice in one pass");
                    *w = pass + 1;
                }
            }
        }
        assert!(written.iter().all(|w| *w >= 1), "every byte written");
        out
    }

    #[test]
    fn a_patched_file_larger_than_a_relation_segment_is_refused_before_it_is_planned() {
        // A manifest is whatever a backup key wrote: a patched entry of 2^60 bytes made the
        // plan push a zero piece per 128 KiB of it (and a flag per page) before the size
        // was checked, until memory ran out.
        let pages = PagePatches {
            patches: vec![],
            units: vec![],
            blocks: vec![],
        };
        let e = entry(1 << 60, vec![], Some(pages.clone()));
        let err = pieces(&e, |_| Some(0)).unwrap_err();
        assert!(err.message.contains("page-patched file of"), "{err}");
        assert_eq!(err.kind, custos_model::Kind::Integrity);
        // A whole segment is fine.
        let e = entry(1 << 30, vec![], Some(pages));
        assert_eq!(
            pieces(&e, |_| Some(0)).unwrap().len(),
            (1 << 30) / ZERO_SPAN as usize
        );
    }

    /// A file PostgreSQL sent incrementally that grew past its parent's short last block:
    /// the parent's blocks, zeros past them, and patches (the pages sent, and the zeros
    /// that say the file's last page); it restores to the file, and a backup read from the
    /// data directory over it stores whole the blocks it could not take from the parent.
    #[test]
    fn a_file_grown_past_its_parents_short_block_is_chunks_zeros_and_patches() {
        let store = Store {
            chunks: Mutex::new(HashMap::new()),
        };
        let page = |n: u8| vec![n; PATCH_PAGE];
        let old: Vec<u8> = (0..20u8).flat_map(page).collect();
        let (parent, _, _) = build(&store, None, &old, &Default::default());
        let lengths = |id: &ChunkId| store.chunks.lock().unwrap().get(id).map(|c| c.len() as u64);
        let parent = ParentFile {
            covered: covered(&parent.chunks, parent.size, lengths),
            ..parent
        };
        assert_eq!(parent.chunks.len(), 2);
        assert_eq!(parent.covered, 20 * PATCH_PAGE as u64);
        // Now 40 pages: 5 and 18 changed, 20..=30 new, 31..=39 zeros the server never sent.
        let mut now = old.clone();
        now[5 * PATCH_PAGE..6 * PATCH_PAGE].fill(105);
        now[18 * PATCH_PAGE..19 * PATCH_PAGE].fill(118);
        for p in 20..31u8 {
            now.extend(page(100 + p));
        }
        now.resize(40 * PATCH_PAGE, 0);
        let at = |p: usize| &now[p * PATCH_PAGE..(p + 1) * PATCH_PAGE];

        let sink = sink(&store);
        let mut b = FileBuilder::new(Some(&parent), B);
        assert!(b.patch(0, B as usize, &[(5, at(5))], &sink).unwrap());
        // Block 1 is 4 pages at the parent, 16 now: no chunk can take it whole.
        assert!(!b.patch(1, B as usize, &[], &sink).unwrap());
        let sent: Vec<(u32, &[u8])> = std::iter::once((2, at(18)))
            .chain((20..31).map(|p| (p as u32 - 16, at(p))))
            .collect();
        b.tail(1, &sent, &sink).unwrap();
        b.tail(2, &[], &sink).unwrap();
        assert!(!b.has_patch_at(39));
        b.tail(2, &[(7, &[0u8; PATCH_PAGE][..])], &sink).unwrap();
        let (chunks, pages, _) = b.finish(now.len() as u64, &sink).unwrap();
        assert_eq!(
            chunks, parent.chunks,
            "the parent's blocks, the short one too"
        );
        let grown = ParentFile {
            size: now.len() as u64,
            mtime_ns: 0,
            covered: covered(&chunks, now.len() as u64, lengths),
            chunks,
            pages,
        };
        assert_eq!(grown.covered, 20 * PATCH_PAGE as u64);
        assert_eq!(restore(&store, &grown), now);

        // Read again from the data directory over it (page 35 changed): block 0 keeps the
        // parent's block, blocks 1 and 2 are stored whole.
        now[35 * PATCH_PAGE] = 7;
        let changed: std::collections::HashSet<u32> = [35].into();
        let (next, _, _) = build(&store, Some((&grown, None)), &now, &changed);
        assert_eq!(next.chunks.len(), 3);
        assert_eq!(next.chunks[0], grown.chunks[0]);
        assert_eq!(restore(&store, &next), now);
    }

    /// A chain of incrementals over a file that changes a few pages, grows and shrinks:
    /// every backup restores to exactly the file as it was read.
    #[test]
    fn a_chain_of_page_incrementals_restores_every_version() {
        let store = Store {
            chunks: Mutex::new(HashMap::new()),
        };
        let mut rng = 0x1234_5678_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut data: Vec<u8> = (0..40 * PATCH_PAGE).map(|i| (i / 97) as u8).collect();
        let (mut parent, mut units, _) = build(&store, None, &data, &Default::default());
        assert!(parent.pages.is_none());
        assert_eq!(restore(&store, &parent), data);
        let (mut pages_total, mut units_total) = (0, 0);
        for round in 0..16 {
            let pages = data.len() / PATCH_PAGE;
            let mut changed = std::collections::HashSet::new();
            let n = if round == 6 {
                14
            } else {
                1 + next() as usize % 5
            };
            for _ in 0..n {
                let p = (next() as usize % pages) as u32;
                changed.insert(p);
                // A few bytes (unit patches), or most of the page (a page patch).
                let spots = if next() % 3 == 0 {
                    7
                } else {
                    1 + next() as usize % 2
                };
                for _ in 0..spots {
                    let u = if spots == 7 {
                        next() as usize % UNITS
                    } else {
                        0
                    };
                    let at =
                        p as usize * PATCH_PAGE + u * PATCH_UNIT + next() as usize % PATCH_UNIT;
                    data[at] = data[at].wrapping_add(1 + round as u8);
                }
                if spots == 7 {
                    for u in 0..UNITS {
                        data[p as usize * PATCH_PAGE + u * PATCH_UNIT] ^= 0x40;
                    }
                }
            }
            if round == 4 {
                // Grows by 20 pages, all new.
                for p in pages..pages + 20 {
                    changed.insert(p as u32);
                }
                data.extend((0..20 * PATCH_PAGE).map(|i| (i % 251) as u8));
            }
            if round == 8 {
                data.truncate(data.len() - 9 * PATCH_PAGE);
            }
            // Round 10 has lost the unit hashes (a new backup host): whole pages.
            let known = (round != 10).then_some(units.as_slice());
            let (next_parent, next_units, patched) =
                build(&store, Some((&parent, known)), &data, &changed);
            if round == 10 {
                assert_eq!(patched.1, 0, "unit patches without the parent's hashes");
            }
            pages_total += patched.0;
            units_total += patched.1;
            assert_eq!(restore(&store, &next_parent), data, "round {round}");
            // The hashes describe the file as restored.
            let fresh: Vec<u64> = data.chunks(PATCH_UNIT).map(|u| unit_hash(7, u)).collect();
            assert!(next_units
                .iter()
                .zip(&fresh)
                .all(|(a, b)| *a == UNKNOWN || a == b));
            parent = next_parent;
            units = next_units;
        }
        assert!(
            pages_total > 0 && units_total > 0,
            "{pages_total} {units_total}"
        );
        assert!(parent.pages.is_some_and(|p| !p.units.is_empty()));
    }

    /// One page changed again and again: unit patches over a page patch, a page patch over
    /// unit patches, a unit patched twice; each backup restores exactly.
    #[test]
    fn unit_and_page_patches_of_one_page_supersede_each_other() {
        let store = Store {
            chunks: Mutex::new(HashMap::new()),
        };
        let mut data: Vec<u8> = (0..32 * PATCH_PAGE).map(|i| (i / 29) as u8).collect();
        let (mut parent, mut units, _) = build(&store, None, &data, &Default::default());
        let page = 3usize;
        let changed: std::collections::HashSet<u32> = [page as u32].into();
        // (units touched, expected (pages, units) patched)
        let steps: [(&[usize], (u64, u64)); 6] = [
            (&[2], (0, 1)),
            (&[0, 1, 2, 3, 4, 5, 6], (1, 0)),
            (&[2], (0, 1)),
            (&[2], (0, 1)),
            (&[0, 5], (0, 1)),
            (&[0, 1, 2, 3, 4, 5, 6, 7], (1, 0)),
        ];
        for (n, (touch, want)) in steps.iter().enumerate() {
            for u in *touch {
                data[page * PATCH_PAGE + u * PATCH_UNIT + 17 * n] ^= 0x5A;
            }
            let (child, child_units, patched) =
                build(&store, Some((&parent, Some(&units))), &data, &changed);
            assert_eq!(patched, *want, "step {n}");
            assert_eq!(restore(&store, &child), data, "step {n}");
            parent = child;
            units = child_units;
        }
    }

    #[test]
    fn a_block_mostly_changed_is_stored_whole() {
        let store = Store {
            chunks: Mutex::new(HashMap::new()),
        };
        let mut data: Vec<u8> = (0..32 * PATCH_PAGE).map(|i| (i / 13) as u8).collect();
        let (parent, _, _) = build(&store, None, &data, &Default::default());
        let mut changed = std::collections::HashSet::new();
        for p in 0..12 {
            changed.insert(p);
            data[p as usize * PATCH_PAGE] ^= 0xFF;
        }
        changed.insert(20);
        data[20 * PATCH_PAGE] ^= 0xFF;
        let (child, _, patched) = build(&store, Some((&parent, None)), &data, &changed);
        assert_eq!(patched.0, 1, "block 0 rebased, one page of block 1 patched");
        assert_ne!(child.chunks[0], parent.chunks[0]);
        assert_eq!(child.chunks[1], parent.chunks[1]);
        assert_eq!(restore(&store, &child), data);
    }

    #[test]
    fn a_patch_naming_a_page_twice_or_outside_the_file_or_chunks_past_it_are_refused() {
        let id = id_of(b"x");
        let mut e = entry(
            2 * PATCH_PAGE as u64,
            vec![id],
            Some(PagePatches {
                patches: vec![Patch {
                    chunk: id,
                    pages: vec![1, 1],
                }],
                units: vec![],
                blocks: vec![],
            }),
        );
        let len = |_: &ChunkId| Some(2 * PATCH_PAGE as u64);
        assert!(pieces(&e, len).unwrap_err().message.contains("twice"));
        let mut short = e.clone();
        short.size = 8;
        assert!(pieces(&short, len)
            .unwrap_err()
            .message
            .contains("more than its size"));
        // Without patches a file is its chunks, all of them (it grew while it was read).
        short.pages = None;
        assert_eq!(pieces(&short, len).unwrap()[0].len, 2 * PATCH_PAGE as u64);
        e.pages.as_mut().unwrap().patches[0].pages = vec![0, 7];
        assert!(pieces(&e, len).is_err());
    }
}
