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
use custos_sources::files::{Entry, PagePatches, Patch, PATCH_PAGE};

/// What the parent backup recorded for a file.
#[derive(Debug, Clone)]
pub struct ParentFile {
    pub size: u64,
    pub mtime_ns: i64,
    pub chunks: Vec<ChunkId>,
    pub pages: Option<PagePatches>,
}

impl ParentFile {
    pub fn of(e: &Entry) -> ParentFile {
        ParentFile {
            size: e.size,
            mtime_ns: e.mtime_ns,
            chunks: e.chunks.clone(),
            pages: e.pages.clone(),
        }
    }
}

/// Pages per patch chunk: as many as a default block, compressed together.
const PATCH_PAGES: usize = 16;

/// Where the builder puts chunks: `hash` gives a chunk's id, `has` whether the repository
/// already holds it, `add` queues a new one.
pub struct Sink<'a> {
    pub hash: &'a (dyn Fn(&[u8]) -> ChunkId + Sync),
    pub has: &'a (dyn Fn(&ChunkId) -> bool + Sync),
    pub add: &'a (dyn Fn(ChunkId, Vec<u8>) -> Result<()> + Sync),
}

/// Builds one file's blocks and page patches, block by block in order.
pub struct FileBuilder<'p> {
    /// Page mode: the parent's record of the file. None: whole blocks only.
    parent: Option<&'p ParentFile>,
    block_size: u64,
    chunks: Vec<ChunkId>,
    /// The parent's patches, with slots superseded here set to UNUSED.
    carried: Vec<Patch>,
    slot_of: HashMap<u32, (usize, usize)>,
    blocks: BTreeMap<u32, ChunkId>,
    pending: Vec<u8>,
    pending_pages: Vec<u32>,
    fresh: Vec<Patch>,
    /// Pages stored as patches by this backup.
    pub pages_patched: u64,
}

impl<'p> FileBuilder<'p> {
    pub fn new(parent: Option<&'p ParentFile>, block_size: u64) -> FileBuilder<'p> {
        let mut b = FileBuilder {
            parent,
            block_size,
            chunks: vec![],
            carried: vec![],
            slot_of: HashMap::new(),
            blocks: BTreeMap::new(),
            pending: vec![],
            pending_pages: vec![],
            fresh: vec![],
            pages_patched: 0,
        };
        if let Some(pages) = parent.and_then(|p| p.pages.as_ref()) {
            b.carried = pages.patches.clone();
            for (ci, p) in b.carried.iter().enumerate() {
                for (slot, page) in p.pages.iter().enumerate() {
                    if *page != Patch::UNUSED {
                        b.slot_of.insert(*page, (ci, slot));
                    }
                }
            }
            b.blocks = pages.blocks.iter().copied().collect();
        }
        b
    }

    fn pages_per_block(&self) -> u32 {
        (self.block_size / PATCH_PAGE as u64) as u32
    }

    /// The parent's block `i` when it has the same length as a block of `len` bytes.
    fn parent_block(&self, i: u32, len: usize) -> Option<ChunkId> {
        let p = self.parent?;
        let start = u64::from(i) * self.block_size;
        let plen = p.size.checked_sub(start)?.min(self.block_size);
        (plen == len as u64 && len.is_multiple_of(PATCH_PAGE))
            .then(|| p.chunks.get(i as usize).copied())
            .flatten()
    }

    fn drop_slot(&mut self, page: u32) {
        if let Some((ci, slot)) = self.slot_of.remove(&page) {
            self.carried[ci].pages[slot] = Patch::UNUSED;
        }
    }

    fn drop_block(&mut self, i: u32) {
        let per = self.pages_per_block();
        for page in i * per..(i + 1) * per {
            self.drop_slot(page);
        }
        self.blocks.remove(&i);
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
            (sink.add)(id, data)?;
            self.chunks.push(id);
            self.drop_block(i);
            return Ok(());
        }
        let base = base.expect("checked");
        let per = self.pages_per_block();
        let changed: Vec<usize> = data
            .chunks(PATCH_PAGE)
            .enumerate()
            .filter(|(k, page)| changed(*k, page))
            .map(|(k, _)| k)
            .collect();
        if changed.is_empty() {
            // As the parent has it (its patches for the block included).
            self.chunks.push(base);
            return Ok(());
        }
        let live = (i * per..(i + 1) * per)
            .filter(|p| self.slot_of.contains_key(p))
            .filter(|p| !changed.contains(&((p - i * per) as usize)))
            .count();
        if (changed.len() + live) * 4 >= per as usize * 3 {
            (sink.add)(id, data)?;
            self.chunks.push(id);
            self.drop_block(i);
            return Ok(());
        }
        self.chunks.push(base);
        for k in changed {
            let page = i * per + k as u32;
            self.drop_slot(page);
            self.pending
                .extend_from_slice(&data[k * PATCH_PAGE..(k + 1) * PATCH_PAGE]);
            self.pending_pages.push(page);
            self.pages_patched += 1;
            if self.pending_pages.len() == PATCH_PAGES {
                self.flush(sink)?;
            }
        }
        self.blocks.insert(i, id);
        Ok(())
    }

