//! Drills: a restore into a scratch place custos creates and removes, proven and timed.
//!
//! `db`: the backup a target picks is restored into a temp folder, started as a cluster of
//! its own (a free port, its socket in that folder, archiving off, local trust only), and
//! recovery replays the archive to the target and promotes. Then `pg_amcheck
//! --heapallindexed` over every database and the configured smoke checks. Each phase is
//! timed: the RTO is the sum until the cluster answers queries; the RPO is the age of the
//! newest point the archive let it reach. The scratch cluster is stopped and its folder
//! removed whatever happened.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use custos_model::{Error, Kind, Result};
use custos_repo::Repository;
use serde::Serialize;

use crate::postgres::restore::{restore_postgres, PgRestoreOptions, Target};
use crate::progress::Progress;

/// A query and the text it must return (`psql -At`), from `[[drill.check]]`.
#[derive(Debug, Clone, Serialize)]
pub struct SmokeCheck {
    pub name: String,
    pub sql: String,
    pub expect: String,
}

pub struct DbDrillOptions<'a> {
    pub target: Target,
    pub snapshot: Option<String>,
    pub cluster: Option<String>,
    /// Where the scratch folder is made (it is removed after).
    pub scratch_parent: PathBuf,
    /// The PostgreSQL server binaries (`pg_ctl`, `psql`, `pg_amcheck`) of the backup's
    /// major version; `None`: found from the restored PG_VERSION.
    pub bin: Option<PathBuf>,
    /// Run the scratch server as this OS user (custos runs as root; PostgreSQL refuses).
    pub os_user: Option<String>,
    /// The database role to connect as (the cluster's superuser; default `postgres`).
    pub db_user: String,
    pub restore_command: String,
    pub command_needs: Vec<(PathBuf, bool)>,
    pub checks: Vec<SmokeCheck>,
    /// How long recovery may take before the drill fails.
    pub recovery_timeout: Duration,
    pub progress: &'a dyn Progress,
}

#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub kind: String,
    pub ok: bool,
    pub snapshot: String,
    pub target: serde_json::Value,
    pub started: DateTime<Utc>,
    pub phases: Vec<Phase>,
    pub checks: Vec<CheckResult>,
    /// Command start until the restored data answered queries.
    pub rto_seconds: f64,
    /// The newest point recovered (the last transaction replayed, else the backup's end).
    pub recovered_to: Option<DateTime<Utc>>,
    /// Its age when the drill ran.
    pub rpo_seconds: Option<f64>,
    /// What failed, when `ok` is false.
    pub failure: Option<String>,
    /// db: bytes the restore wrote and WAL files recovery replayed (what `restore
    /// postgres --preview` estimates the next restore's RTO from).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal_files: Option<u64>,
}

impl DrillReport {
    /// A report with no phase or check yet; the RPO measured from `recovered_to`.
    fn new(
        kind: &str,
        snapshot: String,
        started: DateTime<Utc>,
        recovered_to: Option<DateTime<Utc>>,
    ) -> DrillReport {
        DrillReport {
            kind: kind.into(),
            ok: false,
            snapshot,
            target: serde_json::Value::Null,
            started,
            phases: vec![],
            checks: vec![],
            rto_seconds: 0.0,
            recovered_to,
            rpo_seconds: recovered_to
                .map(|t| (started - t).num_milliseconds().max(0) as f64 / 1000.0),
            failure: None,
            bytes: None,
            wal_files: None,
        }
    }

    /// A drill that could not run at all (`drill full` goes on with the others).
    pub fn failed(kind: &str, why: String) -> DrillReport {
        DrillReport {
            failure: Some(why),
            ..DrillReport::new(kind, String::new(), custos_model::clock::now(), None)
        }
    }
}

