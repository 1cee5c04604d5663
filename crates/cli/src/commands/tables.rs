//! Tables, the vector store, the application's audit log and logical dumps: `backup
//! table|audit-log|dump`, `restore table|audit-log|dump`, `verify --table`, `audit-log
//! verify`; each prints its proofs in plain words.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use custos_model::{ByteSize, Error, Kind, Result};
use custos_ops::tables::{audit, dump, export, restore};
use custos_repo::snapshot::SourceKind;

use crate::commands::backup::print_backup;
use crate::context::Ctx;

#[derive(Args)]
pub(crate) struct TableBackupArgs {
    /// A table to export (repeat for more; all are read in one snapshot)
    #[arg(long = "table", required = true)]
    pub(crate) tables: Vec<String>,
    /// Connection string; otherwise PGHOST, PGPORT, PGUSER, PGDATABASE or [postgres]
    #[arg(long)]
    pub(crate) db_url: Option<String>,
    /// Columns that order the rows of a table without a primary key (repeat for more)
    #[arg(long)]
    pub(crate) order_by: Vec<String>,
    /// The pgvector column to take sample queries from (default: the first vector column)
    #[arg(long)]
    pub(crate) vector_column: Option<String>,
    /// Sample queries recorded with their exact 10 nearest neighbours
    #[arg(long, default_value_t = 8)]
    pub(crate) samples: usize,
    /// The source's name in listings (default: database:tables)
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// A tag for the snapshot (repeat for more)
    #[arg(long)]
    pub(crate) tag: Vec<String>,
}

#[derive(Args)]
pub(crate) struct AuditLogBackupArgs {
    /// The append-only audit table
    #[arg(long)]
    pub(crate) table: String,
    /// Its column that only grows (an identity or serial id, or an insert timestamp)
    #[arg(long)]
    pub(crate) order_by: String,
    /// Connection string; otherwise PGHOST, PGPORT, PGUSER, PGDATABASE or [postgres]
    #[arg(long)]
    pub(crate) db_url: Option<String>,
    /// A tag for the snapshot (repeat for more)
    #[arg(long)]
    pub(crate) tag: Vec<String>,
}

#[derive(Args)]
pub(crate) struct DumpBackupArgs {
    /// Connection string; otherwise PGHOST, PGPORT, PGUSER, PGDATABASE or [postgres]
    #[arg(long)]
    pub(crate) db_url: Option<String>,
    /// Tables pg_dump reads in parallel
    #[arg(long, default_value_t = 2)]
    pub(crate) jobs: usize,
    /// Folder of pg_dump [[postgres] bin; default: the server's version under
    /// /usr/lib/postgresql, else PATH]
    #[arg(long, value_name = "DIR")]
    pub(crate) pg_bin: Option<PathBuf>,
    /// A tag for the snapshot (repeat for more)
    #[arg(long)]
    pub(crate) tag: Vec<String>,
}

#[derive(Args)]
pub(crate) struct TableRestoreArgs {
    /// The table snapshot: an id (prefix) or `latest`
    pub(crate) snapshot: String,
    /// Connection string of the database to restore into
    #[arg(long)]
    pub(crate) db_url: Option<String>,
    /// Which table of the snapshot (default: all)
    #[arg(long)]
    pub(crate) table: Option<String>,
    /// Restore under this new name, beside the live table (which is never touched)
    #[arg(long = "as", value_name = "NEW_NAME")]
    pub(crate) as_name: Option<String>,
    /// Only the rows matching this condition, e.g. "patient_id = 42" (needs --as)
    #[arg(long = "where", value_name = "SQL", requires = "as_name")]
    pub(crate) where_sql: Option<String>,
    /// maintenance_work_mem for rebuilding the indexes (an HNSW graph built in memory is
    /// many times faster)
    #[arg(long, default_value = "1GB")]
    pub(crate) maintenance_work_mem: String,
}

#[derive(Args)]
pub(crate) struct AuditLogRestoreArgs {
    /// Connection string of the database to restore into
    #[arg(long)]
    pub(crate) db_url: Option<String>,
    /// The new table to load the rows into (never the live audit table)
    #[arg(long = "as", value_name = "TABLE")]
    pub(crate) as_name: String,
    /// Which audit table's exports, when the repository holds several
    #[arg(long)]
    pub(crate) table: Option<String>,
    /// Exports made at or after this time (RFC 3339)
    #[arg(long, value_name = "TIME")]
    pub(crate) since: Option<String>,
    /// Exports up to the first made at or after this time (RFC 3339)
    #[arg(long, value_name = "TIME")]
    pub(crate) until: Option<String>,
}

