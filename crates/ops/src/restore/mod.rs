//! Restores of file snapshots (to a folder) and stream snapshots (to a writer).
//!
//! File restores are planned by pack: each pack needed is fetched once (whole when most of
//! it is needed, else blob by blob), its blobs decrypted and checked against their ids into
//! buffers by decoder threads, and the buffers written at their offsets in every file that
//! uses them by writer threads, so that decoding and writing overlap. Before anything is
//! written, a restore that cannot fit on the target is refused. Metadata (modes, owners,
//! times) is applied after the data, folders last and deepest first.
//!
//! A manifest is hostile input (a backup key, or anyone who can name a file in a backed-up
//! folder, wrote it): before anything is written it is checked for paths that are not
//! clean relative ones, paths held twice and paths under something that is not a folder,
//! and every change goes through [`TargetDir`], which never follows a link inside the
//! target. Symbolic links are created last.

pub mod target;

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use custos_model::error::io_error;
use custos_model::{ChunkId, Error, Kind, PackId, PathBytes, Result};
use custos_repo::{pack, paths, Index, Repository, Snapshot};
use custos_sources::files::{Entry, EntryKind};
use serde::Serialize;

use crate::progress::Progress;
use crate::restore::target::{Found, Meta, TargetDir};

#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub snapshot: String,
    pub target: String,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub packs_read: u64,
    pub duration_ms: u64,
    /// With delta: bytes already right in the target, not written.
    pub bytes_unchanged: u64,
    /// With delta: paths removed because the snapshot does not hold them.
    pub removed: u64,
}

#[derive(Default)]
struct DeltaReport {
    /// (entry, chunk) pieces already right in the target.
    unchanged: std::collections::HashSet<(usize, usize)>,
    bytes_unchanged: u64,
    removed: u64,
}

/// Delta restore, before anything is written: removes what the snapshot does not hold,
/// truncates files longer than recorded, and finds the blocks already right (read and
/// hashed in parallel; a block counts only if its keyed hash is the chunk id).
fn delta_prepare(
    repo: &Repository,
    index: &Index,
    target: &TargetDir,
    entries: &[Entry],
    pieces: &[Vec<crate::postgres::pages::Piece>],
) -> Result<DeltaReport> {
    let mut report = DeltaReport::default();
    let wanted: std::collections::HashMap<&PathBytes, EntryKind> =
        entries.iter().map(|e| (&e.path, e.kind)).collect();
    let existing = custos_sources::files::walk(&[target.path().to_path_buf()])?;
    for w in &existing.entries {
        let keep = wanted
            .get(&w.entry.path)
            .is_some_and(|k| *k == w.entry.kind);
        // A file with other names (hard links) is replaced, not written in place: its
        // other names may lie outside the target.
        let shared = || matches!(target.lstat(&w.entry.path), Ok(Some(Found::File { links, .. })) if links > 1);
        if !keep || (w.entry.kind == EntryKind::File && shared()) {
            // A folder removed earlier took its contents with it.
            if target.lstat(&w.entry.path)?.is_some() {
                target.remove(&w.entry.path)?;
                report.removed += 1;
            }
        }
    }
    // Files that should be empty but are not are emptied here; they get no pieces.
    for e in entries
        .iter()
        .filter(|e| e.kind == EntryKind::File && e.chunks.is_empty())
    {
        if matches!(target.lstat(&e.path)?, Some(Found::File { len, .. }) if len > 0) {
            target
                .open_rw(&e.path)
                .and_then(|f| f.set_len(0))
                .map_err(|err| target.error(&e.path, err))?;
        }
    }
    let files: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == EntryKind::File && !e.chunks.is_empty())
        .map(|(i, _)| i)
        .collect();
    let found = custos_repo::repository::parallel_map(
        &files,
        repo.threads(),
        |&i| -> Result<Vec<(usize, usize, u64)>> {
            let e = &entries[i];
            let Ok(f) = target.open_rw(&e.path) else {
                return Ok(vec![]);
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len > e.size {
                f.set_len(e.size)
                    .map_err(|err| target.error(&e.path, err))?;
            }
            let mut same = vec![];
            let mut off = 0u64;
            let mut buf = vec![];
            // A block with page patches is compared with its content as restored.
            let patched: HashMap<u32, ChunkId> = e
                .pages
                .iter()
                .flat_map(|p| p.blocks.iter().copied())
                .collect();
            // Patched blocks whose content as restored the writer did not know (a file
            // PostgreSQL sent incrementally) are always written.
            let unknown: std::collections::HashSet<usize> = pieces[i]
                .iter()
                .filter(|p| p.is_patch() && !patched.contains_key(&(p.block as u32)))
                .map(|p| p.block)
                .collect();
            for (k, id) in e.chunks.iter().enumerate() {
                let Some((_, loc)) = index.get(id) else {
                    break;
                };
                let n = u64::from(loc.raw_length);
                if off + n > len {
                    break;
                }
                buf.resize(n as usize, 0);
                let expect = patched.get(&(k as u32)).unwrap_or(id);
                if !unknown.contains(&k)
                    && f.read_exact_at(&mut buf, off).is_ok()
                    && repo.keys.chunk_id(&buf) == *expect
                {
                    same.push((i, k, n));
                }
                off += n;
            }
            Ok(same)
        },
    )?;
    for (i, k, n) in found.into_iter().flatten() {
        report.unchanged.insert((i, k));
        report.bytes_unchanged += n;
    }
    Ok(report)
}

/// Where a piece of a chunk goes: bytes `src..src+len` to offset `dst` of entry `file`.
struct Target {
    file: usize,
    src: usize,
    dst: u64,
    len: usize,
}

/// Per pack: the chunks needed from it, each with the places its pieces go.
type PackPlan = Vec<(ChunkId, Vec<Target>)>;

/// Bytes of a file with page patches laid down in memory at once: its blocks, the page
/// patches over them, the unit patches over those, then written in one piece per run of
/// blocks. (Written to the file pass by pass, the patches cost a write each: hundreds of
/// thousands of 1 KiB writes, and every patched block written twice.)
const SLICE: u64 = 8 << 20;

/// A piece of a slice: bytes `src..src+len` of a chunk to offset `at` of the slice.
struct SlicePiece {
    chunk: ChunkId,
    src: usize,
    at: usize,
    len: usize,
    pass: u8,
}

/// One slice of a file with page patches: offsets `dst..dst+len`.
struct Slice {
    file: usize,
    dst: u64,
    len: usize,
    /// Sorted by pass: blocks, page patches, unit patches.
    pieces: Vec<SlicePiece>,
}

/// The best location of a chunk the restore was planned from (the plan only names
/// indexed chunks).
fn planned(index: &Index, id: &ChunkId) -> custos_repo::BlobLoc {
    index.loc(id).expect("planned from the index")
}

enum Work {
    /// Blobs of one pack (files without patches): each decoded once, written everywhere
    /// it goes.
    Pack(PackId, PackPlan),
    Slice(Slice),
}

impl Work {
    /// Bytes it writes, and about the bytes it fetches from packs (less where the blobs
    /// are compressed).
    fn sizes(&self, index: &Index) -> (u64, u64) {
        let add = |(raw, stored): (u64, u64), b: custos_repo::BlobLoc| {
            (raw + u64::from(b.raw_length), stored + u64::from(b.length))
        };
        match self {
            Work::Pack(_, blobs) => blobs
                .iter()
                .map(|(id, _)| planned(index, id))
                .fold((0, 0), add),
            Work::Slice(s) => {
                let blocks = s.pieces.iter().filter(|p| p.pass == 0);
                let (_, stored) = blocks.filter_map(|p| index.loc(&p.chunk)).fold((0, 0), add);
                (s.len as u64, stored)
            }
        }
    }
}