/// The PostgreSQL binaries for a data directory's major version: `/usr/lib/postgresql/N/bin`
/// (Debian), else the folder of `pg_ctl` on PATH when its version matches.
pub fn find_bin(data: &Path) -> Result<PathBuf> {
    let major = std::fs::read_to_string(data.join("PG_VERSION"))
        .map_err(|e| Error::internal(format!("restored data has no PG_VERSION: {e}")))?
        .trim()
        .to_string();
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if debian.join("pg_ctl").exists() {
        return Ok(debian);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let pg_ctl = dir.join("pg_ctl");
            let Ok(out) = Command::new(&pg_ctl).arg("--version").output() else {
                continue;
            };
            let v = String::from_utf8_lossy(&out.stdout);
            if v.split_whitespace()
                .last()
                .is_some_and(|x| x.split('.').next() == Some(major.as_str()))
            {
                return Ok(dir);
            }
        }
    }
    Err(Error::config(format!(
        "no PostgreSQL {major} server binaries found for the drill"
    ))
    .hint(format!("install PostgreSQL {major} (its pg_ctl, psql and pg_amcheck), or name their folder: [drill] bin in custos.toml or --pg-bin")))
}

/// A postgresql.conf for a copy whose original kept its configuration elsewhere: the
/// settings that hot standby requires to be at least the original's, as its control file
/// (`pg_controldata`'s output) recorded them; the rest stays at PostgreSQL's defaults.
fn conf_from_controldata(controldata: &str) -> String {
    const REQUIRED: [(&str, &str); 5] = [
        ("max_connections setting", "max_connections"),
        ("max_worker_processes setting", "max_worker_processes"),
        ("max_wal_senders setting", "max_wal_senders"),
        ("max_prepared_xacts setting", "max_prepared_transactions"),
        ("max_locks_per_xact setting", "max_locks_per_transaction"),
    ];
    let mut out = String::from(
        "# Written by custos drill: the backed-up server kept its configuration outside its\n\
         # data directory, so the backup holds none.\n",
    );
    for line in controldata.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if let Some((_, name)) = REQUIRED.iter().find(|(label, _)| *label == k.trim()) {
            if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
                out.push_str(&format!("{name} = {v}\n"));
            }
        }
    }
    out
}

/// Runs a PostgreSQL program, as `os_user` when one is named.
fn pg_cmd(bin: &Path, prog: &str, os_user: Option<&str>) -> Command {
    match os_user {
        Some(u) => {
            let mut c = Command::new("runuser");
            c.args(["-u", u, "--"]).arg(bin.join(prog));
            c
        }
        None => Command::new(bin.join(prog)),
    }
}

