//! The data directory as a base backup sees it: which files are copied (PostgreSQL's own
//! exclusion list for base backups), which are relation files made of 8 KiB pages, and the
//! page checksum that lets a backup catch a damaged page while it reads.

use std::path::{Path, PathBuf};

use custos_model::{Lsn, PathBytes, Result};

use crate::files::{self, EntryKind, WalkReport};

pub const PAGE_SIZE: usize = 8192;
/// Pages per relation segment file (1 GiB files).
pub const RELSEG_PAGES: u32 = 131_072;

/// Folders whose contents a base backup leaves out (the folder itself is kept), as
/// PostgreSQL's `basebackup.c` does. `pg_wal` is refilled by recovery from the archive.
const EMPTY_DIRS: &[&str] = &[
    "pg_wal",
    "pg_stat_tmp",
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_subtrans",
];

/// Top-level files that belong to the running server, not to the backup.
const SKIP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "backup_manifest",
    "tablespace_map",
    "recovery.signal",
    "standby.signal",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
];

/// Whether a path (relative to the data directory) is part of a base backup.
pub fn included(rel: &str, kind: EntryKind) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if name == "pg_internal.init" || name.starts_with("pgsql_tmp") {
        return false;
    }
    if !rel.contains('/') && kind != EntryKind::Dir && SKIP_FILES.contains(&rel) {
        return false;
    }
    if rel == "pg_wal/archive_status" {
        return true;
    }
    !EMPTY_DIRS
        .iter()
        .any(|d| rel.len() > d.len() && rel.starts_with(d) && rel.as_bytes()[d.len()] == b'/')
}

/// A relation file (`base/<db>/<relfilenode>[_fork][.segment]`, `global/...`, or the same
/// under a tablespace): (relfilenode, fork suffix or "", segment number).
fn relation_parts(rel: &str) -> Option<(&str, &str, u32)> {
    let parts: Vec<&str> = rel.split('/').collect();
    let name = match parts.as_slice() {
        ["global", f] => *f,
        ["base", db, f] if is_digits(db) => *f,
        ["pg_tblspc", ts, _version, db, f] if is_digits(ts) && is_digits(db) => *f,
        _ => return None,
    };
    let (stem, seg) = match name.split_once('.') {
        Some((stem, seg)) if is_digits(seg) => (stem, seg.parse::<u32>().ok()?),
        Some(_) => return None,
        None => (name, 0),
    };
    let (node, fork) = match stem.split_once('_') {
        Some((node, fork)) if ["fsm", "vm", "init"].contains(&fork) => (node, fork),
        Some(_) => return None,
        None => (stem, ""),
    };
    is_digits(node).then_some((node, fork, seg))
}

/// A relation file: the number of its first page, for the checksum.
pub fn relation_first_page(rel: &str) -> Option<u32> {
    relation_parts(rel).map(|(_, _, seg)| seg.wrapping_mul(RELSEG_PAGES))
}

/// A relation's main fork: every change to its pages is WAL-logged and stamps the page's
/// LSN. Not so the free space map (not WAL-logged) nor the visibility map (its bits are
/// cleared without a new page LSN), which incrementals therefore compare block by block.
pub fn is_main_fork(rel: &str) -> bool {
    relation_parts(rel).is_some_and(|(_, fork, _)| fork.is_empty())
}

/// (relfilenode, fork number as PostgreSQL counts them, segment) of a relation file.
pub fn relation_fork(rel: &str) -> Option<(u32, i32, u32)> {
    let (node, fork, seg) = relation_parts(rel)?;
    let forknum = match fork {
        "" => 0,
        "fsm" => 1,
        "vm" => 2,
        _ => 3,
    };
    Some((node.parse().ok()?, forknum, seg))
}

/// Whether a main-fork page read now is the page as it was at `since`: initialized, with a
/// sane header, its LSN older than `since`, and (with data checksums) a valid checksum. A
/// page that changed after `since` carries a newer LSN, because every change to it is
/// WAL-logged; anything else (new, damaged, torn) counts as changed.
pub fn page_unchanged_since(page: &[u8], blkno: u32, since: Lsn, checksums: bool) -> bool {
    if page.len() != PAGE_SIZE {
        return false;
    }
    let u16_at = |i: usize| u16::from_le_bytes(page[i..i + 2].try_into().unwrap());
    let (lower, upper, special) = (u16_at(12), u16_at(14), u16_at(16));
    if upper == 0 || lower < 24 || lower > upper || upper > special || special as usize > PAGE_SIZE
    {
        return false;
    }
    let lsn = page_lsn(page);
    if lsn.0 == 0 || lsn >= since {
        return false;
    }
    !checksums || u16_at(8) == page_checksum(page, blkno)
}

