//! Encodings shared by several objects: the repository config, sealed JSON, base64 fields.
//! The normative description is docs/format.md; this module and that document change
//! together.

use chrono::{DateTime, Utc};
use custos_chunk::ChunkerParams;
use custos_model::{Error, RepoId, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub const FORMAT_NAME: &str = "custos-repository";
pub const FORMAT_VERSION: u32 = 1;
/// Default target size of a pack: restic's default, a good S3 object size, and small
/// enough that packers and upload queues stay well under the memory budget.
pub const DEFAULT_PACK_SIZE: u64 = 16 << 20;
pub const ZSTD_LEVEL: i32 = 3;

/// The `config` object: plaintext JSON, holds no secret, written once at `init`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepoConfig {
    pub format: String,
    pub version: u32,
    pub id: RepoId,
    pub created: DateTime<Utc>,
    /// Chunker for files and streams.
    pub chunker: ChunkerParams,
    /// Chunker for database files (page-aligned fixed blocks).
    pub block_chunker: ChunkerParams,
    pub pack_size: u64,
}

impl RepoConfig {
    pub fn parse(bytes: &[u8]) -> Result<RepoConfig> {
        #[derive(Deserialize)]
        struct Probe {
            format: String,
            version: u32,
        }
        let probe: Probe = serde_json::from_slice(bytes)
            .map_err(|e| Error::integrity(format!("repository config is not valid: {e}")))?;
        if probe.format != FORMAT_NAME {
            return Err(Error::integrity(format!(
                "this is not a custos repository (format `{}`)",
                probe.format
            )));
        }
        if probe.version != FORMAT_VERSION {
            return Err(Error::config(format!(
                "repository format version {} is not supported by this custos (supports {FORMAT_VERSION})",
                probe.version
            ))
            .hint("use a custos release that supports this repository version"));
        }
        serde_json::from_slice(bytes)
            .map_err(|e| Error::integrity(format!("repository config is not valid: {e}")))
    }
}

/// zstd-compressed JSON.
pub fn to_zjson<T: Serialize>(v: &T) -> Vec<u8> {
    let json = serde_json::to_vec(v).expect("serializable");
    zstd::bulk::compress(&json, ZSTD_LEVEL).expect("zstd compress in memory")
}

/// The most a zstd-compressed JSON object may expand to: what storage (or a key holder)
/// wrote is hostile, and a few bytes of zstd can claim gigabytes.
pub const ZJSON_LIMIT: u64 = 256 << 20;

pub fn from_zjson<T: DeserializeOwned>(data: &[u8], what: &str) -> Result<T> {
    use std::io::Read;
    // The size the frame declares, when it does and is within the limit, allocated once
    // (growing by doubling held up to twice an index object's 20 MB of JSON); a frame that
    // declares too little only grows the buffer.
    let declared = zstd::zstd_safe::get_frame_content_size(data)
        .ok()
        .flatten()
        .filter(|n| *n <= ZJSON_LIMIT)
        .unwrap_or(0);
    let mut json = Vec::with_capacity(declared as usize);
    zstd::stream::read::Decoder::new(data)
        .and_then(|d| d.take(ZJSON_LIMIT + 1).read_to_end(&mut json))
        .map_err(|e| Error::integrity(format!("{what}: cannot decompress: {e}")))?;
    if json.len() as u64 > ZJSON_LIMIT {
        return Err(Error::integrity(format!(
            "{what}: expands to more than {} MiB: refused",
            ZJSON_LIMIT >> 20
        )));
    }
    serde_json::from_slice(&json)
        .map_err(|e| Error::integrity(format!("{what}: malformed content: {e}")))
}

/// Base64 fields in JSON objects (one definition, shared with key material).
pub use custos_crypto::keys::b64;
