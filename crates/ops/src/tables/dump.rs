//! Logical dumps, for databases where the physical path is closed (Supabase, RDS, Cloud
//! SQL: no `archive_command`, no replication role). `pg_dump` writes the directory format
//! without compression into a private temporary folder, in the snapshot custos exported
//! and counted every table's rows in; custos stores the folder like any other (so days
//! deduplicate against each other) with the versions, the database size and the counts.
//! `restore dump` lays the folder out again, runs `pg_restore`, and counts the rows again.

use std::path::{Path, PathBuf};
use std::process::Command;

use chrono::{DateTime, Utc};
use custos_model::{Error, Kind, Lsn, Result};
use custos_repo::snapshot::SourceKind;
use custos_repo::{Repository, Snapshot};
use custos_sources::postgres::db::{ConnectOptions, Db};
use custos_sources::postgres::tables::version_text;
use serde::{Deserialize, Serialize};

use crate::backup::{BackupOptions, BackupReport};
use crate::postgres::backup::stream::pg_tool;
use crate::progress::Progress;
use crate::restore::{restore_files, RestoreOptions};

pub struct DumpOptions {
    pub conn: ConnectOptions,
    pub jobs: usize,
    pub pg_bin: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableCount {
    pub table: String,
    pub rows: u64,
}

/// What every role reads about a dump.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DumpFacts {
    pub database: String,
    pub server_version_num: i32,
    pub pg_dump_version: String,
    pub database_size: u64,
    pub lsn: Lsn,
    pub snapshot_time: DateTime<Utc>,
    pub tables: Vec<TableCount>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DumpReport {
    pub backup: BackupReport,
    pub facts: DumpFacts,
}

pub fn facts_of(s: &Snapshot) -> Option<DumpFacts> {
    crate::backup::facts(s, SourceKind::Dump)
}

/// A PostgreSQL program's major version from its `--version` line.
fn tool_major(program: &Path) -> Result<(i32, String)> {
    let out = Command::new(program)
        .arg("--version")
        .output()
        .map_err(|e| Error::config(format!("cannot run {}: {e}", program.display())))?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let v = line.rsplit(' ').next().unwrap_or("");
    let major = v
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| {
            Error::config(format!(
                "cannot read the version of {}: `{line}`",
                program.display()
            ))
        })?;
    Ok((major, v.to_string()))
}

/// The program for a server of `major`, no older than it.
fn tool_for(name: &str, major: i32, bin: Option<&Path>) -> Result<(PathBuf, String)> {
    let p = pg_tool(name, major, bin)?;
    let (m, v) = tool_major(&p)?;
    if m < major {
        return Err(Error::new(
            Kind::Config,
            format!(
                "{} is version {v}, older than the server (PostgreSQL {major}): an older {name} cannot read a newer server safely",
                p.display()
            ),
        )
        .hint(format!(
            "install PostgreSQL {major}'s client programs (Debian: postgresql-client-{major}) or name their folder with --pg-bin"
        )));
    }
    Ok((p, v))
}

/// User tables (not partitioned parents, not an extension's) and their row counts in the
/// transaction's snapshot.
fn count_tables(db: &Db) -> Result<Vec<TableCount>> {
    let names = db.texts(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
         AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
         AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                         AND d.objid = c.oid AND d.deptype = 'e') ORDER BY 1",
        &[],
    )?;
    let mut out = vec![];
    for t in names.into_iter().flatten() {
        let n = db
            .text(&format!("SELECT count(*)::text FROM {t}"))?
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        out.push(TableCount { table: t, rows: n });
    }
    Ok(out)
}

