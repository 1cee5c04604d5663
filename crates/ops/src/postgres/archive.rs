//! The WAL archive of one cluster as recovery will read it, computed offline from the
//! repository (as WAL-G's `wal-verify` does): which segments a restore can fetch without
//! a hole, following timeline switches, and so how far each base backup can be recovered.
//! `snapshots`, `info`, `restore postgres`, `verify` and `pg check` all use it, so a gap is
//! reported where it matters instead of when PostgreSQL stops with "recovery ended before
//! configured recovery target was reached".
//!
//! Timelines: recovery follows the newest timeline that descends from the backup's
//! (`recovery_target_timeline = 'latest'`, the default since PostgreSQL 12). Where a
//! timeline begins is read from its history file when the key can decrypt it (restore
//! keys); otherwise a timeline is taken to begin at its first archived segment and to
//! descend from the newest older timeline holding the segment before.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use custos_model::{Lsn, Result};
use custos_repo::snapshot::PgInfo;
use custos_repo::Repository;
use custos_sources::postgres::wal::{classify, segment_name, segment_number, WalFileKind};
use serde::Serialize;

/// The repository's archived WAL as `Repository::wal_objects` lists it: (cluster, file
/// name, size). A command lists it once and hands it to whatever reads it.
pub type WalObjects = [(u64, String, u64)];

/// A cluster's archived WAL: segment numbers per timeline, and where timelines begin.
#[derive(Debug, Clone, Default)]
pub struct Archive {
    pub system_id: u64,
    pub segment_size: u64,
    segs: BTreeMap<u32, BTreeSet<u64>>,
    /// Timeline -> (parent timeline, first segment on it).
    begins: BTreeMap<u32, (u32, u64)>,
    /// Archive times already read, by segment name: several backups' windows usually end
    /// at the same segment.
    pushed: RefCell<BTreeMap<String, Option<DateTime<Utc>>>>,
}

/// How far one base backup can be recovered.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Window {
    /// The earliest point: the backup's end.
    pub from: DateTime<Utc>,
    pub from_lsn: Lsn,
    /// The latest time a target may name: when the last segment of the unbroken run was
    /// archived (every commit in it came before). None when nothing past the backup is
    /// archived, or the time is not known.
    pub until: Option<DateTime<Utc>>,
    /// The end of the last segment of the unbroken run.
    pub until_lsn: Lsn,
    /// That segment (None: recovery cannot go past the backup's own end).
    pub last_segment: Option<String>,
    /// The first hole after the run, as `FIRST` or `FIRST..LAST` missing, when WAL is
    /// archived beyond it (which recovery from this backup can therefore not reach).
    pub gap: Option<String>,
    /// WAL the backup itself needs to become consistent that is missing: it cannot be
    /// restored at all.
    pub missing: Vec<String>,
}

fn range(tli: u32, from: u64, to: u64, segment_size: u64) -> String {
    if from == to {
        segment_name(tli, from, segment_size)
    } else {
        format!(
            "{}..{}",
            segment_name(tli, from, segment_size),
            segment_name(tli, to, segment_size)
        )
    }
}

/// The parent timeline and the switch point of a history file's text (its last line).
fn parse_history(text: &str) -> Option<(u32, Lsn)> {
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'))?;
    let mut parts = line.split_whitespace();
    let parent = parts.next()?.parse().ok()?;
    let lsn = parts.next()?.parse().ok()?;
    Some((parent, lsn))
}

impl Archive {
    /// The archive of `system_id` among `objects` (the repository's listing).
    pub fn load(
        repo: &Repository,
        system_id: u64,
        segment_size: u64,
        objects: &WalObjects,
    ) -> Result<Archive> {
        let mut a = Archive {
            system_id,
            segment_size,
            ..Default::default()
        };
        let mut histories = vec![];
        for (sys, name, _) in objects {
            if *sys != system_id {
                continue;
            }
            match classify(name) {
                Ok(WalFileKind::Segment { .. }) => {
                    if let Some((t, n)) = segment_number(name, segment_size) {
                        a.segs.entry(t).or_default().insert(n);
                    }
                }
                Ok(WalFileKind::History { timeline }) => histories.push((timeline, name)),
                _ => {}
            }
        }
        if repo.keys.secret.is_some() {
            for (tli, name) in histories {
                let parsed = repo
                    .wal_fetch(system_id, name)
                    .ok()
                    .flatten()
                    .and_then(|b| parse_history(&String::from_utf8_lossy(&b)));
                if let Some((parent, lsn)) = parsed {
                    a.begins.insert(tli, (parent, lsn.segment(segment_size)));
                }
            }
        }
        // Timelines without a readable history: from their first segment, descending from
        // the newest older timeline that holds the segment before it (or the same one).
        let tlis: Vec<u32> = a.segs.keys().copied().collect();
        for &t in &tlis {
            if a.begins.contains_key(&t) || t == tlis[0] {
                continue;
            }
            let first = *a.segs[&t]
                .first()
                .expect("a timeline listed holds a segment");
            let parent = tlis
                .iter()
                .rev()
                .filter(|p| **p < t)
                .find(|p| {
                    let s = &a.segs[p];
                    s.contains(&first) || first > 0 && s.contains(&(first - 1))
                })
                .copied()
                .unwrap_or(tlis[0]);
            a.begins.insert(t, (parent, first));
        }
        Ok(a)
    }

