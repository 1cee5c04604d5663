//! `backup table`: several tables read in one snapshot, each by its own connection that
//! joins the snapshot the first one exported, ordered by primary key and stored as rows;
//! with each table its definition, exact row count, digest and (for a pgvector table)
//! sample queries with their exact nearest neighbours.

use chrono::{DateTime, Utc};
use custos_model::{Error, Kind, Lsn, Result};
use custos_repo::snapshot::{SnapshotStats, SourceKind};
use custos_repo::{Repository, SnapshotBody};
use custos_sources::postgres::db::{ConnectOptions, Db};
use custos_sources::postgres::tables::{column_list, ident, CopyRows, TableMeta};
use serde::Serialize;

use crate::backup::{BackupOptions, BackupReport, Run};
use crate::tables::{store_rows, Sample, TableFacts, TableRecord, VectorRecord};

pub struct TableBackupOptions {
    pub conn: ConnectOptions,
    pub tables: Vec<String>,
    /// Columns to order rows by for tables without a primary key.
    pub order_by: Vec<String>,
    /// The pgvector column to sample (default: the table's first `vector` column).
    pub vector_column: Option<String>,
    /// Sample queries recorded per vector table.
    pub samples: usize,
    /// The source's name in listings (default: `database:table,...`).
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TableBackupReport {
    pub backup: BackupReport,
    pub lsn: Lsn,
    pub snapshot_time: DateTime<Utc>,
    pub tables: Vec<TableFacts>,
}

/// What every role reads about a table snapshot (`facts` of its summary).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TablesFacts {
    pub database: String,
    pub server_version_num: i32,
    pub lsn: Lsn,
    pub snapshot_time: DateTime<Utc>,
    pub tables: Vec<TableFacts>,
}

/// The snapshot body's `record` for tables.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TablesRecord {
    pub tables: Vec<TableRecord>,
}