/// Work in two queues, each largest first (the last to finish are short). Work on blobs
/// that compress well keeps a core busy for every byte it writes; work on blobs stored as
/// they are keeps the disk busy. A decoder takes from the second while a writer waits for
/// work, else from the first, so the cores and the disk stay busy together.
struct Queues {
    cpu: Vec<Work>,
    disk: Vec<Work>,
    next: [std::sync::atomic::AtomicUsize; 2],
}

impl Queues {
    fn new(work: Vec<Work>, index: &Index) -> Queues {
        let (mut cpu, mut disk): (Vec<_>, Vec<_>) = work
            .into_iter()
            .map(|w| (w.sizes(index), w))
            .partition(|((raw, stored), _)| stored * 2 < *raw);
        cpu.sort_by_key(|((raw, _), _)| std::cmp::Reverse(*raw));
        disk.sort_by_key(|((raw, _), _)| std::cmp::Reverse(*raw));
        let strip = |v: Vec<((u64, u64), Work)>| v.into_iter().map(|(_, w)| w).collect();
        Queues {
            cpu: strip(cpu),
            disk: strip(disk),
            next: Default::default(),
        }
    }

    fn len(&self) -> usize {
        self.cpu.len() + self.disk.len()
    }

    /// The next work to do, from the disk's queue first if `disk_idle`; None when all is
    /// taken, or after [`Queues::stop`].
    fn take(&self, disk_idle: bool) -> Option<&Work> {
        let order = if disk_idle { [1, 0] } else { [0, 1] };
        order.into_iter().find_map(|q| {
            let v = if q == 0 { &self.cpu } else { &self.disk };
            v.get(self.next[q].fetch_add(1, Ordering::Relaxed))
        })
    }

    fn stop(&self) {
        for n in &self.next {
            n.store(usize::MAX / 2, Ordering::Relaxed);
        }
    }
}

/// Splits each pack's plan into runs of blobs in pack order holding at most 8 MiB that
/// is needed, so that every thread has work to the end.
fn pack_work(plan: HashMap<PackId, PackPlan>, index: &Index) -> Vec<Work> {
    const RUN: u64 = 8 << 20;
    let mut out = vec![];
    for (pack, mut blobs) in plan {
        blobs.sort_by_cached_key(|(id, _)| planned(index, id).offset);
        let mut run: PackPlan = vec![];
        let mut size = 0u64;
        for b in blobs {
            size += u64::from(planned(index, &b.0).length);
            run.push(b);
            if size >= RUN {
                out.push(Work::Pack(pack, std::mem::take(&mut run)));
                size = 0;
            }
        }
        if !run.is_empty() {
            out.push(Work::Pack(pack, run));
        }
    }
    out
}

/// Fetches the blobs `ids` (in pack order) of one pack, one read of their span when they
/// fill most of it, else one read each, and hands each sealed blob to `f`.
fn fetch_blobs(
    repo: &Repository,
    index: &Index,
    pack_id: &PackId,
    ids: &[&ChunkId],
    mut f: impl FnMut(&[u8; 32], &ChunkId, &custos_repo::BlobLoc, &[u8]) -> Result<()>,
) -> Result<()> {
    let meta = index.pack(pack_id).expect("planned from the index");
    let dek = repo.pack_key(&meta)?;
    let locs: Vec<custos_repo::BlobLoc> = ids.iter().map(|id| planned(index, id)).collect();
    let needed: u64 = locs.iter().map(|l| u64::from(l.length)).sum();
    let first = u64::from(locs[0].offset);
    let last = locs[locs.len() - 1];
    let span = u64::from(last.offset) + u64::from(last.length) - first;
    let whole = if needed * 2 > span {
        Some(
            repo.storage
                .get_range(&paths::pack(pack_id), first, span)
                .map_err(|e| missing(e, pack_id))?,
        )
    } else {
        None
    };
    for (id, loc) in ids.iter().zip(&locs) {
        let fetched;
        let sealed: &[u8] = match &whole {
            Some(w) => {
                let at = (u64::from(loc.offset) - first) as usize;
                w.get(at..at + loc.length as usize).ok_or_else(|| {
                    Error::integrity(format!("pack {} is shorter than indexed", pack_id.short()))
                })?
            }
            None => {
                fetched = repo
                    .storage
                    .get_range(
                        &paths::pack(pack_id),
                        u64::from(loc.offset),
                        u64::from(loc.length),
                    )
                    .map_err(|e| missing(e, pack_id))?;
                &fetched
            }
        };
        f(&dek, id, loc, sealed)?;
    }
    Ok(())
}

/// Decrypts a blob fetched from `pack` into `out`; when that copy is damaged (or was
/// planted under another's id), reads the chunk from the next place it is stored.
#[allow(clippy::too_many_arguments)]
fn open_or_other_copy(
    repo: &Repository,
    index: &Index,
    pack: &PackId,
    dek: &[u8; 32],
    id: &ChunkId,
    loc: &custos_repo::BlobLoc,
    sealed: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let named = |mut e: custos_model::Error| {
        if e.kind == Kind::Integrity {
            e.message = format!("{} (in pack {})", e.message, pack);
        }
        e
    };
    match pack::open_blob_into(dek, &repo.keys.id_key, id, loc, sealed, out).map_err(named) {
        Err(e) if e.kind == Kind::Integrity && index.locations(id).len() > 1 => {
            tracing::warn!(
                "chunk {} in pack {}: {}; reading another copy",
                id.short(),
                pack.short(),
                e.message
            );
            repo.read_blob_into(index, id, Some(pack), out)
                .map_err(|_| e)
        }
        r => r,
    }
}

/// Direct I/O wants buffers, offsets and lengths aligned to the device's blocks.
const ALIGN: usize = 4096;

/// A transparent huge page (x86-64, and arm64 with 4 KiB pages).
const HUGE: usize = 2 << 20;

/// A buffer for the bytes a restore writes: mapped on its own, starting on a huge-page
/// boundary and marked `MADV_HUGEPAGE`, so the kernel backs it with 2 MiB pages where it
/// has them. A direct write then hands the device one request of up to `max_sectors_kb`
/// (4 MiB on this machine's disk) instead of one per `max_segments` (254) scattered 4 KiB
/// pages. `fio`, 1.8 GiB of 4 MiB direct writes from six threads: 0.92-0.93 s from huge
/// pages, 1.13-1.36 s from `malloc`'s.
#[derive(Default)]
struct WriteBuf {
    map: Option<memmap2::MmapMut>,
    /// Where the aligned part starts in `map`, and its length.
    at: usize,
    cap: usize,
}

impl WriteBuf {
    /// Its first `len` bytes, at a [`HUGE`]-aligned address. They hold what was last
    /// written there; growing maps a new, zeroed buffer and drops the old content.
    fn get(&mut self, len: usize) -> Result<&mut [u8]> {
        if self.cap < len {
            let cap = len.next_multiple_of(HUGE);
            let map = memmap2::MmapMut::map_anon(cap + HUGE).map_err(|e| {
                Error::new(
                    Kind::Internal,
                    format!("cannot map a {cap}-byte restore buffer: {e}"),
                )
            })?;
            let at = map.as_ptr().align_offset(HUGE);
            // Only a hint: without huge pages to give, the kernel maps small ones.
            let _ = map.advise_range(memmap2::Advice::HugePage, at, cap);
            *self = WriteBuf {
                map: Some(map),
                at,
                cap,
            };
        }
        let map = self.map.as_mut().expect("mapped above");
        Ok(&mut map[self.at..self.at + len])
    }