    /// The timelines recovery from `tli` goes through, oldest first, with the segment
    /// each begins at: up to the newest timeline descending from `tli`.
    fn path(&self, tli: u32) -> Vec<(u32, u64)> {
        let ancestors = |mut t: u32| {
            let mut chain = vec![t];
            while let Some((p, _)) = self.begins.get(&t) {
                if chain.contains(p) {
                    break;
                }
                chain.push(*p);
                t = *p;
            }
            chain
        };
        let newest = self
            .segs
            .keys()
            .chain(self.begins.keys())
            .copied()
            .filter(|t| ancestors(*t).contains(&tli))
            .max()
            .unwrap_or(tli);
        let mut chain = ancestors(newest);
        chain.truncate(
            chain
                .iter()
                .position(|t| *t == tli)
                .map_or(chain.len(), |i| i + 1),
        );
        chain.reverse();
        chain
            .into_iter()
            .map(|t| (t, if t == tli { 0 } else { self.begins[&t].1 }))
            .collect()
    }

    fn held(&self, tli: u32, n: u64) -> bool {
        self.segs.get(&tli).is_some_and(|s| s.contains(&n))
    }

    /// Whether recovery along `path` can fetch segment `n`: from the timeline current at
    /// `n`, or for a timeline's first segment, from its parent (it holds the same WAL up
    /// to the switch).
    fn available(&self, path: &[(u32, u64)], n: u64) -> Option<u32> {
        let i = path.iter().rposition(|(_, begin)| *begin <= n)?;
        let (t, begin) = path[i];
        if self.held(t, n) {
            Some(t)
        } else if i > 0 && n == begin && self.held(path[i - 1].0, n) {
            Some(path[i - 1].0)
        } else {
            None
        }
    }

    /// The newest segment recovery along `path` could ever want.
    fn newest(&self, path: &[(u32, u64)]) -> Option<u64> {
        path.iter()
            .filter_map(|(t, _)| self.segs.get(t).and_then(|s| s.last().copied()))
            .max()
    }

    /// The holes recovery along `path` meets from segment `from` to the newest archived
    /// segment: (first, last) missing, each followed by WAL that is there.
    fn holes(&self, path: &[(u32, u64)], from: u64) -> Vec<(u64, u64)> {
        let Some(newest) = self.newest(path) else {
            return vec![];
        };
        let mut out = vec![];
        let mut n = from;
        while n <= newest {
            if self.available(path, n).is_some() {
                n += 1;
                continue;
            }
            let mut m = n;
            while m <= newest && self.available(path, m).is_none() {
                m += 1;
            }
            // Nothing recovery can read after it: the end of the archive, not a hole.
            if m > newest {
                break;
            }
            out.push((n, m - 1));
            n = m;
        }
        out
    }

    /// A hole as segment names, on the timeline current where it begins.
    fn name_hole(&self, path: &[(u32, u64)], (first, last): (u64, u64)) -> String {
        let t = path
            .iter()
            .rev()
            .find(|(_, b)| *b <= first)
            .map_or(path[0].0, |(t, _)| *t);
        range(t, first, last, self.segment_size)
    }

    /// From segment `from` on timeline `tli`: the last segment of the unbroken run (and its
    /// timeline), and the first hole after it when WAL is archived beyond it.
    pub fn run_from(&self, tli: u32, from: u64) -> (Option<(u32, u64)>, Option<String>) {
        let path = self.path(tli);
        let Some(newest) = self.newest(&path) else {
            return (None, None);
        };
        let mut n = from;
        while n <= newest && self.available(&path, n).is_some() {
            n += 1;
        }
        let last = (n > from)
            .then(|| self.available(&path, n - 1).map(|t| (t, n - 1)))
            .flatten();
        // The run ends at n: a hole there if WAL recovery could read comes after it.
        let gap = self
            .holes(&path, n)
            .first()
            .map(|h| self.name_hole(&path, *h));
        (last, gap)
    }

    /// Every hole on the way from segment `from` of timeline `tli` to the newest archived
    /// segment of its descendants.
    pub fn gaps(&self, tli: u32, from: u64) -> Vec<String> {
        let path = self.path(tli);
        self.holes(&path, from)
            .into_iter()
            .map(|h| self.name_hole(&path, h))
            .collect()
    }

    /// The timelines that hold segments, oldest first.
    pub fn timelines(&self) -> Vec<u32> {
        self.segs.keys().copied().collect()
    }

    /// The oldest archived segment number of a timeline.
    pub fn first_segment(&self, tli: u32) -> Option<u64> {
        self.segs.get(&tli).and_then(|s| s.first().copied())
    }