fn page_lsn(page: &[u8]) -> Lsn {
    let hi = u32::from_le_bytes(page[0..4].try_into().unwrap());
    let lo = u32::from_le_bytes(page[4..8].try_into().unwrap());
    Lsn((u64::from(hi) << 32) | u64::from(lo))
}

fn is_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Walks a data directory: the files a base backup copies, with tablespaces (symbolic
/// links in `pg_tblspc`) followed and their contents placed under `pg_tblspc/<oid>/`.
/// Where each tablespace lived is in `tablespace_map`, which the backup keeps.
pub fn walk(pgdata: &Path) -> Result<WalkReport> {
    let mut report = files::walk(&[pgdata.to_path_buf()])?;
    report
        .entries
        .retain(|w| included(&w.entry.path.lossy(), w.entry.kind));
    let links: Vec<(usize, PathBytes, PathBuf)> = report
        .entries
        .iter()
        .enumerate()
        .filter(|(_, w)| {
            w.entry.kind == EntryKind::Symlink
                && w.entry
                    .path
                    .to_str()
                    .and_then(|p| p.strip_prefix("pg_tblspc/"))
                    .is_some_and(is_digits)
        })
        .map(|(i, w)| {
            (
                i,
                w.entry.path.clone(),
                w.entry
                    .target
                    .as_ref()
                    .map(|t| t.as_path().to_path_buf())
                    .unwrap_or_default(),
            )
        })
        .collect();
    for (i, rel, target) in links.into_iter().rev() {
        let target = if target.is_absolute() {
            target
        } else {
            pgdata.join("pg_tblspc").join(target)
        };
        let sub = files::walk(std::slice::from_ref(&target))?;
        let meta = std::fs::metadata(&target).map_err(|e| {
            custos_model::Error::new(
                custos_model::Kind::Source,
                format!("tablespace {rel} -> {}: {e}", target.display()),
            )
        })?;
        // The link becomes a folder of the same name holding the tablespace.
        let dir = &mut report.entries[i];
        dir.entry.kind = EntryKind::Dir;
        dir.entry.target = None;
        {
            use std::os::unix::fs::MetadataExt;
            dir.entry.mode = meta.mode() & 0o7777;
            dir.entry.uid = meta.uid();
            dir.entry.gid = meta.gid();
        }
        let mut children: Vec<_> = sub
            .entries
            .into_iter()
            .map(|mut w| {
                w.entry.path = rel.join(w.entry.path.as_bytes());
                w
            })
            .filter(|w| included(&w.entry.path.lossy(), w.entry.kind))
            .collect();
        report.errors.extend(sub.errors);
        let at = i + 1;
        report.entries.splice(at..at, children.drain(..));
    }
    Ok(report)
}

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];