    /// Block `i`, not read (the server's WAL summaries say no page of it changed since the
    /// parent started): the parent's block and patches as they are.
    pub fn carry(&mut self, i: u32) -> Result<()> {
        let p = self.parent.expect("carry needs a parent");
        let id = p.chunks.get(i as usize).copied().ok_or_else(|| {
            Error::internal(format!("block {i} carried from a parent that lacks it"))
        })?;
        self.chunks.push(id);
        Ok(())
    }

    fn flush(&mut self, sink: &Sink) -> Result<()> {
        if self.pending_pages.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.pending);
        let id = (sink.hash)(&data);
        (sink.add)(id, data)?;
        self.fresh.push(Patch {
            chunk: id,
            pages: std::mem::take(&mut self.pending_pages),
        });
        Ok(())
    }

    /// The file's blocks and patches once every block up to `size` was given.
    pub fn finish(mut self, size: u64, sink: &Sink) -> Result<(Vec<ChunkId>, Option<PagePatches>)> {
        self.flush(sink)?;
        let pages = size.div_ceil(PATCH_PAGE as u64);
        let beyond: Vec<u32> = self
            .slot_of
            .keys()
            .copied()
            .filter(|p| u64::from(*p) >= pages)
            .collect();
        for p in beyond {
            self.drop_slot(p);
        }
        let blocks = self.chunks.len() as u32;
        self.blocks.retain(|b, _| *b < blocks);
        let mut patches: Vec<Patch> = self
            .carried
            .into_iter()
            .filter(|p| p.pages.iter().any(|x| *x != Patch::UNUSED))
            .collect();
        patches.extend(self.fresh);
        if patches.is_empty() {
            return Ok((self.chunks, None));
        }
        Ok((
            self.chunks,
            Some(PagePatches {
                patches,
                blocks: self.blocks.into_iter().collect(),
            }),
        ))
    }
}

/// One write of a restore: bytes `src..src+len` of a chunk to offset `dst` of the file,
/// which lies in the file's block `block`. Patch pieces (`patch`) are written after every
/// block piece, over them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub chunk: ChunkId,
    pub src: u64,
    pub dst: u64,
    pub len: u64,
    pub block: usize,
    pub patch: bool,
}

