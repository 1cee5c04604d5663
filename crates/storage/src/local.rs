//! Local file-system storage.
//!
//! Written with `std::fs` rather than OpenDAL's `fs` service because durability and access
//! rules need what that service does not do (see docs/adr/0002-local-storage.md): files are
//! created 0600 and folders 0700 whatever the umask; every write goes to a temp file in
//! `.tmp/`, is fsynced, then renamed (or hard-linked, for create-only writes, so that two
//! racing writers cannot both succeed) and the folder is fsynced.
//!
//! One OS user owns a repository folder (root may use any): files 0600 are readable by
//! their owner only, so a repository whose objects belong to two users breaks for the one
//! that is not root (the trail's last entry, which every append reads, above all). Root
//! therefore writes as the repository's owner (everything it creates is given to the
//! owner of the repository folder), and another user is told at once, before any work,
//! that it cannot write a repository it does not own.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use custos_model::{Error, Kind, Result};

use crate::{Entry, PutMode, PutOutcome, Storage};

pub const TEMP_DIR: &str = ".tmp";

pub struct LocalStorage {
    root: PathBuf,
    /// Who gets what this process creates: set when root writes into another user's
    /// repository (or `init --owner`); decided at the first write.
    owner: std::sync::OnceLock<Option<(u32, u32)>>,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// A user's name for messages (the uid when it has none).
pub fn user_name(uid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: a zeroed passwd and a buffer we own; getpwuid_r fills both or leaves result null.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let r = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut result) };
    if r != 0 || result.is_null() {
        return format!("uid {uid}");
    }
    // SAFETY: pw_name points into buf, NUL-terminated, while buf lives.
    unsafe { std::ffi::CStr::from_ptr(pw.pw_name) }
        .to_string_lossy()
        .into_owned()
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    let kind = match e.kind() {
        ErrorKind::NotFound => Kind::NotFound,
        _ => Kind::Storage,
    };
    let hint = match e.kind() {
        ErrorKind::PermissionDenied => {
            "check that the user running custos owns the repository folder"
        }
        ErrorKind::NotFound => "the object is missing from the repository",
        _ => "check free space and the health of the disk holding the repository",
    };
    Error::new(kind, format!("{}: {e}", path.display())).hint(hint)
}

impl LocalStorage {
    pub fn new(root: impl Into<PathBuf>) -> LocalStorage {
        LocalStorage {
            root: root.into(),
            owner: std::sync::OnceLock::new(),
        }
    }

    /// Storage whose every new file and folder (the root included) belongs to `uid:gid`:
    /// `init --owner` run as root.
    pub fn owned_by(root: impl Into<PathBuf>, uid: u32, gid: u32) -> LocalStorage {
        let s = LocalStorage::new(root);
        let _ = s.owner.set(Some((uid, gid)));
        s
    }

    /// Whom new files are given to: the repository folder's owner, when root writes into
    /// a repository of another user.
    fn owner(&self) -> Option<(u32, u32)> {
        *self.owner.get_or_init(|| {
            use std::os::unix::fs::MetadataExt;
            if euid() != 0 {
                return None;
            }
            fs::metadata(&self.root)
                .ok()
                .filter(|m| m.uid() != 0)
                .map(|m| (m.uid(), m.gid()))
        })
    }

    fn give(&self, p: &Path) -> Result<()> {
        if let Some((uid, gid)) = self.owner() {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(|e| io_err(p, e))?;
        }
        Ok(())
    }

    fn path(&self, p: &str) -> Result<PathBuf> {
        if p.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(Error::internal(format!("invalid storage path `{p}`")));
        }
        Ok(self.root.join(p))
    }

    /// Creates `dir` and the folders above it up to the root (and the root), each 0700
    /// and given to the owner.
    fn mkdirs(&self, dir: &Path) -> Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        let mut missing = vec![];
        let mut at = Some(dir);
        while let Some(d) = at {
            if d.is_dir() {
                break;
            }
            missing.push(d);
            if d == self.root {
                break;
            }
            at = d.parent();
        }
        for d in missing.into_iter().rev() {
            match DirBuilder::new().mode(0o700).create(d) {
                Ok(()) => self.give(d)?,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(d, e)),
            }
        }
        Ok(())
    }

    fn sync_dir(dir: &Path) -> Result<()> {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(dir, e))
    }
}

