//! Entry points for the fuzz targets (`fuzz/`, cargo fuzz) and for the replay of their
//! corpora in the test suite: each takes arbitrary bytes as storage (or a key holder)
//! could have written them and runs the decoder custos runs on them. None may panic or
//! allocate without bound; every failure is an error value, which is dropped here.
//! Where the bytes would be decrypted first, a second entry point feeds them to the
//! decoder as the plaintext (sealed with a fixed key), so the fuzzer reaches past the
//! authentication it could never forge.

use custos_crypto::aead;
use custos_model::{Id, RepoId};

use crate::blob::BlobLoc;
use crate::format::from_zjson;

const DEK: [u8; 32] = [7u8; 32];
const ID_KEY: [u8; 32] = [9u8; 32];

/// A pack as stored: the trailer, then the header under a fixed data key.
pub fn pack(data: &[u8]) {
    if let Ok((range, _wrapped)) = crate::pack::parse_trailer(data, "pack") {
        if let Some(sealed) = data.get(range) {
            let _ = crate::pack::open_header(&DEK, sealed, "pack");
        }
    }
}

/// A pack header's plaintext (zstd JSON entries), then each entry's blob opened from the
/// bytes after it, as a restore would.
pub fn pack_header(data: &[u8]) {
    let split = data.len() / 2;
    let (head, body) = data.split_at(split);
    let sealed = aead::seal(&DEK, crate::pack::HEADER_AAD, head);
    let Ok(entries) = crate::pack::open_header(&DEK, &sealed, "pack") else {
        return;
    };
    for e in entries.iter().take(64) {
        let loc = BlobLoc {
            pack: 0,
            offset: e.offset,
            length: e.length,
            raw_length: e.raw_length,
            kind: e.kind,
            compressed: e.compressed,
        };
        let Some(sealed) = body.get(loc.range()) else {
            continue;
        };
        let _ = crate::pack::open_blob(&DEK, &ID_KEY, &e.id, &loc, sealed);
    }
}

/// An index object's plaintext.
pub fn index(data: &[u8]) {
    if let Ok(f) = from_zjson::<crate::index::IndexFile>(data, "index") {
        let _ = f.verified_signer();
        let mut i = crate::index::Index::default();
        for p in f.packs.iter().take(1024) {
            i.add_pack(p);
        }
    }
}

/// A snapshot object as stored, and its summary's and body's plaintexts.
pub fn snapshot(data: &[u8]) {
    let id = custos_model::SnapshotId(Id(*blake3::hash(data).as_bytes()));
    let _ = crate::snapshot::wrapped_key(&id, data);
    if let Ok(s) = from_zjson::<crate::SnapshotSummary>(data, "summary") {
        if let Some(pg) = s.pg {
            let _ = pg.check();
        }
    }
    let _ = from_zjson::<crate::SnapshotBody>(data, "body");
}

/// A key file: its JSON, what `damage` finds in it, and its KDF parameters' bounds (the
/// derivation itself only with parameters as cheap as custos's tests use).
pub fn keyfile(data: &[u8]) {
    if let Ok(k) = serde_json::from_slice::<crate::keyfile::KeyFile>(data) {
        let _ = k.damage();
        if k.kdf.memory_kib <= 64 && k.kdf.iterations <= 2 {
            let _ = k.open(b"password", RepoId(Id([1u8; 32])));
        }
    }
}

/// A trail entry as stored, and an entry's plaintext.
pub fn trail(data: &[u8]) {
    crate::trail::fuzz(data);
}

/// A WAL object: its head, label and body split.
pub fn wal(data: &[u8]) {
    crate::wal::fuzz(data);
}

/// The repository's config object.
pub fn config(data: &[u8]) {
    // A config that parses is used: its chunkers cut (this input, as a file of that size
    // and as a stream of unknown size), which must neither panic nor allocate past the
    // bounds the parser enforces.
    if let Ok(c) = crate::format::RepoConfig::parse(data) {
        for p in [c.chunker, c.block_chunker] {
            for hint in [Some(data.len() as u64), None] {
                for chunk in p.split(data, hint, 7) {
                    let _ = chunk;
                }
            }
        }
    }
}

/// Objects sealed under the meta key that every key reads when it opens or locks the
/// repository, by the first byte: a keyring link's plaintext (then applied to a key that
/// holds no authority's signature for it), a re-wrap table's plaintext, a lock's JSON (then
/// judged live or stale).
pub fn meta(data: &[u8]) {
    let Some((which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => crate::keyring::fuzz_link(rest),
        1 => crate::keyring::fuzz_rewrap(rest),
        _ => {
            if let Ok(l) = serde_json::from_slice::<crate::lock::LockInfo>(rest) {
                let _ = l.is_stale("fuzz-host");
            }
        }
    }
}

/// A named fuzz target.
pub type Target = (&'static str, fn(&[u8]));

/// Every target by name, for the corpus replay.
pub const TARGETS: &[Target] = &[
    ("pack", pack),
    ("pack_header", pack_header),
    ("index", index),
    ("snapshot", snapshot),
    ("keyfile", keyfile),
    ("trail", trail),
    ("wal", wal),
    ("config", config),
    ("meta", meta),
];
