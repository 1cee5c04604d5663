//! Point-in-time restore of a PostgreSQL cluster: picks the newest base backup that ends
//! before the target, checks the archive holds the WAL from that backup to the target,
//! lays the data directory down (or corrects it block by block with `delta`), and writes
//! `recovery.signal` with the recovery settings. PostgreSQL then replays the WAL, fetched
//! through `custos wal-fetch`, and promotes at the target.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use custos_model::{Error, Kind, Lsn, Result};
use custos_repo::snapshot::PgInfo;
use custos_repo::{Repository, Snapshot};
use custos_sources::postgres::wal::segment_number;
use serde::Serialize;

use crate::pg_backup::segments;
use crate::progress::Progress;
use crate::restore::{restore_files, RestoreOptions, RestoreReport};

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum Target {
    /// Replay every archived segment (the default).
    Latest,
    /// Stop as soon as the backup is consistent.
    Immediate,
    Time(DateTime<Utc>),
    Lsn(Lsn),
    Xid(u64),
    /// A restore point made with `pg_create_restore_point`.
    Name(String),
}

pub struct PgRestoreOptions<'a> {
    pub to: PathBuf,
    pub target: Target,
    /// A snapshot id (prefix) to restore instead of choosing by target.
    pub snapshot: Option<String>,
    /// Cluster name (custos.toml) or system identifier, when the repository holds several.
    pub cluster: Option<String>,
    pub delta: bool,
    /// What PostgreSQL runs to fetch WAL (`... wal-fetch %f %p`).
    pub restore_command: String,
    /// More settings for postgresql.auto.conf (`port = 5433`, `archive_mode = off`).
    pub extra_settings: Vec<String>,
    pub progress: &'a dyn Progress,
}

#[derive(Debug, Clone, Serialize)]
pub struct PgRestoreReport {
    pub snapshot: String,
    pub backup: PgInfo,
    pub target: Target,
    pub data_directory: String,
    /// The newest archived segment of the cluster and when it was archived.
    pub archive_end: Option<(String, Option<DateTime<Utc>>)>,
    pub restore: RestoreReport,
    /// What was written to postgresql.auto.conf.
    pub settings: Vec<String>,
}

const BEGIN: &str = "# custos restore: begin (removed by the next custos restore)";
const END: &str = "# custos restore: end";

/// The PostgreSQL backups of one cluster, oldest first.
pub fn backups(repo: &Repository, cluster: Option<&str>) -> Result<Vec<(Snapshot, PgInfo)>> {
    let all: Vec<(Snapshot, PgInfo)> = repo
        .snapshots()?
        .into_iter()
        .filter_map(|s| s.summary.pg.clone().map(|p| (s, p)))
        .filter(|(s, p)| {
            cluster.is_none_or(|c| {
                p.cluster.as_deref() == Some(c)
                    || p.system_id.to_string() == c
                    || s.summary.source == c
            })
        })
        .collect();
    let ids: BTreeSet<u64> = all.iter().map(|(_, p)| p.system_id).collect();
    if ids.len() > 1 {
        let names: Vec<String> = all
            .iter()
            .map(|(s, p)| format!("{} ({})", p.system_id, s.summary.source))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        return Err(Error::config(format!(
            "the repository holds backups of {} clusters: {}",
            ids.len(),
            names.join(", ")
        ))
        .hint("choose one with --cluster NAME_OR_SYSTEM_ID"));
    }
    if all.is_empty() {
        return Err(Error::new(
            Kind::NotFound,
            match cluster {
                Some(c) => format!("no PostgreSQL backup of cluster `{c}` in the repository"),
                None => "no PostgreSQL backup in the repository".into(),
            },
        )
        .hint("take one with `custos backup postgres`; `custos snapshots` lists what there is"));
    }
    Ok(all)
}

/// Picks the backup to start from: the newest that is consistent before the target.
fn choose(
    repo: &Repository,
    list: &[(Snapshot, PgInfo)],
    target: &Target,
    spec: Option<&str>,
) -> Result<(Snapshot, PgInfo)> {
    let reaches = |p: &PgInfo| match target {
        Target::Time(t) => p.stop_time <= *t,
        Target::Lsn(l) => p.stop_lsn <= *l,
        Target::Xid(x) => p.next_xid <= *x,
        Target::Latest | Target::Immediate | Target::Name(_) => true,
    };
    let describe = |p: &PgInfo| {
        format!(
            "it is consistent from {} (LSN {}, next xid {})",
            p.stop_time.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
            p.stop_lsn,
            p.next_xid
        )
    };
    if let Some(spec) = spec {
        let snap = repo.find_snapshot(spec, |s: &custos_repo::SnapshotSummary| s.pg.is_some())?;
        let (s, p) = list
            .iter()
            .find(|(s, _)| s.id == snap.id)
            .cloned()
            .ok_or_else(|| {
                Error::config(format!(
                    "snapshot {} is not a backup of this cluster",
                    snap.id.short()
                ))
            })?;
        if !reaches(&p) {
            return Err(Error::config(format!(
                "snapshot {} cannot reach the target: {}",
                s.id.short(),
                describe(&p)
            ))
            .hint("choose an older snapshot, or leave out --snapshot to pick one"));
        }
        return Ok((s, p));
    }
    list.iter()
        .rev()
        .find(|(_, p)| reaches(p))
        .cloned()
        .ok_or_else(|| {
            let (s, p) = &list[0];
            Error::config(format!(
                "the target is before the oldest backup: snapshot {} is the oldest and {}",
                s.id.short(),
                describe(p)
            ))
            .hint("no backup can be recovered to a point before it ends; choose a later target")
        })
}

