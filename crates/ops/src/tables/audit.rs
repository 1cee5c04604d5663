//! The application's append-only audit table, exported exactly once, forever.
//!
//! The hazard: an id (or a timestamp) is assigned when a row is inserted but the row
//! becomes visible when its transaction commits, so a row with a smaller id can appear
//! after a larger one was exported, and a "max id exported" watermark loses it.
//!
//! So exports partition rows by the 64-bit id of the transaction that inserted them, not
//! by the order column. Export k reads in a `REPEATABLE READ` snapshot whose `xmin` is
//! the oldest transaction still running; every transaction with a smaller id had ended.
//! It takes exactly the visible rows whose inserting transaction is in `[from, to)`, where
//! `from` is the previous export's `to` and `to` is this snapshot's `xmin`: committed rows
//! of transactions that can no longer change. Rows of newer transactions that are already
//! visible are carried to the next export. The windows of consecutive exports meet, so
//! each committed row falls in exactly one.
//!
//! Each export records its rows, their count, the previous export's hash and its own:
//! `hash = BLAKE3("custos audit-log export v1" | prev | seq | from | to | rows | content)`
//! with `content` the BLAKE3 of the rows' bytes in order, so the exports form one chain
//! that `verify_chain` walks from the first export to the last.
//!
//! A row's 32-bit `xmin` is widened to 64 bits against the snapshot's `xmax`; this is exact
//! for rows inserted within the last 2^31 transactions, which every row of a window is.
//! A row much older than that (after about four billion transactions) could map into a
//! window again; the chain would then show it twice (format.md 6.4).

use chrono::{DateTime, Utc};
use custos_model::{Error, Kind, Lsn, Result, SnapshotId};
use custos_repo::snapshot::{SnapshotStats, SourceKind};
use custos_repo::{Repository, Snapshot, SnapshotBody};
use custos_sources::postgres::db::{ConnectOptions, Db};
use custos_sources::postgres::tables::{column_list, ident, CopyRows, TableMeta};
use serde::{Deserialize, Serialize};

use crate::backup::{BackupOptions, BackupReport, Run};
use crate::tables::restore::copy_pieces;
use crate::tables::store_rows;

pub struct AuditExportOptions {
    pub conn: ConnectOptions,
    pub table: String,
    pub order_by: String,
}

/// What every role reads about an export: its place in the chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditFacts {
    pub database: String,
    pub table: String,
    pub order_by: String,
    pub seq: u64,
    /// Rows of transactions with ids in `[xid_from, xid_to)`.
    pub xid_from: u64,
    pub xid_to: u64,
    pub rows: u64,
    /// Visible rows of newer transactions, left for the next export.
    pub carried: u64,
    /// Smallest and largest order values exported (text).
    #[serde(default)]
    pub first: Option<String>,
    #[serde(default)]
    pub last: Option<String>,
    pub snapshot_time: DateTime<Utc>,
    pub lsn: Lsn,
    /// BLAKE3 of the rows' bytes in order (hex).
    pub content: String,
    #[serde(default)]
    pub prev: Option<String>,
    pub hash: String,
}

impl AuditFacts {
    pub fn compute_hash(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(b"custos audit-log export v1");
        h.update(self.prev.as_deref().unwrap_or("").as_bytes());
        h.update(&self.seq.to_le_bytes());
        h.update(&self.xid_from.to_le_bytes());
        h.update(&self.xid_to.to_le_bytes());
        h.update(&self.rows.to_le_bytes());
        h.update(self.content.as_bytes());
        h.finalize().to_hex().to_string()
    }

    pub fn chain_name(&self) -> String {
        format!("{}:{}", self.database, self.table)
    }
}

/// The body's record: the table's definition and the rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    pub meta: TableMeta,
    pub chunks: Vec<custos_model::ChunkId>,
    pub data_bytes: u64,
    pub rows: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditExportReport {
    pub backup: BackupReport,
    pub facts: AuditFacts,
}

pub fn facts_of(s: &Snapshot) -> Option<AuditFacts> {
    crate::backup::facts(s, SourceKind::AuditLog)
}

fn full_xid(xmax: u64) -> String {
    format!("({xmax}::int8 - ((({xmax}::int8 & 4294967295) - xmin::text::int8) & 4294967295))")
}