#[derive(Args)]
pub(crate) struct DumpRestoreArgs {
    /// The dump snapshot: an id (prefix) or `latest`
    pub(crate) snapshot: String,
    /// Connection string of the database to restore into
    #[arg(long)]
    pub(crate) db_url: Option<String>,
    /// Only this table
    #[arg(long)]
    pub(crate) table: Option<String>,
    /// Drop what the dump holds before recreating it
    #[arg(long)]
    pub(crate) clean: bool,
    /// Parallel pg_restore jobs
    #[arg(long, default_value_t = 2)]
    pub(crate) jobs: usize,
    /// Folder of pg_restore
    #[arg(long, value_name = "DIR")]
    pub(crate) pg_bin: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum AuditLogCommand {
    /// Prove the export chain complete from the first export to the last; with
    /// --read-data (restore key) read every export's rows back and hash them
    #[command(after_help = "Example:\n  custos audit-log verify --read-data")]
    Verify {
        /// Only the chain of this table
        #[arg(long)]
        table: Option<String>,
        /// Read every export's rows back and recompute their hashes (restore key)
        #[arg(long)]
        read_data: bool,
    },
}

fn options<'a>(
    ctx: &Ctx,
    tag: Vec<String>,
    progress: &'a dyn custos_ops::progress::Progress,
) -> custos_ops::backup::BackupOptions<'a> {
    custos_ops::backup::BackupOptions {
        tags: tag,
        time: None,
        cache_dir: ctx.settings.cache_dir.clone(),
        progress,
    }
}

pub(crate) fn backup_table(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    a: TableBackupArgs,
) -> Result<i32> {
    let progress = ctx.out.progress();
    let r = export::backup_tables(
        repo,
        &export::TableBackupOptions {
            conn: ctx.settings.db(a.db_url),
            tables: a.tables,
            order_by: a.order_by,
            vector_column: a.vector_column,
            samples: a.samples,
            name: a.name,
        },
        &options(ctx, a.tag, progress.as_ref()),
    )?;
    print_table_backup(ctx, &r);
    Ok(0)
}

pub(crate) fn print_table_backup(ctx: &Ctx, r: &export::TableBackupReport) {
    if ctx.out.json {
        ctx.out.json(r);
        return;
    }
    print_backup(ctx, &r.backup);
    println!(
        "  snapshot   one consistent read at LSN {} ({})",
        r.lsn,
        r.snapshot_time.format("%Y-%m-%d %H:%M:%S UTC")
    );
    for t in &r.tables {
        println!(
            "  table      {}: {} rows, {}{}{}",
            t.table,
            t.rows,
            ByteSize(t.data_bytes),
            t.vector_dims
                .map(|d| format!(", vector({d})"))
                .unwrap_or_default(),
            if t.indexes.is_empty() {
                String::new()
            } else {
                format!(", indexes {}", t.indexes.join(", "))
            }
        );
    }
}

pub(crate) fn backup_audit_log(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    a: AuditLogBackupArgs,
) -> Result<i32> {
    let progress = ctx.out.progress();
    let r = audit::export_audit_log(
        repo,
        &audit::AuditExportOptions {
            conn: ctx.settings.db(a.db_url),
            table: a.table,
            order_by: a.order_by,
        },
        &options(ctx, a.tag, progress.as_ref()),
    )?;
    print_audit_export(ctx, &r);
    Ok(0)
}

pub(crate) fn print_audit_export(ctx: &Ctx, r: &audit::AuditExportReport) {
    ctx.touch(serde_json::json!({"snapshot": r.backup.snapshot, "source": r.facts.table, "export": r.facts.seq, "rows": r.facts.rows}));
    if ctx.out.json {
        ctx.out.json(r);
        return;
    }
    let f = &r.facts;
    println!(
        "audit-log export {} of {} saved as snapshot {}",
        f.seq,
        f.table,
        r.backup.snapshot.short()
    );
    println!(
        "  rows       {} new{}",
        f.rows,
        match (&f.first, &f.last) {
            (Some(a), Some(b)) => format!(" ({} {a} .. {b})", f.order_by),
            _ => String::new(),
        }
    );
    if f.carried > 0 {
        println!(
            "  carried    {} committed row(s) of transactions newer than one still running: in the next export",
            f.carried
        );
    }
    println!(
        "  chain      links to {} ; this export's hash {}",
        // The link is what the previous export's facts said: any backup key wrote it.
        f.prev
            .as_deref()
            .map_or("nothing (first export)".into(), |p| {
                custos_model::path::escape(p.get(..16).unwrap_or(p))
            }),
        &f.hash[..16]
    );
    println!("  stored     {} new", ByteSize(r.backup.stats.bytes_stored));
}