pub fn restore_postgres(repo: &Repository, o: &PgRestoreOptions) -> Result<PgRestoreReport> {
    repo.require_restore("restore a database")?;
    let list = backups(repo, o.cluster.as_deref())?;
    tracing::debug!("restore: {} backups listed", list.len());
    let (snap, info) = choose(repo, &list, &o.target, o.snapshot.as_deref())?;
    tracing::debug!("restore: chose snapshot {}", snap.id.short());

    // The archive must hold the WAL from the backup's start (unless the backup carries
    // it) and reach the target.
    let archived: BTreeSet<String> = repo
        .wal_objects()?
        .into_iter()
        .filter(|(sys, _, _)| *sys == info.system_id)
        .map(|(_, name, _)| name)
        .collect();
    if !info.wal_included {
        let missing: Vec<String> = segments(
            info.timeline,
            info.start_lsn,
            info.stop_lsn,
            info.segment_size,
        )
        .into_iter()
        .filter(|n| !archived.contains(n))
        .collect();
        if !missing.is_empty() {
            return Err(Error::integrity(format!(
                "snapshot {} needs WAL that is not archived: {}",
                snap.id.short(),
                missing.join(", ")
            ))
            .hint("check archiving with `custos pg check`; a backup taken with --wal carries this WAL itself"));
        }
    }
    let reach = archive_reach(
        repo,
        info.system_id,
        &archived,
        info.timeline,
        info.segment_size,
    )?;
    match (&o.target, &reach) {
        (Target::Lsn(l), Some((segno, name, _))) => {
            let end = Lsn((segno + 1) * info.segment_size);
            if *l > end {
                return Err(Error::config(format!(
                    "target LSN {l} is past the end of the archived WAL ({end}, end of {name})"
                ))
                .hint("the WAL up to it is not archived yet: run `SELECT pg_switch_wal()` on the server and check `custos pg check`"));
            }
        }
        (Target::Time(t), Some((_, name, Some(pushed)))) if t > pushed => {
            return Err(Error::config(format!(
                "target time {} is past the end of the archived WAL: the newest segment, {name}, was archived at {}",
                t.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
                pushed.format("%Y-%m-%d %H:%M:%S%.3f UTC")
            ))
            .hint("the WAL written since is not archived yet: run `SELECT pg_switch_wal()` on the server, wait for archiving (`custos pg check`), then restore"));
        }
        _ => {}
    }

    if o.delta && o.to.join("postmaster.pid").exists() {
        return Err(Error::config(format!(
            "{} holds postmaster.pid: a server may be running on it",
            o.to.display()
        ))
        .hint("stop that server (pg_ctl -D DIR stop) before a delta restore; if it is not running, remove the stale postmaster.pid"));
    }
    // A data directory this restore creates is removed if the restore fails: a half-laid
    // directory with a backup_label must never be mistaken for a restore and started.
    let created_here = !o.to.exists();
    let laid = (|| -> Result<(RestoreReport, Vec<String>)> {
        let restore = restore_files(
            repo,
            &snap,
            &o.to,
            &RestoreOptions {
                include: vec![],
                overwrite: false,
                delta: o.delta,
                progress: o.progress,
            },
        )
        .map_err(|e| {
            if e.message.contains("is not empty") {
                e.hint("restore into a new or empty folder, or pass --delta to correct an existing data directory in place")
            } else {
                e
            }
        })?;
        let body = repo.snapshot_body(&snap.id)?;
        let mut settings = recovery_settings(&o.target, &o.restore_command);
        settings.extend(o.extra_settings.iter().cloned());
        write_recovery(&o.to, &settings, body.root)?;
        Ok((restore, settings))
    })();
    let (restore, settings) = match laid {
        Ok(x) => x,
        Err(e) => {
            if created_here {
                let _ = fs::remove_dir_all(&o.to);
            }
            return Err(e);
        }
    };
    Ok(PgRestoreReport {
        snapshot: snap.id.to_hex(),
        backup: info,
        target: o.target.clone(),
        data_directory: o.to.display().to_string(),
        archive_end: reach.map(|(_, name, pushed)| (name, pushed)),
        restore,
        settings,
    })
}