    /// Bytes `at..at + len` of what [`WriteBuf::get`] gave.
    fn bytes(&self, at: usize, len: usize) -> &[u8] {
        match &self.map {
            Some(map) => &map[self.at + at..self.at + at + len],
            None => &[],
        }
    }
}

/// Threads writing decoded buffers: enough writes in flight to keep the disk busy while
/// the decoders use the cores.
const WRITERS: usize = 4;

/// A decoded buffer is at least this large: whole blobs that follow each other in a pack
/// and in one file are decoded side by side and written at once. The device takes 1.8 GiB
/// in 128 KiB direct writes from six threads in 1.55-1.78 s, in 4 MiB writes in 1.19 s
/// (`fio`).
const JOB: usize = SLICE as usize;

/// Decoded bytes and where they go.
#[derive(Default)]
struct Job {
    buf: WriteBuf,
    /// Bytes of `buf` used so far (of its `cap`).
    used: usize,
    puts: Vec<Put>,
}

impl Job {
    /// A job on `buf`, with room for at least `len` bytes.
    fn new(mut buf: WriteBuf, len: usize) -> Result<Job> {
        buf.get(len.max(JOB))?;
        Ok(Job {
            buf,
            used: 0,
            puts: vec![],
        })
    }
}

/// Bytes `at..at+len` of a job's buffer, for offset `dst` of entry `file`; `pieces` planned
/// writes are done when it is written.
struct Put {
    file: usize,
    at: usize,
    len: usize,
    dst: u64,
    pieces: usize,
}

/// Buffers written and free for the next job.
#[derive(Default)]
struct Pool(std::sync::Mutex<Vec<WriteBuf>>);

impl Pool {
    fn take(&self) -> WriteBuf {
        self.0
            .lock()
            .expect("not poisoned")
            .pop()
            .unwrap_or_default()
    }

    fn put(&self, b: WriteBuf) {
        self.0.lock().expect("not poisoned").push(b);
    }
}

/// Files at least this large are allocated whole before their data is written.
const PREALLOCATE: u64 = 1 << 20;

/// Allocates a file's `size` bytes before its first write (done once per file, by
/// whichever thread opens it first): aligned direct writes into allocated space take
/// ext4's inode lock shared (Linux 6.3+), so the threads writing one large file run side
/// by side instead of one at a time, and the file is laid out in few extents. File
/// systems that cannot (`EOPNOTSUPP`) just write without it; a full disk is an error.
fn preallocate(f: &fs::File, size: u64) -> std::result::Result<(), i32> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: fallocate on a descriptor we own.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as libc::off_t) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSPC) {
        return Err(libc::ENOSPC);
    }
    Ok(())
}

/// Per entry: its allocation, done by the first thread to open it.
type Prealloc = std::sync::OnceLock<std::result::Result<(), i32>>;

/// A restored file open for writing: through the page cache, and with `O_DIRECT` where
/// the file system allows it. Aligned writes go direct (no copy into the page cache, no
/// writeback later: a buffered restore spends most of its system time there); the rest,
/// and every write where direct I/O is refused, go through the page cache.
struct OpenFile {
    file: usize,
    buffered: fs::File,
    /// Opened at the first large aligned write; None inside when refused.
    direct: std::cell::OnceCell<Option<fs::File>>,
}

/// Writes smaller than this go through the page cache: a direct write waits for the
/// device, which costs more than the copy for the small files of a file backup.
const DIRECT_MIN: usize = 64 << 10;

impl OpenFile {
    /// Opens entry `file` at `rel` of the target, creating it if need be (never
    /// truncated: other threads write other pieces of it); with `alloc`, allocates it
    /// first if no thread did.
    fn open(
        file: usize,
        t: &TargetDir,
        rel: &PathBytes,
        alloc: Option<(&Prealloc, u64)>,
    ) -> Result<OpenFile> {
        let buffered = t
            .open_write(rel, true, false)
            .map_err(|err| write_error(t, rel, err))?;
        if let Some((once, size)) = alloc {
            once.get_or_init(|| preallocate(&buffered, size))
                .map_err(|e| write_error(t, rel, std::io::Error::from_raw_os_error(e)))?;
        }
        Ok(OpenFile {
            file,
            buffered,
            direct: std::cell::OnceCell::new(),
        })
    }

    /// Writes `data` at `dst`: direct where it can, its unaligned tail (a file's last
    /// bytes) through the page cache.
    fn write_at(&self, data: &[u8], dst: u64, t: &TargetDir, rel: &PathBytes) -> Result<()> {
        let head = data.len() / ALIGN * ALIGN;
        let fits = head >= DIRECT_MIN
            && data.as_ptr().align_offset(ALIGN) == 0
            && dst.is_multiple_of(ALIGN as u64);
        let direct = fits.then(|| {
            self.direct
                .get_or_init(|| t.open_write(rel, false, true).ok())
        });
        if let Some(Some(d)) = direct {
            match d.write_all_at(&data[..head], dst) {
                Ok(()) if head == data.len() => return Ok(()),
                Ok(()) => return self.write_buffered(&data[head..], dst + head as u64, t, rel),
                // Refused (alignment this device does not take): the page cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(write_error(t, rel, e)),
            }
        }
        self.write_buffered(data, dst, t, rel)
    }

    fn write_buffered(&self, data: &[u8], dst: u64, t: &TargetDir, rel: &PathBytes) -> Result<()> {
        self.buffered
            .write_all_at(data, dst)
            .map_err(|err| write_error(t, rel, err))?;
        // Start it towards the disk now rather than all at the final sync.
        if data.len() >= DIRECT_MIN {
            start_writeback(&self.buffered, dst, data.len());
        }
        Ok(())
    }
}

/// A failed write or create of a restored file; a full file system says what to do.
fn write_error(t: &TargetDir, rel: &PathBytes, err: std::io::Error) -> Error {
    let full = matches!(err.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT));
    let e = t.error(rel, err);
    if full {
        e.hint("the file system is full: free space (and inodes) there, or restore into a folder on a larger one; what was written so far is incomplete")
    } else {
        e
    }
}

/// Cuts the pieces of a file with patches (blocks first, see `pg_pages::pieces`) into
/// slices of about [`SLICE`] bytes of its blocks.
fn slices(file: usize, pieces: &[crate::postgres::pages::Piece]) -> Vec<Slice> {
    // Slice of every block, by the block's index (blocks come first, block k at k).
    let blocks = pieces
        .iter()
        .filter(|p| !p.is_patch())
        .map(|p| p.block + 1)
        .max();
    let mut by_block: Vec<Option<usize>> = vec![None; blocks.unwrap_or(0)];
    let mut out: Vec<Slice> = vec![];
    for p in pieces.iter().filter(|p| !p.is_patch()) {
        let k = (p.dst / SLICE) as usize;
        let n = match out.last() {
            Some(s) if (s.dst / SLICE) as usize == k => out.len() - 1,
            _ => {
                out.push(Slice {
                    file,
                    dst: p.dst,
                    len: 0,
                    pieces: vec![],
                });
                out.len() - 1
            }
        };
        by_block[p.block] = Some(n);
        let s = &mut out[n];
        s.len = (p.dst + p.len - s.dst) as usize;
    }
    for p in pieces {
        let Some(&Some(n)) = by_block.get(p.block) else {
            continue;
        };
        let s = &mut out[n];
        s.pieces.push(SlicePiece {
            chunk: p.chunk,
            src: p.src as usize,
            at: (p.dst - s.dst) as usize,
            len: p.len as usize,
            pass: p.pass,
        });
    }
    for s in &mut out {
        s.pieces.sort_by_key(|p| p.pass);
    }
    out
}

