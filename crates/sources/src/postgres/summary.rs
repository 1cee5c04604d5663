//! The server's WAL summaries (PostgreSQL 17+, `summarize_wal = on`): which blocks of which
//! relations WAL changed between two LSNs, so an incremental reads only those.
//!
//! Rules as PostgreSQL's own incremental backups apply them (`basebackup_incremental.c`):
//! summaries must cover the whole range on the timeline; a relation created or truncated in
//! the range has a limit block, from which on nothing may come from the parent; a database
//! created in the range (relfilenode 0) is read whole. Only main forks use this: the free
//! space map is not WAL-logged, and custos reads the small visibility map whole.

use std::collections::{HashMap, HashSet};

use super::datadir::RELSEG_PAGES;

const DEFAULT_TABLESPACE: u32 = 1663;
const GLOBAL_TABLESPACE: u32 = 1664;

#[derive(Debug, Default)]
struct Fork {
    /// The shortest length the fork had in the range (0: created or truncated to nothing).
    limit: Option<u32>,
    blocks: HashSet<u32>,
}

/// Changed main-fork blocks by (tablespace, database, relfilenode).
#[derive(Debug, Default)]
pub struct ChangedBlocks {
    forks: HashMap<(u32, u32, u32), Fork>,
    new_databases: HashSet<(u32, u32)>,
}

/// What the summaries say about one file (pages counted from the file's start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileChanges {
    /// Not known: read every block.
    ReadAll,
    /// Only these pages changed; from `limit` on, none may come from the parent.
    Pages {
        changed: HashSet<u32>,
        limit: Option<u32>,
    },
}

impl FileChanges {
    /// Whether pages `first..first + n` must be read.
    pub fn touches(&self, first: u32, n: u32) -> bool {
        match self {
            FileChanges::ReadAll => true,
            FileChanges::Pages { changed, limit } => {
                limit.is_some_and(|l| first + n > l)
                    || (first..first + n).any(|p| changed.contains(&p))
            }
        }
    }
}

impl ChangedBlocks {
    /// One row of `pg_wal_summary_contents` (main fork only).
    pub fn add(&mut self, spc: u32, db: u32, node: u32, block: u32, is_limit: bool) {
        if node == 0 {
            self.new_databases.insert((spc, db));
            return;
        }
        let f = self.forks.entry((spc, db, node)).or_default();
        if is_limit {
            f.limit = Some(f.limit.map_or(block, |l| l.min(block)));
        } else {
            f.blocks.insert(block);
        }
    }

    /// What changed in the main-fork file at `rel` (a data-directory path).
    pub fn for_file(&self, rel: &str) -> FileChanges {
        let parts: Vec<&str> = rel.split('/').collect();
        let (spc, db, name) = match parts.as_slice() {
            ["global", f] => (GLOBAL_TABLESPACE, 0, *f),
            ["base", db, f] => match db.parse() {
                Ok(db) => (DEFAULT_TABLESPACE, db, *f),
                Err(_) => return FileChanges::ReadAll,
            },
            ["pg_tblspc", spc, _, db, f] => match (spc.parse(), db.parse()) {
                (Ok(spc), Ok(db)) => (spc, db, *f),
                _ => return FileChanges::ReadAll,
            },
            _ => return FileChanges::ReadAll,
        };
        let (node, seg) = match name.split_once('.') {
            Some((n, s)) => (n, s.parse::<u32>().ok()),
            None => (name, Some(0)),
        };
        let (Ok(node), Some(seg)) = (node.parse::<u32>(), seg) else {
            return FileChanges::ReadAll;
        };
        if self.new_databases.contains(&(spc, db)) {
            return FileChanges::ReadAll;
        }
        let first = seg.wrapping_mul(RELSEG_PAGES);
        let Some(f) = self.forks.get(&(spc, db, node)) else {
            return FileChanges::Pages {
                changed: HashSet::new(),
                limit: None,
            };
        };
        if f.limit.is_some_and(|l| l <= first) {
            return FileChanges::ReadAll;
        }
        FileChanges::Pages {
            changed: f
                .blocks
                .iter()
                .filter(|b| **b >= first && **b - first < RELSEG_PAGES)
                .map(|b| b - first)
                .collect(),
            limit: f.limit.map(|l| l - first),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_map_to_their_blocks_limits_and_new_databases() {
        let mut c = ChangedBlocks::default();
        c.add(1663, 5, 16384, 3, false);
        c.add(1663, 5, 16384, RELSEG_PAGES + 7, false);
        c.add(1663, 5, 16390, 10, true);
        c.add(1663, 5, 16390, 12, true);
        c.add(1663, 9, 0, 0, true);
        c.add(1664, 0, 1262, 0, false);
        let pages = |v: &[u32], limit| FileChanges::Pages {
            changed: v.iter().copied().collect(),
            limit,
        };
        assert_eq!(c.for_file("base/5/16384"), pages(&[3], None));
        assert_eq!(c.for_file("base/5/16384.1"), pages(&[7], None));
        // Untouched relation: nothing to read.
        assert_eq!(c.for_file("base/5/16400"), pages(&[], None));
        // Truncated to 10 pages at least once: the shortest length counts.
        assert_eq!(c.for_file("base/5/16390"), pages(&[], Some(10)));
        assert_eq!(c.for_file("base/5/16390.1"), FileChanges::ReadAll);
        assert_eq!(c.for_file("base/9/16384"), FileChanges::ReadAll);
        assert_eq!(c.for_file("global/1262"), pages(&[0], None));
        assert_eq!(
            c.for_file("pg_tblspc/16500/PG_18_1/5/16384"),
            pages(&[], None)
        );
        assert!(pages(&[], Some(10)).touches(8, 4));
        assert!(!pages(&[], Some(10)).touches(0, 8));
        assert!(pages(&[3], None).touches(0, 16));
        assert!(!pages(&[3], None).touches(16, 16));
    }
}