fn run_tool(mut c: Command, what: &str, password: Option<&str>) -> Result<()> {
    if let Some(p) = password {
        c.env("PGPASSWORD", p);
    }
    let out = c
        .output()
        .map_err(|e| Error::new(Kind::Source, format!("cannot run {what}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        return Err(Error::new(
            Kind::Source,
            format!(
                "{what} failed ({}):\n{}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        ));
    }
    Ok(())
}

pub fn backup_dump(repo: &Repository, o: &DumpOptions, opts: &BackupOptions) -> Result<DumpReport> {
    repo.require_write("back up")?;
    let db = Db::connect(&o.conn)?;
    let snap = db.begin_export()?;
    let major = snap.server_version_num / 10000;
    let (pg_dump, pg_dump_version) = tool_for("pg_dump", major, o.pg_bin.as_deref())?;
    let size: u64 = db
        .text("SELECT pg_database_size(current_database())::text")?
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let tables = count_tables(&db)?;
    let tmp = tempfile::Builder::new()
        .prefix("custos-dump-")
        .tempdir()
        .map_err(|e| Error::internal(format!("cannot make a temporary folder: {e}")))?;
    let dir = tmp.path().join(&snap.database);
    let (conninfo, password) = o.conn.libpq()?;
    let mut c = Command::new(&pg_dump);
    c.args(["--format=directory", "--compress=0", "--no-password"])
        .arg(format!("--jobs={}", o.jobs.max(1)))
        .arg(format!("--snapshot={}", snap.name))
        .arg("--file")
        .arg(&dir)
        .arg(&conninfo);
    run_tool(c, "pg_dump", password.as_deref())?;
    db.execute("COMMIT")?;
    let facts = DumpFacts {
        database: snap.database.clone(),
        server_version_num: snap.server_version_num,
        pg_dump_version,
        database_size: size,
        lsn: snap.lsn,
        snapshot_time: snap.time,
        tables,
    };
    let backup = crate::files::backup::backup_tree(
        repo,
        &[dir],
        opts,
        SourceKind::Dump,
        Some(format!("dump:{}", snap.database)),
        Some(serde_json::to_value(&facts).expect("serializable")),
    )?;
    Ok(DumpReport { backup, facts })
}

pub struct DumpRestoreOptions<'a> {
    pub conn: ConnectOptions,
    pub jobs: usize,
    pub table: Option<String>,
    pub clean: bool,
    pub pg_bin: Option<PathBuf>,
    pub progress: &'a dyn Progress,
}

#[derive(Debug, Clone, Serialize)]
pub struct CountCheck {
    pub table: String,
    pub expected: u64,
    pub restored: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DumpRestoreReport {
    pub snapshot: String,
    pub server: String,
    pub seconds: f64,
    pub counts: Vec<CountCheck>,
}

pub fn restore_dump(
    repo: &Repository,
    snap: &Snapshot,
    o: &DumpRestoreOptions,
) -> Result<DumpRestoreReport> {
    let start = std::time::Instant::now();
    repo.require_restore("restore a dump")?;
    let facts = facts_of(snap).ok_or_else(|| {
        Error::config(format!(
            "snapshot {} is a {} snapshot, not a dump",
            snap.id.short(),
            snap.summary.kind.as_str()
        ))
        .hint("`custos snapshots` lists dumps with kind `dump`")
    })?;
    let wanted: Vec<&TableCount> = facts
        .tables
        .iter()
        .filter(|t| match &o.table {
            None => true,
            Some(n) => crate::backup::names_table(&t.table, n),
        })
        .collect();
    if o.table.is_some() && wanted.is_empty() {
        return Err(Error::config(format!(
            "the dump holds no table {}",
            o.table.as_deref().unwrap_or("")
        )));
    }
    let db = Db::connect(&o.conn)?;
    let major: i32 = db
        .text("SELECT current_setting('server_version_num')")?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        / 10000;
    let (pg_restore, _) = tool_for(
        "pg_restore",
        major.max(facts.server_version_num / 10000),
        o.pg_bin.as_deref(),
    )?;
    if !o.clean {
        for t in &wanted {
            if db.relation_exists(&t.table)? {
                return Err(Error::new(
                    Kind::Config,
                    format!("table {} already exists in the target database", t.table),
                )
                .hint("restore into an empty database, or pass --clean to drop and recreate what the dump holds"));
            }
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix("custos-dump-")
        .tempdir()
        .map_err(|e| Error::internal(format!("cannot make a temporary folder: {e}")))?;
    let out = tmp.path().join("d");
    restore_files(
        repo,
        snap,
        &out,
        &RestoreOptions {
            subtree: None,
            include: vec![],
            overwrite: false,
            delta: false,
            last: None,
            discard_on_failure: true,
            progress: o.progress,
        },
    )?;
    // One folder backed up is laid out at the top; older layouts kept its name.
    let dir = Some(out.clone())
        .filter(|p| p.join("toc.dat").is_file())
        .or_else(|| {
            std::fs::read_dir(&out)
                .ok()
                .and_then(|mut d| d.next())
                .and_then(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.join("toc.dat").is_file())
        })
        .ok_or_else(|| Error::integrity("the dump snapshot holds no pg_dump folder (toc.dat)"))?;
    let (conninfo, password) = o.conn.libpq()?;
    let mut c = Command::new(&pg_restore);
    c.args(["--no-password", "--exit-on-error"])
        .arg(format!("--jobs={}", o.jobs.max(1)))
        .arg(format!("--dbname={conninfo}"));
    if o.clean {
        c.args(["--clean", "--if-exists"]);
    }
    if let Some(t) = &o.table {
        match t.split_once('.') {
            Some((s, n)) => c.arg(format!("--schema={s}")).arg(format!("--table={n}")),
            None => c.arg(format!("--table={t}")),
        };
    }
    c.arg(&dir);
    run_tool(c, "pg_restore", password.as_deref())?;
    drop(tmp);
    let mut counts = vec![];
    for t in wanted {
        let n = db
            .text(&format!("SELECT count(*)::text FROM {}", t.table))?
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        counts.push(CountCheck {
            table: t.table.clone(),
            expected: t.rows,
            restored: n,
        });
    }
    if let Some(bad) = counts.iter().find(|c| c.expected != c.restored) {
        return Err(Error::integrity(format!(
            "{} holds {} rows after the restore; the dump recorded {}",
            bad.table, bad.restored, bad.expected
        )));
    }
    Ok(DumpRestoreReport {
        snapshot: snap.id.to_hex(),
        server: version_text(facts.server_version_num),
        seconds: start.elapsed().as_secs_f64(),
        counts,
    })
}