/// The runs of a slice's bytes to write: its blocks (those a delta restore kept are not
/// in it), merged where they touch.
fn slice_runs(s: &Slice) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = vec![];
    for p in s.pieces.iter().filter(|p| p.pass == 0) {
        match runs.last_mut() {
            Some((at, len)) if *at + *len == p.at => *len += p.len,
            _ => runs.push((p.at, p.len)),
        }
    }
    runs
}

/// Decodes a slice's blocks and patches into `buf` (the slice's bytes): blocks used whole
/// once are decoded in place; every other chunk once, then its pieces copied in pass
/// order, so patches land over the blocks and units over the page patches.
fn lay_slice(
    repo: &Repository,
    index: &Index,
    path: &PathBytes,
    s: &Slice,
    buf: &mut [u8],
) -> Result<()> {
    let zero = crate::postgres::pages::ZERO_CHUNK;
    let mut uses: HashMap<ChunkId, usize> = HashMap::new();
    for p in s.pieces.iter().filter(|p| p.chunk != zero) {
        *uses.entry(p.chunk).or_default() += 1;
    }
    // Chunks decoded in place, at their offset in the slice: each is used once, whole.
    let at_of: HashMap<ChunkId, usize> = s
        .pieces
        .iter()
        .filter(|p| {
            p.pass == 0
                && p.src == 0
                && p.chunk != zero
                && uses[&p.chunk] == 1
                && planned(index, &p.chunk).raw_length as usize == p.len
        })
        .map(|p| (p.chunk, p.at))
        .collect();
    let mut by_pack: HashMap<PackId, Vec<&ChunkId>> = HashMap::new();
    for id in uses.keys() {
        by_pack
            .entry(index.get(id).expect("pieces checked the index").0.id)
            .or_default()
            .push(id);
    }
    let mut decoded: HashMap<ChunkId, Vec<u8>> = HashMap::new();
    for (pack_id, mut ids) in by_pack {
        ids.sort_by_cached_key(|id| planned(index, id).offset);
        fetch_blobs(
            repo,
            index,
            &pack_id,
            &ids,
            |dek, id, loc, sealed| match at_of.get(id) {
                Some(&at) => open_or_other_copy(
                    repo,
                    index,
                    &pack_id,
                    dek,
                    id,
                    loc,
                    sealed,
                    &mut buf[at..at + loc.raw_length as usize],
                ),
                None => {
                    let mut out = vec![0u8; loc.raw_length as usize];
                    open_or_other_copy(repo, index, &pack_id, dek, id, loc, sealed, &mut out)?;
                    decoded.insert(*id, out);
                    Ok(())
                }
            },
        )?;
    }
    for p in s.pieces.iter().filter(|p| !at_of.contains_key(&p.chunk)) {
        if p.chunk == zero {
            buf[p.at..p.at + p.len].fill(0);
            continue;
        }
        let piece = decoded[&p.chunk].get(p.src..p.src + p.len).ok_or_else(|| {
            Error::integrity(format!(
                "chunk {} is shorter than its use in {path}",
                p.chunk.short()
            ))
        })?;
        buf[p.at..p.at + p.len].copy_from_slice(piece);
    }
    Ok(())
}

pub struct RestoreOptions<'a> {
    /// Restore what lies under this path of the snapshot into the target itself (a file:
    /// the file, under its own name).
    pub subtree: Option<String>,
    pub include: Vec<String>,
    /// Allow restoring into a non-empty folder (files present in the snapshot are replaced).
    pub overwrite: bool,
    /// Make the folder equal to the snapshot, rewriting only blocks whose content differs
    /// and removing what the snapshot does not hold.
    pub delta: bool,
    /// A file laid down only once every other one is complete: written under a temporary
    /// name beside it and renamed into place at the end (PostgreSQL's `global/pg_control`:
    /// a data directory whose restore stopped part-way has none and cannot be started).
    pub last: Option<PathBytes>,
    /// The caller removes the whole target if the restore fails (a folder it created):
    /// the files a failed restore did not finish are then left to it.
    pub discard_on_failure: bool,
    pub progress: &'a dyn Progress,
}

/// A restore that stopped while writing: the error, and the files it had not finished.
struct Stopped {
    error: Error,
    incomplete: Vec<usize>,
}

/// The error of a restore that stopped part-way, saying so: the files it had not finished
/// are removed (what was written of them is neither the old file nor the restored one),
/// so that every file the target holds is complete, and `--delta` restores the rest.
fn stopped_part_way(t: &TargetDir, entries: &[Entry], s: Stopped, opts: &RestoreOptions) -> Error {
    let Stopped {
        mut error,
        incomplete,
    } = s;
    if opts.discard_on_failure || incomplete.is_empty() {
        return error;
    }
    let mut left = vec![];
    for &i in &incomplete {
        let p = &entries[i].path;
        let removed = match t.lstat(p) {
            Ok(Some(_)) => t.remove(p).is_ok(),
            Ok(None) => true,
            Err(_) => false,
        };
        if !removed {
            left.push(t.show(p).display().to_string());
        }
    }
    let files = entries.iter().filter(|e| e.kind == EntryKind::File).count();
    let n = incomplete.len();
    error.message = format!(
        "{}; the restore stopped part-way: {n} of {files} files in {} {} not restored ({})",
        error.message,
        t.path().display(),
        if n == 1 { "was" } else { "were" },
        if left.is_empty() {
            "what was written of them is removed; every file there is complete".to_string()
        } else {
            format!("cannot remove what was written of {}", left.join(", "))
        }
    );
    let then = "once the cause is fixed, the same restore with --delta restores the rest";
    error.hint = Some(match error.hint.take() {
        Some(h) => format!("{h}; {then}"),
        None => then.to_string(),
    });
    error
}

/// Whether `path` is asked for: inside an included path, or a folder on the way to one.
fn included(path: &PathBytes, include: &[String]) -> bool {
    include.is_empty()
        || include.iter().any(|i| {
            let i = PathBytes::from(i.trim_matches('/'));
            path.is_within(i.as_bytes()) || i.is_within(path.as_bytes())
        })
}

/// Refuses, before anything is written, a manifest that a restore cannot lay down as it
/// says inside its target: a path that is not a clean relative one, a path held twice
/// (the second would replace the first, a link a folder), a path under an entry that is
/// not a folder, or a link without a target.
pub(crate) fn check_tree(entries: &[Entry]) -> Result<()> {
    let mut kinds: HashMap<&[u8], EntryKind> = HashMap::with_capacity(entries.len());
    for e in entries {
        if let Some(why) = e.path.relative_problem() {
            return Err(Error::integrity(format!(
                "the manifest holds an unsafe path `{}`: {why}",
                e.path
            )));
        }
        if kinds.insert(e.path.as_bytes(), e.kind).is_some() {
            return Err(Error::integrity(format!(
                "the manifest holds `{}` twice; nothing was restored",
                e.path
            )));
        }
        if e.kind == EntryKind::Symlink && e.target.as_ref().is_none_or(|t| t.is_empty()) {
            return Err(Error::integrity(format!(
                "the manifest holds a link `{}` without a target",
                e.path
            )));
        }
    }
    for e in entries {
        let mut up = e.path.as_bytes();
        while let Some(i) = up.iter().rposition(|b| *b == b'/') {
            up = &up[..i];
            match kinds.get(up) {
                Some(EntryKind::Dir) | None => {}
                Some(_) => {
                    return Err(Error::integrity(format!(
                        "the manifest holds `{}` inside `{}`, which is not a folder; nothing was restored",
                        e.path,
                        PathBytes::new(up.to_vec())
                    )))
                }
            }
        }
    }
    Ok(())
}

