//! `custos restore ...`: files into a folder, a PostgreSQL cluster to a point in time, a
//! stream to standard output.

use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;
use custos_model::{ByteSize, Error, Result};
use custos_ops::restore;
use custos_repo::snapshot::SourceKind;

use crate::context::Ctx;
use crate::output::mb_per_s;

#[derive(Subcommand)]
pub(crate) enum RestoreCommand {
    /// Restore a file snapshot into a folder. Paths keep their place in the snapshot
    /// (--include restores some of them, under the same folders); SNAPSHOT:PATH restores
    /// what lies under PATH into the folder itself.
    #[command(
        after_help = "Examples:\n  custos restore files latest --to /restore --include documents/patient-0042   # /restore/documents/patient-0042\n  custos restore files latest:documents/patient-0042 --to /restore/patient-0042  # its files right in it"
    )]
    Files {
        /// The snapshot: an id (prefix) or `latest` (the newest of the right kind), with
        /// `:PATH` to restore only what lies under PATH, into the target itself
        snapshot: String,
        /// The folder to restore into (created if missing; must be empty without
        /// --overwrite or --delta)
        #[arg(long)]
        to: PathBuf,
        /// Restore only this path of the snapshot, under the folders it is in (repeatable)
        #[arg(long)]
        include: Vec<String>,
        /// Allow a non-empty target folder; its files that are in the snapshot are replaced
        #[arg(long, conflicts_with = "delta")]
        overwrite: bool,
        /// Make the target folder equal to the snapshot: rewrite only the blocks that differ
        /// and remove what the snapshot does not hold
        #[arg(long)]
        delta: bool,
        /// With `latest`: the latest snapshot of this source
        #[arg(long)]
        source: Option<String>,
    },
    /// Restore a PostgreSQL cluster to a point in time into a data directory
    #[command(
        after_help = "Example:\n  CUSTOS_PASSWORD_FILE=/etc/custos/restore.pw custos restore postgres --to /var/lib/postgresql/18/restored \\\n      --target-time '2026-11-28 02:55:00+00' --port 5433 --no-archiving"
    )]
    Postgres {
        /// The data directory to create (or correct in place with --delta)
        #[arg(long, required_unless_present_any = ["preview", "extract_table"])]
        to: Option<PathBuf>,
        /// Recover to this time, with its zone: `2026-01-31 02:00:00+01`, `... UTC`, or RFC 3339
        #[arg(long, value_name = "TIME", group = "target_kind")]
        target_time: Option<String>,
        /// Recover to this WAL position (like 0/3000060)
        #[arg(long, value_name = "LSN", group = "target_kind")]
        target_lsn: Option<String>,
        /// Recover up to and including this transaction id
        #[arg(long, value_name = "XID", group = "target_kind")]
        target_xid: Option<u64>,
        /// Recover to a restore point made with pg_create_restore_point()
        #[arg(long, value_name = "NAME", group = "target_kind")]
        target_name: Option<String>,
        /// `immediate`: stop as soon as the backup is consistent. Default: replay all archived WAL
        #[arg(long, value_parser = ["immediate"], group = "target_kind")]
        target: Option<String>,
        /// Restore this base backup (default: the newest that ends before the target)
        #[arg(long)]
        snapshot: Option<String>,
        /// The cluster (name or system id) when the repository holds several
        #[arg(long)]
        cluster: Option<String>,
        /// Correct an existing data directory: rewrite only blocks that differ, remove extra files
        #[arg(long)]
        delta: bool,
        /// restore_command to write (default: this custos with the same repository and password source)
        #[arg(long, value_name = "COMMAND")]
        restore_command: Option<String>,
        /// Port for the restored server (to run it beside the original)
        #[arg(long)]
        port: Option<u16>,
        /// Folder for the restored server's Unix socket (`unix_socket_directories`): the
        /// backed-up configuration names the original host's, which may not exist here
        #[arg(long, value_name = "DIR")]
        socket_dir: Option<PathBuf>,
        /// Turn archiving off in the restored server: for drills and copies, so they do not
        /// archive a new timeline into the production repository
        #[arg(long)]
        no_archiving: bool,
        /// Write nothing: which backup, how much to restore and replay, and the RTO
        /// estimated from the throughput measured by earlier drills
        #[arg(long, conflicts_with_all = ["to", "delta"])]
        preview: bool,
        /// Bring this table back as it was at the target, beside the live ones (repeatable):
        /// a scratch cluster is recovered, the table copied into --into under --as, the
        /// scratch removed
        #[arg(long, value_name = "TABLE", requires = "into", conflicts_with_all = ["to", "delta", "preview"])]
        extract_table: Vec<String>,
        /// With --extract-table: the live database to copy into (libpq URL or conninfo; its
        /// password from ~/.pgpass or PGPASSFILE, never the command line)
        #[arg(long, value_name = "URL")]
        into: Option<String>,
        /// With --extract-table: the new name of each table, in order (default TABLE_restored)
        #[arg(long = "as", value_name = "NAME")]
        as_names: Vec<String>,
        /// With --extract-table: the database in the backup the tables are in
        #[arg(long, value_name = "NAME", default_value = "postgres")]
        database: String,
    },
    /// Restore tables of a table snapshot, rebuild their indexes and prove them (row count,
    /// digest, sample nearest neighbours, recall of the rebuilt vector index)
    #[command(
        after_help = "Examples:\n  custos restore table latest --db-url postgresql://postgres@db/app --table document_embeddings --as document_embeddings_restored\n  custos restore table latest --table clinical_notes --as notes_patient_42 --where \"patient_id = 42\""
    )]
    Table(crate::commands::tables::TableRestoreArgs),
    /// Load audit-log exports of a period into a new table, checking their chain
    #[command(
        name = "audit-log",
        after_help = "Example:\n  custos restore audit-log --as audit_log_2026_11 --since 2026-11-01T00:00:00Z --until 2026-12-01T00:00:00Z"
    )]
    AuditLog(crate::commands::tables::AuditLogRestoreArgs),
    /// Restore a logical dump with pg_restore and check every table's row count
    #[command(
        after_help = "Example:\n  custos restore dump latest --db-url postgresql://postgres@localhost/scratch --table patients"
    )]
    Dump(crate::commands::tables::DumpRestoreArgs),
    /// Restore every part of one recovery point (`custos points`) into a folder: files
    /// and configuration as they were, the database's data directory recovering to the
    /// point's WAL position; [restore_all] pre, post and on_failure hooks around it, each
    /// step timed; a failed step stops the run and says which. With --target-time: the
    /// newest point taken at or before that time, and the database recovering to the time
    /// itself
    #[command(
        after_help = "Examples:\n  custos restore all --point 3f2a9c0d11e4b7a2 --to /srv/restore/2026-12-04\n  custos restore all --target-time '2026-12-04 02:55:00+00' --to /srv/restore/before-incident"
    )]
    All {
        /// The recovery point's id (default: the newest)
        #[arg(long, conflicts_with = "target_time")]
        point: Option<String>,
        /// A time (with its zone): files and configuration from the newest point taken at
        /// or before it, the database recovering to exactly this time (its WAL must reach it)
        #[arg(long, value_name = "TIME")]
        target_time: Option<String>,
        /// The folder to restore into (created; must be empty)
        #[arg(long)]
        to: PathBuf,
        /// The port the restored database will listen on (default: the source's; set
        /// one when the source still runs on this host)
        #[arg(long, value_name = "PORT")]
        port: Option<u16>,
    },
    /// Write an env snapshot as an env file: plain values, and secrets as comments naming
    /// where they live
    #[command(
        after_help = "Example:\n  custos restore env latest --source platform-env --to /tmp/platform.env"
    )]
    Env(crate::commands::config::EnvRestoreArgs),
    /// Write a stream snapshot to standard output
    #[command(
        after_help = "Example:\n  custos restore stream latest --source terraform > terraform.tfstate"
    )]
    Stream {
        /// The snapshot: an id (prefix) or `latest`
        snapshot: String,
        /// With `latest`: the latest snapshot of this stream name
        #[arg(long)]
        source: Option<String>,
    },
}