fn run(c: &mut Command, what: &str) -> Result<String> {
    let out = c
        .output()
        .map_err(|e| Error::new(Kind::Source, format!("cannot run {what}: {e}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(Error::new(
            Kind::Check,
            format!("{what} failed: {}", text.trim()),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::internal(format!("no free port for the drill: {e}")))
}

fn chown_tree(p: &Path, user: &str) -> Result<()> {
    let out = Command::new("chown")
        .args(["-R", user])
        .arg(p)
        .output()
        .map_err(|e| Error::internal(format!("cannot run chown: {e}")))?;
    if !out.status.success() {
        return Err(Error::internal(format!(
            "cannot give {} to {user}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// A scratch cluster recovered from a backup: stopped and its folder removed when
/// dropped. Reached only through its socket in that folder, trusted.
pub struct ScratchCluster {
    dir: PathBuf,
    data: PathBuf,
    bin: Option<PathBuf>,
    os_user: Option<String>,
    socket: String,
    port: u16,
    db_user: String,
    /// The restore that made it.
    pub restore: crate::postgres::restore::PgRestoreReport,
    /// Its phases so far (restore files, start and recover).
    pub phases: Vec<Phase>,
    /// Why it did not come up (with the server log's tail), when it did not.
    pub failure: Option<String>,
    /// The last transaction replayed.
    pub replayed: Option<DateTime<Utc>>,
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        if let Some(bin) = &self.bin {
            if self.data.join("postmaster.pid").exists() {
                let _ = pg_cmd(bin, "pg_ctl", self.os_user.as_deref())
                    .args(["-D"])
                    .arg(&self.data)
                    .args(["-m", "immediate", "-w", "-t", "60", "stop"])
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Removes a folder when dropped, unless taken.
struct Folder(Option<PathBuf>);

impl Drop for Folder {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl ScratchCluster {
    /// A client program of the cluster's version, connected to it (`-h -p -U`).
    pub fn client(&self, prog: &str) -> Command {
        let mut c = pg_cmd(self.bin(), prog, self.os_user.as_deref());
        c.args([
            "-h",
            &self.socket,
            "-p",
            &self.port.to_string(),
            "-U",
            &self.db_user,
        ]);
        c
    }

    /// One statement on database `db`, its `psql -At` output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        run(
            self.client("psql").args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ]),
            "psql",
        )
    }

    /// The PostgreSQL programs it runs with.
    pub fn bin(&self) -> &Path {
        self.bin.as_deref().unwrap_or(Path::new(""))
    }

    /// Restores the backup `o` picks into a scratch folder and starts it; returns once
    /// recovery has promoted (or failed: then `failure` says why).
    pub fn recover(repo: &Repository, o: &DbDrillOptions) -> Result<ScratchCluster> {
        let dir = tempfile::Builder::new()
            .prefix("custos-drill-")
            .tempdir_in(&o.scratch_parent)
            .map_err(|e| {
                Error::config(format!(
                    "cannot make a scratch folder in {}: {e}",
                    o.scratch_parent.display()
                ))
                .hint("name a writable folder with enough room for the database: [drill] scratch in custos.toml or --scratch")
            })?
            .keep();
        // Removed whatever happens next, until the cluster owns it.
        let mut folder = Folder(Some(dir.clone()));
        if let Some(u) = &o.os_user {
            chown_tree(&dir, u)?;
        }
        let port = free_port()?;
        let hba = dir.join("drill_hba.conf");
        // Only a socket in the scratch folder (0700), trusted: the copy is reachable by no
        // one else, and its own pg_hba.conf (which may ask for passwords) is not used.
        std::fs::write(&hba, "local all all trust\n")
            .map_err(|e| Error::internal(format!("cannot write {}: {e}", hba.display())))?;
        let socket = dir.display().to_string();
        let data = dir.join("data");
        let mut at = Instant::now();
        let r = restore_postgres(
            repo,
            &PgRestoreOptions {
                to: data.clone(),
                target: o.target.clone(),
                snapshot: o.snapshot.clone(),
                cluster: o.cluster.clone(),
                delta: false,
                restore_command: o.restore_command.clone(),
                extra_settings: vec![
                    format!("port = {port}"),
                    "listen_addresses = ''".into(),
                    format!("unix_socket_directories = '{socket}'"),
                    format!("hba_file = '{}'", hba.display()),
                    "archive_mode = off".into(),
                    "hot_standby = on".into(),
                ],
                command_needs: o.command_needs.clone(),
                progress: o.progress,
                cold: false,
            },
        )?;
        if let Some(u) = &o.os_user {
            chown_tree(&dir, u)?;
        }
        let mut phases = vec![Phase {
            name: "restore files".into(),
            seconds: at.elapsed().as_secs_f64(),
        }];
        at = Instant::now();
        let bin = match &o.bin {
            Some(b) => b.clone(),
            None => find_bin(&data)?,
        };
        // A server configured from outside its data directory (Debian) left no
        // postgresql.conf in the backup: the copy gets one holding only what recovery
        // requires to be at least the original's (settings on top go to postgresql.auto.conf).
        let conf = data.join("postgresql.conf");
        if !conf.exists() {
            let controldata = run(
                pg_cmd(&bin, "pg_controldata", o.os_user.as_deref())
                    .arg("-D")
                    .arg(&data),
                "pg_controldata",
            )?;
            std::fs::write(&conf, conf_from_controldata(&controldata))
                .map_err(|e| Error::internal(format!("cannot write {}: {e}", conf.display())))?;
            if let Some(u) = &o.os_user {
                chown_tree(&conf, u)?;
            }
        }
        folder.0 = None;
        let mut c = ScratchCluster {
            dir,
            data,
            bin: Some(bin.clone()),
            os_user: o.os_user.clone(),
            socket,
            port,
            db_user: o.db_user.clone(),
            restore: r,
            phases: vec![],
            failure: None,
            replayed: None,
        };
        let log = c.dir.join("server.log");
        let started = run(
            pg_cmd(&bin, "pg_ctl", o.os_user.as_deref())
                .arg("-D")
                .arg(&c.data)
                .arg("-l")
                .arg(&log)
                .args([
                    "-w",
                    "-t",
                    &o.recovery_timeout.as_secs().max(1).to_string(),
                    "start",
                ]),
            "pg_ctl start",
        );
        // Recovery ends with a promotion: wait until the copy accepts writes.
        let recovered = started.and_then(|_| {
            let deadline = Instant::now() + o.recovery_timeout;
            loop {
                match c.psql("postgres", "SELECT pg_is_in_recovery()") {
                    Ok(v) if v == "f" => return Ok(()),
                    _ if Instant::now() > deadline => {
                        return Err(Error::new(
                            Kind::Check,
                            format!(
                                "recovery did not finish within {} s",
                                o.recovery_timeout.as_secs()
                            ),
                        ))
                    }
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        phases.push(Phase {
            name: "start and recover".into(),
            seconds: at.elapsed().as_secs_f64(),
        });
        c.phases = phases;
        match recovered {
            Err(e) => {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(8)..].join("\n");
                c.failure = Some(format!("{}; server log:\n{tail}", e.message));
            }
            Ok(()) => {
                c.replayed = c
                    .psql(
                        "postgres",
                        "SELECT coalesce(pg_last_xact_replay_timestamp()::text, '')",
                    )
                    .ok()
                    .filter(|s| !s.is_empty())
                    .and_then(|s| {
                        DateTime::parse_from_str(&s, "%Y-%m-%d %H:%M:%S%.f%#z")
                            .ok()
                            .map(|t| t.with_timezone(&Utc))
                    });
            }
        }
        Ok(c)
    }
}

/// A database drill. A failed check is a report with `ok: false` (and the failure named);
/// a restore that cannot be done at all is an error.
pub fn db(repo: &Repository, o: &DbDrillOptions) -> Result<DrillReport> {
    let started = custos_model::clock::now();
    let t0 = Instant::now();
    let c = ScratchCluster::recover(repo, o)?;
    let mut report = DrillReport::new("db", c.restore.snapshot.clone(), started, None);
    report.target = serde_json::to_value(&c.restore.target).unwrap_or_default();
    report.bytes = Some(c.restore.restore.bytes);
    report.wal_files = crate::postgres::restore::preview(
        repo,
        &o.target,
        Some(&c.restore.snapshot),
        o.cluster.as_deref(),
    )
    .ok()
    .map(|p| p.wal_files);
    report.phases = c.phases.clone();
    report.rto_seconds = t0.elapsed().as_secs_f64();
    if let Some(f) = &c.failure {
        report.failure = Some(f.clone());
        return Ok(report);
    }
    report.recovered_to = c.replayed.or(Some(c.restore.backup.stop_time));
    report.rpo_seconds = report
        .recovered_to
        .map(|t| (started - t).num_milliseconds().max(0) as f64 / 1000.0);
    let at = Instant::now();
    let mut checks = vec![];
    if let Target::Time(t) = &o.target {
        let ok = c.replayed.is_none_or(|x| x <= *t);
        checks.push(CheckResult {
            name: "recovery stopped at the target".into(),
            ok,
            detail: format!(
                "last transaction replayed {}, target {}",
                c.replayed.map_or("none".into(), |x| x.to_rfc3339()),
                t.to_rfc3339()
            ),
        });
    }
    let amcheck = run(
        c.client("pg_amcheck")
            .args(["--all", "--install-missing", "--heapallindexed"]),
        "pg_amcheck",
    );
    checks.push(CheckResult {
        name: "pg_amcheck --heapallindexed".into(),
        ok: amcheck.is_ok(),
        detail: match &amcheck {
            Ok(_) => "every table and index of every database is consistent".into(),
            Err(e) => e.message.clone(),
        },
    });
    for sc in &o.checks {
        let got = c.psql("postgres", &sc.sql);
        let (ok, detail) = match &got {
            Ok(v) if v.trim() == sc.expect.trim() => (true, format!("returned {v:?}")),
            Ok(v) => (false, format!("returned {v:?}, expected {:?}", sc.expect)),
            Err(e) => (false, e.message.clone()),
        };
        checks.push(CheckResult {
            name: sc.name.clone(),
            ok,
            detail,
        });
    }
    report.phases.push(Phase {
        name: "checks".into(),
        seconds: at.elapsed().as_secs_f64(),
    });
    report.checks = checks;
    settle(&mut report);
    drop(c);
    Ok(report)
}

fn settle(r: &mut DrillReport) {
    r.ok = r.checks.iter().all(|c| c.ok);
    r.failure = r
        .checks
        .iter()
        .find(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail));
}

/// Every file and its size under `root` (links and folders not counted).
fn walk_files(root: &Path) -> (u64, u64) {
    let (mut n, mut bytes) = (0, 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                n += 1;
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    (n, bytes)
}

/// A files drill: the snapshot restored into a scratch folder (every chunk checked against
/// its id on the way, so each file's content is the snapshot's), then what landed on disk
/// counted against what the restore wrote; the folder removed.
pub fn files(
    repo: &Repository,
    snap: &custos_repo::Snapshot,
    scratch_parent: &Path,
    progress: &dyn Progress,
) -> Result<DrillReport> {
    let started = custos_model::clock::now();
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("custos-drill-")
        .tempdir_in(scratch_parent)
        .map_err(|e| {
            Error::config(format!(
                "cannot make a scratch folder in {}: {e}",
                scratch_parent.display()
            ))
            .hint("name a writable folder with room for the files: [drill] scratch or --scratch")
        })?;
    let mut r = DrillReport::new(
        "files",
        snap.id.to_string(),
        started,
        Some(snap.summary.time),
    );
    let target = dir.path().join("files");
    let rep = crate::restore::restore_files(
        repo,
        snap,
        &target,
        &crate::restore::RestoreOptions {
            subtree: None,
            include: vec![],
            overwrite: false,
            delta: false,
            last: None,
            // A temporary folder, removed with the drill.
            discard_on_failure: true,
            progress,
        },
    )?;
    r.phases.push(Phase {
        name: "restore files".into(),
        seconds: t0.elapsed().as_secs_f64(),
    });
    r.rto_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    r.checks.push(CheckResult {
        name: "every file's content is the snapshot's".into(),
        ok: true,
        detail: format!(
            "{} files, {} bytes, each chunk checked against its id",
            rep.files, rep.bytes
        ),
    });
    let (n, bytes) = walk_files(&target);
    r.checks.push(CheckResult {
        name: "what is on disk is what was restored".into(),
        ok: n == rep.files && bytes == rep.bytes,
        detail: format!(
            "{n} files, {bytes} bytes on disk; the restore wrote {} files, {} bytes",
            rep.files, rep.bytes
        ),
    });
    r.phases.push(Phase {
        name: "checks".into(),
        seconds: t1.elapsed().as_secs_f64(),
    });
    settle(&mut r);
    Ok(r)
}

/// A vector-store drill: the table export restored into a scratch database (created and
/// dropped), its indexes rebuilt, and proven: row counts, the rows' digest, the exact
/// neighbours of the recorded sample queries, the recall of the rebuilt index.
pub fn vector(
    repo: &Repository,
    snap: &custos_repo::Snapshot,
    conn: &custos_sources::postgres::db::ConnectOptions,
) -> Result<DrillReport> {
    let started = custos_model::clock::now();
    let t0 = Instant::now();
    let mut r = DrillReport::new(
        "vector",
        snap.id.to_string(),
        started,
        Some(snap.summary.time),
    );
    let p = crate::tables::restore::verify_tables(repo, snap, conn, "1GB")?;
    r.phases.push(Phase {
        name: "restore, index and prove".into(),
        seconds: t0.elapsed().as_secs_f64(),
    });
    r.rto_seconds = t0.elapsed().as_secs_f64();
    for t in &p.tables {
        r.checks.push(CheckResult {
            name: format!("{}: rows", t.table),
            ok: t.rows_loaded == t.rows_expected && t.digest_matches != Some(false),
            detail: format!(
                "{} loaded of {} recorded; digest {}",
                t.rows_loaded,
                t.rows_expected,
                match t.digest_matches {
                    Some(true) => "matches",
                    Some(false) => "differs",
                    None => "not compared",
                }
            ),
        });
        if t.samples > 0 {
            r.checks.push(CheckResult {
                name: format!("{}: exact neighbours", t.table),
                ok: t.samples_exact == t.samples,
                detail: format!(
                    "{} of {} sample queries return the recorded top 10{}",
                    t.samples_exact,
                    t.samples,
                    t.recall_at_10
                        .map(|x| format!("; rebuilt index recall@10 {x:.3}"))
                        .unwrap_or_default()
                ),
            });
        }
    }
    settle(&mut r);
    Ok(r)
}

/// An audit-log drill: every export chain read back whole, each row hashed, its links
/// followed from the first export to the last.
pub fn audit_log(repo: &Repository, min_retention: chrono::Duration) -> Result<DrillReport> {
    let started = custos_model::clock::now();
    let t0 = Instant::now();
    let chains = crate::tables::audit::verify_chains(repo, None, true, min_retention, started)?;
    if chains.is_empty() {
        return Err(Error::new(Kind::NotFound, "no audit-log exports to drill")
            .hint("export one with `custos backup audit-log --table T --order-by C`"));
    }
    let newest = chains.iter().filter_map(|c| c.last_time).max();
    let mut r = DrillReport::new("audit-log", String::new(), started, newest);
    r.phases.push(Phase {
        name: "read and follow the chains".into(),
        seconds: t0.elapsed().as_secs_f64(),
    });
    r.rto_seconds = t0.elapsed().as_secs_f64();
    for c in &chains {
        r.checks.push(CheckResult {
            name: format!("chain {}", c.chain),
            ok: c.problems.is_empty(),
            detail: if c.problems.is_empty() {
                format!(
                    "{} exports, {} rows, sequence {}..{} continuous",
                    c.exports,
                    c.rows,
                    c.first_seq.unwrap_or(0),
                    c.last_seq.unwrap_or(0)
                )
            } else {
                c.problems.join("; ")
            },
        });
    }
    settle(&mut r);
    Ok(r)
}

/// One table to bring back beside the live ones: its name in the backup, its new name.
#[derive(Debug, Clone, Serialize)]
pub struct Extracted {
    pub table: String,
    pub restored_as: String,
    pub rows: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExtractReport {
    pub snapshot: String,
    /// The last transaction the scratch copy replayed (at or before the target).
    pub recovered_to: Option<DateTime<Utc>>,
    pub tables: Vec<Extracted>,
    pub phases: Vec<Phase>,
    pub seconds: f64,
}

/// A table name as `name` or `schema.name`, letters, digits and `_` only: it goes into SQL.
pub fn check_table_name(n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.split('.').count() <= 2
        && n.split('.').all(|p| {
            !p.is_empty()
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        });
    if !ok {
        return Err(Error::config(format!(
            "`{n}` is not a table name custos takes: name or schema.name, of letters, digits and _"
        )));
    }
    Ok(())
}

/// The "one patient's records were deleted at 3 a.m." restore: a scratch cluster
/// recovered to the target, each table copied from it (its columns and rows, as they were)
/// into the live database under a new name, the row counts compared, the scratch removed.
/// Nothing is written to the live database unless every new name is free there.
pub fn extract_tables(
    repo: &Repository,
    o: &DbDrillOptions,
    database: &str,
    tables: &[(String, String)],
    into: &str,
) -> Result<ExtractReport> {
    let t0 = Instant::now();
    for (t, n) in tables {
        check_table_name(t)?;
        check_table_name(n)?;
    }
    let c = ScratchCluster::recover(repo, o)?;
    if let Some(f) = &c.failure {
        return Err(Error::new(
            Kind::Check,
            format!("the scratch copy did not come up: {f}"),
        ));
    }
    let live = |sql: &str| -> Result<String> {
        run(
            Command::new(c.bin().join("psql")).args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                into,
                "-c",
                sql,
            ]),
            "psql on the target database",
        )
    };
    for (_, n) in tables {
        if live(&format!("SELECT to_regclass('{n}') IS NULL"))? != "t" {
            return Err(Error::config(format!(
                "`{n}` already exists in the target database: nothing was written"
            ))
            .hint("choose another name with --as"));
        }
    }
    let at = Instant::now();
    let mut phases = c.phases.clone();
    let mut out = vec![];
    for (t, n) in tables {
        let staged = format!("custos_extract_{}", out.len());
        c.psql(
            database,
            &format!("CREATE TABLE public.{staged} AS SELECT * FROM {t}"),
        )
        .map_err(|e| {
            Error::new(
                Kind::NotFound,
                format!(
                    "cannot read `{t}` from the backup as of the target: {}",
                    e.message
                ),
            )
        })?;
        let rows: u64 = c
            .psql(database, &format!("SELECT count(*) FROM public.{staged}"))?
            .parse()
            .unwrap_or(0);
        let (schema, name) = n.split_once('.').unwrap_or(("public", n.as_str()));
        c.psql(
            database,
            &format!(
                "CREATE SCHEMA IF NOT EXISTS {schema}; ALTER TABLE public.{staged} RENAME TO {name}; {}",
                if schema == "public" { String::new() } else { format!("ALTER TABLE public.{name} SET SCHEMA {schema};") }
            ),
        )?;
        let mut dump = c
            .client("pg_dump")
            .args([
                "-d",
                database,
                "-t",
                &format!("{schema}.{name}"),
                "--no-owner",
                "--no-privileges",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| Error::new(Kind::Source, format!("cannot run pg_dump: {e}")))?;
        let load = Command::new(c.bin().join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", into])
            .stdin(dump.stdout.take().expect("piped"))
            .output()
            .map_err(|e| Error::new(Kind::Source, format!("cannot run psql: {e}")))?;
        let dumped = dump
            .wait_with_output()
            .map_err(|e| Error::new(Kind::Source, format!("pg_dump: {e}")))?;
        if !dumped.status.success() || !load.status.success() {
            return Err(Error::new(
                Kind::Check,
                format!(
                    "copying `{t}` into the target as `{n}` failed: {}{}",
                    String::from_utf8_lossy(&dumped.stderr).trim(),
                    String::from_utf8_lossy(&load.stderr).trim()
                ),
            ));
        }
        let landed: u64 = live(&format!("SELECT count(*) FROM {schema}.{name}"))?
            .parse()
            .unwrap_or(u64::MAX);
        if landed != rows {
            return Err(Error::new(
                Kind::Check,
                format!("`{n}` holds {landed} rows in the target, the backup had {rows}"),
            ));
        }
        out.push(Extracted {
            table: t.clone(),
            restored_as: format!("{schema}.{name}"),
            rows,
        });
    }
    phases.push(Phase {
        name: "copy tables".into(),
        seconds: at.elapsed().as_secs_f64(),
    });
    let report = ExtractReport {
        snapshot: c.restore.snapshot.clone(),
        recovered_to: c.replayed,
        tables: out,
        phases,
        seconds: 0.0,
    };
    drop(c);
    Ok(ExtractReport {
        seconds: t0.elapsed().as_secs_f64(),
        ..report
    })
}

#[cfg(test)]
mod tests {
    use super::conf_from_controldata;

    #[test]
    fn a_conf_from_controldata_holds_what_hot_standby_needs_and_nothing_odd() {
        let text = "pg_control version number:            1800\n\
                    wal_level setting:                    replica\n\
                    max_connections setting:              150\n\
                    max_worker_processes setting:         12\n\
                    max_wal_senders setting:              10\n\
                    max_prepared_xacts setting:           0\n\
                    max_locks_per_xact setting:           64\n\
                    max_connections setting:              1; shared_preload_libraries = 'x'\n";
        let conf = conf_from_controldata(text);
        let settings: Vec<&str> = conf.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            settings,
            [
                "max_connections = 150",
                "max_worker_processes = 12",
                "max_wal_senders = 10",
                "max_prepared_transactions = 0",
                "max_locks_per_transaction = 64",
            ]
        );
    }
}