pub fn restore_files(
    repo: &Repository,
    snap: &Snapshot,
    target: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreReport> {
    let start = std::time::Instant::now();
    repo.require_restore("restore files")?;
    let body = repo.snapshot_body(&snap.id)?;
    if body.manifest.is_empty() && !body.stream.is_empty() {
        return Err(Error::config(format!(
            "snapshot {} holds a stream; use `custos restore stream`",
            snap.id.short()
        )));
    }
    if !opts.overwrite
        && !opts.delta
        && target.exists()
        && fs::read_dir(target)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::config(format!("{} exists and is not empty", target.display()))
            .hint("restore into a new or empty folder, or pass --overwrite to replace the files it holds"));
    }
    let index = repo.load_index_for_reading()?;
    tracing::debug!("restore: index loaded");
    let mut entries = select(repo, &index, snap, &body.manifest, opts)?;
    tracing::debug!("restore: manifest loaded ({} entries)", entries.len());
    // The file laid down last goes under a temporary name until every other is complete.
    let held = match &opts.last {
        Some(last) => hold_back(&mut entries, last)?,
        None => None,
    };
    // Every file's pieces, worked out side by side (a large file with patches has
    // hundreds of thousands), and before anything is written: a malformed entry stops
    // the restore here.
    let all_pieces: Vec<Vec<crate::postgres::pages::Piece>> =
        custos_repo::repository::parallel_map(&entries, repo.threads(), |e| {
            if e.kind != EntryKind::File {
                return Ok(vec![]);
            }
            crate::postgres::pages::pieces(e, |id| {
                index.get(id).map(|(_, loc)| u64::from(loc.raw_length))
            })
        })?;
    let t = TargetDir::open(target)?;
    let mut report_delta = DeltaReport::default();
    let keep = if opts.delta {
        report_delta = delta_prepare(repo, &index, &t, &entries, &all_pieces)?;
        Some(&report_delta.unchanged)
    } else {
        None
    };

    let Layout {
        work,
        planned,
        packs_read,
        total,
        mut report,
    } = lay_out(&index, &t, &entries, all_pieces, keep, opts)?;
    report.snapshot = snap.id.to_hex();
    report.target = target.display().to_string();
    report.bytes_unchanged = report_delta.bytes_unchanged;
    report.removed = report_delta.removed;

    if !opts.delta {
        let blocks = &|bsize: u64| {
            entries
                .iter()
                .filter(|e| e.kind == EntryKind::File)
                .map(|e| e.size.next_multiple_of(bsize))
                .sum::<u64>()
        };
        match check_room(target, blocks) {
            // Space freed by --overwrite's removals may show only once committed.
            Err(_) if opts.overwrite => {
                sync_filesystem(target)?;
                check_room(target, blocks)?;
            }
            r => r?,
        }
    }
    tracing::debug!("restore: planned {} work items", work.len());
    // From here the workers read what the plan needs, in its order.
    custos_storage::stop_warming();
    let is_root = unsafe { libc::geteuid() } == 0;
    let written = write_data(
        repo, &index, &t, &entries, &work, &planned, total, is_root, opts,
    )
    .map_err(|s| stopped_part_way(&t, &entries, s, opts))?;
    tracing::debug!("restore: data written");
    report.packs_read = packs_read;
    report.bytes = written;
    opts.progress.finish();

    set_metadata(&t, &entries, &planned, is_root, &mut report)?;
    if let (Some(i), Some(last)) = (held, &opts.last) {
        t.rename(&entries[i].path, last)?;
    }
    // Durable before we say done: one syncfs for the whole restore rather than an fsync
    // per file (same data written, far fewer waits).
    tracing::debug!("restore: metadata set");
    sync_filesystem(target)?;
    tracing::debug!("restore: synced");
    report.duration_ms = start.elapsed().as_millis() as u64;
    Ok(report)
}

/// Renames the file entry `last`, if the restore holds it, to a temporary name beside it
/// (its position): it is renamed back once every other file is complete.
fn hold_back(entries: &mut [Entry], last: &PathBytes) -> Result<Option<usize>> {
    let Some(i) = entries
        .iter()
        .position(|e| e.kind == EntryKind::File && e.path == *last)
    else {
        return Ok(None);
    };
    let tmp = PathBytes::new([last.as_bytes(), b".custos-restore"].concat());
    if entries.iter().any(|e| e.path == tmp) {
        return Err(Error::integrity(format!(
            "the manifest holds both `{last}` and `{tmp}`; nothing was restored"
        )));
    }
    entries[i].path = tmp;
    Ok(Some(i))
}

/// The entries a restore lays down: the manifest, checked (`check_tree`), cut to
/// `SNAPSHOT:PATH` and to `--include`.
fn select(
    repo: &Repository,
    index: &Index,
    snap: &Snapshot,
    manifest: &[ChunkId],
    opts: &RestoreOptions,
) -> Result<Vec<Entry>> {
    let all = crate::manifest::load(repo, index, manifest)?;
    check_tree(&all)?;
    let all = match &opts.subtree {
        None => all,
        Some(sub) => {
            let sub = PathBytes::from(sub.trim_matches('/'));
            let mut out = vec![];
            for mut e in all {
                if e.path == sub {
                    // The folder itself is the target; a file keeps its name in it.
                    if e.kind != EntryKind::Dir {
                        e.path = PathBytes::new(e.path.file_name().to_vec());
                        out.push(e);
                    }
                } else if !sub.is_empty() && e.path.is_within(sub.as_bytes()) {
                    e.path = PathBytes::new(e.path.as_bytes()[sub.as_bytes().len() + 1..].to_vec());
                    out.push(e);
                }
            }
            if out.is_empty() {
                return Err(Error::new(
                    Kind::NotFound,
                    format!("snapshot {} holds nothing at `{sub}`", snap.id.short()),
                )
                .hint("`custos ls SNAPSHOT` lists the paths it holds"));
            }
            out
        }
    };
    let entries: Vec<Entry> = all
        .into_iter()
        .filter(|e| included(&e.path, &opts.include))
        .collect();
    if !opts.include.is_empty() && entries.is_empty() {
        return Err(Error::new(
            Kind::NotFound,
            format!(
                "no path in snapshot {} matches {:?}",
                snap.id.short(),
                opts.include
            ),
        )
        .hint("`custos ls SNAPSHOT` lists the paths it holds"));
    }
    Ok(entries)
}

/// What `lay_out` leaves to write: the work in its queues, per entry the writes planned
/// (its metadata is set when they are done), and the counts for the report.
struct Layout {
    work: Queues,
    planned: Vec<usize>,
    packs_read: u64,
    total: u64,
    report: RestoreReport,
}

