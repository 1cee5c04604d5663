//! Restores of file snapshots (to a folder) and stream snapshots (to a writer).
//!
//! File restores are planned by pack: each pack needed is fetched once (whole when most of
//! it is needed, else blob by blob), its blobs decrypted and checked against their ids, and
//! written at their offsets in every file that uses them, on one thread per core. Metadata
//! (modes, owners, times) is applied after the data, folders last and deepest first.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use custos_model::error::io_error;
use custos_model::{ChunkId, Error, Kind, PackId, Result};
use custos_repo::{pack, paths, Index, Repository, Snapshot};
use custos_sources::files::{Entry, EntryKind};
use serde::Serialize;

use crate::progress::Progress;

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
    target: &Path,
    entries: &[Entry],
) -> Result<DeltaReport> {
    let mut report = DeltaReport::default();
    let wanted: std::collections::HashMap<&str, EntryKind> =
        entries.iter().map(|e| (e.path.as_str(), e.kind)).collect();
    let existing = custos_sources::files::walk(&[target.to_path_buf()])?;
    for w in &existing.entries {
        let keep = wanted
            .get(w.entry.path.as_str())
            .is_some_and(|k| *k == w.entry.kind);
        if !keep {
            // A folder removed earlier took its contents with it.
            let p = target.join(&w.entry.path);
            if p.symlink_metadata().is_ok() {
                remove_any(&p)?;
                report.removed += 1;
            }
        }
    }
    // Files that should be empty but are not are emptied here; they get no pieces.
    for e in entries
        .iter()
        .filter(|e| e.kind == EntryKind::File && e.chunks.is_empty())
    {
        let p = target.join(&e.path);
        if p.symlink_metadata()
            .is_ok_and(|m| m.is_file() && m.len() > 0)
        {
            fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_len(0))
                .map_err(|err| io_error(Kind::Config, &p, err))?;
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
            let p = target.join(&e.path);
            let Ok(f) = fs::OpenOptions::new().read(true).write(true).open(&p) else {
                return Ok(vec![]);
            };
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len > e.size {
                f.set_len(e.size)
                    .map_err(|err| io_error(Kind::Config, &p, err))?;
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
                if f.read_exact_at(&mut buf, off).is_ok() && repo.keys.chunk_id(&buf) == *expect {
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
    /// A block that page patches write over: its writeback waits for them.
    patched: Option<usize>,
    /// A page patch (second pass).
    patch: bool,
}

/// A block that page patches write over: where it lies, and how many of its patch pieces
/// are still to write (its writeback starts after the last).
struct PatchedBlock {
    dst: u64,
    len: usize,
    left: std::sync::atomic::AtomicUsize,
}

/// Per pack: the chunks needed from it, each with the places its pieces go.
type PackPlan = Vec<(ChunkId, Vec<Target>)>;

/// When a piece is written. Files with patches go first, in slices of 256 MiB of their
/// offsets; per slice their blocks, then the page patches over them, then the unit patches
/// over those (`pg_pages::pieces` passes): a patched block goes to disk once its patches
/// are written, so early slices' writeback overlaps later slices' work. The blocks of
/// files without patches (which go to disk at once) come last.
fn step(patched: bool, pass: u8, block_dst: u64) -> Option<usize> {
    const SLICE: u64 = 256 << 20;
    const PASSES: usize = crate::pg_pages::PASSES;
    patched.then(|| (block_dst / SLICE) as usize * PASSES + usize::from(pass))
}

/// Runs `f` on every item, `threads` at a time, taking items in order, but an item of step
/// `s` only once every item of step `after(s)` is done. The first error stops the work and
/// is returned.
fn run_steps<T: Sync>(
    items: &[(usize, T)],
    steps: usize,
    after: impl Fn(usize) -> Option<usize> + Sync,
    threads: usize,
    f: impl Fn(&T) -> Result<()> + Sync,
) -> Result<()> {
    struct State {
        taken: Vec<bool>,
        left: Vec<usize>,
        error: Option<Error>,
    }
    let mut left = vec![0usize; steps];
    for (s, _) in items {
        left[*s] += 1;
    }
    let state = Mutex::new(State {
        taken: vec![false; items.len()],
        left,
        error: None,
    });
    let wake = std::sync::Condvar::new();
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1).min(items.len().max(1)) {
            scope.spawn(|| loop {
                let mut st = state.lock().unwrap();
                let i = loop {
                    if st.error.is_some() || st.taken.iter().all(|t| *t) {
                        return;
                    }
                    let ready = (0..items.len()).find(|i| {
                        !st.taken[*i] && after(items[*i].0).is_none_or(|d| st.left[d] == 0)
                    });
                    match ready {
                        Some(i) => break i,
                        None => st = wake.wait(st).unwrap(),
                    }
                };
                st.taken[i] = true;
                drop(st);
                let r = f(&items[i].1);
                let mut st = state.lock().unwrap();
                st.left[items[i].0] -= 1;
                if let Err(e) = r {
                    st.error.get_or_insert(e);
                }
                wake.notify_all();
            });
        }
    });
    match state.into_inner().unwrap().error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Splits each pack's plan into runs of blobs in pack order holding at most 8 MiB that
/// is needed, so that a pass with few packs (the patches of one incremental) still keeps
/// every thread busy.
fn work_items(plan: HashMap<PackId, PackPlan>, index: &Index) -> Vec<(PackId, PackPlan)> {
    const RUN: u64 = 8 << 20;
    let mut out = vec![];
    for (pack, mut blobs) in plan {
        blobs.sort_by_key(|(id, _)| index.blobs[id].offset);
        let mut run: PackPlan = vec![];
        let mut size = 0u64;
        for b in blobs {
            size += u64::from(index.blobs[&b.0].length);
            run.push(b);
            if size >= RUN {
                out.push((pack, std::mem::take(&mut run)));
                size = 0;
            }
        }
        if !run.is_empty() {
            out.push((pack, run));
        }
    }
    // The largest first, so that the last to finish are short.
    out.sort_by_key(|(_, b)| std::cmp::Reverse(b.len()));
    out
}

pub struct RestoreOptions<'a> {
    pub include: Vec<String>,
    /// Allow restoring into a non-empty folder (files present in the snapshot are replaced).
    pub overwrite: bool,
    /// Make the folder equal to the snapshot, rewriting only blocks whose content differs
    /// and removing what the snapshot does not hold.
    pub delta: bool,
    pub progress: &'a dyn Progress,
}