pub fn export_audit_log(
    repo: &Repository,
    o: &AuditExportOptions,
    opts: &BackupOptions,
) -> Result<AuditExportReport> {
    let db = Db::connect(&o.conn)?;
    let snap = db.begin_export()?;
    let meta = db.table_meta(&o.table)?;
    let col = meta.column(&o.order_by).ok_or_else(|| {
        Error::config(format!(
            "--order-by {}: table {} has no such column",
            o.order_by,
            meta.qualified()
        ))
    })?;
    let sequenced = col.identity.is_some()
        || col
            .default
            .as_deref()
            .is_some_and(|d| d.starts_with("nextval("));
    let monotonic = match col.type_name.as_str() {
        "int2" | "int4" | "int8" | "numeric" => sequenced,
        "timestamptz" | "timestamp" => col.default.as_deref().is_some_and(|d| {
            d.contains("now()")
                || d.contains("CURRENT_TIMESTAMP")
                || d.contains("clock_timestamp()")
        }),
        _ => false,
    };
    if !monotonic {
        return Err(Error::new(
            Kind::Config,
            format!(
                "column {} of {} ({}{}) is not monotonic: an audit log is exported in the order of a column that only grows",
                o.order_by,
                meta.qualified(),
                col.type_sql,
                col.default.as_deref().map(|d| format!(" default {d}")).unwrap_or_default()
            ),
        )
        .hint("order by an identity or serial column, or a timestamp defaulting to now()"));
    }
    let head = chain_head(repo, &snap.database, &meta.qualified())?;
    let prev = head.as_ref().map(|(_, f)| f.clone());
    let from = prev.as_ref().map(|p| p.xid_to).unwrap_or(0);
    let to = snap.xmin;
    if to < from {
        return Err(Error::new(
            Kind::Source,
            format!(
                "the database's transaction ids ({to}) are behind the last export's ({from}): this is not the database the chain was exported from, or it was restored to an earlier point"
            ),
        )
        .hint("export a restored or different database under its own name (another --db-url database), never into this chain"));
    }
    let xid = full_xid(snap.xmax);
    let window = format!("{xid} >= {from} AND {xid} < {to}");
    let t = meta.qualified();
    let oc = ident(&o.order_by);
    let r = db.texts(
        &format!(
            "SELECT concat_ws(E'\\n', min({oc})::text, max({oc})::text, (SELECT count(*) FROM {t} WHERE {xid} >= {to})::text) FROM {t} WHERE {window}"
        ),
        &[],
    )?;
    let line = r.into_iter().next().flatten().unwrap_or_default();
    let parts: Vec<&str> = line.split('\n').collect();
    let (first, last, carried) = match parts.as_slice() {
        [a, b, c] => (
            Some(a.to_string()),
            Some(b.to_string()),
            c.parse().unwrap_or(0),
        ),
        [c] => (None, None, c.parse().unwrap_or(0)),
        _ => (None, None, 0),
    };

    let mut run = Run::begin_after(repo, SourceKind::AuditLog, &t, head.map(|(s, _)| s))?;
    let cols = column_list(&meta.copied_columns());
    let out = db.copy_out(&format!(
        "COPY (SELECT {cols} FROM {t} WHERE {window} ORDER BY {oc}) TO STDOUT (FORMAT binary)"
    ))?;
    let mut rows = CopyRows::new(out);
    let stored = store_rows(repo, &run.writer, &mut rows, |_| Ok(()))?;
    db.execute("COMMIT")?;
    let mut facts = AuditFacts {
        database: snap.database.clone(),
        table: t.clone(),
        order_by: o.order_by.clone(),
        seq: prev.as_ref().map(|p| p.seq + 1).unwrap_or(1),
        xid_from: from,
        xid_to: to,
        rows: stored.rows,
        carried,
        first,
        last,
        snapshot_time: snap.time,
        lsn: snap.lsn,
        content: stored.ordered.to_hex().to_string(),
        prev: prev.as_ref().map(|p| p.hash.clone()),
        hash: String::new(),
    };
    facts.hash = facts.compute_hash();
    run.facts = Some(serde_json::to_value(&facts).expect("serializable"));
    let record = AuditRecord {
        meta,
        chunks: stored.chunks,
        data_bytes: stored.bytes,
        rows: stored.rows,
    };
    let stats = SnapshotStats {
        files: 1,
        bytes: stored.bytes,
        bytes_read: stored.bytes,
        ..Default::default()
    };
    let body = SnapshotBody {
        paths: vec![t.clone()],
        record: Some(serde_json::to_value(&record).expect("serializable")),
        ..Default::default()
    };
    let backup = run.finish(opts, stats, &body, vec![])?;
    Ok(AuditExportReport { backup, facts })
}

