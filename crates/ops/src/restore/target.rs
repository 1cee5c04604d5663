//! A restore's target folder, which nothing a restore does can leave.
//!
//! The folder is opened once; every path under it is resolved from that descriptor by the
//! kernel with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (component by component
//! with `O_NOFOLLOW` where the kernel lacks it), and every change is made relative to the
//! descriptor of the entry's folder: `mkdirat`, `openat(O_NOFOLLOW)`, `symlinkat`,
//! `unlinkat`, `fchown`/`fchmod`/`futimens` on the entry's own descriptor, and for links
//! `fchownat`/`utimensat` with `AT_SYMLINK_NOFOLLOW`. So neither a manifest (written by a
//! backup key, or by whoever can name files in a backed-up folder) nor a symbolic link
//! already in the target can make a restore create, write, remove, chown or chmod
//! anything outside the target: a link in the way of a path is an error, never followed.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use custos_model::{Error, Kind, PathBytes, Result};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

pub struct TargetDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// Set when the kernel has no `openat2` (before Linux 5.6): resolve by hand.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// What an existing entry is, as `lstat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Dir,
    File { len: u64, links: u64 },
    Symlink,
    Other,
}

impl TargetDir {
    /// Opens `path` (created, private, if missing). The path itself is the user's: a link
    /// there is followed, as for any folder named on a command line.
    pub fn open(path: &Path) -> Result<TargetDir> {
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
            .recursive(true)
            .create(path)
            .map_err(|e| custos_model::error::io_error(Kind::Config, path, e))?;
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| custos_model::error::io_error(Kind::Config, path, e.into()))?;
        Ok(TargetDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` under the target, for messages and for calls that must take a path (free
    /// space, the final sync).
    pub fn show(&self, rel: &PathBytes) -> PathBuf {
        self.path.join(rel.as_path())
    }

    /// The error for a failed operation on `rel`: a link in the way says so.
    pub fn error(&self, rel: &PathBytes, e: io::Error) -> Error {
        let p = self.show(rel);
        match e.raw_os_error() {
            Some(libc::ELOOP | libc::EXDEV) => Error::new(
                Kind::Config,
                format!(
                    "{}: a symbolic link is in the way (a restore never follows a link inside its target)",
                    p.display()
                ),
            )
            .hint("remove the link, or restore into a new or empty folder"),
            _ => custos_model::error::io_error(Kind::Config, &p, e),
        }
    }

    /// Opens `rel` beneath the target without following any link on the way or at its end.
    fn beneath(&self, rel: &[u8], flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if rel.is_empty() {
            return Ok(rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)?);
        }
        if !NO_OPENAT2.load(Ordering::Relaxed) {
            match rustix::fs::openat2(
                &self.fd,
                rel,
                flags,
                mode,
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
            ) {
                Err(rustix::io::Errno::NOSYS) => NO_OPENAT2.store(true, Ordering::Relaxed),
                // A path that is not a clean relative one never reaches here (the
                // manifest is checked first); EAGAIN is openat2's "retry" on a race.
                Err(rustix::io::Errno::AGAIN) => return self.by_hand(rel, flags, mode),
                r => return Ok(r?),
            }
        }
        self.by_hand(rel, flags, mode)
    }

    /// `beneath` without openat2: each folder opened with `O_NOFOLLOW` from the one before.
    fn by_hand(&self, rel: &[u8], flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        let parts: Vec<&[u8]> = rel.split(|b| *b == b'/').collect();
        if parts
            .iter()
            .any(|c| c.is_empty() || *c == b"." || *c == b"..")
        {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        }
        let mut dir: Option<OwnedFd> = None;
        for (i, c) in parts.iter().enumerate() {
            let at: BorrowedFd = dir.as_ref().map_or(self.fd.as_fd(), |d| d.as_fd());
            let last = i + 1 == parts.len();
            let fl = if last {
                flags
            } else {
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
            };
            let fd = rustix::fs::openat(at, *c, fl, if last { mode } else { Mode::empty() })?;
            dir = Some(fd);
        }
        Ok(dir.expect("a path has a component"))
    }

    /// The folder holding `rel` (opened for `*at` calls) and `rel`'s last component.
    fn parent<'a>(&self, rel: &'a PathBytes) -> io::Result<(OwnedFd, &'a [u8])> {
        let dir = self.beneath(
            rel.parent().unwrap_or_default(),
            OFlags::PATH | OFlags::DIRECTORY,
            Mode::empty(),
        )?;
        Ok((dir, rel.file_name()))
    }

    /// What is at `rel`, without following a link; None when nothing is.
    pub fn lstat(&self, rel: &PathBytes) -> Result<Option<Found>> {
        let (dir, name) = match self.parent(rel) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            // A link (or a file) where a folder of the path should be: the entry itself
            // is not there, and whoever creates it will meet the link.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                return Ok(None)
            }
            Err(e) => return Err(self.error(rel, e)),
        };
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(
                match rustix::fs::FileType::from_raw_mode(st.st_mode) {
                    rustix::fs::FileType::Directory => Found::Dir,
                    rustix::fs::FileType::RegularFile => Found::File {
                        len: st.st_size as u64,
                        links: st.st_nlink,
                    },
                    rustix::fs::FileType::Symlink => Found::Symlink,
                    _ => Found::Other,
                },
            )),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(self.error(rel, e.into())),
        }
    }

    /// Creates the folder `rel` and any folder above it (private until their own modes are
    /// set). A component that exists and is not a folder (a link included) is an error.
    pub fn make_dirs(&self, rel: &PathBytes) -> Result<()> {
        if rel.is_empty() {
            return Ok(());
        }
        // Manifests list a folder before what is in it: its parent is there, mostly.
        match self.parent(rel) {
            Ok((dir, name)) => match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700)) {
                Ok(()) => return Ok(()),
                Err(rustix::io::Errno::EXIST) => {
                    // There already: it must be a folder, not a link to one.
                    return self
                        .beneath(
                            rel.as_bytes(),
                            OFlags::PATH | OFlags::DIRECTORY,
                            Mode::empty(),
                        )
                        .map(drop)
                        .map_err(|e| self.error(rel, e));
                }
                Err(e) => return Err(self.error(rel, e.into())),
            },
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(self.error(rel, e)),
        }
        let mut at = PathBytes::default();
        for c in rel.components() {
            let (dir, _) = self.parent(&at.join(c)).map_err(|e| self.error(rel, e))?;
            at = at.join(c);
            match rustix::fs::mkdirat(&dir, c, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(self.error(&at, e.into())),
            }
        }
        // Whatever existed on the way must have been a folder, not a link to one.
        self.beneath(
            rel.as_bytes(),
            OFlags::PATH | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .map(drop)
        .map_err(|e| self.error(rel, e))
    }

    /// Opens the regular file `rel` for writing (created 0600 when `create`, never
    /// truncated: other threads write other parts of it), optionally with `O_DIRECT`.
    pub fn open_write(&self, rel: &PathBytes, create: bool, direct: bool) -> io::Result<File> {
        let mut fl = OFlags::WRONLY;
        if direct {
            fl |= OFlags::DIRECT;
        }
        // openat2 refuses a mode without O_CREAT.
        let mode = if create {
            fl |= OFlags::CREATE;
            Mode::from_raw_mode(0o600)
        } else {
            Mode::empty()
        };
        self.beneath(rel.as_bytes(), fl, mode).map(File::from)
    }

    /// Opens the regular file `rel` to read and write (a delta restore compares and cuts).
    pub fn open_rw(&self, rel: &PathBytes) -> io::Result<File> {
        let f = File::from(self.beneath(rel.as_bytes(), OFlags::RDWR, Mode::empty())?);
        if !f.metadata()?.is_file() {
            return Err(io::Error::from_raw_os_error(libc::EISDIR));
        }
        Ok(f)
    }

    /// Reads the regular file `rel` whole; None when there is nothing there.
    pub fn read(&self, rel: &PathBytes) -> Result<Option<Vec<u8>>> {
        match self.beneath(
            rel.as_bytes(),
            OFlags::RDONLY | OFlags::NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => {
                let mut f = File::from(fd);
                if !f.metadata().map_err(|e| self.error(rel, e))?.is_file() {
                    return Err(self.error(rel, io::Error::from_raw_os_error(libc::EISDIR)));
                }
                let mut v = vec![];
                std::io::Read::read_to_end(&mut f, &mut v).map_err(|e| self.error(rel, e))?;
                Ok(Some(v))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(self.error(rel, e)),
        }
    }

    /// Writes the regular file `rel` (created 0600 or emptied first; a link there is an
    /// error), synced, owned by `owner` when given.
    pub fn write(&self, rel: &PathBytes, data: &[u8], owner: Option<(u32, u32)>) -> Result<()> {
        let fd = self
            .beneath(
                rel.as_bytes(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| self.error(rel, e))?;
        let mut f = File::from(fd);
        std::io::Write::write_all(&mut f, data)
            .and_then(|_| f.sync_all())
            .map_err(|e| self.error(rel, e))?;
        if let Some((uid, gid)) = owner {
            rustix::fs::fchown(
                &f,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(|e| self.error(rel, e.into()))?;
        }
        Ok(())
    }

    /// Creates an empty regular file `rel` (0600); fails if anything is there.
    pub fn create_new(&self, rel: &PathBytes) -> Result<File> {
        self.beneath(
            rel.as_bytes(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
            Mode::from_raw_mode(0o600),
        )
        .map(File::from)
        .map_err(|e| self.error(rel, e))
    }

    /// Removes whatever is at `rel` (a folder with everything in it; a link, never what
    /// it points to).
    pub fn remove(&self, rel: &PathBytes) -> Result<()> {
        let (dir, name) = self.parent(rel).map_err(|e| self.error(rel, e))?;
        remove_at(dir.as_fd(), name).map_err(|e| self.error(rel, e))
    }

    /// Renames `from` to `to` (replacing what is there), both beneath the target.
    pub fn rename(&self, from: &PathBytes, to: &PathBytes) -> Result<()> {
        let (fdir, fname) = self.parent(from).map_err(|e| self.error(from, e))?;
        let (tdir, tname) = self.parent(to).map_err(|e| self.error(to, e))?;
        rustix::fs::renameat(&fdir, fname, &tdir, tname).map_err(|e| self.error(to, e.into()))
    }

    /// Creates the symbolic link `rel` pointing to `to` (which is never followed here).
    pub fn symlink(&self, rel: &PathBytes, to: &PathBytes) -> Result<()> {
        let (dir, name) = self.parent(rel).map_err(|e| self.error(rel, e))?;
        rustix::fs::symlinkat(to.as_bytes(), &dir, name).map_err(|e| self.error(rel, e.into()))
    }

    /// Sets owner (when `owner`), mode and times of the folder or regular file `rel`, on
    /// the entry itself: a link put in its place is refused, never followed.
    pub fn set_meta(&self, rel: &PathBytes, meta: &Meta) -> Result<()> {
        let fl = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY;
        match self.beneath(rel.as_bytes(), fl, Mode::empty()) {
            Ok(fd) => set_meta_fd(&fd, meta).map_err(|e| self.error(rel, e)),
            // Not readable by us (a non-root delta restore over an entry of mode 0):
            // change it by name in its folder, after checking it is not a link.
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                let (dir, name) = self.parent(rel).map_err(|e| self.error(rel, e))?;
                let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| self.error(rel, e.into()))?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode).is_symlink() {
                    return Err(self.error(rel, io::Error::from_raw_os_error(libc::ELOOP)));
                }
                self.set_meta_at(&dir, name, meta, true)
                    .map_err(|e| self.error(rel, e))
            }
            Err(e) => Err(self.error(rel, e)),
        }
    }

    /// Sets owner (when `owner`) and times of the link `rel` itself.
    pub fn set_link_meta(&self, rel: &PathBytes, meta: &Meta) -> Result<()> {
        let (dir, name) = self.parent(rel).map_err(|e| self.error(rel, e))?;
        self.set_meta_at(&dir, name, meta, false)
            .map_err(|e| self.error(rel, e))
    }

    /// Owner (never through a link), then mode (`chmod`: not for links, whose mode Linux
    /// ignores), then times (never through a link) of `name` in `dir`.
    fn set_meta_at(&self, dir: &OwnedFd, name: &[u8], meta: &Meta, chmod: bool) -> io::Result<()> {
        if let Some((uid, gid)) = meta.owner {
            rustix::fs::chownat(
                dir,
                name,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )?;
        }
        if chmod {
            rustix::fs::chmodat(dir, name, Mode::from_raw_mode(meta.mode), AtFlags::empty())?;
        }
        rustix::fs::utimensat(dir, name, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)?;
        Ok(())
    }
}

/// What a restore sets on an entry once its content is in place.
pub struct Meta {
    /// Owner and group: set only when running as root.
    pub owner: Option<(u32, u32)>,
    pub mode: u32,
    pub mtime_ns: i64,
}

impl Meta {
    fn times(&self) -> Timestamps {
        let t = Timespec {
            tv_sec: self.mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: self.mtime_ns.rem_euclid(1_000_000_000) as _,
        };
        Timestamps {
            last_access: t,
            last_modification: t,
        }
    }
}

/// Owner, then mode (a change of owner clears set-id bits), then times, on a descriptor.
pub fn set_meta_fd(fd: impl AsFd, meta: &Meta) -> io::Result<()> {
    if let Some((uid, gid)) = meta.owner {
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        )?;
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode))?;
    rustix::fs::futimens(&fd, &meta.times())?;
    Ok(())
}

/// Removes `name` in `dir`: a file or link by unlinking it, a folder with its contents,
/// each opened without following links.
fn remove_at(dir: BorrowedFd, name: &[u8]) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::ISDIR | rustix::io::Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = vec![];
    for ent in rustix::fs::Dir::read_from(&sub)? {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    for n in names {
        remove_at(sub.as_fd(), &n)?;
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_reached_through_a_link_in_the_target() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"keep").unwrap();
        let target = tmp.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&outside, target.join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), target.join("file")).unwrap();
        let t = TargetDir::open(&target).unwrap();

        let through = PathBytes::from("sub/secret");
        assert!(t.open_write(&through, true, false).is_err());
        assert!(t
            .open_write(&PathBytes::from("sub/new"), true, false)
            .is_err());
        assert!(t.open_write(&PathBytes::from("file"), true, false).is_err());
        assert!(t.make_dirs(&PathBytes::from("sub/deeper")).is_err());
        let meta = Meta {
            owner: None,
            mode: 0o777,
            mtime_ns: 0,
        };
        assert!(t.set_meta(&PathBytes::from("sub"), &meta).is_err());
        assert!(t.set_meta(&PathBytes::from("file"), &meta).is_err());
        assert!(t.remove(&through).is_err());
        assert_eq!(t.lstat(&through).unwrap(), None);
        // Removing the link removes the link, not what it points to.
        t.remove(&PathBytes::from("sub")).unwrap();
        assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"keep");
        assert!(!outside.join("deeper").exists() && !outside.join("new").exists());
        use std::os::unix::fs::PermissionsExt;
        assert_ne!(
            std::fs::metadata(outside.join("secret"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o777
        );
        // By hand (kernels without openat2) the same holds.
        NO_OPENAT2.store(true, Ordering::Relaxed);
        assert!(t.open_write(&PathBytes::from("file"), true, false).is_err());
        std::os::unix::fs::symlink(&outside, target.join("sub")).unwrap();
        assert!(t.open_write(&through, true, false).is_err());
        NO_OPENAT2.store(false, Ordering::Relaxed);
    }

    #[test]
    fn a_folder_is_removed_with_its_contents_but_not_what_links_in_it_point_to() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(outside.join("deep")).unwrap();
        let target = tmp.path().join("target");
        std::fs::create_dir_all(target.join("a/b")).unwrap();
        std::fs::write(target.join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, target.join("a/link")).unwrap();
        let t = TargetDir::open(&target).unwrap();
        t.remove(&PathBytes::from("a")).unwrap();
        assert!(!target.join("a").exists());
        assert!(outside.join("deep").is_dir());
    }
}