/// Lays the tree out (folders, empty files; what is in the way removed for --overwrite
/// and --delta) and plans the data: files with page patches in slices assembled in
/// memory, every other file blob by blob from its pack.
fn lay_out(
    index: &Index,
    t: &TargetDir,
    entries: &[Entry],
    mut all_pieces: Vec<Vec<crate::postgres::pages::Piece>>,
    keep: Option<&std::collections::HashSet<(usize, usize)>>,
    opts: &RestoreOptions,
) -> Result<Layout> {
    // Layout first: folders, then every file. Then the data: files with page patches in
    // slices assembled in memory, every other file blob by blob from its pack.
    let mut plan: HashMap<PackId, PackPlan> = HashMap::new();
    let mut chunk_slot: HashMap<ChunkId, (PackId, usize)> = HashMap::new();
    let mut work: Vec<Work> = vec![];
    let mut total = 0u64;
    let mut report = RestoreReport {
        snapshot: String::new(),
        target: String::new(),
        files: 0,
        dirs: 0,
        symlinks: 0,
        bytes: 0,
        packs_read: 0,
        duration_ms: 0,
        bytes_unchanged: 0,
        removed: 0,
    };
    // Writes (pieces or slices) planned per entry.
    let mut planned = vec![0usize; entries.len()];
    let mut made: std::collections::HashSet<&[u8]> = Default::default();
    for (i, e) in entries.iter().enumerate() {
        match e.kind {
            EntryKind::Dir => {
                // Replacing what is in the way (a link above all) is what --overwrite
                // and --delta are for; a link is removed, never followed.
                if (opts.delta || opts.overwrite)
                    && t.lstat(&e.path)?.is_some_and(|f| f != Found::Dir)
                {
                    t.remove(&e.path)?;
                }
                t.make_dirs(&e.path)?;
                made.insert(e.path.as_bytes());
                report.dirs += 1;
            }
            EntryKind::File => {
                if let Some(parent) = e.path.parent() {
                    if !made.contains(parent) {
                        t.make_dirs(&PathBytes::new(parent.to_vec()))?;
                        made.insert(parent);
                    }
                }
                // Files are written by offset without truncation: anything in the way goes.
                // Into an empty target (the usual restore) nothing can be in the way.
                let found = if opts.overwrite || opts.delta {
                    t.lstat(&e.path)?
                } else {
                    None
                };
                if opts.overwrite && found.is_some() {
                    t.remove(&e.path)?;
                }
                if e.chunks.is_empty() && !(opts.delta && matches!(found, Some(Found::File { .. })))
                {
                    t.create_new(&e.path)?;
                }
                let mut pieces = std::mem::take(&mut all_pieces[i]);
                pieces.retain(|piece| !keep.is_some_and(|u| u.contains(&(i, piece.block))));
                if pieces.iter().any(|p| p.is_patch() || p.is_zero()) {
                    let slices = slices(i, &pieces);
                    planned[i] += slices.len();
                    work.extend(slices.into_iter().map(Work::Slice));
                } else {
                    for piece in &pieces {
                        let (meta, _) = index.get(&piece.chunk).expect("pieces checked the index");
                        planned[i] += 1;
                        let slot = chunk_slot.entry(piece.chunk).or_insert_with(|| {
                            let v = plan.entry(meta.id).or_default();
                            v.push((piece.chunk, vec![]));
                            (meta.id, v.len() - 1)
                        });
                        plan.get_mut(&slot.0).unwrap()[slot.1].1.push(Target {
                            file: i,
                            src: piece.src as usize,
                            dst: piece.dst,
                            len: piece.len as usize,
                        });
                    }
                }
                total += e.size;
                report.files += 1;
            }
            EntryKind::Symlink | EntryKind::Other => {}
        }
    }
    let mut packs: std::collections::HashSet<PackId> = plan.keys().copied().collect();
    for w in &work {
        if let Work::Slice(s) = w {
            packs.extend(
                s.pieces
                    .iter()
                    .filter(|p| p.chunk != crate::postgres::pages::ZERO_CHUNK)
                    .map(|p| index.get(&p.chunk).expect("checked").0.id),
            );
        }
    }
    let packs_read = packs.len() as u64;
    work.extend(pack_work(plan, index));
    let work = Queues::new(work, index);

    Ok(Layout {
        work,
        planned,
        packs_read,
        total,
        report,
    })
}

