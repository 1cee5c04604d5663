//! `custos backup ...`: folders, buckets, streams, PostgreSQL base backups, and every
//! source of custos.toml; what a backup reports.

use std::path::PathBuf;

use clap::Subcommand;
use custos_model::{ByteSize, Error, Kind, Result};
use custos_ops::postgres::backup as pg_backup;
use custos_ops::{backup, files};
use custos_repo::snapshot::{PgBackupType, SourceKind};
use custos_storage::url::Location;

use crate::context::Ctx;
use crate::output::mb_per_s;

#[derive(Subcommand)]
pub(crate) enum BackupCommand {
    /// Back up folders, or a bucket given as s3://bucket/prefix
    #[command(
        after_help = "Example:\n  custos backup files /srv/documents /etc/platform --tag daily"
    )]
    Files {
        /// Folders or files to back up, or one bucket as s3://bucket/prefix; several paths
        /// sit in the snapshot under their own names
        #[arg(required = true)]
        paths: Vec<String>,
        /// A tag for the snapshot (repeat for more)
        #[arg(long)]
        tag: Vec<String>,
        /// Record this time (RFC 3339) instead of now, e.g. when importing older backups
        #[arg(long, value_name = "TIME")]
        time: Option<String>,
    },
    /// Back up standard input, or the output of --command
    #[command(
        after_help = "Example:\n  custos backup stream --name terraform --command 'terraform state pull'"
    )]
    Stream {
        /// The stream's name in listings (restore it with `--source NAME`)
        #[arg(long)]
        name: String,
        /// Command whose output is backed up; it must exit 0 for the backup to count
        #[arg(long)]
        command: Option<String>,
        /// A tag for the snapshot (repeat for more)
        #[arg(long)]
        tag: Vec<String>,
        /// Record this time (RFC 3339) instead of now
        #[arg(long, value_name = "TIME")]
        time: Option<String>,
    },
    /// Base backup of a running PostgreSQL cluster (15 or later, primary or standby): its
    /// data directory read between pg_backup_start and pg_backup_stop, or streamed by
    /// pg_basebackup with --replication
    #[command(
        after_help = "Example:\n  custos --config /etc/custos/db.toml backup postgres --type full"
    )]
    Postgres {
        /// full reads every file; incremental reads only files changed since the last
        /// backup of the cluster. Both are restorable on their own.
        #[arg(long = "type", value_parser = ["full", "incremental"], default_value = "incremental")]
        backup_type: String,
        /// Connection string; otherwise PGHOST, PGPORT, PGUSER, PGDATABASE or [postgres]
        #[arg(long)]
        db_url: Option<String>,
        /// Data directory [env: PGDATA; default: the server's data_directory]
        #[arg(long)]
        pgdata: Option<PathBuf>,
        /// A name for the cluster in listings (default: [postgres] name, else its system id)
        #[arg(long)]
        cluster: Option<String>,
        /// Also store the WAL from start to end of the backup: restorable without the archive
        #[arg(long)]
        wal: bool,
        /// How long to wait for the backup's last WAL segment to be archived
        #[arg(long, value_name = "DURATION", default_value = "2m")]
        archive_timeout: String,
        /// Stream the backup over the replication protocol (pg_basebackup) instead of
        /// reading the data directory: for a cluster on another host [[postgres] replication]
        #[arg(long)]
        replication: bool,
        /// Folder of PostgreSQL's programs for --replication [[postgres] bin; default: the
        /// server's version under /usr/lib/postgresql, else PATH]
        #[arg(long, value_name = "DIR")]
        pg_bin: Option<PathBuf>,
        /// A tag for the snapshot (repeat for more)
        #[arg(long)]
        tag: Vec<String>,
    },
    /// Export tables (the vector store) in one consistent snapshot, as rows, with their
    /// definitions, exact row counts, digests and sample nearest-neighbour queries
    #[command(
        after_help = "Example:\n  custos backup table --table document_embeddings --db-url postgresql://backup@db/app"
    )]
    Table(crate::commands::tables::TableBackupArgs),
    /// Export the rows an append-only audit table gained since the last export, exactly
    /// once, chained to the export before
    #[command(
        name = "audit-log",
        after_help = "Example:\n  custos backup audit-log --table audit_log --order-by id"
    )]
    AuditLog(crate::commands::tables::AuditLogBackupArgs),
    /// Logical dump with pg_dump (for managed databases: Supabase, RDS, Cloud SQL), with
    /// the server's row counts
    #[command(
        after_help = "Example:\n  custos backup dump --db-url postgresql://postgres@db.example.supabase.co/postgres --jobs 4"
    )]
    Dump(crate::commands::tables::DumpBackupArgs),
    /// Back up the configuration sources of custos.toml: environment (secrets kept as
    /// references), Terraform state and configuration, system logs
    #[command(
        after_help = "Example:\n  custos --config /etc/custos/custos.toml backup config --source platform-env"
    )]
    Config {
        /// Only this source (default: every env, terraform and logs source)
        #[arg(long)]
        source: Option<String>,
    },
    /// Back up every [[source]] of custos.toml, in order
    #[command(after_help = "Example:\n  custos --config /etc/custos/custos.toml backup all")]
    All {
        /// Only these sources, by name (repeat for more)
        #[arg(long)]
        source: Vec<String>,
    },
}