/// How to lay a file down: its blocks whole, then its patch pages over them (so each block
/// is one write, and each block piece may go in any order, as may each patch piece).
/// `chunk_len` gives a chunk's plain length (from the index).
pub fn pieces(e: &Entry, chunk_len: impl Fn(&ChunkId) -> Option<u64>) -> Result<Vec<Piece>> {
    let len_of = |id: &ChunkId| {
        chunk_len(id).ok_or_else(|| {
            Error::integrity(format!(
                "chunk {} of {} is not in the index",
                id.short(),
                e.path
            ))
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
            patch: false,
        });
        off += len;
    }
    let Some(pages) = &e.pages else {
        return Ok(out);
    };
    pages
        .check(e.size)
        .map_err(|m| Error::integrity(format!("{}: {m}", e.path)))?;
    let page = PATCH_PAGE as u64;
    let block_of = |dst: u64| starts.partition_point(|s| *s <= dst).saturating_sub(1);
    for p in &pages.patches {
        let n = len_of(&p.chunk)?;
        if n != p.pages.len() as u64 * page {
            return Err(Error::integrity(format!(
                "{}: a page patch of {} pages holds {n} bytes",
                e.path,
                p.pages.len()
            )));
        }
        for (slot, pg) in p.pages.iter().enumerate() {
            if *pg == Patch::UNUSED {
                continue;
            }
            let dst = u64::from(*pg) * page;
            out.push(Piece {
                chunk: p.chunk,
                src: slot as u64 * page,
                dst,
                len: page.min(e.size - dst),
                block: block_of(dst),
                patch: true,
            });
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

    fn build(
        store: &Store,
        parent: Option<&ParentFile>,
        data: &[u8],
        changed_pages: &std::collections::HashSet<u32>,
    ) -> (ParentFile, u64) {
        let hash = |d: &[u8]| id_of(d);
        let has = |id: &ChunkId| store.chunks.lock().unwrap().contains_key(id);
        let add = |id: ChunkId, d: Vec<u8>| -> Result<()> {
            store.chunks.lock().unwrap().insert(id, d);
            Ok(())
        };
        let sink = Sink {
            hash: &hash,
            has: &has,
            add: &add,
        };
        let mut b = FileBuilder::new(parent, B);
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
        let patched = b.pages_patched;
        let (chunks, pages) = b.finish(data.len() as u64, &sink).unwrap();
        (
            ParentFile {
                size: data.len() as u64,
                mtime_ns: 0,
                chunks,
                pages,
            },
            patched,
        )
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
        }
    }

    fn restore(store: &Store, f: &ParentFile) -> Vec<u8> {
        let e = entry(f.size, f.chunks.clone(), f.pages.clone());
        let chunks = store.chunks.lock().unwrap();
        let ps = pieces(&e, |id| chunks.get(id).map(|c| c.len() as u64)).unwrap();
        let mut out = vec![0xEEu8; f.size as usize];
        let mut written = vec![0u8; f.size as usize];
        // Blocks first, then patches, as a restore writes them; each in any order.
        for patch in [false, true] {
            for p in ps.iter().filter(|p| p.patch == patch) {
                let src = &chunks[&p.chunk][p.src as usize..(p.src + p.len) as usize];
                let dst = p.dst as usize..(p.dst + p.len) as usize;
                out[dst.clone()].copy_from_slice(src);
                for w in &mut written[dst] {
                    assert!(*w < 1 + patch as u8, "a byte written twice in one pass");
                    *w += 1;
                }
            }
        }
        assert!(written.iter().all(|w| *w >= 1), "every byte written");
        out
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
        let (mut parent, _) = build(&store, None, &data, &Default::default());
        assert!(parent.pages.is_none());
        assert_eq!(restore(&store, &parent), data);
        let mut patched_total = 0;
        for round in 0..12 {
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
                let at = p as usize * PATCH_PAGE + next() as usize % PATCH_PAGE;
                data[at] = data[at].wrapping_add(1 + round as u8);
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
            let (next_parent, patched) = build(&store, Some(&parent), &data, &changed);
            patched_total += patched;
            assert_eq!(restore(&store, &next_parent), data, "round {round}");
            parent = next_parent;
        }
        assert!(patched_total > 0, "page mode was used");
        assert!(parent.pages.is_some());
    }

    #[test]
    fn a_block_mostly_changed_is_stored_whole() {
        let store = Store {
            chunks: Mutex::new(HashMap::new()),
        };
        let mut data: Vec<u8> = (0..32 * PATCH_PAGE).map(|i| (i / 13) as u8).collect();
        let (parent, _) = build(&store, None, &data, &Default::default());
        let mut changed = std::collections::HashSet::new();
        for p in 0..12 {
            changed.insert(p);
            data[p as usize * PATCH_PAGE] ^= 0xFF;
        }
        changed.insert(20);
        data[20 * PATCH_PAGE] ^= 0xFF;
        let (child, patched) = build(&store, Some(&parent), &data, &changed);
        assert_eq!(patched, 1, "block 0 rebased, one page of block 1 patched");
        assert_ne!(child.chunks[0], parent.chunks[0]);
        assert_eq!(child.chunks[1], parent.chunks[1]);
        assert_eq!(restore(&store, &child), data);
    }

    #[test]
    fn a_patch_naming_a_page_twice_or_outside_the_file_is_refused() {
        let id = id_of(b"x");
        let mut e = entry(
            2 * PATCH_PAGE as u64,
            vec![id],
            Some(PagePatches {
                patches: vec![Patch {
                    chunk: id,
                    pages: vec![1, 1],
                }],
                blocks: vec![],
            }),
        );
        let len = |_: &ChunkId| Some(2 * PATCH_PAGE as u64);
        assert!(pieces(&e, len).unwrap_err().message.contains("twice"));
        e.pages.as_mut().unwrap().patches[0].pages = vec![0, 7];
        assert!(pieces(&e, len).is_err());
    }
}
