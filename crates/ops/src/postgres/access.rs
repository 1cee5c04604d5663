//! Whether another OS user can reach a file: what a restore run as root checks before it
//! writes anything, because PostgreSQL runs `restore_command` as the data folder's owner,
//! not as root. The check reads permission bits (owner, group with the user's
//! supplementary groups, other) of the file and of every folder above it; ACLs and
//! security modules are not read, so a refusal by them still shows only when the server
//! starts.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// An OS user as permission checks see it.
#[derive(Debug, Clone)]
pub struct User {
    pub uid: u32,
    pub name: String,
    pub groups: Vec<u32>,
}

impl User {
    /// The user `uid` with their primary group `gid` and supplementary groups.
    pub fn of(uid: u32, gid: u32) -> User {
        let name = custos_storage::local::user_name(uid);
        let mut groups = vec![gid];
        if let Ok(c) = CString::new(name.clone()) {
            let mut n: libc::c_int = 64;
            loop {
                let mut buf = vec![0 as libc::gid_t; n as usize];
                // SAFETY: buf holds n entries; getgrouplist writes at most n and sets n.
                let r = unsafe { libc::getgrouplist(c.as_ptr(), gid, buf.as_mut_ptr(), &mut n) };
                if r >= 0 {
                    groups.extend(buf[..n as usize].iter().copied());
                    break;
                }
                if n <= buf.len() as libc::c_int {
                    break;
                }
            }
        }
        groups.sort_unstable();
        groups.dedup();
        User { uid, name, groups }
    }

    /// Why this user cannot read `path` (and run it, with `exec`), or None when it can.
    pub fn cannot(&self, path: &Path, exec: bool) -> Option<String> {
        if self.uid == 0 {
            return None;
        }
        let path = match std::fs::canonicalize(path) {
            Ok(p) => p,
            Err(e) => return Some(format!("{} cannot be resolved: {e}", path.display())),
        };
        let mut folders: Vec<PathBuf> = path.ancestors().skip(1).map(Path::to_path_buf).collect();
        folders.reverse();
        for d in folders {
            match std::fs::metadata(&d) {
                Ok(m) if !self.may(&m, 0o1) => {
                    return Some(format!("the folder {} is not open to it", d.display()))
                }
                Ok(_) => {}
                Err(e) => return Some(format!("{}: {e}", d.display())),
            }
        }
        match std::fs::metadata(&path) {
            Ok(m) if !self.may(&m, 0o4) => Some(format!("it may not read {}", path.display())),
            Ok(m) if exec && !self.may(&m, 0o1) => {
                Some(format!("it may not run {}", path.display()))
            }
            Ok(_) => None,
            Err(e) => Some(format!("{}: {e}", path.display())),
        }
    }

    /// Whether the mode of `m` grants `bit` (4 read, 1 execute/search) to this user.
    fn may(&self, m: &std::fs::Metadata, bit: u32) -> bool {
        let mode = m.mode();
        let shift = if m.uid() == self.uid {
            6
        } else if self.groups.contains(&m.gid()) {
            3
        } else {
            0
        };
        mode >> shift & bit != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_file_in_a_closed_folder_or_without_read_is_refused_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("secrets");
        std::fs::create_dir(&dir).unwrap();
        let f = dir.join("restore.pw");
        std::fs::write(&f, b"pw").unwrap();
        // Someone else: neither owner nor in the group.
        let other = User {
            uid: 54321,
            name: "other".into(),
            groups: vec![54321],
        };
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(other.cannot(&f, false).unwrap().contains("not open to it"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(other.cannot(&f, false), None);
        assert!(other.cannot(&f, true).unwrap().contains("may not run"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(other.cannot(&f, false).unwrap().contains("may not read"));
        // The owner may; so may root, whatever the bits.
        let me = User::of(unsafe { libc::geteuid() }, unsafe { libc::getegid() });
        assert_eq!(me.cannot(&f, false), None);
    }
}