pub(crate) fn print_backup(ctx: &Ctx, r: &backup::BackupReport) -> i32 {
    ctx.touch(serde_json::json!({"snapshot": r.snapshot, "source": r.source, "bytes": r.stats.bytes, "bytes_stored": r.stats.bytes_stored}));
    if ctx.out.json {
        ctx.out.json(r);
    } else {
        let s = &r.stats;
        println!(
            "snapshot {} saved ({} {})",
            r.snapshot.short(),
            r.kind.as_str(),
            r.source
        );
        if let Some(p) = r.parent {
            println!("  parent     {}", p.short());
        }
        match r.kind {
            SourceKind::Table => println!("  tables     {}", s.files),
            SourceKind::Env => println!("  variables  {}", s.files),
            SourceKind::AuditLog => {}
            _ => println!(
                "  files      {} ({} unchanged, not read), {} folders",
                s.files, s.files_unchanged, s.dirs
            ),
        }
        println!(
            "  size       {} ({} read)",
            ByteSize(s.bytes),
            ByteSize(s.bytes_read)
        );
        println!(
            "  new data   {} in {} chunks, {} stored",
            ByteSize(s.bytes_new),
            s.chunks_new,
            ByteSize(s.bytes_stored)
        );
        println!(
            "  took       {:.1} s ({})",
            s.duration_ms as f64 / 1000.0,
            mb_per_s(s.bytes_read, s.duration_ms)
        );
        for e in &r.errors {
            eprintln!("custos: warning: could not read {e}");
        }
    }
    if r.errors.is_empty() {
        0
    } else {
        if !ctx.out.json {
            eprintln!(
                "custos: the snapshot is partial: {} path(s) could not be read (exit code {})",
                r.errors.len(),
                Kind::Partial.exit_code()
            );
        }
        Kind::Partial.exit_code()
    }
}