    /// How far the backup `b` can be recovered. Reads the archive time of one segment
    /// (once per segment and archive).
    pub fn window(&self, repo: &Repository, b: &PgInfo) -> Result<Window> {
        let seg = self.segment_size;
        let start = b.start_lsn.segment(seg);
        // The segment holding the last byte before the stop point.
        let stop = Lsn(b.stop_lsn.0.saturating_sub(1)).segment(seg);
        let path = self.path(b.timeline);
        let missing: Vec<String> = if b.wal_included {
            vec![]
        } else {
            (start..=stop)
                .filter(|n| self.available(&path, *n).is_none())
                .map(|n| segment_name(b.timeline, n, seg))
                .collect()
        };
        let mut w = Window {
            from: b.stop_time,
            from_lsn: b.stop_lsn,
            until: None,
            until_lsn: b.stop_lsn,
            last_segment: None,
            gap: None,
            missing,
        };
        if !w.missing.is_empty() {
            return Ok(w);
        }
        // With the WAL in the snapshot, the archive is needed only from its stop segment on.
        let from = if b.wal_included { stop } else { start };
        let (last, gap) = self.run_from(b.timeline, from);
        w.gap = gap;
        if let Some((t, n)) = last.filter(|(_, n)| *n >= stop) {
            let name = segment_name(t, n, seg);
            w.until_lsn = w.until_lsn.max(Lsn((n + 1) * seg));
            let known = self.pushed.borrow().get(&name).copied();
            w.until = match known {
                Some(t) => t,
                None => {
                    let t = repo.wal_meta(self.system_id, &name)?.and_then(|m| m.pushed);
                    self.pushed.borrow_mut().insert(name.clone(), t);
                    t
                }
            };
            w.last_segment = Some(name);
        }
        Ok(w)
    }
}

/// Every cluster's archive, loaded once for the clusters `backups` belong to.
pub fn archives<'a>(
    repo: &Repository,
    backups: impl IntoIterator<Item = &'a PgInfo>,
    objects: &WalObjects,
) -> Result<BTreeMap<u64, Archive>> {
    let mut out = BTreeMap::new();
    for p in backups {
        if let std::collections::btree_map::Entry::Vacant(e) = out.entry(p.system_id) {
            e.insert(Archive::load(repo, p.system_id, p.segment_size, objects)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    fn archive(segs: &[(u32, &[u64])], begins: &[(u32, u32, u64)]) -> Archive {
        let mut a = Archive {
            system_id: 1,
            segment_size: SEG,
            ..Default::default()
        };
        for (t, ns) in segs {
            a.segs.insert(*t, ns.iter().copied().collect());
        }
        for (t, p, b) in begins {
            a.begins.insert(*t, (*p, *b));
        }
        a
    }

    #[test]
    fn the_run_stops_at_the_first_hole_and_names_it() {
        let a = archive(&[(1, &[3, 4, 5, 7, 8, 10])], &[]);
        let (last, gap) = a.run_from(1, 3);
        assert_eq!(last, Some((1, 5)));
        assert_eq!(gap.as_deref(), Some("000000010000000000000006"));
        assert_eq!(
            a.gaps(1, 3),
            vec![
                "000000010000000000000006".to_string(),
                "000000010000000000000009".to_string()
            ]
        );
        // Nothing archived past the run: no gap, however far the run got.
        let b = archive(&[(1, &[3, 4])], &[]);
        assert_eq!(b.run_from(1, 3), (Some((1, 4)), None));
        // The run must start where asked.
        assert_eq!(b.run_from(1, 2).0, None);
    }

    #[test]
    fn recovery_follows_the_newest_timeline_from_its_switch() {
        // Timeline 2 began at segment 5 (a restore promoted there); timeline 1 went on
        // to 9 in a branch recovery does not follow.
        let a = archive(
            &[(1, &[3, 4, 5, 6, 7, 8, 9]), (2, &[5, 6, 7])],
            &[(2, 1, 5)],
        );
        assert_eq!(a.run_from(1, 3), (Some((2, 7)), None));
        // Timeline 2's first segment missing: its parent's copy holds the same WAL.
        let b = archive(&[(1, &[3, 4, 5]), (2, &[6, 7])], &[(2, 1, 5)]);
        assert_eq!(b.run_from(1, 3).0, Some((2, 7)));
        // A hole on the new timeline is a hole, whatever the old one holds there.
        let c = archive(&[(1, &[3, 4, 5, 6, 7]), (2, &[5, 7])], &[(2, 1, 5)]);
        let (last, gap) = c.run_from(1, 3);
        assert_eq!(last, Some((2, 5)));
        assert_eq!(gap.as_deref(), Some("000000020000000000000006"));
    }

    #[test]
    fn without_history_a_timeline_begins_at_its_first_segment() {
        let mut a = archive(&[(1, &[3, 4, 5]), (2, &[5, 6])], &[]);
        // As `load` infers it for a key that cannot read history files.
        a.begins.insert(2, (1, 5));
        assert_eq!(a.run_from(1, 3).0, Some((2, 6)));
    }

    #[test]
    fn history_files_name_the_parent_and_switch_point() {
        let text =
            "1\t0/5000000\tno recovery target specified\n\n2\t0/7000060\tat restore point \"x\"\n";
        assert_eq!(parse_history(text), Some((2, Lsn(0x7000060))));
    }
}