fn included(path: &str, include: &[String]) -> bool {
    include.is_empty()
        || include.iter().any(|i| {
            let i = i.trim_matches('/');
            path == i || path.starts_with(&format!("{i}/")) || i.starts_with(&format!("{path}/"))
        })
}

fn safe_join(target: &Path, rel: &str) -> Result<PathBuf> {
    if rel.split('/').any(|c| c == ".." || c.is_empty()) || rel.starts_with('/') {
        return Err(Error::integrity(format!(
            "manifest holds an unsafe path `{rel}`"
        )));
    }
    Ok(target.join(rel))
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
    let index = repo.load_index()?;
    let entries: Vec<Entry> = crate::manifest::load(repo, &index, &body.manifest)?
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
    make_private_dir(target)?;
    let mut report_delta = DeltaReport::default();
    let keep = if opts.delta {
        report_delta = delta_prepare(repo, &index, target, &entries)?;
        Some(&report_delta.unchanged)
    } else {
        None
    };

    // Layout first: folders, then every file created at its final size. Then the blocks of
    // files with patches, the page patches written over them, the unit patches written over
    // those, and last the blocks of every other file: patched blocks go to disk once their
    // patches are written, and the other files' blocks (which go at once) overlap that.
    // Per step (see `step`): the chunks needed from each pack and where their pieces go.
    let mut plans: Vec<HashMap<PackId, PackPlan>> = vec![];
    let mut chunk_slots: Vec<HashMap<ChunkId, (PackId, usize)>> = vec![];
    let mut patched_blocks: Vec<PatchedBlock> = vec![];
    let mut total = 0u64;
    let mut report = RestoreReport {
        snapshot: snap.id.to_hex(),
        target: target.display().to_string(),
        files: 0,
        dirs: 0,
        symlinks: 0,
        bytes: 0,
        packs_read: 0,
        duration_ms: 0,
        bytes_unchanged: report_delta.bytes_unchanged,
        removed: report_delta.removed,
    };
    let mut planned = vec![0usize; entries.len()];
    let mut made: std::collections::HashSet<PathBuf> = Default::default();
    for (i, e) in entries.iter().enumerate() {
        let p = safe_join(target, &e.path)?;
        match e.kind {
            EntryKind::Dir => {
                if opts.delta && p.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
                    remove_any(&p)?;
                }
                make_private_dir(&p)?;
                made.insert(p);
                report.dirs += 1;
            }
            EntryKind::File => {
                if let Some(parent) = p.parent() {
                    if !made.contains(parent) {
                        make_private_dir(parent)?;
                        made.insert(parent.to_path_buf());
                    }
                }
                // Files are written by offset without truncation: anything in the way goes.
                if opts.overwrite && p.symlink_metadata().is_ok() {
                    remove_any(&p)?;
                }
                if e.chunks.is_empty() && !(opts.delta && p.is_file()) {
                    fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&p)
                        .map_err(|err| io_error(Kind::Config, &p, err))?;
                }
                let pieces = crate::pg_pages::pieces(e, |id| {
                    index.get(id).map(|(_, loc)| u64::from(loc.raw_length))
                })?;
                let mut block_slot: HashMap<usize, usize> = HashMap::new();
                for piece in pieces.iter().filter(|p| p.is_patch()) {
                    if keep.is_some_and(|u| u.contains(&(i, piece.block))) {
                        continue;
                    }
                    let n = block_slot.entry(piece.block).or_insert_with(|| {
                        // Block pieces come first, block k at index k.
                        let b = &pieces[piece.block];
                        patched_blocks.push(PatchedBlock {
                            dst: b.dst,
                            len: b.len as usize,
                            left: Default::default(),
                        });
                        patched_blocks.len() - 1
                    });
                    patched_blocks[*n].left.fetch_add(1, Ordering::Relaxed);
                }
                for piece in &pieces {
                    if keep.is_some_and(|u| u.contains(&(i, piece.block))) {
                        continue;
                    }
                    let (meta, _) = index.get(&piece.chunk).expect("pieces checked the index");
                    planned[i] += 1;
                    // Index 0 holds the blocks of files without patches, written last.
                    let at = step(e.pages.is_some(), piece.pass, pieces[piece.block].dst)
                        .map_or(0, |s| s + 1);
                    if plans.len() <= at {
                        plans.resize_with(at + 1, Default::default);
                        chunk_slots.resize_with(at + 1, Default::default);
                    }
                    let (plan, chunk_slot) = (&mut plans[at], &mut chunk_slots[at]);
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
                        patched: block_slot.get(&piece.block).copied(),
                        patch: piece.is_patch(),
                    });
                }
                total += e.size;
                report.files += 1;
            }
            EntryKind::Symlink | EntryKind::Other => {}
        }
    }
    opts.progress.start("restore", Some(total));
    let written = AtomicU64::new(0);
    let is_root = unsafe { libc::geteuid() } == 0;
    // Pieces still to write per entry; a file's metadata is set when it reaches zero.
    let remaining: Vec<std::sync::atomic::AtomicUsize> = planned
        .iter()
        .map(|n| std::sync::atomic::AtomicUsize::new(*n))
        .collect();
    let mut packs_read = 0;
    if !plans.is_empty() {
        plans.rotate_left(1);
    }
    // Steps run without barriers: an item waits only for the step before it in its slice.
    let steps = plans.len();
    let after =
        |s: usize| (s + 1 < steps && !s.is_multiple_of(crate::pg_pages::PASSES)).then(|| s - 1);
    let mut work = vec![];
    for (s, plan) in plans.into_iter().enumerate() {
        packs_read += plan.len() as u64;
        work.extend(work_items(plan, &index).into_iter().map(|w| (s, w)));
    }
    {
        run_steps(
            &work,
            steps,
            after,
            repo.threads() * 3,
            |(pack_id, blobs)| -> Result<()> {
                let meta = index.pack(pack_id).expect("planned from the index");
                let dek = repo.pack_key(meta)?;
                let needed: u64 = blobs
                    .iter()
                    .map(|(id, _)| u64::from(index.blobs[id].length))
                    .sum();
                // Blobs are in pack order: one read of their span when they fill most of it.
                let first = u64::from(index.blobs[&blobs[0].0].offset);
                let last = index.blobs[&blobs[blobs.len() - 1].0];
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
                let mut open: Option<(usize, fs::File)> = None;
                for (id, targets) in blobs {
                    let loc = index.blobs[id];
                    let fetched;
                    let sealed: &[u8] = match &whole {
                        Some(w) => {
                            let at = (u64::from(loc.offset) - first) as usize;
                            w.get(at..at + loc.length as usize).ok_or_else(|| {
                                Error::integrity(format!(
                                    "pack {} is shorter than indexed",
                                    pack_id.short()
                                ))
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
                    let plain = pack::open_blob(&dek, &repo.keys.id_key, id, &loc, sealed)?;
                    for t in targets {
                        let e = &entries[t.file];
                        let piece = plain.get(t.src..t.src + t.len).ok_or_else(|| {
                            Error::integrity(format!(
                                "chunk {} is shorter than its use in {}",
                                id.short(),
                                e.path
                            ))
                        })?;
                        let p = target.join(&e.path);
                        // Consecutive pieces mostly go to one file (a patch holds one
                        // file's pages): keep it open.
                        if open.as_ref().is_none_or(|(k, _)| *k != t.file) {
                            let f = fs::OpenOptions::new()
                                .write(true)
                                .create(true)
                                // Other threads write other pieces of the same file: never
                                // truncate.
                                .truncate(false)
                                .mode(0o600)
                                .open(&p)
                                .map_err(|err| io_error(Kind::Config, &p, err))?;
                            open = Some((t.file, f));
                        }
                        let f = &open.as_ref().expect("opened above").1;
                        f.write_all_at(piece, t.dst)
                            .map_err(|err| io_error(Kind::Config, &p, err))?;
                        // A block starts going to disk once written, a patched block once
                        // its last patch page is; lone small files go with the final sync.
                        match t.patched {
                            None if t.len >= 64 * 1024 => start_writeback(f, t.dst, t.len),
                            Some(b)
                                if t.patch
                                    && patched_blocks[b].left.fetch_sub(1, Ordering::AcqRel)
                                        == 1 =>
                            {
                                start_writeback(f, patched_blocks[b].dst, patched_blocks[b].len)
                            }
                            _ => {}
                        }
                        // Whoever writes a file's last piece sets its metadata through the
                        // open descriptor: no second lookup of the path.
                        if remaining[t.file].fetch_sub(1, Ordering::AcqRel) == 1 {
                            set_meta_fd(f, &p, e, is_root)?;
                        }
                        written.fetch_add(t.len as u64, Ordering::Relaxed);
                        opts.progress.add(t.len as u64);
                    }
                }
                Ok(())
            },
        )?;
    }
    report.packs_read = packs_read;
    report.bytes = written.load(Ordering::Relaxed);
    opts.progress.finish();

    // Metadata: empty files and links now, folders last (deepest first) so their times hold.
    for (i, e) in entries.iter().enumerate() {
        let p = target.join(&e.path);
        match e.kind {
            EntryKind::File if planned[i] == 0 => set_meta(&p, e, is_root)?,
            EntryKind::Symlink => {
                if let Some(parent) = p.parent() {
                    make_private_dir(parent)?;
                }
                if p.symlink_metadata().is_ok() {
                    remove_any(&p)?;
                }
                std::os::unix::fs::symlink(e.target.as_deref().unwrap_or_default(), &p)
                    .map_err(|err| io_error(Kind::Config, &p, err))?;
                if is_root {
                    let _ = std::os::unix::fs::lchown(&p, Some(e.uid), Some(e.gid));
                }
                let t = mtime(e);
                let _ = filetime::set_symlink_file_times(&p, t, t);
                report.symlinks += 1;
            }
            _ => {}
        }
    }
    for e in entries.iter().rev().filter(|e| e.kind == EntryKind::Dir) {
        set_meta(&target.join(&e.path), e, is_root)?;
    }
    // Durable before we say done: one syncfs for the whole restore rather than an fsync
    // per file (same data written, far fewer waits).
    sync_filesystem(target)?;
    report.duration_ms = start.elapsed().as_millis() as u64;
    Ok(report)
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

fn remove_any(p: &Path) -> Result<()> {
    let m = p
        .symlink_metadata()
        .map_err(|e| io_error(Kind::Config, p, e))?;
    if m.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    }
    .map_err(|e| io_error(Kind::Config, p, e))
}

/// An entry's modification time (also set as access time), pre-1970 times included.
fn mtime(e: &Entry) -> filetime::FileTime {
    filetime::FileTime::from_unix_time(
        e.mtime_ns.div_euclid(1_000_000_000),
        e.mtime_ns.rem_euclid(1_000_000_000) as u32,
    )
}

/// Restored folders are private until their own mode is applied at the end.
fn make_private_dir(p: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(|e| io_error(Kind::Config, p, e))
}

fn set_meta_fd(f: &fs::File, p: &Path, e: &Entry, is_root: bool) -> Result<()> {
    if is_root {
        std::os::unix::fs::fchown(f, Some(e.uid), Some(e.gid))
            .map_err(|err| io_error(Kind::Config, p, err))?;
    }
    f.set_permissions(fs::Permissions::from_mode(e.mode))
        .map_err(|err| io_error(Kind::Config, p, err))?;
    let t = mtime(e);
    filetime::set_file_handle_times(f, Some(t), Some(t))
        .map_err(|err| io_error(Kind::Config, p, err))
}

fn set_meta(p: &Path, e: &Entry, is_root: bool) -> Result<()> {
    if is_root {
        std::os::unix::fs::chown(p, Some(e.uid), Some(e.gid))
            .map_err(|err| io_error(Kind::Config, p, err))?;
    }
    fs::set_permissions(p, fs::Permissions::from_mode(e.mode))
        .map_err(|err| io_error(Kind::Config, p, err))?;
    let t = mtime(e);
    filetime::set_file_times(p, t, t).map_err(|err| io_error(Kind::Config, p, err))
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
    let index = repo.load_index()?;
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
            path: body.paths.first().cloned().unwrap_or_default(),
            kind: EntryKind::File,
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime_ns: snap.summary.time.timestamp_nanos_opt().unwrap_or_default(),
            size: body.stream_size,
            target: None,
            chunks: body.stream,
            pages: None,
        }]);
    }
    crate::manifest::load(repo, index, &body.manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items of a step never start before every item of the step they wait for is done,
    /// steps that wait for nothing run meanwhile, and an error stops the work.
    #[test]
    fn steps_wait_only_for_their_predecessor() {
        // Steps 0 -> 1 -> 2 (one slice), 3 -> 4 -> 5 (another), 6 waits for nothing.
        let after = |s: usize| (s < 6 && !s.is_multiple_of(3)).then(|| s - 1);
        let items: Vec<(usize, usize)> = (0..70).map(|i| (i % 7, i)).collect();
        let mut sorted = items.clone();
        sorted.sort();
        let done: Mutex<Vec<(usize, std::time::Instant)>> = Mutex::new(vec![]);
        let started: Mutex<Vec<(usize, std::time::Instant)>> = Mutex::new(vec![]);
        run_steps(&sorted, 7, after, 4, |&i| {
            let s = i % 7;
            started.lock().unwrap().push((s, std::time::Instant::now()));
            std::thread::sleep(std::time::Duration::from_millis(1 + (s as u64 % 3)));
            done.lock().unwrap().push((s, std::time::Instant::now()));
            Ok(())
        })
        .unwrap();
        let (started, done) = (started.into_inner().unwrap(), done.into_inner().unwrap());
        assert_eq!(started.len(), 70);
        for (s, t) in &started {
            if let Some(d) = after(*s) {
                let last = done.iter().filter(|x| x.0 == d).map(|x| x.1).max().unwrap();
                assert!(
                    *t >= last,
                    "an item of step {s} started before step {d} ended"
                );
            }
        }
        // Slice two started before slice one's last step ended: no barrier between them.
        let first_of_3 = started
            .iter()
            .filter(|x| x.0 == 3)
            .map(|x| x.1)
            .min()
            .unwrap();
        let end_of_2 = done.iter().filter(|x| x.0 == 2).map(|x| x.1).max().unwrap();
        assert!(first_of_3 < end_of_2);

        let ran = std::sync::atomic::AtomicUsize::new(0);
        let err = run_steps(&sorted, 7, after, 2, |&i| {
            ran.fetch_add(1, Ordering::Relaxed);
            if i == 1 {
                Err(Error::integrity("bad chunk"))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(err.message.contains("bad chunk"));
        assert!(
            ran.load(Ordering::Relaxed) < 70,
            "the work went on after an error"
        );
    }
}