/// Exports grouped by chain (`database:table`), each in chain order; only the chains of
/// `table` when one is named.
type Chains = std::collections::BTreeMap<String, Vec<(Snapshot, AuditFacts)>>;

fn chains(snaps: Vec<Snapshot>, table: Option<&str>) -> Chains {
    let mut out = Chains::new();
    for s in snaps {
        if let Some(f) = facts_of(&s) {
            if table.is_none_or(|t| crate::backup::names_table(&f.table, t)) {
                out.entry(f.chain_name()).or_default().push((s, f));
            }
        }
    }
    for exports in out.values_mut() {
        exports.sort_by_key(|(_, f)| f.seq);
    }
    out
}

/// The newest export of a chain, which a new export links to. Refuses to extend a chain
/// that forks (two exports claiming the same place).
fn chain_head(
    repo: &Repository,
    database: &str,
    table: &str,
) -> Result<Option<(Snapshot, AuditFacts)>> {
    let exports = chains(repo.snapshots_for_reading()?, Some(table))
        .remove(&format!("{database}:{table}"))
        .unwrap_or_default();
    for w in exports.windows(2) {
        if w[0].1.seq == w[1].1.seq {
            return Err(Error::integrity(format!(
                "the audit-log chain of {table} forks: exports {} and {} both claim place {}",
                w[0].0.id.short(),
                w[1].0.id.short(),
                w[0].1.seq
            ))
            .hint("run `custos audit-log verify` to see the whole chain"));
        }
    }
    Ok(exports.into_iter().last())
}

#[derive(Debug, Clone, Serialize)]
pub struct ChainReport {
    pub chain: String,
    pub exports: usize,
    pub rows: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub first_time: Option<DateTime<Utc>>,
    pub last_time: Option<DateTime<Utc>>,
    /// Whether the rows were read back and their content hashes recomputed.
    pub read_data: bool,
    /// The problems found, the first break first.
    pub problems: Vec<String>,
}

/// Walks every audit-log chain (or the one of `table`) from its first export to its last.
/// With `read_data` (a restore key), every export's rows are read back and hashed.
/// `min_retention`: exports younger than this must all be present, from seq 1 on.
pub fn verify_chains(
    repo: &Repository,
    table: Option<&str>,
    read_data: bool,
    min_retention: chrono::Duration,
    now: DateTime<Utc>,
) -> Result<Vec<ChainReport>> {
    let (snaps, damaged) = repo.snapshots_in_storage()?;
    let chains = chains(snaps, table);
    let index = if read_data {
        Some(repo.load_index()?)
    } else {
        None
    };
    let mut out = vec![];
    for (name, exports) in chains {
        let mut problems: Vec<String> = damaged
            .iter()
            .map(|(id, e)| format!("snapshot {} cannot be read ({e}): if it was an export of this chain, it was altered", id.short()))
            .collect();
        let mut rows = 0;
        let mut prev: Option<&(Snapshot, AuditFacts)> = None;
        for e in &exports {
            let (s, f) = e;
            rows += f.rows;
            if f.compute_hash() != f.hash {
                problems.push(format!(
                    "export {} ({}) was altered: its hash does not match its contents",
                    f.seq,
                    s.id.short()
                ));
            }
            match prev {
                None => {
                    if f.seq != 1 || f.prev.is_some() {
                        let young = now - s.summary.time < min_retention;
                        if young {
                            problems.push(format!(
                                "exports 1 to {} are missing: the chain starts at export {} ({}, {}), younger than the minimum retention",
                                f.seq - 1,
                                f.seq,
                                s.id.short(),
                                s.summary.time.format("%Y-%m-%d %H:%M")
                            ));
                        }
                    }
                }
                Some((ps, pf)) => {
                    if f.seq == pf.seq {
                        problems.push(format!(
                            "exports {} and {} both claim place {} in the chain",
                            ps.id.short(),
                            s.id.short(),
                            f.seq
                        ));
                    } else if f.seq != pf.seq + 1 {
                        problems.push(format!(
                            "gap: exports {} to {} are missing between {} ({}) and {} ({})",
                            pf.seq + 1,
                            f.seq - 1,
                            ps.id.short(),
                            ps.summary.time.format("%Y-%m-%d %H:%M"),
                            s.id.short(),
                            s.summary.time.format("%Y-%m-%d %H:%M")
                        ));
                    } else if f.prev.as_deref() != Some(pf.hash.as_str()) {
                        problems.push(format!(
                            "export {} ({}) does not link to export {} ({}): one of them was replaced",
                            f.seq,
                            s.id.short(),
                            pf.seq,
                            ps.id.short()
                        ));
                    } else if f.xid_from != pf.xid_to {
                        problems.push(format!(
                            "export {} ({}) starts at transaction {} but export {} ended at {}: rows between them were never exported",
                            f.seq,
                            s.id.short(),
                            f.xid_from,
                            pf.seq,
                            pf.xid_to
                        ));
                    }
                    if s.summary.time < ps.summary.time {
                        problems.push(format!(
                            "export {} ({}) is dated before export {}: the chain was reordered",
                            f.seq,
                            s.id.short(),
                            pf.seq
                        ));
                    }
                }
            }
            if let Some(index) = &index {
                if let Err(e) = check_content(repo, index, s, f) {
                    problems.push(format!(
                        "export {} ({}): {}",
                        f.seq,
                        s.id.short(),
                        e.message
                    ));
                }
            }
            prev = Some(e);
        }
        out.push(ChainReport {
            chain: name,
            exports: exports.len(),
            rows,
            first_seq: exports.first().map(|(_, f)| f.seq),
            last_seq: exports.last().map(|(_, f)| f.seq),
            first_time: exports.first().map(|(s, _)| s.summary.time),
            last_time: exports.last().map(|(s, _)| s.summary.time),
            read_data,
            problems,
        });
    }
    Ok(out)
}