impl Storage for LocalStorage {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, path: &str, data: &[u8], mode: PutMode) -> Result<PutOutcome> {
        let target = self.path(path)?;
        let parent = target
            .parent()
            .expect("joined path has a parent")
            .to_path_buf();
        let tmpdir = self.root.join(TEMP_DIR);
        self.mkdirs(&parent)?;
        self.mkdirs(&tmpdir)?;
        let tmp = tmpdir.join(format!("{}-{:016x}", std::process::id(), rand_u64()));
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            if let Some((uid, gid)) = self.owner() {
                std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
            }
            f.write_all(data)?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&tmp, e));
        }
        let outcome = match mode {
            PutMode::Overwrite => {
                fs::rename(&tmp, &target).map_err(|e| io_err(&target, e))?;
                PutOutcome::Created
            }
            PutMode::CreateOnly => {
                let r = fs::hard_link(&tmp, &target);
                let _ = fs::remove_file(&tmp);
                match r {
                    Ok(()) => PutOutcome::Created,
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                        return Ok(PutOutcome::AlreadyExists)
                    }
                    Err(e) => return Err(io_err(&target, e)),
                }
            }
        };
        Self::sync_dir(&parent)?;
        Ok(outcome)
    }

    fn check_writable(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let me = euid();
        let Ok(m) = fs::metadata(&self.root) else {
            return Ok(());
        };
        if me == 0 {
            return Ok(());
        }
        let refuse = |what: String, owner: u32| {
            Error::new(
                Kind::Permission,
                format!(
                    "{what} belongs to {}; custos runs as {} here and could not write to the repository (not even its operation trail)",
                    user_name(owner),
                    user_name(me)
                ),
            )
            .hint(format!(
                "run custos as {} (`runuser -u {} -- custos ...`), or give the repository to this user: `chown -R {}: {}` (`custos init --owner USER` makes a repository for another user)",
                user_name(owner),
                user_name(owner),
                user_name(me),
                self.root.display()
            ))
        };
        if m.uid() != me {
            return Err(refuse(
                format!("the repository at {}", self.root.display()),
                m.uid(),
            ));
        }
        // Objects written by another user before (root, before it wrote as the owner).
        for e in fs::read_dir(&self.root)
            .map_err(|e| io_err(&self.root, e))?
            .flatten()
        {
            if let Ok(m) = e.metadata() {
                if m.uid() != me {
                    return Err(refuse(e.path().display().to_string(), m.uid()));
                }
            }
        }
        Ok(())
    }

    fn get(&self, path: &str) -> Result<Vec<u8>> {
        let p = self.path(path)?;
        fs::read(&p).map_err(|e| io_err(&p, e))
    }

    fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let p = self.path(path)?;
        let read = || -> std::io::Result<Vec<u8>> {
            let mut f = File::open(&p)?;
            f.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::with_capacity(len as usize);
            f.take(len).read_to_end(&mut buf)?;
            Ok(buf)
        };
        let buf = read().map_err(|e| io_err(&p, e))?;
        if buf.len() as u64 != len {
            return Err(Error::integrity(format!(
                "{}: expected {len} bytes at offset {offset}, the object is shorter",
                p.display()
            )));
        }
        Ok(buf)
    }

    fn get_prefix(&self, path: &str, n: u64) -> Result<Vec<u8>> {
        let p = self.path(path)?;
        let read = || -> std::io::Result<Vec<u8>> {
            let f = File::open(&p)?;
            let len = f.metadata()?.len().min(n);
            let mut buf = Vec::with_capacity(len as usize);
            f.take(n).read_to_end(&mut buf)?;
            Ok(buf)
        };
        read().map_err(|e| io_err(&p, e))
    }

    fn size(&self, path: &str) -> Result<Option<u64>> {
        let p = self.path(path)?;
        match fs::metadata(&p) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&p, e)),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        let mut out: Vec<Entry> = files_under(&self.path(dir)?)?
            .into_iter()
            .map(|(p, meta)| Entry {
                path: p
                    .strip_prefix(&self.root)
                    .expect("under root")
                    .to_string_lossy()
                    .into_owned(),
                size: meta.len(),
                modified: meta.modified().ok(),
                md5: None,
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    fn permission_findings(&self) -> Result<Vec<String>> {
        use std::os::unix::fs::PermissionsExt;
        let mut out = vec![];
        let mut stack = vec![self.root.clone()];
        while let Some(d) = stack.pop() {
            let rd = fs::read_dir(&d).map_err(|e| io_err(&d, e))?;
            let mode = fs::metadata(&d)
                .map_err(|e| io_err(&d, e))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                out.push(format!(
                    "folder {} has mode {mode:o}; it should be 700",
                    d.display()
                ));
            }
            for ent in rd {
                let ent = ent.map_err(|e| io_err(&d, e))?;
                let m = ent.metadata().map_err(|e| io_err(&ent.path(), e))?;
                if m.is_dir() {
                    stack.push(ent.path());
                } else if m.permissions().mode() & 0o077 != 0 {
                    out.push(format!(
                        "file {} has mode {:o}; it should be 600",
                        ent.path().display(),
                        m.permissions().mode() & 0o777
                    ));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, path: &str) -> Result<()> {
        let p = self.path(path)?;
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&p, e)),
        }
    }

    fn warm(&self, dir: &str) {
        let Ok(base) = self.path(dir) else {
            return;
        };
        // Measured on the benchmark's restore (1.8 GiB from 368 MB of packs): 1.82-2.03 s
        // against 2.02-2.30 s, with reading stopped once the restore was planned.
        let _ = std::thread::Builder::new()
            .name("custos-warm".into())
            .spawn(move || {
                for path in warm_order(&base, available_memory() / 4) {
                    let Ok(f) = File::open(&path) else {
                        continue;
                    };
                    warm_file(&f);
                    if crate::warming_stopped() {
                        return;
                    }
                }
            });
    }
}