pub(crate) fn cmd_restore(ctx: &Ctx, r: RestoreCommand) -> Result<i32> {
    // A delta restore reads the target folder first: no read-ahead to compete with it.
    let delta = matches!(r, RestoreCommand::Postgres { delta: true, .. });
    let repo = if delta {
        ctx.open()?
    } else {
        ctx.open_to_restore()?
    };
    repo.require_restore("restore")?;
    match r {
        RestoreCommand::Files {
            snapshot,
            to,
            include,
            overwrite,
            delta,
            source,
        } => {
            let (spec, subtree) = match snapshot.split_once(':') {
                Some((spec, path)) => (spec.to_string(), Some(path.to_string())),
                None => (snapshot.clone(), None),
            };
            let snap =
                repo.find_snapshot(&spec, |s: &custos_repo::SnapshotSummary| match &source {
                    Some(src) => s.source == *src && s.kind != SourceKind::Stream,
                    None => s.kind != SourceKind::Stream,
                })?;
            ctx.cold_gate(&repo, &snap)?;
            let progress = ctx.out.progress();
            let rep = restore::restore_files(
                &repo,
                &snap,
                &to,
                &restore::RestoreOptions {
                    subtree,
                    include,
                    overwrite,
                    delta,
                    last: None,
                    discard_on_failure: false,
                    progress: progress.as_ref(),
                },
            )?;
            ctx.touch(
                serde_json::json!({"snapshot": snap.id, "files": rep.files, "bytes": rep.bytes}),
            );
            if ctx.out.json {
                ctx.out.json(&rep);
            } else {
                println!("restored snapshot {} to {}", snap.id.short(), rep.target);
                println!(
                    "  {} files, {} folders, {} links, {} in {:.1} s ({})",
                    rep.files,
                    rep.dirs,
                    rep.symlinks,
                    ByteSize(rep.bytes),
                    rep.duration_ms as f64 / 1000.0,
                    mb_per_s(rep.bytes, rep.duration_ms)
                );
            }
        }
        RestoreCommand::Postgres {
            to,
            target_time,
            target_lsn,
            target_xid,
            target_name,
            target,
            snapshot,
            cluster,
            delta,
            restore_command,
            port,
            socket_dir,
            no_archiving,
            preview,
            extract_table,
            into,
            as_names,
            database,
        } => {
            if !extract_table.is_empty() {
                let target = target_of(target_time, target_lsn, target_xid, target_name, target)?;
                return extract(
                    ctx,
                    &repo,
                    target,
                    snapshot,
                    cluster,
                    &extract_table,
                    &as_names,
                    &database,
                    &into.unwrap_or_default(),
                );
            }
            let to = match (to, preview) {
                (_, true) | (None, _) => {
                    return preview_postgres(
                        ctx,
                        &repo,
                        target_time,
                        target_lsn,
                        target_xid,
                        target_name,
                        target,
                        snapshot,
                        cluster,
                    )
                }
                (Some(to), false) => to,
            };
            let mut extra_settings = vec![];
            if let Some(p) = port {
                extra_settings.push(format!("port = {p}"));
            }
            if let Some(d) = &socket_dir {
                extra_settings.push(socket_setting(d)?);
            }
            if no_archiving {
                extra_settings.push("archive_mode = off".to_string());
            }
            use custos_ops::postgres::restore::{restore_postgres, PgRestoreOptions, Target};
            let target = target_of(target_time, target_lsn, target_xid, target_name, target)?;
            let (restore_command, command_needs) = match restore_command {
                Some(c) => (c, vec![]),
                None => (
                    ctx.settings.restore_command(&ctx.env)?,
                    ctx.settings.restore_command_files(&ctx.env),
                ),
            };
            if let Target::Time(t) = &target {
                // Said once in both zones, so that a misread zone shows before the restore.
                if !ctx.out.quiet {
                    eprintln!(
                        "custos: recovering to {} ({} on this host)",
                        t.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
                        t.with_timezone(&chrono::Local)
                            .format("%Y-%m-%d %H:%M:%S%.3f %:z")
                    );
                }
            }
            let progress = ctx.out.progress();
            let r = restore_postgres(
                &repo,
                &PgRestoreOptions {
                    to: to.clone(),
                    target,
                    snapshot,
                    cluster,
                    delta,
                    restore_command,
                    extra_settings,
                    command_needs,
                    progress: progress.as_ref(),
                    cold: ctx.request_cold,
                },
            )?;
            ctx.touch(serde_json::json!({"snapshot": r.snapshot, "target": r.target, "to": r.data_directory, "bytes": r.restore.bytes, "risky_settings": r.risky_settings.len()}));
            // The restored configuration came from whoever wrote the snapshot (a backup
            // key): what in it runs commands or loads code is named before anyone starts
            // the server, on stderr, with --json too.
            if !r.risky_settings.is_empty() {
                let w = &r.written_by;
                eprintln!(
                    "custos: warning: the restored configuration runs commands or loads code; check these before starting the server (snapshot written by {} key {} on {}):",
                    w.role.as_deref().unwrap_or("a removed"),
                    w.key.short(),
                    custos_model::path::escape(&w.host)
                );
                for s in &r.risky_settings {
                    eprintln!(
                        "  {}:{}: {} = '{}' ({})",
                        s.file,
                        s.line,
                        s.name,
                        custos_model::path::escape(&s.value),
                        s.does
                    );
                }
            }
            for w in &r.warnings {
                eprintln!("custos: warning: {w}");
            }
            if ctx.out.json {
                ctx.out.json(&r);
            } else {
                let b = &r.backup;
                println!(
                    "restored {} backup {} of cluster {} (consistent from {}) to {}",
                    b.backup_type.as_str(),
                    &r.snapshot[..8],
                    b.system_id,
                    b.stop_time.format("%Y-%m-%d %H:%M:%S UTC"),
                    r.data_directory
                );
                let x = &r.restore;
                println!(
                    "  {} files, {} written in {:.1} s ({}){}",
                    x.files,
                    ByteSize(x.bytes),
                    x.duration_ms as f64 / 1000.0,
                    mb_per_s(x.bytes, x.duration_ms),
                    if delta {
                        format!(
                            "; delta: {} already right, {} path(s) removed",
                            ByteSize(x.bytes_unchanged),
                            x.removed
                        )
                    } else {
                        String::new()
                    }
                );
                if let Some((seg, at)) = &r.archive_end {
                    println!(
                        "  archived WAL reaches {seg}{}",
                        at.map(|t| format!(" (archived {})", t.format("%Y-%m-%d %H:%M:%S UTC")))
                            .unwrap_or_default()
                    );
                }
                println!("  recovery settings (postgresql.auto.conf, with recovery.signal):");
                for s in &r.settings {
                    println!("    {s}");
                }
                println!("start it as the owner of the folder, for example:");
                println!(
                    "  runuser -u postgres -- pg_ctl -D {} -l {}/restore.log start",
                    r.data_directory, r.data_directory
                );
                println!("PostgreSQL fetches and replays the WAL up to the target, then promotes and accepts writes.");
                if port.is_none() {
                    println!("(Pass --port, or change `port`, if the original server runs on this host.)");
                }
                if !no_archiving {
                    println!("Archiving stays on: once promoted, the server archives a new timeline into this repository (--no-archiving for a drill or a copy).");
                }
            }
        }
        RestoreCommand::All {
            point,
            target_time,
            to,
            port,
        } => {
            let at = target_time.as_deref().map(parse_target_time).transpose()?;
            return restore_all(ctx, &repo, point.as_deref(), at, &to, port);
        }
        RestoreCommand::Env(a) => return crate::commands::config::restore_env(ctx, &repo, a),
        RestoreCommand::Table(a) => return crate::commands::tables::restore_table(ctx, &repo, a),
        RestoreCommand::AuditLog(a) => {
            return crate::commands::tables::restore_audit_log(ctx, &repo, a)
        }
        RestoreCommand::Dump(a) => return crate::commands::tables::restore_dump(ctx, &repo, a),
        RestoreCommand::Stream { snapshot, source } => {
            let snap = repo.find_snapshot(&snapshot, |s: &custos_repo::SnapshotSummary| {
                s.kind == SourceKind::Stream && source.as_deref().is_none_or(|src| s.source == src)
            })?;
            ctx.cold_gate(&repo, &snap)?;
            ctx.touch(serde_json::json!({"snapshot": snap.id}));
            let stdout = std::io::stdout();
            let mut lock = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
            restore::restore_stream(&repo, &snap, &mut lock)?;
            lock.flush().map_err(|e| Error::internal(e.to_string()))?;
        }
    }
    Ok(0)
}