fn audit_record(repo: &Repository, s: &Snapshot) -> Result<AuditRecord> {
    crate::backup::record(repo, s, SourceKind::AuditLog, "an audit-log export")
}

/// Reads an export's rows back: their count and content hash must be the chain's.
fn check_content(
    repo: &Repository,
    index: &custos_repo::Index,
    s: &Snapshot,
    f: &AuditFacts,
) -> Result<()> {
    let rec = audit_record(repo, s)?;
    let mut h = blake3::Hasher::new();
    let mut n = 0u64;
    let mut rows = CopyRows::new(Pieces::new(copy_pieces(repo, index, &rec.chunks)));
    let parsed = (|| {
        while let Some(r) = rows.next_row()? {
            h.update(&r);
            n += 1;
        }
        Ok(())
    })();
    // A chunk that could not be read says so, rather than the parse it cut short.
    if let Some(e) = rows.into_inner().failed {
        return Err(e);
    }
    parsed?;
    matches_chain(f, rec.rows, n, h.finalize())
}

/// An export's rows as read back (how many, and the hash of their bytes in order) against
/// what the chain recorded.
fn matches_chain(f: &AuditFacts, record_rows: u64, n: u64, content: blake3::Hash) -> Result<()> {
    if n != f.rows || record_rows != f.rows {
        return Err(Error::integrity(format!(
            "holds {n} rows; the chain recorded {}",
            f.rows
        )));
    }
    if content.to_hex().as_str() != f.content {
        return Err(Error::integrity(
            "its rows do not match the content hash the chain recorded: they were altered",
        ));
    }
    Ok(())
}

/// The pieces of a binary COPY as one reader; the first piece that fails ends it, and
/// is kept for the caller.
struct Pieces<I> {
    pieces: I,
    current: Vec<u8>,
    at: usize,
    failed: Option<Error>,
}

impl<I: Iterator<Item = Result<Vec<u8>>>> Pieces<I> {
    fn new(pieces: I) -> Self {
        Pieces {
            pieces,
            current: vec![],
            at: 0,
            failed: None,
        }
    }
}

