//! `restore table` and `verify --table`: a table made again from its record, loaded,
//! indexed, and proven, all in one transaction that commits only when the proofs hold.
//! A restore never touches a table that exists: it refuses, and `--as` names a new table
//! beside the live one.

use std::time::Instant;

use custos_model::{ChunkId, Error, Kind, Result, SnapshotId};
use custos_repo::snapshot::SourceKind;
use custos_repo::{Index, Repository, Snapshot};
use custos_sources::postgres::db::{ConnectOptions, Db};
use custos_sources::postgres::tables::{
    column_list, column_sql, ident, literal, Column, CopyRows, COPY_HEADER, COPY_TRAILER,
};
use serde::Serialize;

use crate::tables::export::{exact_neighbours, key_text, TablesRecord};
use crate::tables::{RowDigest, TableRecord};

pub struct TableRestoreOptions {
    pub conn: ConnectOptions,
    /// Which table of the snapshot (all when None).
    pub table: Option<String>,
    /// A new name, beside the live table.
    pub as_name: Option<String>,
    /// Only rows matching this SQL condition (into a new table; digest not checked).
    pub where_sql: Option<String>,
    /// `maintenance_work_mem` for the index builds.
    pub maintenance_work_mem: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct IndexBuild {
    pub name: String,
    pub method: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableProof {
    pub table: String,
    pub restored_as: String,
    pub rows_expected: u64,
    pub rows_loaded: u64,
    /// Whether the restored rows' digest equals the recorded one (None under `--where`).
    pub digest_matches: Option<bool>,
    pub load_seconds: f64,
    pub indexes: Vec<IndexBuild>,
    /// Sample queries whose exact top 10 equal the recorded neighbours, of how many.
    pub samples_exact: usize,
    pub samples: usize,
    /// Recall@10 of the rebuilt vector index over the samples.
    pub recall_at_10: Option<f64>,
    pub foreign_keys_skipped: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub where_sql: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableRestoreReport {
    pub snapshot: SnapshotId,
    pub tables: Vec<TableProof>,
    pub seconds: f64,
}

/// A table snapshot's record (restore key).
pub fn tables_record(repo: &Repository, snap: &Snapshot) -> Result<TablesRecord> {
    crate::backup::record(repo, snap, SourceKind::Table, "a table export")
}

/// The chunks of a table's rows as binary COPY pieces: header, rows, trailer; fetched in
/// parallel batches and handed over in order.
pub(crate) fn copy_pieces<'a>(
    repo: &'a Repository,
    index: &'a Index,
    chunks: &'a [ChunkId],
) -> impl Iterator<Item = Result<Vec<u8>>> + 'a {
    let batch = repo.threads() * 2;
    let head = std::iter::once(Ok(COPY_HEADER.to_vec()));
    let body =
        chunks
            .chunks(batch.max(1))
            .flat_map(move |b| {
                match custos_repo::repository::parallel_map(b, b.len(), |id| {
                    repo.read_blob(index, id)
                }) {
                    Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
                    Err(e) => vec![Err(e)],
                }
            });
    head.chain(body)
        .chain(std::iter::once(Ok(COPY_TRAILER.to_vec())))
}

/// A name for something of the restored table: the table's own prefix replaced.
fn renamed(old: &str, table: &str, new: &str) -> String {
    let mut s = if table == new {
        old.to_string()
    } else if let Some(rest) = old.strip_prefix(table) {
        format!("{new}{rest}")
    } else {
        format!("{new}_{old}")
    };
    while s.len() > 63 {
        s.pop();
    }
    s
}

/// Restores tables of a snapshot and proves them; one transaction for all.
pub fn restore_tables(
    repo: &Repository,
    snap: &Snapshot,
    o: &TableRestoreOptions,
) -> Result<TableRestoreReport> {
    let start = Instant::now();
    let record = tables_record(repo, snap)?;
    let picked: Vec<&TableRecord> = record
        .tables
        .iter()
        .filter(|t| match &o.table {
            None => true,
            Some(n) => crate::backup::names_table(&t.meta.qualified(), n),
        })
        .collect();
    if picked.is_empty() {
        return Err(Error::config(format!(
            "snapshot {} holds no table {} (it holds {})",
            snap.id.short(),
            o.table.as_deref().unwrap_or("?"),
            record
                .tables
                .iter()
                .map(|t| t.meta.qualified())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if picked.len() > 1 && (o.as_name.is_some() || o.where_sql.is_some()) {
        return Err(Error::config(
            "--as and --where apply to one table: name it with --table",
        ));
    }
    let db = Db::connect(&o.conn)?;
    // Checks before anything is written.
    let mut targets = vec![];
    for t in &picked {
        let (schema, name) = match &o.as_name {
            Some(a) => match a.split_once('.') {
                Some((s, n)) => (s.to_string(), n.to_string()),
                None => (t.meta.schema.clone(), a.clone()),
            },
            None => (t.meta.schema.clone(), t.meta.name.clone()),
        };
        let q = format!("{}.{}", ident(&schema), ident(&name));
        if db.relation_exists(&q)? {
            return Err(Error::new(
                Kind::Config,
                format!("table {q} already exists in the target database: a restore never writes into an existing table"),
            )
            .hint("restore beside it under a new name with --as NEW_NAME, then copy back what is needed"));
        }
        crate::tables::check_record_types(&t.meta)?;
        for c in &t.meta.columns {
            if !db.type_exists(&c.type_sql)? {
                return Err(Error::new(
                    Kind::Config,
                    format!(
                        "type {} (column {} of {}) does not exist in the target database",
                        c.type_sql,
                        c.name,
                        t.meta.qualified()
                    ),
                )
                .hint(if t.meta.extensions.is_empty() {
                    "create the type first".to_string()
                } else {
                    format!(
                        "install the extension first: CREATE EXTENSION {}",
                        t.meta.extensions.join("; CREATE EXTENSION ")
                    )
                }));
            }
        }
        targets.push((schema, name, q));
    }
    let index = repo.load_index_for_reading()?;
    custos_storage::stop_warming();

    db.execute(&format!(
        "BEGIN; SET LOCAL maintenance_work_mem = {}",
        literal(&o.maintenance_work_mem)
    ))?;
    let mut proofs = vec![];
    for (t, (schema, name, target)) in picked.iter().zip(&targets) {
        match restore_one(repo, &index, &db, t, schema, name, target, o) {
            Ok(p) => proofs.push(p),
            Err(e) => {
                let _ = db.execute("ROLLBACK");
                return Err(e.context(format!("restoring {}", t.meta.qualified())));
            }
        }
    }
    db.execute("COMMIT")?;
    Ok(TableRestoreReport {
        snapshot: snap.id,
        tables: proofs,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[allow(clippy::too_many_arguments)]
fn restore_one(
    repo: &Repository,
    index: &Index,
    db: &Db,
    t: &TableRecord,
    schema: &str,
    name: &str,
    target: &str,
    o: &TableRestoreOptions,
) -> Result<TableProof> {
    let meta = &t.meta;
    let mut lines = vec![];
    let mut sequences = vec![];
    for c in &meta.columns {
        let mut c2: Column = c.clone();
        if c.default
            .as_deref()
            .is_some_and(|d| d.starts_with("nextval("))
        {
            // A serial column: its own new sequence, set past the restored rows afterwards.
            let mut seq = renamed(&format!("{}_{}_seq", meta.name, c.name), &meta.name, name);
            let mut n = 1;
            while db.relation_exists(&format!("{}.{}", ident(schema), ident(&seq)))? {
                seq = format!(
                    "{}_{n}",
                    renamed(&format!("{}_{}_seq", meta.name, c.name), &meta.name, name)
                );
                n += 1;
            }
            let seq_q = format!("{}.{}", ident(schema), ident(&seq));
            db.execute_one(&format!("CREATE SEQUENCE {seq_q}"))?;
            c2.default = Some(format!("nextval({}::regclass)", literal(&seq_q)));
            sequences.push((seq_q, c.name.clone()));
        }
        lines.push(column_sql(&c2));
    }
    let mut fks = vec![];
    for k in &meta.constraints {
        if k.kind == "f" {
            fks.push(format!("{} {}", k.name, k.def));
            continue;
        }
        lines.push(format!(
            "CONSTRAINT {} {}",
            ident(&renamed(&k.name, &meta.name, name)),
            k.def
        ));
    }
    db.execute_one(&format!("CREATE TABLE {target} ({})", lines.join(", ")))?;
    let volatile = db.checks_calling_volatile(target)?;
    if !volatile.is_empty() {
        return Err(Error::integrity(format!(
            "the snapshot's CHECK constraints of {} call functions that are not immutable ({}): they would run on every row loaded; nothing was restored",
            meta.qualified(),
            volatile.join(", ")
        ))
        .hint("a check that does more than look at the row was planted or is unsafe to replay: inspect the snapshot's definition with `custos audit log` and the DDL"));
    }
    for (seq, col) in &sequences {
        db.execute_one(&format!(
            "ALTER SEQUENCE {seq} OWNED BY {target}.{}",
            ident(col)
        ))?;
    }

    let cols = column_list(&meta.copied_columns());
    let load = Instant::now();
    let rows_loaded = match &o.where_sql {
        None => {
            let mut pieces = copy_pieces(repo, index, &t.chunks);
            db.copy_in(
                &format!("COPY {target} ({cols}) FROM STDIN (FORMAT binary)"),
                &mut pieces,
            )?
        }
        Some(w) => {
            let tmp = "pg_temp.custos_restore_rows";
            db.execute_one(&format!(
                "CREATE TEMP TABLE custos_restore_rows ({}) ON COMMIT DROP",
                meta.copied_columns()
                    .iter()
                    .map(|c| format!("{} {}", ident(&c.name), c.type_sql))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))?;
            if let Err(msg) = db.check_sql(&format!("SELECT 1 FROM {tmp} WHERE ({w})")) {
                return Err(Error::new(
                    Kind::Config,
                    format!("--where `{w}` is not a condition on the table's rows: {msg}"),
                )
                .hint("write it as the part after WHERE, with the table's column names, e.g. --where \"patient_id = 42\""));
            }
            let mut pieces = copy_pieces(repo, index, &t.chunks);
            db.copy_in(
                &format!("COPY {tmp} ({cols}) FROM STDIN (FORMAT binary)"),
                &mut pieces,
            )?;
            let overriding = if meta
                .columns
                .iter()
                .any(|c| c.identity.as_deref() == Some("a"))
            {
                "OVERRIDING SYSTEM VALUE "
            } else {
                ""
            };
            let n = db.text(&format!(
                "WITH moved AS (INSERT INTO {target} ({cols}) {overriding}SELECT {cols} FROM {tmp} WHERE ({w}) RETURNING 1) SELECT count(*)::text FROM moved"
            ))?;
            n.and_then(|n| n.parse().ok()).unwrap_or(0)
        }
    };
    let load_seconds = load.elapsed().as_secs_f64();
    for (seq, col) in &sequences {
        db.execute_one(&format!(
            "SELECT setval({}, coalesce((SELECT max({}) FROM {target}), 0) + 1, false)",
            literal(seq),
            ident(col)
        ))?;
    }
    for c in meta.columns.iter().filter(|c| c.identity.is_some()) {
        let next = db
            .text(&format!(
                "SELECT (coalesce(max({}), 0) + 1)::text FROM {target}",
                ident(&c.name)
            ))?
            .unwrap_or_else(|| "1".into());
        db.execute_one(&format!(
            "ALTER TABLE {target} ALTER COLUMN {} RESTART WITH {next}",
            ident(&c.name)
        ))?;
    }

    let mut builds = vec![];
    for i in &meta.indexes {
        let iname = renamed(&i.name, &meta.name, name);
        let s = Instant::now();
        db.execute_one(&format!(
            "CREATE {}INDEX {} ON {target}{}",
            if i.unique { "UNIQUE " } else { "" },
            ident(&iname),
            i.tail
        ))?;
        builds.push(IndexBuild {
            name: iname,
            method: i.method.clone(),
            seconds: s.elapsed().as_secs_f64(),
        });
    }

    let mut proof = TableProof {
        table: meta.qualified(),
        restored_as: target.to_string(),
        rows_expected: t.rows,
        rows_loaded,
        digest_matches: None,
        load_seconds,
        indexes: builds,
        samples_exact: 0,
        samples: 0,
        recall_at_10: None,
        foreign_keys_skipped: fks,
        where_sql: o.where_sql.clone(),
    };
    if o.where_sql.is_some() {
        return Ok(proof);
    }

    // The proofs, before the transaction commits.
    let out = db.copy_out(&format!(
        "COPY (SELECT {cols} FROM {target}) TO STDOUT (FORMAT binary)"
    ))?;
    let mut rows = CopyRows::new(out);
    let mut digest = RowDigest::default();
    while let Some(r) = rows.next_row()? {
        digest.add(&r);
    }
    proof.digest_matches = Some(digest.hex() == t.digest && digest.rows == t.rows);
    if digest.rows != t.rows {
        return Err(Error::integrity(format!(
            "{target} holds {} rows after the restore; the snapshot recorded {}",
            digest.rows, t.rows
        )));
    }
    if digest.hex() != t.digest {
        return Err(Error::integrity(format!(
            "the rows of {target} do not match the snapshot's digest ({} recorded, {} restored)",
            t.digest,
            digest.hex()
        )));
    }
    if let Some(v) = &t.vector {
        proof.samples = v.samples.len();
        db.execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off")?;
        let mut mismatch = None;
        let mut exact_sets = vec![];
        for (n, s) in v.samples.iter().enumerate() {
            let got = exact_neighbours(
                db,
                target,
                &v.column,
                &v.operator,
                &t.order_by,
                &s.vector,
                10,
            )?;
            if got == s.neighbours {
                proof.samples_exact += 1;
            } else if mismatch.is_none() {
                mismatch = Some((n, got.clone()));
            }
            exact_sets.push(got);
        }
        if let Some((n, got)) = mismatch {
            return Err(Error::integrity(format!(
                "sample query {} of {target} returns neighbours {:?}; the snapshot recorded {:?}",
                n + 1,
                got,
                v.samples[n].neighbours
            )));
        }
        let has_index = meta.indexes.iter().any(|i| {
            (i.method == "hnsw" || i.method == "ivfflat") && i.tail.contains(&ident(&v.column))
        });
        if has_index && !v.samples.is_empty() {
            db.execute(
                "SET LOCAL enable_indexscan = on; SET LOCAL enable_bitmapscan = on; SET LOCAL enable_seqscan = off",
            )?;
            let mut hits = 0usize;
            let mut total = 0usize;
            for (s, exact) in v.samples.iter().zip(&exact_sets) {
                let c = ident(&v.column);
                let got = db.texts(
                    &format!(
                        "SELECT {} FROM {target} ORDER BY {c} {} $1::text::vector LIMIT 10",
                        key_text(&t.order_by),
                        v.operator
                    ),
                    &[&s.vector],
                )?;
                total += exact.len();
                hits += got.iter().flatten().filter(|g| exact.contains(g)).count();
            }
            db.execute("SET LOCAL enable_seqscan = on")?;
            proof.recall_at_10 = Some(if total == 0 {
                1.0
            } else {
                hits as f64 / total as f64
            });
        }
    }
    Ok(proof)
}

/// `verify --table`: the restore and its proofs in a scratch database made and dropped
/// on the server `conn` reaches; nothing else on it is touched.
pub fn verify_tables(
    repo: &Repository,
    snap: &Snapshot,
    conn: &ConnectOptions,
    maintenance_work_mem: &str,
) -> Result<TableRestoreReport> {
    let record = tables_record(repo, snap)?;
    let admin = Db::connect(conn)?;
    let scratch = format!("custos_verify_{}", &hex::encode(rand::random::<[u8; 6]>()));
    admin.execute(&format!("CREATE DATABASE {scratch}"))?;
    let result = (|| {
        let mut c = conn.clone();
        c.dbname_override = Some(scratch.clone());
        let db = Db::connect(&c)?;
        let mut exts: Vec<&String> = record
            .tables
            .iter()
            .flat_map(|t| &t.meta.extensions)
            .collect();
        exts.sort();
        exts.dedup();
        for e in exts {
            db.execute(&format!("CREATE EXTENSION IF NOT EXISTS {}", ident(e)))
                .map_err(|e| e.context("preparing the scratch database"))?;
        }
        for t in &record.tables {
            if t.meta.schema != "public" {
                db.execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {}",
                    ident(&t.meta.schema)
                ))?;
            }
        }
        drop(db);
        restore_tables(
            repo,
            snap,
            &TableRestoreOptions {
                conn: c,
                table: None,
                as_name: None,
                where_sql: None,
                maintenance_work_mem: maintenance_work_mem.into(),
            },
        )
    })();
    let dropped = admin.execute(&format!("DROP DATABASE IF EXISTS {scratch} WITH (FORCE)"));
    let report = result?;
    dropped.map_err(|e| e.context(format!("dropping the scratch database {scratch}")))?;
    Ok(report)
}
