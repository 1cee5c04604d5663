//! Snapshot objects.
//!
//! A snapshot has a *summary* (time, source, host, parent, statistics) sealed with the meta
//! key, which every role can read to list snapshots and find a parent; and a *body* (source
//! paths, the manifest or stream chunk list) sealed with a fresh data key wrapped to the
//! restore public key: only the restore role can read what was backed up. The body's AAD
//! includes the hash of the sealed summary, so the two halves cannot be recombined.

use chrono::{DateTime, Utc};
use custos_crypto::{aead, wrap, MasterKeys};
use custos_model::{ChunkId, Error, KeyId, Kind, Lsn, Result, SnapshotId};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::format::{b64, from_zjson, to_zjson};

const SUMMARY_AAD: &[u8] = b"custos snapshot summary v1";
pub const KEY_AAD: &[u8] = b"custos snapshot key v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A local folder tree.
    Files,
    /// Objects of a bucket (S3 or another OpenDAL service).
    Bucket,
    /// Standard input or a command's output.
    Stream,
    /// A PostgreSQL base backup (data directory between pg_backup_start and pg_backup_stop).
    Postgres,
    /// Tables exported as rows in one snapshot (`backup table`), with their proofs.
    Table,
    /// One export of an append-only audit table, chained to the export before it.
    #[serde(rename = "audit-log")]
    AuditLog,
    /// A logical dump (`pg_dump` directory format) with the server's row counts.
    Dump,
    /// Configuration from the environment: plain values, and references in place of secrets.
    Env,
    /// A Terraform state (`terraform state pull`) and its configuration folder.
    Terraform,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Files => "files",
            SourceKind::Bucket => "bucket",
            SourceKind::Stream => "stream",
            SourceKind::Postgres => "postgres",
            SourceKind::Table => "table",
            SourceKind::AuditLog => "audit-log",
            SourceKind::Dump => "dump",
            SourceKind::Env => "env",
            SourceKind::Terraform => "terraform",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotStats {
    pub files: u64,
    pub dirs: u64,
    /// Files taken from the parent without being read.
    pub files_unchanged: u64,
    /// Logical bytes of the source.
    pub bytes: u64,
    /// Bytes actually read from the source.
    pub bytes_read: u64,
    pub chunks_new: u64,
    /// Uncompressed bytes of new chunks.
    pub bytes_new: u64,
    /// Bytes added to storage (packs, after compression and encryption).
    pub bytes_stored: u64,
    /// Files that could not be read (the snapshot is partial).
    pub errors: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotSummary {
    pub time: DateTime<Utc>,
    pub kind: SourceKind,
    /// Name of the source: a path for files, a bucket URL, the `--name` of a stream.
    pub source: String,
    pub host: String,
    pub user: String,
    #[serde(default)]
    pub parent: Option<SnapshotId>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub stats: SnapshotStats,
    /// The key that wrote the snapshot.
    pub key: KeyId,
    /// For PostgreSQL base backups: what recovery needs to know, readable by every role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg: Option<PgInfo>,
    /// For tables, audit-log exports and dumps: what the data is, readable by every role
    /// (row counts, the export chain's links, versions; never values). Written and read by
    /// the operation of the kind (format.md 6.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub facts: Option<serde_json::Value>,
    /// The operation trail's head when the snapshot was written (format.md 11): a
    /// snapshot naming an entry the trail no longer holds shows the trail was cut short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trail: Option<crate::trail::Anchor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PgBackupType {
    /// Every file read.
    Full,
    /// Only files changed since the parent read; the rest taken from the parent.
    Incremental,
}

impl PgBackupType {
    pub fn as_str(self) -> &'static str {
        match self {
            PgBackupType::Full => "full",
            PgBackupType::Incremental => "incremental",
        }
    }
}

/// A base backup's place in the cluster's history.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PgInfo {
    #[serde(with = "custos_model::id::u64_text")]
    pub system_id: u64,
    /// The name given in custos.toml, if any.
    #[serde(default)]
    pub cluster: Option<String>,
    pub version_num: i32,
    pub backup_type: PgBackupType,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub start_time: DateTime<Utc>,
    /// The earliest time the backup can be recovered to (it is consistent from here).
    pub stop_time: DateTime<Utc>,
    /// Transactions with this id or later committed after the backup.
    pub next_xid: u64,
    pub segment_size: u64,
    /// The WAL from start to stop is inside the snapshot (restorable without the archive).
    pub wal_included: bool,
    pub data_checksums: bool,
    /// Pages whose checksum did not match while reading.
    #[serde(default)]
    pub damaged_pages: u64,
}

