//! Data kept as rows, proven by what it means: tables and the vector store (`export`,
//! `restore`), the application's append-only audit log (`audit`), logical dumps of a
//! managed database (`dump`).
//!
//! Rows travel as PostgreSQL's binary COPY format. They are cut into chunks on row
//! boundaries chosen by the rows' own content: once a chunk holds 1 KiB, it ends after a
//! row with probability (row size / 3 KiB), decided by the row's keyed hash. Chunks then
//! average about 3 KiB whatever the row size, a change to one row changes one chunk (two
//! when it moves a boundary), and an hourly export in which 1% of 1.5 KiB rows changed
//! stores about 4% of the table.

pub mod audit;
pub mod dump;
pub mod export;
pub mod restore;

use custos_model::{ChunkId, Result};
use custos_repo::{BlobKind, BlobWriter, Repository};
use custos_sources::postgres::tables::{CopyRows, TableMeta};
use serde::{Deserialize, Serialize};

/// A chunk is cut after a row once it holds this much...
const MIN_CHUNK: usize = 1 << 10;
/// ...with probability (row size / TARGET_CHUNK), by the row's hash...
const TARGET_CHUNK: u64 = 3 << 10;
/// ...and always once it holds this much.
const MAX_CHUNK: usize = 256 << 10;

/// A table as stored in a snapshot's record: its definition, its rows, and its proofs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableRecord {
    pub meta: TableMeta,
    /// The DDL as a person reads it.
    pub ddl: String,
    /// Columns the rows were ordered by (the primary key, or `--order-by`).
    pub order_by: Vec<String>,
    /// Rows in binary COPY format without header and trailer, cut on row boundaries.
    pub chunks: Vec<ChunkId>,
    pub data_bytes: u64,
    pub rows: u64,
    /// Order-independent digest of the rows (format.md 6.4).
    pub digest: String,
    #[serde(default)]
    pub vector: Option<VectorRecord>,
}

/// The table's pgvector column and sample queries with their exact nearest neighbours.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VectorRecord {
    pub column: String,
    pub dims: i32,
    /// The distance operator of the table's vector index (`<->` when it has none).
    pub operator: String,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// The query vector as text (`[0.1,0.2,...]`).
    pub vector: String,
    /// The exact top-10 neighbours' keys as text, nearest first.
    pub neighbours: Vec<String>,
}

/// What every role may read about a table in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TableFacts {
    pub table: String,
    pub rows: u64,
    pub data_bytes: u64,
    #[serde(default)]
    pub vector_dims: Option<i32>,
    #[serde(default)]
    pub indexes: Vec<String>,
}

/// Rows read and stored.
pub(crate) struct Stored {
    pub chunks: Vec<ChunkId>,
    pub bytes: u64,
    pub rows: u64,
    pub digest: RowDigest,
    /// Hash of the row bytes in order (the audit chain's content hash).
    pub ordered: blake3::Hash,
}

/// The order-independent digest of a multiset of rows: the sum, modulo 2^128, of each
/// row's BLAKE3 hash (first 16 bytes, little endian), and the count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowDigest {
    pub sum: u128,
    pub rows: u64,
}

impl RowDigest {
    pub fn add(&mut self, row: &[u8]) {
        let h = blake3::hash(row);
        let v = u128::from_le_bytes(h.as_bytes()[..16].try_into().unwrap());
        self.sum = self.sum.wrapping_add(v);
        self.rows += 1;
    }

    pub fn hex(&self) -> String {
        format!("{:032x}", self.sum)
    }
}

/// Reads a binary COPY stream row by row into chunks cut on row boundaries.
pub(crate) fn store_rows(
    repo: &Repository,
    writer: &BlobWriter,
    rows: &mut CopyRows<impl std::io::Read>,
    mut each: impl FnMut(&[u8]) -> Result<()>,
) -> Result<Stored> {
    let seed = repo.cdc_seed();
    let mut chunk: Vec<u8> = Vec::with_capacity(MAX_CHUNK);
    let mut out = Stored {
        chunks: vec![],
        bytes: 0,
        rows: 0,
        digest: RowDigest::default(),
        ordered: blake3::hash(b""),
    };
    let mut ordered = blake3::Hasher::new();
    let flush = |chunk: &mut Vec<u8>, out: &mut Stored| -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(chunk, Vec::with_capacity(MAX_CHUNK));
        let id = repo.keys.chunk_id(&data);
        out.bytes += data.len() as u64;
        writer.add(id, BlobKind::Data, data)?;
        out.chunks.push(id);
        Ok(())
    };
    while let Some(row) = rows.next_row()? {
        each(&row)?;
        out.digest.add(&row);
        ordered.update(&row);
        out.rows += 1;
        chunk.extend_from_slice(&row);
        let threshold = (u64::MAX / TARGET_CHUNK).saturating_mul(row.len() as u64);
        let cut = chunk.len() >= MAX_CHUNK
            || (chunk.len() >= MIN_CHUNK
                && xxhash_rust::xxh3::xxh3_64_with_seed(&row, seed) <= threshold);
        if cut {
            flush(&mut chunk, &mut out)?;
        }
    }
    flush(&mut chunk, &mut out)?;
    out.ordered = ordered.finalize();
    Ok(out)
}

/// Refuses a record whose column types are not plain type names (`int8`, `vector(384)`,
/// `character varying(20)[]`, `"My Type"`): a record comes from a snapshot that a backup
/// key may have written, and its text becomes SQL.
pub fn check_record_types(meta: &custos_sources::postgres::tables::TableMeta) -> Result<()> {
    for c in &meta.columns {
        let t = c.type_sql.as_str();
        let (name, rest) = t.split_once('(').unwrap_or((t, ""));
        let name_ok = !name.trim().is_empty()
            && name
                .chars()
                .all(|ch| ch.is_alphanumeric() || " _.\"[]".contains(ch))
            && name.matches('"').count() % 2 == 0;
        let rest_ok = rest.is_empty() || {
            let (inside, after) = rest.split_once(')').unwrap_or(("x", ""));
            inside
                .chars()
                .all(|ch| ch.is_ascii_digit() || ch == ',' || ch == ' ')
                && after.chars().all(|ch| ch == '[' || ch == ']' || ch == ' ')
        };
        let identity_ok = c.identity.as_deref().is_none_or(|i| i == "a" || i == "d");
        if !(name_ok && rest_ok && identity_ok) {
            return Err(custos_model::Error::integrity(format!(
                "the snapshot's definition of column {:?} has a type that is not a type name: {t:?}; nothing was restored",
                c.name
            ))
            .hint("the snapshot was written by a key that should not have written it: check `custos audit log` for who wrote it"));
        }
    }
    Ok(())
}

/// Parses `6y`, `30d`, `12w`, `18m` (months) or anything humantime reads.
pub fn parse_retention(s: &str) -> Result<chrono::Duration> {
    let t = s.trim();
    let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let days = |d: i64| chrono::Duration::days(d);
    if let Ok(n) = n.parse::<i64>() {
        match unit {
            "y" | "year" | "years" => return Ok(days(n * 365 + n / 4)),
            "m" | "month" | "months" => return Ok(days(n * 30 + n * 5 / 12)),
            "w" | "week" | "weeks" => return Ok(days(n * 7)),
            "d" | "day" | "days" => return Ok(days(n)),
            _ => {}
        }
    }
    humantime::parse_duration(t)
        .ok()
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .ok_or_else(|| {
            custos_model::Error::config(format!(
                "`{s}` is not a retention period like 6y, 12m, 30d"
            ))
        })
}