/// Reads `f` into the page cache, 4 MiB at a time, until it ends or warming stops: with
/// `MADV_POPULATE_READ` on a mapping (Linux 5.14+), which waits for the data like a read
/// but does not copy it out (the benchmark's 381 MB of packs: 0.11 CPU-s instead of 0.15,
/// CPU the restore key's derivation needs at that moment), else with reads.
fn warm_file(f: &File) {
    const PIECE: usize = 4 << 20;
    // SAFETY: the mapping is only advised, never read, so a file changed under it cannot
    // fault this process; it is dropped before the function returns.
    if let Ok(map) = unsafe { memmap2::Mmap::map(f) } {
        let mut at = 0;
        while at < map.len() && !crate::warming_stopped() {
            let len = PIECE.min(map.len() - at);
            if map
                .advise_range(memmap2::Advice::PopulateRead, at, len)
                .is_err()
            {
                break;
            }
            at += len;
        }
        if at >= map.len() || crate::warming_stopped() {
            return;
        }
    }
    let mut buf = vec![0u8; PIECE];
    let mut f = f;
    while !crate::warming_stopped() {
        match f.read(&mut buf) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// Every file under `base` (recursively) with its metadata; none if `base` is missing.
fn files_under(base: &Path) -> Result<Vec<(PathBuf, fs::Metadata)>> {
    let mut out = vec![];
    let mut stack = vec![base.to_path_buf()];
    while let Some(d) = stack.pop() {
        let rd = match fs::read_dir(&d) {
            Ok(rd) => rd,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&d, e)),
        };
        for ent in rd {
            let ent = ent.map_err(|e| io_err(&d, e))?;
            // Removed between the folder's read and its stat (a lock released, a temp
            // file renamed): not listed, as if listed a moment later.
            let meta = match ent.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&ent.path(), e)),
            };
            if meta.is_dir() {
                stack.push(ent.path());
            } else {
                out.push((ent.path(), meta));
            }
        }
    }
    Ok(out)
}

/// The files under `base`, newest first (a restore most often wants the newest backup),
/// as many as fit in `budget` bytes. Best effort: none when the folder cannot be read.
fn warm_order(base: &Path, budget: u64) -> Vec<PathBuf> {
    let mut files: Vec<_> = files_under(base)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(p, m)| Some((m.modified().ok()?, m.len(), p)))
        .collect();
    files.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.2.cmp(&b.2)));
    let mut left = budget;
    files
        .into_iter()
        .take_while(|(_, len, _)| {
            let fits = *len <= left;
            left = left.saturating_sub(*len);
            fits
        })
        .map(|(_, _, p)| p)
        .collect()
}

/// `MemAvailable` from /proc/meminfo; 1 GiB when it cannot be read.
fn available_memory() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(1 << 30, |kb| kb * 1024)
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read-ahead takes the newest files first and stops at its budget.
    #[test]
    fn warm_order_is_newest_first_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let now = std::time::SystemTime::now();
        for (i, name) in ["a/old", "b/mid", "b/new"].iter().enumerate() {
            let p = base.join(name);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, vec![0u8; 100]).unwrap();
            let f = File::options().write(true).open(&p).unwrap();
            f.set_modified(now - std::time::Duration::from_secs(100 - 10 * i as u64))
                .unwrap();
        }
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter()
                .map(|p| p.strip_prefix(base).unwrap().display().to_string())
                .collect()
        };
        assert_eq!(names(warm_order(base, 1000)), ["b/new", "b/mid", "a/old"]);
        assert_eq!(names(warm_order(base, 250)), ["b/new", "b/mid"]);
        assert!(warm_order(base, 50).is_empty());
        assert!(available_memory() > 0);
    }
}
