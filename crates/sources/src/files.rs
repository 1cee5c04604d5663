//! Folder trees: walking with metadata (permissions, owners, times, symlinks), and the
//! manifest entry format that records them.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use custos_model::{ChunkId, Error, Kind, PathBytes, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// Sockets, FIFOs and device nodes: recorded, not read.
    Other,
}

/// One line of a snapshot manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Path relative to the snapshot root, `/`-separated, never empty for a child: the
    /// bytes the file system gave.
    pub path: PathBytes,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<PathBytes>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<ChunkId>,
    /// A relation file of a page-level incremental: pages that changed since the backup
    /// its blocks (`chunks`) come from. None for every other file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<PagePatches>,
    /// A bucket object's MD5 as its store listed it (the ETag of a single PUT): with its
    /// size and modification time, what tells the next backup it is unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

impl Entry {
    /// Every chunk the entry needs: its blocks, then its page patches.
    pub fn chunk_refs(&self) -> impl Iterator<Item = &ChunkId> {
        self.chunks.iter().chain(
            self.pages
                .iter()
                .flat_map(|p| p.patches.iter().chain(&p.units).map(|x| &x.chunk)),
        )
    }
}

/// The page size of the files that carry page patches (PostgreSQL's 8 KiB).
pub const PATCH_PAGE: usize = 8192;

/// The size of the pieces of a page that unit patches replace (eight to a page).
pub const PATCH_UNIT: usize = 1024;

/// Changed pages of a file stored on their own (format.md 6.3): the file's content is its
/// blocks, with these pages written over them, then these units written over those. No
/// page appears in two slots of `patches`, no unit in two slots of `units`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagePatches {
    pub patches: Vec<Patch>,
    /// Changed 1 KiB units of pages (slot `k` is unit `units[k]` of the file, bytes
    /// `k*1024..` of the chunk), written after the page patches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<Patch>,
    /// For every block that patches touch: (block number, keyed hash of the block as
    /// restored), so a delta restore can tell an already-right block without fetching.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<(u32, ChunkId)>,
}

/// A chunk of whole pages; slot `k` (bytes `k*8192..`) is page `pages[k]` of the file, or
/// nowhere when `pages[k]` is [`Patch::UNUSED`] (a later backup stored that page again).
/// In [`PagePatches::units`] the same with 1 KiB units instead of pages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    pub chunk: ChunkId,
    pub pages: Vec<u32>,
}

impl Patch {
    pub const UNUSED: u32 = u32::MAX;
}

impl PagePatches {
    /// Checks that every slot names a page (a unit) inside a file of `size` bytes, at most
    /// once.
    pub fn check(&self, size: u64) -> std::result::Result<(), String> {
        // Only relation segment files are patched, and they stop at 1 GiB: a restore
        // lays out a patched file piece by piece, so a size from a hostile manifest must
        // not size that plan.
        let max = u64::from(crate::postgres::datadir::RELSEG_PAGES) * PATCH_PAGE as u64;
        if size > max {
            return Err(format!(
                "a page-patched file of {size} bytes (relation segment files are at most {max})"
            ));
        }
        for (list, unit, what) in [
            (&self.patches, PATCH_PAGE, "page"),
            (&self.units, PATCH_UNIT, "unit"),
        ] {
            let n = size.div_ceil(unit as u64);
            let mut seen = std::collections::HashSet::new();
            for p in list {
                for &k in p.pages.iter().filter(|p| **p != Patch::UNUSED) {
                    if u64::from(k) >= n {
                        return Err(format!(
                            "{what} patch names {what} {k} of a {size}-byte file"
                        ));
                    }
                    if !seen.insert(k) {
                        return Err(format!("{what} {k} is patched twice"));
                    }
                }
            }
        }
        Ok(())
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// What change detection compares (ctime and inode catch a rewrite that kept mtime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
}

/// A walked entry: its manifest form (without chunks yet) and where to read it.
#[derive(Debug, Clone)]
pub struct Walked {
    pub entry: Entry,
    pub source: PathBuf,
    pub fingerprint: Fingerprint,
}

pub struct WalkReport {
    pub entries: Vec<Walked>,
    /// Paths that could not be read, with the reason.
    pub errors: Vec<(PathBuf, String)>,
}

fn entry_of(path: &Path, rel: PathBytes, m: &fs::Metadata) -> Result<Walked> {
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    let target = if kind == EntryKind::Symlink {
        Some(PathBytes::from(
            fs::read_link(path)
                .map_err(|e| Error::new(Kind::Source, format!("{}: {e}", path.display())))?
                .as_path(),
        ))
    } else {
        None
    };
    let mtime_ns = m.mtime() * 1_000_000_000 + m.mtime_nsec();
    Ok(Walked {
        entry: Entry {
            path: rel,
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime_ns,
            size: if kind == EntryKind::File { m.len() } else { 0 },
            target,
            chunks: vec![],
            pages: None,
            etag: None,
        },
        source: path.to_path_buf(),
        fingerprint: Fingerprint {
            size: m.len(),
            mtime_ns,
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            inode: m.ino(),
        },
    })
}

/// Walks `roots` (not following symlinks), in path order. With one root, entries are
/// relative to it; with several, each root's entries sit under the root's file name.
pub fn walk(roots: &[PathBuf]) -> Result<WalkReport> {
    let mut report = WalkReport {
        entries: vec![],
        errors: vec![],
    };
    let mut names = std::collections::HashSet::new();
    for root in roots {
        let meta = fs::symlink_metadata(root).map_err(|e| {
            Error::new(Kind::Source, format!("cannot read {}: {e}", root.display()))
                .hint("check the path given to `custos backup files`")
        })?;
        let prefix = if roots.len() == 1 {
            PathBytes::default()
        } else {
            let name = root.file_name().map(PathBytes::from_os).unwrap_or_default();
            if !names.insert(name.clone()) {
                return Err(Error::config(format!(
                    "two backup paths share the name `{name}`; back them up separately"
                )));
            }
            report.entries.push(entry_of(root, name.clone(), &meta)?);
            name
        };
        if roots.len() == 1 && !meta.is_dir() {
            let name = root.file_name().map(PathBytes::from_os).unwrap_or_default();
            report.entries.push(entry_of(root, name, &meta)?);
            continue;
        }
        if meta.is_dir() {
            walk_dir(root, &prefix, &mut report);
        }
    }
    Ok(report)
}

fn walk_dir(dir: &Path, rel: &PathBytes, report: &mut WalkReport) {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            report.errors.push((dir.to_path_buf(), e.to_string()));
            return;
        }
    };
    let mut children: Vec<_> = rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    children.sort();
    for name in children {
        let path = dir.join(&name);
        let child_rel = rel.join(std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str()));
        match fs::symlink_metadata(&path)
            .map_err(|e| e.to_string())
            .and_then(|m| {
                entry_of(&path, child_rel.clone(), &m)
                    .map(|w| (m, w))
                    .map_err(|e| e.message)
            }) {
            Ok((m, w)) => {
                report.entries.push(w);
                if m.is_dir() {
                    walk_dir(&path, &child_rel, report);
                }
            }
            Err(e) => report.errors.push((path, e)),
        }
    }
}