/// The newest archived segment's number and name, and when it was archived.
type Reach = (u64, String, Option<DateTime<Utc>>);

/// How far `names` (archived files of the cluster) reach from `timeline` on.
fn archive_reach<'a>(
    repo: &Repository,
    system_id: u64,
    names: impl IntoIterator<Item = &'a String>,
    timeline: u32,
    segment_size: u64,
) -> Result<Option<Reach>> {
    let newest = names
        .into_iter()
        .filter_map(|n| match segment_number(n, segment_size) {
            Some((t, number)) if t >= timeline => Some((number, n.clone())),
            _ => None,
        })
        .max();
    match newest {
        Some((number, name)) => {
            let pushed = repo.wal_meta(system_id, &name)?.and_then(|m| m.pushed);
            Ok(Some((number, name, pushed)))
        }
        None => Ok(None),
    }
}

/// How far the archive of a cluster reaches: its newest segment from `timeline` on, and
/// when that segment was archived. What `snapshots` shows as the end of the restorable range.
pub fn archive_end(
    repo: &Repository,
    system_id: u64,
    timeline: u32,
    segment_size: u64,
) -> Result<Option<(String, Option<DateTime<Utc>>)>> {
    let names: Vec<String> = repo
        .wal_objects()?
        .into_iter()
        .filter(|(sys, _, _)| *sys == system_id)
        .map(|(_, n, _)| n)
        .collect();
    Ok(
        archive_reach(repo, system_id, &names, timeline, segment_size)?
            .map(|(_, name, pushed)| (name, pushed)),
    )
}

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

pub fn recovery_settings(target: &Target, restore_command: &str) -> Vec<String> {
    let mut s = vec![format!("restore_command = {}", quote(restore_command))];
    match target {
        Target::Latest => {}
        Target::Immediate => s.push("recovery_target = 'immediate'".into()),
        Target::Time(t) => s.push(format!(
            "recovery_target_time = {}",
            quote(&t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())
        )),
        Target::Lsn(l) => s.push(format!("recovery_target_lsn = {}", quote(&l.to_string()))),
        Target::Xid(x) => s.push(format!("recovery_target_xid = {}", quote(&x.to_string()))),
        Target::Name(n) => s.push(format!("recovery_target_name = {}", quote(n))),
    }
    if *target != Target::Latest {
        s.push("recovery_target_action = 'promote'".into());
    }
    s
}

/// Appends the settings to postgresql.auto.conf (replacing those of an earlier restore),
/// writes recovery.signal, and gives the data directory its recorded owner and mode.
fn write_recovery(
    dir: &Path,
    settings: &[String],
    root: Option<custos_repo::snapshot::RootMeta>,
) -> Result<()> {
    let io = |p: &Path, e: std::io::Error| custos_model::error::io_error(Kind::Config, p, e);
    let auto = dir.join("postgresql.auto.conf");
    let old = fs::read_to_string(&auto).unwrap_or_default();
    let mut kept = String::new();
    let mut skipping = false;
    for line in old.lines() {
        if line == BEGIN {
            skipping = true;
        } else if line == END {
            skipping = false;
        } else if !skipping {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept.push_str(BEGIN);
    kept.push('\n');
    for s in settings {
        kept.push_str(s);
        kept.push('\n');
    }
    kept.push_str(END);
    kept.push('\n');
    write_owned(&auto, kept.as_bytes(), root).map_err(|e| io(&auto, e))?;
    let signal = dir.join("recovery.signal");
    write_owned(&signal, b"", root).map_err(|e| io(&signal, e))?;
    if let Some(r) = root {
        use std::os::unix::fs::PermissionsExt;
        if unsafe { libc::geteuid() } == 0 {
            std::os::unix::fs::chown(dir, Some(r.uid), Some(r.gid)).map_err(|e| io(dir, e))?;
        }
        fs::set_permissions(dir, fs::Permissions::from_mode(r.mode)).map_err(|e| io(dir, e))?;
    }
    Ok(())
}

fn write_owned(
    p: &Path,
    data: &[u8],
    root: Option<custos_repo::snapshot::RootMeta>,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)?;
    f.write_all(data)?;
    f.sync_all()?;
    if let (Some(r), true) = (root, unsafe { libc::geteuid() } == 0) {
        std::os::unix::fs::fchown(&f, Some(r.uid), Some(r.gid))?;
    }
    Ok(())
}