impl PgInfo {
    /// What a cluster can have; anything else was not written by custos (a snapshot is
    /// whatever a backup key wrote), and used as it stands a segment size of 0 divides by
    /// zero in every command that places WAL.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !self.segment_size.is_power_of_two() || !(1 << 20..=1 << 30).contains(&self.segment_size)
        {
            return Err(format!(
                "WAL segment size {} (PostgreSQL's are powers of two from 1 MiB to 1 GiB)",
                self.segment_size
            ));
        }
        if self.timeline == 0 {
            return Err("timeline 0 (timelines start at 1)".into());
        }
        if self.stop_lsn < self.start_lsn {
            return Err(format!(
                "stop LSN {} before start LSN {}",
                self.stop_lsn, self.start_lsn
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SnapshotBody {
    /// Source paths as given.
    #[serde(default)]
    pub paths: Vec<String>,
    /// Manifest (JSON lines of entries) chunks, for files and buckets.
    #[serde(default)]
    pub manifest: Vec<ChunkId>,
    /// Content chunks, for streams.
    #[serde(default)]
    pub stream: Vec<ChunkId>,
    #[serde(default)]
    pub stream_size: u64,
    /// PostgreSQL base backups: `tablespace_map` as pg_backup_stop returned it (the
    /// tablespaces themselves are in the manifest under `pg_tblspc/<oid>/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablespace_map: Option<String>,
    /// PostgreSQL base backups: mode and owner of the data directory itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<RootMeta>,
    /// PostgreSQL base backups: the configuration files the server read from outside its
    /// data directory (Debian's /etc/postgresql/...), which the backup does not hold:
    /// named so that a restore can say what it lacks (format.md 6.2).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pg_config_outside: Vec<String>,
    /// For tables, audit-log exports and dumps: definitions, row chunks, digests and
    /// sample queries, readable by the restore role only (format.md 6.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RootMeta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Serialize, Deserialize)]
struct Encoded {
    version: u32,
    #[serde(with = "b64")]
    summary: Vec<u8>,
    #[serde(with = "b64")]
    key: Vec<u8>,
    #[serde(with = "b64")]
    body: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub summary: SnapshotSummary,
}

pub fn encode(
    keys: &MasterKeys,
    summary: &SnapshotSummary,
    body: &SnapshotBody,
) -> Result<Vec<u8>> {
    let sealed_summary = aead::seal(&keys.meta_key, SUMMARY_AAD, &to_zjson(summary));
    let mut dek = Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rng(), dek.as_mut());
    let wrapped = wrap::wrap(&keys.public, KEY_AAD, dek.as_ref())?;
    let aad = body_aad(&sealed_summary);
    let sealed_body = aead::seal(&dek, &aad, &to_zjson(body));
    Ok(serde_json::to_vec(&Encoded {
        version: 1,
        summary: sealed_summary,
        key: wrapped,
        body: sealed_body,
    })
    .expect("serializable"))
}

fn body_aad(sealed_summary: &[u8]) -> Vec<u8> {
    let mut aad = b"custos snapshot body v1".to_vec();
    aad.extend_from_slice(blake3::hash(sealed_summary).as_bytes());
    aad
}

fn parse(id: &SnapshotId, bytes: &[u8]) -> Result<Encoded> {
    if SnapshotId(custos_model::Id::of_bytes(bytes)) != *id {
        return Err(Error::integrity(format!(
            "snapshot {} does not match its id: it was altered",
            id.short()
        )));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| Error::integrity(format!("snapshot {} is malformed: {e}", id.short())))
}

pub fn decode_summary(keys: &MasterKeys, id: &SnapshotId, bytes: &[u8]) -> Result<SnapshotSummary> {
    let e = parse(id, bytes)?;
    let what = format!("snapshot {}", id.short());
    let plain = aead::open(&keys.meta_key, SUMMARY_AAD, &e.summary, &what)?;
    let summary: SnapshotSummary = from_zjson(&plain, &what)?;
    check_summary(&what, &summary)?;
    Ok(summary)
}

/// What a reader holds a decoded summary to beyond its form: also run on the summaries a
/// host kept from earlier listings, so a check added later applies to them too.
pub fn check_summary(what: &str, summary: &SnapshotSummary) -> Result<()> {
    if let Some(Err(why)) = summary.pg.as_ref().map(PgInfo::check) {
        return Err(Error::integrity(format!(
            "{what} records PostgreSQL facts no cluster has: {why}"
        ))
        .hint("custos never writes such a snapshot: find which key wrote it (`custos audit log`), then `custos forget` it"));
    }
    Ok(())
}

pub fn decode_body(keys: &MasterKeys, id: &SnapshotId, bytes: &[u8]) -> Result<SnapshotBody> {
    decode_body_with(keys, id, bytes, || None)
}

/// The body's data key as stored in the snapshot (wrapped to the pair of its time).
pub fn wrapped_key(id: &SnapshotId, bytes: &[u8]) -> Result<Vec<u8>> {
    Ok(parse(id, bytes)?.key)
}

/// Decodes the body, trying first `rewrapped` (its data key re-wrapped to the current
/// pair by `key rotate --rewrap`), then the key stored in the snapshot.
pub fn decode_body_with(
    keys: &MasterKeys,
    id: &SnapshotId,
    bytes: &[u8],
    rewrapped: impl FnOnce() -> Option<Vec<u8>>,
) -> Result<SnapshotBody> {
    if keys.secret.is_none() {
        return Err(restore_key_required("read the contents of a snapshot"));
    }
    let e = parse(id, bytes)?;
    let what = format!("snapshot {}", id.short());
    // The object's own wrapping first (current and previous secrets); the re-wrap table
    // (`rewrapped`, read on first use) only when those no longer open it.
    let dek = match keys.unwrap(KEY_AAD, &e.key, &what) {
        Ok(k) => k,
        Err(err) => match rewrapped().map(|w| keys.unwrap(KEY_AAD, &w, &what)) {
            Some(Ok(k)) => k,
            _ => return Err(err),
        },
    };
    let dek: [u8; 32] = dek
        .as_slice()
        .try_into()
        .map_err(|_| Error::integrity(format!("{what}: bad data key")))?;
    let plain = aead::open(&dek, &body_aad(&e.summary), &e.body, &what)?;
    from_zjson(&plain, &what)
}

pub fn restore_key_required(action: &str) -> Error {
    Error::new(Kind::Permission, format!("this key has the backup role and cannot {action}"))
        .hint("backup keys can only add data; use a password of a restore-role key (see `custos key list`)")
}