/// PostgreSQL's data page checksum (`checksum_impl.h`): 32 parallel FNV-1a-like lanes over
/// the page with its checksum field zeroed, the block number mixed in, folded to 16 bits.
pub fn page_checksum(page: &[u8], blkno: u32) -> u16 {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    let mut sums = BASE_OFFSETS;
    let comp = |sum: &mut u32, v: u32| {
        let t = *sum ^ v;
        *sum = t.wrapping_mul(FNV_PRIME) ^ (t >> 17);
    };
    for (row, words) in page.chunks_exact(4 * N_SUMS).enumerate() {
        for (j, w) in words.chunks_exact(4).enumerate() {
            let mut v = u32::from_le_bytes(w.try_into().unwrap());
            // pd_checksum (bytes 8..10) counts as zero.
            if row == 0 && j == 2 {
                v &= 0xFFFF_0000;
            }
            comp(&mut sums[j], v);
        }
    }
    for _ in 0..2 {
        for s in sums.iter_mut() {
            comp(s, 0);
        }
    }
    let folded = sums.iter().fold(0u32, |a, s| a ^ s) ^ blkno;
    ((folded % 65535) + 1) as u16
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCheck {
    Valid,
    /// Changed since the backup started: WAL replay rewrites it, its checksum may be torn.
    Newer,
    /// Never initialized (all zero).
    New,
    Damaged {
        stored: u16,
        computed: u16,
    },
}

/// Checks one page of a relation file against its checksum.
pub fn check_page(page: &[u8], blkno: u32, backup_start: Lsn) -> PageCheck {
    if page.len() != PAGE_SIZE {
        // A file's last, partial page is being extended right now: replay fixes it.
        return PageCheck::Newer;
    }
    let lsn = page_lsn(page);
    let pd_upper = u16::from_le_bytes(page[14..16].try_into().unwrap());
    if pd_upper == 0 && page.iter().all(|b| *b == 0) {
        return PageCheck::New;
    }
    if lsn >= backup_start {
        return PageCheck::Newer;
    }
    let stored = u16::from_le_bytes(page[8..10].try_into().unwrap());
    let computed = page_checksum(page, blkno);
    if stored == computed {
        PageCheck::Valid
    } else {
        PageCheck::Damaged { stored, computed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions_follow_basebackup() {
        assert!(included("base/5/16384", EntryKind::File));
        assert!(included("pg_wal", EntryKind::Dir));
        assert!(included("pg_wal/archive_status", EntryKind::Dir));
        assert!(!included(
            "pg_wal/000000010000000000000001",
            EntryKind::File
        ));
        assert!(!included("pg_wal/archive_status/x.ready", EntryKind::File));
        assert!(!included("postmaster.pid", EntryKind::File));
        assert!(!included("base/5/pg_internal.init", EntryKind::File));
        assert!(!included("base/pgsql_tmp/pgsql_tmp123.0", EntryKind::File));
        assert!(included("pg_stat_tmp", EntryKind::Dir));
        assert!(!included("pg_stat_tmp/global.stat", EntryKind::File));
        assert!(included("postgresql.auto.conf", EntryKind::File));
        assert!(included("pg_walsummaries", EntryKind::Dir));
    }

    #[test]
    fn relation_files_and_their_first_page() {
        assert_eq!(relation_first_page("base/5/16384"), Some(0));
        assert_eq!(
            relation_first_page("base/5/16384.2"),
            Some(2 * RELSEG_PAGES)
        );
        assert_eq!(relation_first_page("base/5/16384_vm"), Some(0));
        assert_eq!(relation_first_page("global/1262_fsm"), Some(0));
        assert_eq!(
            relation_first_page("pg_tblspc/16400/PG_15_202209061/5/16401.1"),
            Some(RELSEG_PAGES)
        );
        assert_eq!(relation_first_page("base/5/PG_VERSION"), None);
        assert_eq!(relation_first_page("global/pg_control"), None);
        assert_eq!(relation_first_page("base/5/pg_filenode.map"), None);
        assert_eq!(relation_first_page("base/5/16384_xx"), None);
        assert!(is_main_fork("base/5/16384.3"));
        assert!(!is_main_fork("base/5/16384_vm"));
        assert!(!is_main_fork("base/5/16384_fsm.1"));
        assert!(!is_main_fork("base/5/PG_VERSION"));
        assert_eq!(relation_fork("base/5/16384_vm.1"), Some((16384, 2, 1)));
    }

    #[test]
    fn checksum_detects_a_flipped_byte_and_a_moved_page() {
        let mut page = vec![0u8; PAGE_SIZE];
        page[0..8].copy_from_slice(&[0, 0, 0, 0, 0x28, 0, 0, 1]); // LSN 0/1000028
        page[12..14].copy_from_slice(&40u16.to_le_bytes());
        page[14..16].copy_from_slice(&8000u16.to_le_bytes());
        for (i, b) in page[8000..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let c = page_checksum(&page, 7);
        page[8..10].copy_from_slice(&c.to_le_bytes());
        let start = Lsn(0x2000000);
        assert_eq!(check_page(&page, 7, start), PageCheck::Valid);
        assert!(matches!(
            check_page(&page, 8, start),
            PageCheck::Damaged { .. }
        ));
        page[8100] ^= 1;
        assert!(matches!(
            check_page(&page, 7, start),
            PageCheck::Damaged { .. }
        ));
        assert_eq!(check_page(&page, 7, Lsn(0x100)), PageCheck::Newer);
        assert_eq!(check_page(&vec![0u8; PAGE_SIZE], 0, start), PageCheck::New);
    }

    #[test]
    fn a_page_counts_unchanged_only_when_older_sane_and_intact() {
        let mut page = vec![0u8; PAGE_SIZE];
        page[0..8].copy_from_slice(&[0, 0, 0, 0, 0x28, 0, 0, 1]); // LSN 0/1000028
        page[12..14].copy_from_slice(&40u16.to_le_bytes());
        page[14..16].copy_from_slice(&8000u16.to_le_bytes());
        page[16..18].copy_from_slice(&8192u16.to_le_bytes());
        let c = page_checksum(&page, 3);
        page[8..10].copy_from_slice(&c.to_le_bytes());
        assert!(page_unchanged_since(&page, 3, Lsn(0x2000000), true));
        // Changed at or after `since`.
        assert!(!page_unchanged_since(&page, 3, Lsn(0x1000028), true));
        // Checksum of another block, or a flipped byte: damaged counts as changed.
        assert!(!page_unchanged_since(&page, 4, Lsn(0x2000000), true));
        assert!(page_unchanged_since(&page, 4, Lsn(0x2000000), false));
        // New and torn pages.
        assert!(!page_unchanged_since(
            &vec![0u8; PAGE_SIZE],
            0,
            Lsn(0x2000000),
            false
        ));
        assert!(!page_unchanged_since(
            &page[..4096],
            3,
            Lsn(0x2000000),
            false
        ));
        page[14..16].copy_from_slice(&20u16.to_le_bytes());
        assert!(!page_unchanged_since(&page, 3, Lsn(0x2000000), false));
    }
}