/// The key expression of a table's rows as text: its column, or `ROW(a, b)`.
pub(crate) fn key_text(order_by: &[String]) -> String {
    if order_by.len() == 1 {
        format!("{}::text", ident(&order_by[0]))
    } else {
        format!(
            "ROW({})::text",
            order_by
                .iter()
                .map(|c| ident(c))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// The distance operator a vector index was built for.
pub(crate) fn vector_operator(meta: &TableMeta, column: &str) -> String {
    for i in &meta.indexes {
        if (i.method == "hnsw" || i.method == "ivfflat") && i.tail.contains(&ident(column)) {
            for (ops, op) in [
                ("vector_cosine_ops", "<=>"),
                ("vector_ip_ops", "<#>"),
                ("vector_l1_ops", "<+>"),
                ("vector_l2_ops", "<->"),
            ] {
                if i.tail.contains(ops) {
                    return op.into();
                }
            }
        }
    }
    "<->".into()
}

/// The exact nearest neighbours of `vector` (index scans off), nearest first.
pub(crate) fn exact_neighbours(
    db: &Db,
    table: &str,
    column: &str,
    operator: &str,
    order_by: &[String],
    vector: &str,
    k: usize,
) -> Result<Vec<String>> {
    let c = ident(column);
    let keys = order_by
        .iter()
        .map(|c| ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT {} FROM {table} WHERE {c} IS NOT NULL ORDER BY {c} {operator} $1::text::vector, {keys} LIMIT {k}",
        key_text(order_by)
    );
    Ok(db.texts(&sql, &[vector])?.into_iter().flatten().collect())
}

pub fn backup_tables(
    repo: &Repository,
    o: &TableBackupOptions,
    opts: &BackupOptions,
) -> Result<TableBackupReport> {
    if o.tables.is_empty() {
        return Err(Error::config("name at least one table with --table"));
    }
    let db = Db::connect(&o.conn)?;
    let snap = db.begin_export()?;
    let mut plans = vec![];
    for t in &o.tables {
        let meta = db.table_meta(t)?;
        let order_by = if !meta.primary_key.is_empty() {
            meta.primary_key.clone()
        } else if !o.order_by.is_empty() {
            for c in &o.order_by {
                if meta.column(c).is_none() {
                    return Err(Error::config(format!(
                        "--order-by {c}: table {} has no such column",
                        meta.qualified()
                    )));
                }
            }
            o.order_by.clone()
        } else {
            return Err(Error::new(
                Kind::Config,
                format!(
                    "table {} has no primary key, so its rows have no order to export them in",
                    meta.qualified()
                ),
            )
            .hint("give --order-by COLUMN (repeat for more) naming columns that identify a row"));
        };
        let vector = match &o.vector_column {
            Some(v) if o.tables.len() == 1 || meta.column(v).is_some() => {
                let col = meta.column(v).ok_or_else(|| {
                    Error::config(format!(
                        "--vector-column {v}: table {} has no such column",
                        meta.qualified()
                    ))
                })?;
                if col.type_name != "vector" {
                    return Err(Error::config(format!(
                        "--vector-column {v}: column {v} of {} is of type {}, not pgvector's vector",
                        meta.qualified(),
                        col.type_sql
                    ))
                    .hint("name a column of type vector(N), or leave --vector-column out for a table without embeddings"));
                }
                Some(col.clone())
            }
            _ => meta
                .columns
                .iter()
                .find(|c| c.type_name == "vector")
                .cloned(),
        };
        plans.push((meta, order_by, vector));
    }

    // Sample queries, exact: no index may answer them.
    let mut vectors = vec![];
    for (meta, order_by, vector) in &plans {
        let Some(col) = vector else {
            vectors.push(None);
            continue;
        };
        let operator = vector_operator(meta, &col.name);
        db.execute("SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off")?;
        let picks = db.texts(
            &format!(
                "SELECT {c}::text FROM {t} WHERE {c} IS NOT NULL ORDER BY random() LIMIT {k}",
                c = ident(&col.name),
                t = meta.qualified(),
                k = o.samples
            ),
            &[],
        )?;
        let mut samples = vec![];
        for v in picks.into_iter().flatten() {
            let neighbours = exact_neighbours(
                &db,
                &meta.qualified(),
                &col.name,
                &operator,
                order_by,
                &v,
                10,
            )?;
            samples.push(Sample {
                vector: v,
                neighbours,
            });
        }
        db.execute("SET LOCAL enable_indexscan = on; SET LOCAL enable_bitmapscan = on")?;
        vectors.push(Some(VectorRecord {
            column: col.name.clone(),
            dims: col.typmod,
            operator,
            samples,
        }));
    }

    let source = o.name.clone().unwrap_or_else(|| {
        format!(
            "{}:{}",
            snap.database,
            plans
                .iter()
                .map(|(m, _, _)| m.qualified())
                .collect::<Vec<_>>()
                .join(",")
        )
    });
    let mut run = Run::begin(repo, SourceKind::Table, &source)?;
    opts.progress.start("backup", None);
    let stored: Vec<Result<_>> = std::thread::scope(|s| {
        let handles: Vec<_> = plans
            .iter()
            .map(|(meta, order_by, _)| {
                let writer = &run.writer;
                let snap_name = &snap.name;
                let conn = &o.conn;
                s.spawn(move || -> Result<_> {
                    let reader = Db::connect(conn)?;
                    reader.join_export(snap_name)?;
                    let cols = column_list(&meta.copied_columns());
                    let keys = order_by
                        .iter()
                        .map(|c| ident(c))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let out = reader.copy_out(&format!(
                        "COPY (SELECT {cols} FROM {} ORDER BY {keys}) TO STDOUT (FORMAT binary)",
                        meta.qualified()
                    ))?;
                    let mut rows = CopyRows::new(out);
                    let stored = store_rows(repo, writer, &mut rows, |r| {
                        opts.progress.add(r.len() as u64);
                        Ok(())
                    })?;
                    reader.execute("COMMIT")?;
                    Ok(stored)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::internal("table reader panicked")))
            })
            .collect()
    });
    opts.progress.finish();
    db.execute("COMMIT")?;

    let mut records = vec![];
    let mut facts = vec![];
    let mut stats = SnapshotStats::default();
    for (((meta, order_by, _), vector), stored) in plans.into_iter().zip(vectors).zip(stored) {
        let stored = stored.map_err(|e| e.context(format!("table {}", meta.qualified())))?;
        stats.files += 1;
        stats.bytes += stored.bytes;
        stats.bytes_read += stored.bytes;
        facts.push(TableFacts {
            table: meta.qualified(),
            rows: stored.rows,
            data_bytes: stored.bytes,
            vector_dims: vector.as_ref().map(|v| v.dims),
            indexes: meta
                .indexes
                .iter()
                .map(|i| format!("{} ({})", i.name, i.method))
                .collect(),
        });
        records.push(TableRecord {
            ddl: meta.ddl(),
            meta,
            order_by,
            chunks: stored.chunks,
            data_bytes: stored.bytes,
            rows: stored.rows,
            digest: stored.digest.hex(),
            vector,
        });
    }
    let all_facts = TablesFacts {
        database: snap.database.clone(),
        server_version_num: snap.server_version_num,
        lsn: snap.lsn,
        snapshot_time: snap.time,
        tables: facts.clone(),
    };
    run.facts = Some(serde_json::to_value(&all_facts).expect("serializable"));
    let body = SnapshotBody {
        paths: records.iter().map(|r| r.meta.qualified()).collect(),
        record: Some(serde_json::to_value(TablesRecord { tables: records }).expect("serializable")),
        ..Default::default()
    };
    let backup = run.finish(opts, stats, &body, vec![])?;
    Ok(TableBackupReport {
        backup,
        lsn: snap.lsn,
        snapshot_time: snap.time,
        tables: facts,
    })
}
