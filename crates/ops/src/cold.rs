//! Archived (cold) objects before a restore: with `--request-cold`, every pack a snapshot's
//! restore reads (and, for a database backup, the WAL from its start on) is looked at; what
//! sits in GLACIER or DEEP_ARCHIVE is asked back from the store (S3 RestoreObject), and the
//! restore waits, with one error that says how many objects and how long, instead of
//! failing on the first with a denial.

use custos_model::{Error, Kind, Result};
use custos_repo::{paths, repository::parallel_map, Repository, Snapshot};
use custos_storage::ColdRestore;
use serde::Serialize;

/// How many days a restored copy stays readable.
pub const RESTORE_DAYS: u32 = 7;

#[derive(Debug, Clone, Serialize, Default)]
pub struct ColdReport {
    pub checked: u64,
    /// Archived objects asked back now.
    pub requested: Vec<String>,
    /// Archived objects already on their way back.
    pub in_progress: u64,
    /// Archived objects whose restored copy is readable.
    pub ready: u64,
}

/// The objects restoring `snap` reads: its packs, and for a database backup every WAL
/// file of its cluster from its start on (recovery may replay to the latest).
fn objects(repo: &Repository, snap: &Snapshot) -> Result<Vec<String>> {
    let index = repo.load_index_for_reading()?;
    let mut out: Vec<String> = crate::manifest::referenced_chunks(repo, &index, &snap.id)?
        .iter()
        .filter_map(|c| index.get(c).map(|(p, _)| paths::pack(&p.id)))
        .collect();
    if let Some(pg) = &snap.summary.pg {
        let first = pg.start_lsn.segment(pg.segment_size);
        for (sys, name, _) in repo.wal_objects()? {
            let n = name
                .get(..24)
                .and_then(|n| custos_sources::postgres::wal::segment_number(n, pg.segment_size));
            if sys == pg.system_id && n.is_none_or(|(_, n)| n >= first) {
                out.push(paths::wal(sys, &name));
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Looks at every object restoring `snap` reads, asks the store back for the archived
/// ones not yet on their way, and fails (exit 21) while any is not readable.
pub fn gate(repo: &Repository, snap: &Snapshot) -> Result<ColdReport> {
    let objs = objects(repo, snap)?;
    let states = parallel_map(&objs, repo.threads() * 2, |o| {
        Ok(match repo.storage.cold(o)? {
            None => None,
            Some(c) => Some(match c.restore {
                ColdRestore::NotRequested => {
                    // false: someone asked already; it is on its way.
                    if repo.storage.request_restore(o, RESTORE_DAYS)? {
                        ColdRestore::NotRequested
                    } else {
                        ColdRestore::InProgress
                    }
                }
                r => r,
            }),
        })
    })?;
    let mut r = ColdReport {
        checked: objs.len() as u64,
        ..Default::default()
    };
    for (o, s) in objs.iter().zip(states) {
        match s {
            Some(ColdRestore::NotRequested) => r.requested.push(o.clone()),
            Some(ColdRestore::InProgress) => r.in_progress += 1,
            Some(ColdRestore::Ready) => r.ready += 1,
            None => {}
        }
    }
    let waiting = r.requested.len() as u64 + r.in_progress;
    if waiting > 0 {
        return Err(Error::new(
            Kind::Cold,
            format!(
                "snapshot {} needs {waiting} archived object(s) the store is bringing back: {} requested now, {} already on their way ({} of {} readable)",
                snap.id.short(),
                r.requested.len(),
                r.in_progress,
                r.checked - waiting,
                r.checked
            ),
        )
        .hint(format!("run the same command again when they are back: a Standard retrieval takes 3-5 hours from GLACIER, up to 12 from DEEP_ARCHIVE; restored copies stay readable {RESTORE_DAYS} days")));
    }
    Ok(r)
}