impl<I: Iterator<Item = Result<Vec<u8>>>> std::io::Read for Pieces<I> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.current.len() {
            match self.pieces.next() {
                None => return Ok(0),
                Some(Ok(p)) => {
                    self.current = p;
                    self.at = 0;
                }
                Some(Err(e)) => {
                    let msg = e.message.clone();
                    self.failed = Some(e);
                    return Err(std::io::Error::other(msg));
                }
            }
        }
        let n = out.len().min(self.current.len() - self.at);
        out[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

pub struct AuditRestoreOptions {
    pub conn: ConnectOptions,
    /// Which chain (table name); required when the repository holds several.
    pub table: Option<String>,
    pub as_name: String,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditRestoreReport {
    pub chain: String,
    pub restored_as: String,
    pub exports: usize,
    pub first_seq: u64,
    pub last_seq: u64,
    pub rows: u64,
    pub snapshots: Vec<SnapshotId>,
}

/// Loads the exports of a period into a new table, after checking their links and
/// content; never into the live audit table or any table that exists.
pub fn restore_audit_log(repo: &Repository, o: &AuditRestoreOptions) -> Result<AuditRestoreReport> {
    repo.require_restore("restore an audit log")?;
    let chains = chains(repo.snapshots_for_reading()?, o.table.as_deref());
    if chains.len() != 1 {
        return Err(Error::config(if chains.is_empty() {
            "no audit-log exports found".to_string()
        } else {
            format!(
                "several audit-log chains ({}): name one with --table",
                chains.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        }));
    }
    let (name, exports) = chains.into_iter().next().unwrap();
    let picked: Vec<&(Snapshot, AuditFacts)> = {
        let mut v = vec![];
        for e in &exports {
            let t = e.0.summary.time;
            if o.since.is_some_and(|s| t < s) {
                continue;
            }
            v.push(e);
            if o.until.is_some_and(|u| t >= u) {
                break;
            }
        }
        v
    };
    if picked.is_empty() {
        return Err(Error::config(
            "no export of the chain falls in the period given",
        ));
    }
    for w in picked.windows(2) {
        let (a, b) = (&w[0].1, &w[1].1);
        if b.seq != a.seq + 1
            || b.prev.as_deref() != Some(a.hash.as_str())
            || b.xid_from != a.xid_to
        {
            return Err(Error::integrity(format!(
                "the chain of {name} is broken between exports {} and {}",
                a.seq, b.seq
            ))
            .hint("`custos audit-log verify` names what is missing or altered"));
        }
    }
    let db = Db::connect(&o.conn)?;
    let first = audit_record(repo, &picked[0].0)?;
    let (schema, tname) = match o.as_name.split_once('.') {
        Some((s, n)) => (s.to_string(), n.to_string()),
        None => (first.meta.schema.clone(), o.as_name.clone()),
    };
    let target = format!("{}.{}", ident(&schema), ident(&tname));
    if target == first.meta.qualified() || db.relation_exists(&target)? {
        return Err(Error::new(
            Kind::Config,
            format!("{target} exists (or is the live audit table): an audit log is restored into a new table only"),
        )
        .hint("give --as a name no table has, e.g. --as audit_log_restored"));
    }
    let index = repo.load_index_for_reading()?;
    custos_storage::stop_warming();
    let cols: Vec<String> = first
        .meta
        .copied_columns()
        .iter()
        .map(|c| format!("{} {}", ident(&c.name), c.type_sql))
        .collect();
    crate::tables::check_record_types(&first.meta)?;
    db.execute("BEGIN")?;
    db.execute_one(&format!("CREATE TABLE {target} ({})", cols.join(", ")))?;
    let names = column_list(&first.meta.copied_columns());
    let mut total = 0u64;
    let result = (|| -> Result<()> {
        for (s, f) in &picked {
            let rec = audit_record(repo, s)?;
            // The rows are hashed as they are loaded (the content hash is over the
            // chunks' bytes in order); a mismatch rolls the load back.
            let mut h = blake3::Hasher::new();
            let last = rec.chunks.len();
            let mut pieces = copy_pieces(repo, &index, &rec.chunks)
                .enumerate()
                .map(|(i, p)| {
                    if let (1.., Ok(b)) = (i, &p) {
                        if i <= last {
                            h.update(b);
                        }
                    }
                    p
                });
            let n = db.copy_in(
                &format!("COPY {target} ({names}) FROM STDIN (FORMAT binary)"),
                &mut pieces,
            )?;
            matches_chain(f, rec.rows, n, h.finalize())
                .map_err(|e| e.context(format!("export {} ({})", f.seq, s.id.short())))?;
            total += n;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = db.execute("ROLLBACK");
        return Err(e);
    }
    let expected: u64 = picked.iter().map(|(_, f)| f.rows).sum();
    if total != expected {
        let _ = db.execute("ROLLBACK");
        return Err(Error::integrity(format!(
            "loaded {total} rows; the chain recorded {expected}"
        )));
    }
    db.execute("COMMIT")?;
    Ok(AuditRestoreReport {
        chain: name,
        restored_as: target,
        exports: picked.len(),
        first_seq: picked[0].1.seq,
        last_seq: picked[picked.len() - 1].1.seq,
        rows: total,
        snapshots: picked.iter().map(|(s, _)| s.id).collect(),
    })
}