pub(crate) fn backup_dump(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    a: DumpBackupArgs,
) -> Result<i32> {
    let progress = ctx.out.progress();
    let r = dump::backup_dump(
        repo,
        &dump::DumpOptions {
            conn: ctx.settings.db(a.db_url),
            jobs: a.jobs,
            pg_bin: a.pg_bin.or_else(|| ctx.settings.file.postgres.bin.clone()),
        },
        &options(ctx, a.tag, progress.as_ref()),
    )?;
    print_dump(ctx, &r);
    Ok(0)
}

pub(crate) fn print_dump(ctx: &Ctx, r: &dump::DumpReport) {
    if ctx.out.json {
        ctx.out.json(r);
        return;
    }
    print_backup(ctx, &r.backup);
    let f = &r.facts;
    println!(
        "  dump       database {} (PostgreSQL {}, {}), pg_dump {}, {} tables, {} rows",
        f.database,
        custos_sources::postgres::tables::version_text(f.server_version_num),
        ByteSize(f.database_size),
        f.pg_dump_version,
        f.tables.len(),
        f.tables.iter().map(|t| t.rows).sum::<u64>()
    );
}

/// A snapshot of `kind`; `latest` is the newest that holds `table` when one is named.
fn find(
    repo: &custos_repo::Repository,
    spec: &str,
    kind: SourceKind,
    table: Option<&str>,
) -> Result<custos_repo::Snapshot> {
    repo.find_snapshot(spec, |s| {
        s.kind == kind
            && table.is_none_or(|t| {
                let names: Vec<String> = s
                    .facts
                    .as_ref()
                    .and_then(|f| f.get("tables"))
                    .and_then(|t| t.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|t| {
                                t.get("table").and_then(|n| n.as_str()).map(String::from)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                names.iter().any(|n| custos_ops::backup::names_table(n, t))
            })
    })
}

pub(crate) fn restore_table(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    a: TableRestoreArgs,
) -> Result<i32> {
    let snap = find(repo, &a.snapshot, SourceKind::Table, a.table.as_deref())?;
    ctx.cold_gate(repo, &snap)?;
    let r = restore::restore_tables(
        repo,
        &snap,
        &restore::TableRestoreOptions {
            conn: ctx.settings.db(a.db_url),
            table: a.table,
            as_name: a.as_name,
            where_sql: a.where_sql,
            maintenance_work_mem: a.maintenance_work_mem,
        },
    )?;
    print_table_restore(ctx, &r, "restored");
    Ok(0)
}

pub(crate) fn print_table_restore(ctx: &Ctx, r: &restore::TableRestoreReport, verb: &str) {
    ctx.touch(serde_json::json!({"snapshot": r.snapshot, "tables": r.tables.iter().map(|t| &t.restored_as).collect::<Vec<_>>()}));
    if ctx.out.json {
        ctx.out.json(r);
        return;
    }
    println!(
        "snapshot {} {verb} in {:.1} s",
        r.snapshot.short(),
        r.seconds
    );
    for t in &r.tables {
        println!("  {} -> {}", t.table, t.restored_as);
        match &t.where_sql {
            Some(w) => println!(
                "    rows       {} of {} match `{w}` and were loaded ({:.1} s); counts and digest not compared",
                t.rows_loaded, t.rows_expected, t.load_seconds
            ),
            None => println!(
                "    rows       {} loaded in {:.1} s; count and digest equal the snapshot's ({} rows)",
                t.rows_loaded, t.load_seconds, t.rows_expected
            ),
        }
        for i in &t.indexes {
            println!(
                "    index      {} ({}) built in {:.1} s",
                i.name, i.method, i.seconds
            );
        }
        if t.samples > 0 {
            println!(
                "    vectors    {}/{} sample queries return the same 10 neighbours",
                t.samples_exact, t.samples
            );
        }
        if let Some(r) = t.recall_at_10 {
            println!(
                "    recall@10  {:.3} through the rebuilt vector index{}",
                r,
                if r < 0.95 {
                    " (below 0.95: check the index's build options)"
                } else {
                    ""
                }
            );
        }
        for f in &t.foreign_keys_skipped {
            println!(
                "    not made   foreign key {f}: add it once the rows it refers to are in place"
            );
        }
    }
}

pub(crate) fn verify_table(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    spec: &str,
    db_url: Option<String>,
) -> Result<i32> {
    let snap = find(repo, spec, SourceKind::Table, None)?;
    let r = restore::verify_tables(repo, &snap, &ctx.settings.db(db_url), "1GB")?;
    print_table_restore(
        ctx,
        &r,
        "restored into a scratch database, proven, and dropped",
    );
    Ok(0)
}

pub(crate) fn restore_audit_log(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    a: AuditLogRestoreArgs,
) -> Result<i32> {
    let time = |t: Option<String>| crate::commands::backup::parse_time(t.as_deref());
    let r = audit::restore_audit_log(
        repo,
        &audit::AuditRestoreOptions {
            conn: ctx.settings.db(a.db_url),
            table: a.table,
            as_name: a.as_name,
            since: time(a.since)?,
            until: time(a.until)?,
        },
    )?;
    ctx.touch(serde_json::json!({"chain": r.chain, "restored_as": r.restored_as, "rows": r.rows}));
    if ctx.out.json {
        ctx.out.json(&r);
    } else {
        println!(
            "{} rows of {} exports ({} .. {}) of {} loaded into {}; their links and content hashes check out",
            r.rows, r.exports, r.first_seq, r.last_seq, r.chain, r.restored_as
        );
    }
    Ok(0)
}

pub(crate) fn restore_dump(
    ctx: &Ctx,
    repo: &custos_repo::Repository,
    a: DumpRestoreArgs,
) -> Result<i32> {
    let snap = find(repo, &a.snapshot, SourceKind::Dump, a.table.as_deref())?;
    ctx.cold_gate(repo, &snap)?;
    let progress = ctx.out.progress();
    let r = dump::restore_dump(
        repo,
        &snap,
        &dump::DumpRestoreOptions {
            conn: ctx.settings.db(a.db_url),
            jobs: a.jobs,
            table: a.table,
            clean: a.clean,
            pg_bin: a.pg_bin.or_else(|| ctx.settings.file.postgres.bin.clone()),
            progress: progress.as_ref(),
        },
    )?;
    if ctx.out.json {
        ctx.out.json(&r);
    } else {
        println!(
            "dump {} (PostgreSQL {}) restored in {:.1} s; row counts equal the dump's for {} table(s):",
            &r.snapshot[..8],
            r.server,
            r.seconds,
            r.counts.len()
        );
        for c in &r.counts {
            println!("  {}  {} rows", c.table, c.restored);
        }
    }
    Ok(0)
}

pub(crate) fn cmd_audit_log(ctx: &Ctx, c: AuditLogCommand) -> Result<i32> {
    let AuditLogCommand::Verify { table, read_data } = c;
    let repo = ctx.open()?;
    if read_data {
        repo.require_restore("read audit-log exports back (--read-data)")?;
    }
    let min = ctx.settings.audit_log_min_retention()?;
    let chains = audit::verify_chains(
        &repo,
        table.as_deref(),
        read_data,
        min.audit_log_default,
        custos_model::clock::now(),
    )?;
    if chains.is_empty() {
        return Err(
            Error::new(Kind::NotFound, "no audit-log exports in the repository")
                .hint("export one with `custos backup audit-log --table T --order-by C`"),
        );
    }
    let bad = chains.iter().any(|c| !c.problems.is_empty());
    if ctx.out.json {
        ctx.out.json(&chains);
    } else {
        for c in &chains {
            if c.problems.is_empty() {
                println!(
                    "{}: {} exports ({} .. {}), {} rows, chain complete{}",
                    c.chain,
                    c.exports,
                    c.first_seq.unwrap_or(0),
                    c.last_seq.unwrap_or(0),
                    c.rows,
                    if c.read_data {
                        "; every export read back and its hash recomputed"
                    } else {
                        ""
                    }
                );
            } else {
                println!("{}: {} exports, chain BROKEN:", c.chain, c.exports);
                for p in &c.problems {
                    println!("  {p}");
                }
            }
        }
    }
    if bad {
        // One JSON document (the chains) either way; the exit code says it failed.
        if !ctx.out.json {
            eprintln!(
                "custos: error E{:02}: the audit-log chain is broken (see above)\n  hint: restore the missing exports from a secondary copy, and keep this report as evidence",
                Kind::Integrity.code()
            );
        }
        return Ok(Kind::Integrity.exit_code());
    }
    Ok(0)
}