/// Decodes the planned work and writes it: decoders fill buffers and hand them over,
/// writers write them, so the cores and the disk work side by side; a file's metadata is
/// set by whoever does its last write. Returns the bytes written.
#[allow(clippy::too_many_arguments)]
fn write_data(
    repo: &Repository,
    index: &Index,
    t: &TargetDir,
    entries: &[Entry],
    work: &Queues,
    planned: &[usize],
    total: u64,
    is_root: bool,
    opts: &RestoreOptions,
) -> std::result::Result<u64, Stopped> {
    opts.progress.start("restore", Some(total));
    let written = AtomicU64::new(0);
    // Writes still to do per entry; a file's metadata is set when it reaches zero.
    let remaining: Vec<std::sync::atomic::AtomicUsize> = planned
        .iter()
        .map(|n| std::sync::atomic::AtomicUsize::new(*n))
        .collect();
    // Whoever does a file's last write sets its metadata through the open descriptor: no
    // second lookup of the path.
    let wrote = |f: &OpenFile, rel: &PathBytes, n: usize, pieces: usize| -> Result<()> {
        written.fetch_add(n as u64, Ordering::Relaxed);
        opts.progress.add(n as u64);
        if pieces > 0 && remaining[f.file].fetch_sub(pieces, Ordering::AcqRel) == pieces {
            crate::restore::target::set_meta_fd(&f.buffered, &meta_of(&entries[f.file], is_root))
                .map_err(|err| t.error(rel, err))?;
        }
        Ok(())
    };
    let prealloc: Vec<Prealloc> = entries.iter().map(|_| Prealloc::new()).collect();
    let alloc =
        |i: usize| (entries[i].size >= PREALLOCATE).then(|| (&prealloc[i], entries[i].size));
    // Decoders fill buffers and hand them over; writers write them. A decoder never waits
    // for the disk, only for a free writer, so the cores and the disk work side by side.
    let pool = Pool::default();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(0);
    let rx = std::sync::Mutex::new(rx);
    // The first error, a writer's or a decoder's: it stops both.
    let failed: std::sync::Mutex<Option<Error>> = Default::default();
    // Writers waiting for a job: the disk could take more.
    let idle = std::sync::atomic::AtomicUsize::new(0);
    let write_job = |job: &Job, open: &mut Option<OpenFile>| -> Result<()> {
        for put in &job.puts {
            let rel = &entries[put.file].path;
            if open.as_ref().is_none_or(|f| f.file != put.file) {
                *open = Some(OpenFile::open(put.file, t, rel, alloc(put.file))?);
            }
            let f = open.as_ref().expect("opened above");
            f.write_at(job.buf.bytes(put.at, put.len), put.dst, t, rel)?;
            wrote(f, rel, put.len, put.pieces)?;
        }
        Ok(())
    };
    std::thread::scope(|scope| {
        for _ in 0..WRITERS {
            scope.spawn(|| {
                // Consecutive writes mostly go to one file: keep it open.
                let mut open: Option<OpenFile> = None;
                loop {
                    idle.fetch_add(1, Ordering::Relaxed);
                    let job = rx.lock().expect("not poisoned").recv();
                    idle.fetch_sub(1, Ordering::Relaxed);
                    let Ok(job) = job else {
                        return;
                    };
                    // After a failure, jobs are taken and dropped so that no decoder waits.
                    if failed.lock().expect("not poisoned").is_none() {
                        if let Err(e) = write_job(&job, &mut open) {
                            failed.lock().expect("not poisoned").get_or_insert(e);
                        }
                    }
                    pool.put(job.buf);
                }
            });
        }
        let send = |job: Job| -> Result<()> {
            if let Some(e) = failed.lock().expect("not poisoned").as_ref() {
                return Err(Error::new(e.kind, "restore stopped by an earlier error"));
            }
            tx.send(job)
                .map_err(|_| Error::new(Kind::Internal, "restore writers stopped"))
        };
        let decode = |w: &Work| -> Result<()> {
            match w {
                Work::Slice(s) => {
                    let mut job = Job::new(pool.take(), s.len)?;
                    lay_slice(repo, index, &entries[s.file].path, s, job.buf.get(s.len)?)?;
                    job.used = s.len;
                    // One planned write per slice: counted with its last run.
                    let runs = slice_runs(s);
                    let last = runs.len().saturating_sub(1);
                    for (i, (at, len)) in runs.into_iter().enumerate() {
                        job.puts.push(Put {
                            file: s.file,
                            at,
                            len,
                            dst: s.dst + at as u64,
                            pieces: usize::from(i == last),
                        });
                    }
                    if job.puts.is_empty() {
                        job.puts.push(Put {
                            file: s.file,
                            at: 0,
                            len: 0,
                            dst: s.dst,
                            pieces: 1,
                        });
                    }
                    send(job)
                }
                Work::Pack(pack_id, blobs) => {
                    let ids: Vec<&ChunkId> = blobs.iter().map(|(id, _)| id).collect();
                    let mut k = 0;
                    let mut job = Job::new(pool.take(), 0)?;
                    fetch_blobs(repo, index, pack_id, &ids, |dek, id, loc, sealed| {
                        let targets = &blobs[k].1;
                        k += 1;
                        let raw = loc.raw_length as usize;
                        for t in targets {
                            if t.src + t.len > raw {
                                return Err(Error::integrity(format!(
                                    "chunk {} is shorter than its use in {}",
                                    id.short(),
                                    entries[t.file].path
                                )));
                            }
                        }
                        // A whole blob that continues the last write is decoded right
                        // after it, anything else at the next aligned offset.
                        let continues = match (targets.as_slice(), job.puts.last()) {
                            ([t], Some(w)) => {
                                t.src == 0
                                    && t.len == raw
                                    && w.file == t.file
                                    && w.dst + w.len as u64 == t.dst
                                    && w.at + w.len == job.used
                            }
                            _ => false,
                        };
                        let mut at = if continues {
                            job.used
                        } else {
                            job.used.next_multiple_of(ALIGN)
                        };
                        if at + raw > job.buf.cap {
                            send(std::mem::take(&mut job))?;
                            job = Job::new(pool.take(), raw)?;
                            at = 0;
                        }
                        let out = &mut job.buf.get(at + raw)?[at..];
                        open_or_other_copy(repo, index, pack_id, dek, id, loc, sealed, out)?;
                        job.used = at + raw;
                        match job.puts.last_mut() {
                            Some(w) if continues => {
                                w.len += raw;
                                w.pieces += 1;
                            }
                            _ => job.puts.extend(targets.iter().map(|t| Put {
                                file: t.file,
                                at: at + t.src,
                                len: t.len,
                                dst: t.dst,
                                pieces: 1,
                            })),
                        }
                        Ok(())
                    })?;
                    if job.puts.is_empty() {
                        pool.put(job.buf);
                        Ok(())
                    } else {
                        send(job)
                    }
                }
            }
        };
        // Decoders: two per core, so that fetches (from a remote repository, or packs
        // not yet in the page cache) overlap. Each holds a pack and a buffer: three per
        // core were no faster, locally or on S3, and held 30-40 MB more (bench/RESULTS.md,
        // files on S3 run 3).
        let decoders = (repo.threads() * 2).min(work.len()).max(1);
        std::thread::scope(|dscope| {
            for _ in 0..decoders {
                let (decode, failed, work, idle) = (&decode, &failed, &work, &idle);
                dscope.spawn(move || {
                    while let Some(w) = work.take(idle.load(Ordering::Relaxed) > 0) {
                        if let Err(e) = decode(w) {
                            failed.lock().expect("not poisoned").get_or_insert(e);
                            work.stop();
                        }
                    }
                });
            }
        });
        // The writers finish what is queued and stop.
        drop(tx);
    });
    if let Some(error) = failed.into_inner().expect("not poisoned") {
        // A file is finished when its last planned write is done.
        let incomplete = remaining
            .iter()
            .enumerate()
            .filter(|(_, n)| n.load(Ordering::Relaxed) > 0)
            .map(|(i, _)| i)
            .collect();
        return Err(Stopped { error, incomplete });
    }
    Ok(written.load(Ordering::Relaxed))
}

/// Metadata of empty files; then links, created last, when every folder and file is in
/// place; then folders (deepest first) so their times hold.
fn set_metadata(
    t: &TargetDir,
    entries: &[Entry],
    planned: &[usize],
    is_root: bool,
    report: &mut RestoreReport,
) -> Result<()> {
    for (i, e) in entries.iter().enumerate() {
        if e.kind == EntryKind::File && planned[i] == 0 {
            t.set_meta(&e.path, &meta_of(e, is_root))?;
        }
    }
    for e in entries.iter().filter(|e| e.kind == EntryKind::Symlink) {
        if let Some(parent) = e.path.parent() {
            t.make_dirs(&PathBytes::new(parent.to_vec()))?;
        }
        if t.lstat(&e.path)?.is_some() {
            t.remove(&e.path)?;
        }
        t.symlink(
            &e.path,
            e.target.as_ref().expect("check_tree: links have targets"),
        )?;
        // Owners and times of links are best effort, as with `cp -a`.
        let _ = t.set_link_meta(&e.path, &meta_of(e, is_root));
        report.symlinks += 1;
    }
    for e in entries.iter().rev().filter(|e| e.kind == EntryKind::Dir) {
        t.set_meta(&e.path, &meta_of(e, is_root))?;
    }
    Ok(())
}

/// Refuses a restore that cannot fit before anything is written: `need(block size)` is
/// what the files take on `target`'s file system, rounded up to its blocks.
fn check_room(target: &Path, need: &dyn Fn(u64) -> u64) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(target.as_os_str().as_bytes())
        .map_err(|_| Error::config(format!("{} is not a usable path", target.display())))?;
    // SAFETY: statvfs fills the zeroed struct we own from a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        // Not knowing the free space is no reason to refuse: the writes will tell.
        return Ok(());
    }
    let bsize = st.f_frsize.max(1);
    // The blocks the file system keeps back for root are root's to use.
    let blocks = if unsafe { libc::geteuid() } == 0 {
        st.f_bfree
    } else {
        st.f_bavail
    };
    let free = blocks * bsize;
    let need = need(bsize);
    if need > free {
        return Err(Error::config(format!(
            "{} has {} free; the restore needs {}",
            target.display(),
            custos_model::ByteSize(free),
            custos_model::ByteSize(need)
        ))
        .hint("free space there, or restore into a folder on a larger file system"));
    }
    Ok(())
}

/// Starts writing a just-written range to disk without waiting for it, so the disk works
/// while the next chunks are decrypted and the final sync has little left to do (a
/// restore otherwise leaves gigabytes dirty in memory until then).
fn start_writeback(f: &fs::File, off: u64, len: usize) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a hint on a descriptor we own; failure only loses the overlap.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

