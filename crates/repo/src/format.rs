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
/// The pack sizes `init --pack-size-mib` accepts (1 to 512 MiB), and so a config holds.
pub const PACK_SIZE_MIN: u64 = 1 << 20;
pub const PACK_SIZE_MAX: u64 = 512 << 20;
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
        let c: RepoConfig = serde_json::from_slice(bytes)
            .map_err(|e| Error::integrity(format!("repository config is not valid: {e}")))?;
        // What init can write; anything else was written by someone else, and would make
        // every backup panic or allocate without bound (a pack of 2^62 bytes).
        let bad = |what: String| {
            Error::integrity(format!(
                "repository config is not valid: {what}: custos never writes that; the config was altered"
            ))
            .hint("copy `config` back from a secondary (`custos copy` keeps it byte for byte) or from a backup of the repository; nothing was written")
        };
        c.chunker.check().map_err(|e| bad(format!("chunker {e}")))?;
        c.block_chunker
            .check()
            .map_err(|e| bad(format!("block_chunker {e}")))?;
        if !(PACK_SIZE_MIN..=PACK_SIZE_MAX).contains(&c.pack_size) {
            return Err(bad(format!(
                "pack_size {} is outside {PACK_SIZE_MIN}..={PACK_SIZE_MAX}",
                c.pack_size
            )));
        }
        Ok(c)
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
    /// Counts what the decoder gives and stops at the limit with an error of its own.
    struct Bounded<R> {
        inner: R,
        left: u64,
    }
    impl<R: Read> Read for Bounded<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::FileTooLarge, "over the limit")
            })?;
            Ok(n)
        }
    }
    // Parsed as it is decompressed: the JSON is never whole in memory (an index object's
    // 20 MB, twice over while the build reads two at once).
    let decoder = zstd::stream::read::Decoder::new(data)
        .map_err(|e| Error::integrity(format!("{what}: cannot decompress: {e}")))?;
    let reader = std::io::BufReader::with_capacity(
        64 << 10,
        Bounded {
            inner: decoder,
            left: ZJSON_LIMIT,
        },
    );
    serde_json::from_reader(reader).map_err(|e| match e.io_error_kind() {
        Some(std::io::ErrorKind::FileTooLarge) => Error::integrity(format!(
            "{what}: expands to more than {} MiB: refused",
            ZJSON_LIMIT >> 20
        )),
        Some(_) => Error::integrity(format!("{what}: cannot decompress: {e}")),
        None => Error::integrity(format!("{what}: malformed content: {e}")),
    })
}

/// Base64 fields in JSON objects (one definition, shared with key material).
pub use custos_crypto::keys::b64;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sealed_json_reads_back_and_damage_is_an_integrity_error() {
        let v: Vec<(String, u64)> = (0..50_000).map(|i| (format!("k{i}"), i)).collect();
        let z = to_zjson(&v);
        assert_eq!(from_zjson::<Vec<(String, u64)>>(&z, "t").unwrap(), v);
        // Cut short: the stream ends inside the JSON.
        let e = from_zjson::<Vec<(String, u64)>>(&z[..z.len() / 2], "t").unwrap_err();
        assert_eq!(e.kind, custos_model::Kind::Integrity, "{e}");
        // Valid zstd, not the JSON of the type.
        let e = from_zjson::<Vec<(String, u64)>>(&to_zjson(&"text"), "t").unwrap_err();
        assert!(e.to_string().contains("malformed content"), "{e}");
        // Not zstd at all.
        let e = from_zjson::<Vec<(String, u64)>>(b"not zstd", "t").unwrap_err();
        assert_eq!(e.kind, custos_model::Kind::Integrity, "{e}");
    }

    #[test]
    fn a_config_custos_never_writes_is_refused() {
        let good = serde_json::json!({
            "format": "custos-repository", "version": 1, "id": "00".repeat(32),
            "created": "2026-12-06T00:00:00Z",
            "chunker": {"kind": "cdc", "min": 524288, "avg": 1048576, "max": 8388608},
            "block_chunker": {"kind": "fixed", "size": 131072},
            "pack_size": 16777216u64,
        });
        RepoConfig::parse(good.to_string().as_bytes()).unwrap();
        let cases: [(&str, serde_json::Value, &str); 6] = [
            ("pack_size", serde_json::json!(1u64 << 62), "pack_size"),
            ("pack_size", serde_json::json!(4096), "pack_size"),
            (
                "chunker",
                serde_json::json!({"kind": "cdc", "min": 0, "avg": 0, "max": 0}),
                "chunker min 0",
            ),
            (
                "chunker",
                serde_json::json!({"kind": "cdc", "min": 1048576, "avg": 65536, "max": 4096}),
                "not in order",
            ),
            (
                "block_chunker",
                serde_json::json!({"kind": "fixed", "size": 0}),
                "block_chunker size 0",
            ),
            (
                "block_chunker",
                serde_json::json!({"kind": "fixed", "size": 12288}),
                "multiple of 8192",
            ),
        ];
        for (field, value, says) in cases {
            let mut c = good.clone();
            c[field] = value;
            let e = RepoConfig::parse(c.to_string().as_bytes()).unwrap_err();
            assert_eq!(e.kind, custos_model::Kind::Integrity, "{e}");
            assert!(
                e.to_string().contains(says) && e.to_string().contains("altered"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_small_object_that_expands_past_the_limit_is_refused() {
        // 257 MiB of JSON whitespace before `0`: valid JSON, a few KB compressed. Refused
        // for its size alone, before it is all decompressed.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        let spaces = vec![b' '; 1 << 20];
        for _ in 0..(ZJSON_LIMIT >> 20) + 1 {
            enc.write_all(&spaces).unwrap();
        }
        enc.write_all(b"0").unwrap();
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 1 << 20, "{}", bomb.len());
        let e = from_zjson::<u64>(&bomb, "bomb").unwrap_err();
        assert!(
            e.to_string().contains("expands to more than 256 MiB"),
            "{e}"
        );
        assert_eq!(e.kind, custos_model::Kind::Integrity);
    }
}