pub(crate) fn cmd_backup(ctx: &Ctx, b: BackupCommand) -> Result<i32> {
    let repo = ctx.open()?;
    // An overdue key never stops a backup; it is reported on every run.
    let max_age = ctx.settings.key_max_age()?;
    for k in custos_ops::keys::ages(&repo, max_age, chrono::Utc::now())? {
        if k.id.is_none() || k.id == Some(repo.key_id) {
            if let Some(f) = k.finding(max_age) {
                eprintln!("custos: warning: {f}");
            }
        }
    }
    let progress = ctx.out.progress();
    match b {
        BackupCommand::Files { paths, tag, time } => {
            let opts = backup::BackupOptions {
                tags: tag,
                time: parse_time(time.as_deref())?,
                cache_dir: ctx.settings.cache_dir.clone(),
                progress: progress.as_ref(),
            };
            let is_url = |p: &str| p.contains("://");
            if paths.iter().any(|p| is_url(p)) {
                if paths.len() != 1 {
                    return Err(Error::config(
                        "back up one bucket at a time, and not together with local paths",
                    ));
                }
                let loc = Location::parse(&paths[0])?;
                let (storage_loc, prefix) = match &loc {
                    Location::S3 { bucket, prefix } => (
                        Location::S3 {
                            bucket: bucket.clone(),
                            prefix: String::new(),
                        },
                        prefix.clone(),
                    ),
                    other => (other.clone(), String::new()),
                };
                let src = custos_storage::url::open(&storage_loc, &ctx.settings.storage)?;
                let r = files::backup_bucket(&repo, &src, &paths[0], &prefix, &opts)?;
                Ok(print_backup(ctx, &r))
            } else {
                let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
                let r = files::backup_files(&repo, &paths, &opts)?;
                Ok(print_backup(ctx, &r))
            }
        }
        BackupCommand::Stream {
            name,
            command,
            tag,
            time,
        } => {
            let opts = backup::BackupOptions {
                tags: tag,
                time: parse_time(time.as_deref())?,
                cache_dir: None,
                progress: progress.as_ref(),
            };
            let r = files::backup_stream(&repo, &name, command.as_deref(), &opts)?;
            Ok(print_backup(ctx, &r))
        }
        BackupCommand::Postgres {
            backup_type,
            db_url,
            pgdata,
            cluster,
            wal,
            archive_timeout,
            replication,
            pg_bin,
            tag,
        } => {
            let archive_timeout = humantime::parse_duration(&archive_timeout).map_err(|e| {
                Error::config(format!("--archive-timeout `{archive_timeout}`: {e}"))
            })?;
            let opts = backup::BackupOptions {
                tags: tag,
                time: None,
                cache_dir: ctx.settings.cache_dir.clone(),
                progress: progress.as_ref(),
            };
            let pg = pg_backup::PgBackupOptions {
                backup_type: if backup_type == "full" {
                    PgBackupType::Full
                } else {
                    PgBackupType::Incremental
                },
                conn: ctx.settings.db(db_url),
                pgdata: ctx.settings.pgdata_opt(pgdata),
                cluster: cluster.or_else(|| ctx.settings.file.postgres.name.clone()),
                include_wal: wal,
                archive_timeout,
                replication: replication || ctx.settings.file.postgres.replication,
                pg_bin: pg_bin.or_else(|| ctx.settings.file.postgres.bin.clone()),
            };
            let r = pg_backup::backup_postgres(&repo, &pg, &opts)?;
            Ok(print_pg_backup(ctx, &r))
        }
        BackupCommand::Config { source } => {
            crate::commands::config::backup_config(ctx, &repo, source.as_deref())
        }
        BackupCommand::Table(a) => crate::commands::tables::backup_table(ctx, &repo, a),
        BackupCommand::AuditLog(a) => crate::commands::tables::backup_audit_log(ctx, &repo, a),
        BackupCommand::Dump(a) => crate::commands::tables::backup_dump(ctx, &repo, a),
        BackupCommand::All { source: only } => {
            let all = &ctx.settings.file.sources;
            if all.is_empty() {
                return Err(
                    Error::config("custos.toml defines no [[source]]").hint("see docs/config.md")
                );
            }
            if let Some(n) = only.iter().find(|n| !all.iter().any(|s| &s.name == *n)) {
                return Err(
                    Error::config(format!("custos.toml has no [[source]] named `{n}`")).hint(
                        format!(
                            "its sources: {}",
                            all.iter()
                                .map(|s| s.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ),
                );
            }
            let sources: Vec<_> = all
                .iter()
                .filter(|s| only.is_empty() || only.contains(&s.name))
                .collect();
            let mut reports = vec![];
            let mut code = 0;
            let names: Vec<String> = sources.iter().map(|s| s.name.clone()).collect();
            for s in sources {
                let opts = backup::BackupOptions {
                    tags: vec![s.name.clone()],
                    time: None,
                    cache_dir: ctx.settings.cache_dir.clone(),
                    progress: progress.as_ref(),
                };
                let r = match s.kind.as_str() {
                    "files" => files::backup_files(
                        &repo,
                        &s.paths.iter().map(PathBuf::from).collect::<Vec<_>>(),
                        &opts,
                    ),
                    "stream" => files::backup_stream(
                        &repo,
                        &s.name,
                        Some(s.command.as_deref().ok_or_else(|| {
                            Error::config(format!(
                                "source `{}` has kind stream but no command",
                                s.name
                            ))
                        })?),
                        &opts,
                    ),
                    "table" => custos_ops::tables::export::backup_tables(
                        &repo,
                        &custos_ops::tables::export::TableBackupOptions {
                            conn: ctx.settings.db(s.db_url.clone()),
                            tables: s.tables.clone(),
                            order_by: s.order_by.iter().cloned().collect(),
                            vector_column: None,
                            samples: 8,
                            name: Some(s.name.clone()),
                        },
                        &opts,
                    )
                    .map(|r| {
                        if !ctx.out.json {
                            crate::commands::tables::print_table_backup(ctx, &r);
                        }
                        r.backup
                    }),
                    "audit-log" => custos_ops::tables::audit::export_audit_log(
                        &repo,
                        &custos_ops::tables::audit::AuditExportOptions {
                            conn: ctx.settings.db(s.db_url.clone()),
                            table: s.table.clone().ok_or_else(|| {
                                Error::config(format!("source `{}` (audit-log) needs `table`", s.name))
                            })?,
                            order_by: s.order_by.clone().ok_or_else(|| {
                                Error::config(format!("source `{}` (audit-log) needs `order_by`", s.name))
                            })?,
                        },
                        &opts,
                    )
                    .map(|r| {
                        if !ctx.out.json {
                            crate::commands::tables::print_audit_export(ctx, &r);
                        }
                        r.backup
                    }),
                    "dump" => custos_ops::tables::dump::backup_dump(
                        &repo,
                        &custos_ops::tables::dump::DumpOptions {
                            conn: ctx.settings.db(s.db_url.clone()),
                            jobs: s.jobs.unwrap_or(2),
                            pg_bin: ctx.settings.file.postgres.bin.clone(),
                        },
                        &opts,
                    )
                    .map(|r| {
                        if !ctx.out.json {
                            crate::commands::tables::print_dump(ctx, &r);
                        }
                        r.backup
                    }),
                    k if crate::commands::config::is_config(k) => {
                        crate::commands::config::backup_source(ctx, &repo, s, &opts)
                    }
                    other => Err(Error::config(format!(
                        "source `{}` has unknown kind `{other}` (files, stream, table, audit-log, dump, env, terraform or logs)",
                        s.name
                    ))),
                }
                .map_err(|e| e.context(format!("source `{}`", s.name)))?;
                let printed = matches!(
                    s.kind.as_str(),
                    "table" | "audit-log" | "dump" | "env" | "terraform" | "logs"
                );
                if !ctx.out.json && !printed {
                    code = code.max(print_backup(ctx, &r));
                } else if !r.errors.is_empty() {
                    code = Kind::Partial.exit_code();
                }
                reports.push(r);
            }
            // One recovery point binds what this run took, and where the database's WAL
            // was when it ended (what `restore postgres --target-lsn` reaches).
            let database = if ctx.settings.names_database() {
                match custos_sources::postgres::db::Db::connect(&ctx.settings.db(None))
                    .and_then(|db| db.point())
                {
                    Ok((sys, lsn, at)) => {
                        serde_json::json!({"system_id": sys.to_string(), "lsn": lsn.to_string(), "time": at})
                    }
                    Err(e) => serde_json::json!({"error": e.message}),
                }
            } else {
                serde_json::Value::Null
            };
            let time = custos_model::clock::now();
            let mut h = blake3::Hasher::new();
            h.update(time.to_rfc3339().as_bytes());
            for r in &reports {
                h.update(r.snapshot.to_string().as_bytes());
            }
            let point = serde_json::json!({
                "id": h.finalize().to_hex()[..16].to_string(),
                "time": time,
                "parts": reports.iter().zip(&names).map(|(r, name)| serde_json::json!({
                    "name": name, "source": r.source, "kind": r.kind.as_str(), "snapshot": r.snapshot,
                })).collect::<Vec<_>>(),
                "database": database,
            });
            ctx.touch(serde_json::json!({"point": point}));
            if ctx.out.json {
                ctx.out
                    .json(&serde_json::json!({"backups": reports, "point": point}));
            } else if !ctx.out.quiet {
                println!(
                    "recovery point {}: {} part(s){}",
                    point["id"].as_str().unwrap_or(""),
                    reports.len(),
                    point["database"]["lsn"]
                        .as_str()
                        .map(|l| format!(", database at WAL {l}"))
                        .unwrap_or_default()
                );
            }
            Ok(code)
        }
    }
}

pub(crate) fn print_pg_backup(ctx: &Ctx, r: &pg_backup::PgBackupReport) -> i32 {
    if ctx.out.json {
        ctx.out.json(r);
    } else {
        let code = print_backup(ctx, &r.backup);
        debug_assert_eq!(code, 0);
        if let Some(p) = &r.backup.pg {
            println!(
                "  postgres   {} backup of cluster {} (PostgreSQL {}), timeline {}, LSN {} .. {}{}",
                p.backup_type.as_str(),
                p.system_id,
                p.version_num,
                p.timeline,
                p.start_lsn,
                p.stop_lsn,
                if p.wal_included { ", WAL included" } else { "" }
            );
            println!(
                "  restorable to any time from {} on (with the archived WAL)",
                p.stop_time.format("%Y-%m-%d %H:%M:%S%.3f UTC")
            );
        }
        if r.via == "replication" {
            println!(
                "  read       over the replication protocol (pg_basebackup): every file crossed the network; unchanged ones were not hashed or stored again"
            );
        }
        if r.promoted_to_full {
            println!("  (no earlier backup of this cluster: this incremental read every file)");
        }
        if r.pages_patched + r.units_patched > 0 {
            println!(
                "  pages      {} changed page(s) stored whole, {} as their changed 1 KiB units (page-level incremental)",
                r.pages_patched, r.units_patched
            );
        }
        for d in &r.damaged_pages {
            eprintln!("custos: warning: damaged page: {d}");
        }
    }
    if !r.config_outside.is_empty() {
        eprintln!(
            "custos: warning: the server reads its configuration from outside its data directory ({}), which a base backup does not hold: back those files up too (a files source naming them), or a restore on a new host has no configuration to start with",
            r.config_outside.join(", ")
        );
    }
    if r.damaged_pages.is_empty() {
        0
    } else {
        if !ctx.out.json {
            eprintln!(
                "custos: {} damaged page(s) found: the snapshot holds them as read; check the storage of the database and its logs, run pg_amcheck, and keep older backups (exit code {})",
                r.damaged_pages.len(),
                Kind::Partial.exit_code()
            );
        }
        Kind::Partial.exit_code()
    }
}

pub(crate) fn parse_time(t: Option<&str>) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
    t.map(|t| {
        chrono::DateTime::parse_from_rfc3339(t)
            .map(|d| d.with_timezone(&chrono::Utc))
            .map_err(|e| {
                Error::config(format!(
                    "--time `{t}` is not an RFC 3339 time like 2026-01-31T02:00:00Z: {e}"
                ))
            })
    })
    .transpose()
}