fn sync_filesystem(target: &Path) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    let dir = fs::File::open(target).map_err(|e| io_error(Kind::Config, target, e))?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(io_error(
            Kind::Config,
            target,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn missing(e: Error, pack: &PackId) -> Error {
    if e.kind == Kind::NotFound {
        Error::integrity(format!(
            "pack {} is missing from the repository",
            pack.short()
        ))
    } else {
        e
    }
}

/// What a restore sets on an entry: its mode and time, and its owner when run as root.
fn meta_of(e: &Entry, is_root: bool) -> Meta {
    Meta {
        owner: is_root.then_some((e.uid, e.gid)),
        mode: e.mode & 0o7777,
        mtime_ns: e.mtime_ns,
    }
}

/// Writes a stream snapshot to `out`, checking every chunk.
pub fn restore_stream(repo: &Repository, snap: &Snapshot, out: &mut dyn Write) -> Result<u64> {
    repo.require_restore("restore a stream")?;
    let body = repo.snapshot_body(&snap.id)?;
    if body.stream.is_empty() && !body.manifest.is_empty() {
        return Err(Error::config(format!(
            "snapshot {} holds files; use `custos restore files`",
            snap.id.short()
        )));
    }
    let index = repo.load_index_for_reading()?;
    custos_storage::stop_warming();
    let mut n = 0u64;
    // Fetch ahead in parallel, write in order.
    for batch in body.stream.chunks(repo.threads() * 2) {
        let blobs = custos_repo::repository::parallel_map(batch, batch.len(), |id| {
            repo.read_blob(&index, id)
        })?;
        for b in blobs {
            out.write_all(&b).map_err(|e| {
                Error::new(Kind::Internal, format!("writing the restored stream: {e}"))
            })?;
            n += b.len() as u64;
        }
    }
    out.flush()
        .map_err(|e| Error::new(Kind::Internal, format!("writing the restored stream: {e}")))?;
    if n != body.stream_size {
        return Err(Error::integrity(format!(
            "stream restored {n} bytes, snapshot recorded {}",
            body.stream_size
        )));
    }
    Ok(n)
}

/// Lists a snapshot's entries (restore role).
pub fn list(repo: &Repository, snap: &Snapshot, index: &Index) -> Result<Vec<Entry>> {
    let body = repo.snapshot_body(&snap.id)?;
    if !body.stream.is_empty() {
        return Ok(vec![Entry {
            path: body.paths.first().cloned().unwrap_or_default().into(),
            kind: EntryKind::File,
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime_ns: snap.summary.time.timestamp_nanos_opt().unwrap_or_default(),
            size: body.stream_size,
            target: None,
            chunks: body.stream,
            pages: None,
            etag: None,
        }]);
    }
    crate::manifest::load(repo, index, &body.manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::pages::Piece;

    fn id(n: u8) -> ChunkId {
        ChunkId(custos_model::Id::of_bytes(&[n]))
    }

    /// Patches go to the slice of the block they lie in, after its blocks, at offsets
    /// within the slice; blocks a delta restore keeps are left out of the writes.
    #[test]
    fn slices_hold_their_blocks_then_their_patches() {
        const B: u64 = 128 << 10;
        let mut pieces: Vec<Piece> = (0..100)
            .map(|k| Piece {
                chunk: id(k as u8),
                src: 0,
                dst: k as u64 * B,
                len: B,
                block: k,
                pass: 0,
            })
            .collect();
        // A unit over a page patch in the last block of slice 0, a page in the first of 1.
        pieces.push(Piece {
            chunk: id(200),
            src: 8192,
            dst: 63 * B + 8192,
            len: 8192,
            block: 63,
            pass: 1,
        });
        pieces.push(Piece {
            chunk: id(201),
            src: 1024,
            dst: 63 * B + 9216,
            len: 1024,
            block: 63,
            pass: 2,
        });
        pieces.push(Piece {
            chunk: id(200),
            src: 0,
            dst: 64 * B,
            len: 8192,
            block: 64,
            pass: 1,
        });
        // Delta: block 10 is already right.
        pieces.retain(|p| p.block != 10);
        let s = slices(7, &pieces);
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].file, s[0].dst, s[0].len), (7, 0, SLICE as usize));
        assert_eq!((s[1].dst, s[1].len), (SLICE, 36 * B as usize));
        let passes: Vec<u8> = s[0].pieces.iter().map(|p| p.pass).collect();
        assert!(passes.is_sorted(), "{passes:?}");
        assert_eq!(s[0].pieces.len(), 63 + 2);
        let unit = s[0].pieces.iter().find(|p| p.pass == 2).unwrap();
        assert_eq!(
            (unit.at, unit.src, unit.len),
            (63 * B as usize + 9216, 1024, 1024)
        );
        let page = s[1].pieces.iter().find(|p| p.pass == 1).unwrap();
        assert_eq!((page.at, page.src), (0, 0));
        assert_eq!(
            slice_runs(&s[0]),
            vec![(0, 10 * B as usize), (11 * B as usize, 53 * B as usize)]
        );
        assert_eq!(slice_runs(&s[1]), vec![(0, 36 * B as usize)]);
    }

    /// What a restore writes reads back the same whether it went direct (aligned, large),
    /// through the page cache (a tail), or through the page cache because the file
    /// system refuses `O_DIRECT` (ramfs, when this test may mount one).
    #[test]
    fn open_files_write_the_same_bytes_direct_or_not() {
        let tmp = tempfile::tempdir().unwrap();
        let ext = tmp.path().join("disk");
        let ram = tmp.path().join("ram");
        fs::create_dir_all(&ext).unwrap();
        fs::create_dir_all(&ram).unwrap();
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (src, dst) = (c("ramfs"), c(ram.to_str().unwrap()));
        // SAFETY: mount with valid C strings; fails without privileges, which is fine.
        let mounted = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        } == 0;
        // Unmounted however the test ends.
        struct Unmount(Option<std::ffi::CString>);
        impl Drop for Unmount {
            fn drop(&mut self) {
                if let Some(d) = &self.0 {
                    // SAFETY: unmounting what this test mounted.
                    unsafe { libc::umount(d.as_ptr()) };
                }
            }
        }
        let _unmount = Unmount(mounted.then(|| dst.clone()));
        let mut dirs = vec![ext.clone()];
        if mounted {
            dirs.push(ram.clone());
        } else {
            eprintln!("ramfs not mountable here: only the direct path is checked");
        }
        const N: usize = 256 << 10;
        let mut v = WriteBuf::default();
        let buf = v.get(N).unwrap();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let mut want = buf.to_vec();
        want.extend_from_slice(b"tail");
        for dir in &dirs {
            let p = dir.join("f");
            let t = TargetDir::open(dir).unwrap();
            let rel = PathBytes::from("f");
            let once = Prealloc::new();
            let f = OpenFile::open(0, &t, &rel, Some((&once, want.len() as u64))).unwrap();
            f.write_at(&buf[N / 2..], (N / 2) as u64, &t, &rel).unwrap();
            f.write_at(&buf[..N / 2], 0, &t, &rel).unwrap();
            f.write_at(b"tail", N as u64, &t, &rel).unwrap();
            let can = t.open_write(&PathBytes::from("probe"), true, true).is_ok();
            let direct = f.direct.get().is_some_and(|d| d.is_some());
            assert_eq!(direct, can, "direct I/O in {}", dir.display());
            drop(f);
            assert!(fs::read(&p).unwrap() == want, "{} differs", dir.display());
        }
    }

    /// Direct writes need aligned memory: the buffer starts on a huge-page boundary
    /// whatever its size, keeps what was written in it while it does not grow, and starts
    /// zeroed when it does.
    #[test]
    fn write_buffers_start_on_a_huge_page_boundary() {
        let mut b = WriteBuf::default();
        for len in [1, 4096, 128 << 10, 5000, HUGE + 1] {
            let s = b.get(len).unwrap();
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr().align_offset(HUGE), 0);
        }
        b.get(10).unwrap().copy_from_slice(b"0123456789");
        assert_eq!(&b.get(HUGE * 2).unwrap()[..10], b"0123456789");
        let grown = b.get(HUGE * 2 + 1).unwrap();
        assert!(grown.iter().all(|&x| x == 0));
    }
}