/// Runs a hook (`sh -c`), with the point and the folder in its environment.
fn hook(cmd: &str, point: &str, to: &std::path::Path) -> Result<()> {
    let o = std::process::Command::new("sh")
        .args(["-c", cmd])
        .env("CUSTOS_POINT", point)
        .env("CUSTOS_RESTORE_DIR", to)
        .output()
        .map_err(|e| Error::config(format!("cannot run hook `{cmd}`: {e}")))?;
    if !o.status.success() {
        return Err(Error::new(
            custos_model::Kind::Source,
            format!(
                "hook `{cmd}` failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// A source name as one folder name.
fn folder_name(s: &str) -> String {
    let n: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    n.trim_start_matches('.').to_string()
}

/// One timed step of `restore all`: its name and what it does (a line of detail).
type Step<'a> = dyn FnMut(String, &mut dyn FnMut() -> Result<String>) -> Result<()> + 'a;

fn restore_all(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    point: Option<&str>,
    at: Option<chrono::DateTime<chrono::Utc>>,
    to: &std::path::Path,
    port: Option<u16>,
) -> Result<i32> {
    let points: Vec<serde_json::Value> = crate::commands::snapshots::points(repo)?
        .into_iter()
        .filter_map(|(p, ok)| ok.then_some(p))
        .collect();
    let taken = |p: &serde_json::Value| {
        p["time"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    };
    let p = match (point, at) {
        (Some(id), _) => points
            .iter()
            .find(|p| p["id"].as_str().is_some_and(|x| x.starts_with(id))),
        (None, Some(t)) => points
            .iter()
            .rfind(|p| taken(p).is_some_and(|d| d <= t)),
        (None, None) => points.last(),
    }
    .ok_or_else(|| match at {
        Some(t) => Error::new(
            custos_model::Kind::NotFound,
            format!(
                "no recovery point was taken at or before {}",
                t.to_rfc3339()
            ),
        )
        .hint("`custos points` lists them with their times; `custos restore postgres --target-time` restores the database alone"),
        None => Error::new(
            custos_model::Kind::NotFound,
            format!("there is no recovery point {}", point.unwrap_or("")),
        )
        .hint("`custos points` lists them; `custos backup all` records one"),
    })?
    .clone();
    let id = p["id"].as_str().unwrap_or("").to_string();
    if to.exists()
        && std::fs::read_dir(to)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::config(format!("{} is not empty", to.display()))
            .hint("restore all writes into a new or empty folder"));
    }
    let hooks = &ctx.settings.file.restore_all;
    let mut steps: Vec<serde_json::Value> = vec![];
    let started = std::time::Instant::now();
    let mut step = |name: String, f: &mut dyn FnMut() -> Result<String>| -> Result<()> {
        let t = std::time::Instant::now();
        let r = f();
        let secs = t.elapsed().as_secs_f64();
        match &r {
            Ok(d) => {
                if !ctx.out.quiet && !ctx.out.json {
                    println!("  {name:<40} {secs:>7.1} s  {d}");
                }
                steps.push(
                    serde_json::json!({"step": name, "seconds": secs, "ok": true, "detail": d}),
                );
            }
            Err(e) => {
                steps.push(serde_json::json!({"step": name, "seconds": secs, "ok": false, "detail": e.message}));
            }
        }
        r.map(|_| ())
            .map_err(|e| e.context(format!("restore all stopped at `{name}`")))
    };
    let run = |step: &mut Step| -> Result<()> {
        for h in &hooks.pre {
            step(format!("pre-hook: {h}"), &mut || {
                hook(h, &id, to).map(|_| "ok".into())
            })?;
        }
        std::fs::create_dir_all(to)
            .map_err(|e| custos_model::error::io_error(custos_model::Kind::Config, to, e))?;
        for part in p["parts"].as_array().into_iter().flatten() {
            let (Some(sid), Some(source), Some(kind)) = (
                part["snapshot"].as_str(),
                part["source"].as_str(),
                part["kind"].as_str(),
            ) else {
                continue;
            };
            let snap = repo.find_snapshot(sid, |_: &custos_repo::SnapshotSummary| true)?;
            let dest = to.join(folder_name(part["name"].as_str().unwrap_or(source)));
            step(format!("{kind} {source}"), &mut || {
                ctx.cold_gate(repo, &snap)?;
                let body = repo.snapshot_body(&snap.id)?;
                match kind {
                    "table" | "audit-log" | "dump" => Ok(format!(
                        "rows are in the database restored to the point; the export stays in snapshot {} (`custos restore {kind}`)",
                        snap.id.short()
                    )),
                    "env" => {
                        let text = custos_ops::config::env_file(repo, &snap)?;
                        std::fs::write(dest.with_extension("env"), text)
                            .map_err(|e| Error::internal(e.to_string()))?;
                        Ok(format!("{}.env", dest.display()))
                    }
                    _ if body.manifest.is_empty() => {
                        let mut f = std::fs::File::create(&dest)
                            .map_err(|e| Error::internal(format!("{}: {e}", dest.display())))?;
                        let n = restore::restore_stream(repo, &snap, &mut f)?;
                        Ok(format!("{} ({})", dest.display(), ByteSize(n)))
                    }
                    _ => {
                        let progress = ctx.out.progress();
                        let r = restore::restore_files(
                            repo,
                            &snap,
                            &dest,
                            &restore::RestoreOptions {
                                subtree: None,
                                include: vec![],
                                overwrite: false,
                                delta: false,
                                last: None,
                                discard_on_failure: false,
                                progress: progress.as_ref(),
                            },
                        )?;
                        Ok(format!("{} ({} files, {})", dest.display(), r.files, ByteSize(r.bytes)))
                    }
                }
            })?;
        }
        if let Some(lsn) = p["database"]["lsn"].as_str() {
            use custos_ops::postgres::restore::{restore_postgres, PgRestoreOptions, Target};
            let dir = to.join("postgres");
            // At a time, the database goes to the time itself: the point only chose the
            // files; the WAL archive carries the database further.
            let (name, target) = match at {
                Some(t) => (format!("database to {}", t.to_rfc3339()), Target::Time(t)),
                None => (format!("database to WAL {lsn}"), Target::Lsn(lsn.parse()?)),
            };
            step(name, &mut || {
                let progress = ctx.out.progress();
                let r = restore_postgres(
                    repo,
                    &PgRestoreOptions {
                        to: dir.clone(),
                        target: target.clone(),
                        snapshot: None,
                        cluster: p["database"]["system_id"].as_str().map(String::from),
                        delta: false,
                        restore_command: ctx.settings.restore_command(&ctx.env)?,
                        // Not archiving: a copy must not write into the source's archive.
                        extra_settings: std::iter::once("archive_mode = off".to_string())
                            .chain(port.map(|p| format!("port = {p}")))
                            .collect(),
                        command_needs: ctx.settings.restore_command_files(&ctx.env),
                        progress: progress.as_ref(),
                        cold: ctx.request_cold,
                    },
                )?;
                Ok(format!(
                    "{} from snapshot {}; start it to replay to the target",
                    r.data_directory,
                    &r.snapshot[..8]
                ))
            })?;
        }
        for h in &hooks.post {
            step(format!("post-hook: {h}"), &mut || {
                hook(h, &id, to).map(|_| "ok".into())
            })?;
        }
        Ok(())
    };
    let result = run(&mut step);
    if let Err(e) = &result {
        for h in &hooks.on_failure {
            if let Err(f) = hook(h, &id, to) {
                eprintln!("custos: warning: {}", f.message);
            }
        }
        ctx.touch(serde_json::json!({"point": id, "steps": steps, "error": e.message}));
    } else {
        let done = serde_json::json!({
            "point": id,
            "target_time": at.map(|t| t.to_rfc3339()),
            "steps": steps,
            "seconds": started.elapsed().as_secs_f64(),
        });
        ctx.touch(done.clone());
        if ctx.out.json {
            ctx.out.json(&done);
        } else {
            println!(
                "recovery point {id} restored into {} in {:.1} s",
                to.display(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    result.map(|_| 0)
}

fn target_of(
    target_time: Option<String>,
    target_lsn: Option<String>,
    target_xid: Option<u64>,
    target_name: Option<String>,
    target: Option<String>,
) -> Result<custos_ops::postgres::restore::Target> {
    use custos_ops::postgres::restore::Target;
    Ok(if let Some(t) = target_time {
        Target::Time(parse_target_time(&t)?)
    } else if let Some(l) = target_lsn {
        Target::Lsn(l.parse()?)
    } else if let Some(x) = target_xid {
        Target::Xid(x)
    } else if let Some(n) = target_name {
        Target::Name(n)
    } else if target.is_some() {
        Target::Immediate
    } else {
        Target::Latest
    })
}

/// What the newest passed database drills measured: bytes restored a second, and seconds
/// of recovery per WAL file replayed (the start included).
fn measured_rates(
    repo: &custos_repo::Repository,
) -> Result<Option<(f64, f64, chrono::DateTime<chrono::Utc>)>> {
    let mut best = None;
    for r in repo.trail_verify()? {
        let Some(e) = r.entry else { continue };
        if !e.command.starts_with("drill ") || e.result != "ok" {
            continue;
        }
        let parts: Vec<&serde_json::Value> = match e.touched["parts"].as_array() {
            Some(p) => p.iter().collect(),
            None => vec![&e.touched],
        };
        for d in parts
            .into_iter()
            .filter(|d| d["kind"] == "db" && d["ok"] == true)
        {
            let phase = |n: &str| {
                d["phases"]
                    .as_array()
                    .and_then(|p| p.iter().find(|x| x["name"] == n))
                    .and_then(|x| x["seconds"].as_f64())
            };
            if let (Some(bytes), Some(rs), Some(rec)) = (
                d["bytes"].as_f64(),
                phase("restore files"),
                phase("start and recover"),
            ) {
                let wal = d["wal_files"].as_f64().unwrap_or(0.0).max(1.0);
                best = Some((bytes / rs.max(0.001), rec / wal, e.time));
            }
        }
    }
    Ok(best)
}

#[allow(clippy::too_many_arguments)]
fn preview_postgres(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    target_time: Option<String>,
    target_lsn: Option<String>,
    target_xid: Option<u64>,
    target_name: Option<String>,
    target: Option<String>,
    snapshot: Option<String>,
    cluster: Option<String>,
) -> Result<i32> {
    let target = target_of(target_time, target_lsn, target_xid, target_name, target)?;
    let p = custos_ops::postgres::restore::preview(
        repo,
        &target,
        snapshot.as_deref(),
        cluster.as_deref(),
    )?;
    let rates = measured_rates(repo)?;
    let estimate =
        rates.map(|(bps, per_wal, _)| p.bytes as f64 / bps + p.wal_files.max(1) as f64 * per_wal);
    if ctx.out.json {
        ctx.out.json(
            &serde_json::json!({"preview": p, "rto_estimate_seconds": estimate,
            "measured_by_drill_at": rates.map(|r| r.2)}),
        );
        return Ok(0);
    }
    println!(
        "would restore snapshot {} ({} backup of {}, ended {})",
        &p.snapshot[..8],
        p.backup.backup_type.as_str(),
        p.backup.cluster.as_deref().unwrap_or("the cluster"),
        p.backup.stop_time.format("%Y-%m-%d %H:%M:%S UTC")
    );
    println!("  writes {} of data files", ByteSize(p.bytes));
    println!(
        "  replays about {} archived WAL file(s) ({})",
        p.wal_files,
        ByteSize(p.wal_bytes)
    );
    match (estimate, rates) {
        (Some(s), Some((bps, per_wal, at))) => println!(
            "  estimated RTO: {s:.0} s (the drill of {}: restore {}/s, {per_wal:.2} s of recovery per WAL file)",
            at.format("%Y-%m-%d %H:%M UTC"),
            ByteSize(bps as u64)
        ),
        _ => println!("  no RTO estimate: no database drill has been measured yet (`custos drill db`)"),
    }
    println!("nothing was written");
    Ok(0)
}

#[allow(clippy::too_many_arguments)]
fn extract(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    target: custos_ops::postgres::restore::Target,
    snapshot: Option<String>,
    cluster: Option<String>,
    tables: &[String],
    names: &[String],
    database: &str,
    into: &str,
) -> Result<i32> {
    if !names.is_empty() && names.len() != tables.len() {
        return Err(Error::config(format!(
            "{} --extract-table but {} --as: give one new name per table, or none",
            tables.len(),
            names.len()
        )));
    }
    let pairs: Vec<(String, String)> = tables
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let n = names
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("{}_restored", t.rsplit('.').next().unwrap_or(t)));
            (t.clone(), n)
        })
        .collect();
    let progress = ctx.out.progress();
    let o = crate::commands::drill::db_options(
        ctx,
        target,
        snapshot,
        cluster,
        None,
        None,
        progress.as_ref(),
    )?;
    let r = custos_ops::drill::extract_tables(repo, &o, database, &pairs, into)?;
    ctx.touch(serde_json::json!({"snapshot": r.snapshot, "recovered_to": r.recovered_to, "tables": r.tables}));
    if ctx.out.json {
        ctx.out.json(&r);
    } else {
        println!(
            "recovered snapshot {} in a scratch cluster to {} and copied:",
            &r.snapshot[..8],
            r.recovered_to.map_or("the backup's end".into(), |t| t
                .format("%Y-%m-%d %H:%M:%S%.3f UTC")
                .to_string())
        );
        for t in &r.tables {
            println!("  {} -> {} ({} rows)", t.table, t.restored_as, t.rows);
        }
        println!("in {:.1} s; the scratch cluster is removed", r.seconds);
    }
    Ok(0)
}

/// A recovery target time, which must say its zone: a time read in the wrong zone
/// restores the wrong hour, silently (PostgreSQL, pgBackRest and this host may each assume
/// another zone).
pub(crate) fn parse_target_time(t: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    use chrono::{DateTime, NaiveDateTime, Utc};
    let trimmed = t.trim();
    let utc = ["UTC", "GMT", "Z"]
        .iter()
        .find_map(|z| trimmed.strip_suffix(z).map(str::trim_end));
    let zoned = utc.map_or(trimmed.to_string(), |s| format!("{s}+00:00"));
    if let Ok(d) = DateTime::parse_from_rfc3339(&zoned) {
        return Ok(d.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(d) = DateTime::parse_from_str(&zoned, f) {
            return Ok(d.with_timezone(&Utc));
        }
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ] {
        if NaiveDateTime::parse_from_str(trimmed, f).is_ok() {
            let here = chrono::Local::now().format("%:z");
            return Err(Error::config(format!(
                "--target-time `{t}` does not say its time zone"
            ))
            .hint(format!(
                "add it: `{trimmed}+00` for UTC, or `{trimmed}{here}` for this host's zone (a server may log in yet another zone: check its log_timezone)"
            )));
        }
    }
    Err(Error::config(format!(
        "--target-time `{t}` is not a time like `2026-01-31 02:00:00+01` or 2026-01-31T02:00:00Z"
    )))
}

/// `unix_socket_directories` naming `dir`, quoted for postgresql.auto.conf. A folder the
/// server cannot be told of in one line, or a relative one (it would be taken from the
/// data directory), is refused.
fn socket_setting(dir: &std::path::Path) -> Result<String> {
    let d = dir
        .to_str()
        .filter(|d| d.starts_with('/') && !d.contains(|c: char| c.is_control() || c == ','));
    let Some(d) = d else {
        return Err(Error::config(format!(
            "--socket-dir {}: give an absolute folder without commas or control characters",
            dir.display()
        )));
    };
    Ok(format!(
        "unix_socket_directories = '{}'",
        d.replace('\'', "''")
    ))
}
