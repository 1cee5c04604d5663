//! WAL objects: one object per archived WAL file, `wal/<system id>/<file name>`.
//!
//! ```text
//! "CSTWAL01"
//! u32 LE length || meta   JSON {"name", "system_id", "size", "digest", "compressed", "pushed", "trail"}
//! u32 LE length || wrapped DEK   HPKE(public key, AAD = "custos wal key v1", DEK)
//! body            nonce || AES-256-GCM(DEK, AAD, zstd(file) or file) || tag
//! ```
//! AAD = "custos wal v1" || name || system id (8, LE) || digest, or, for an object whose
//! label records the trail's head (`trail`, an anchor), "custos wal v2" || the same ||
//! pushed || anchor: a label whose anchor was added, removed or altered does not open.
//! `digest` is the keyed BLAKE3 (id key) of the file: a writer (backup role) compares it
//! to tell an identical re-push (success) from a different file under the same name
//! (refused) without being able to decrypt; the reader checks it after decryption. Names
//! and sizes are visible, as in every WAL archive; contents are not.

use custos_crypto::{aead, wrap, MasterKeys};
use custos_model::{Error, Kind, Result};
use custos_storage::{PutMode, PutOutcome};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::trail::Anchor;
use crate::{paths, Repository};

const MAGIC: &[u8; 8] = b"CSTWAL01";
/// PostgreSQL's largest WAL segment (wal_segment_size at most 1 GiB).
const MAX_WAL_FILE: u64 = 1 << 30;
/// The largest WAL object read: the largest file, stored as zstd would at worst (its bound
/// adds 1/256), with its label. Storage and every key can write `wal/`: a larger object
/// is damaged, and is not read.
const MAX_OBJECT: u64 = MAX_WAL_FILE + (32 << 20);
/// The WAL archive is listed in this many ranges side by side once it holds more than
/// `SPLIT_ABOVE` objects (a listing page is 1,000): seven years of segments are hundreds
/// of pages, each a round trip after the one before.
const WAL_RANGES: usize = 16;
const SPLIT_ABOVE: usize = 4_000;
/// What is read of an object for its label and wrapped key alone.
const HEAD: u64 = 4096;
/// A body's nonce and tag: the least an object holds after its head.
const SEAL: u64 = 12 + 16;
pub const KEY_AAD: &[u8] = b"custos wal key v1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WalMeta {
    pub name: String,
    pub system_id: u64,
    pub size: u64,
    pub digest: String,
    pub compressed: bool,
    /// When it was archived: every commit inside happened before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<chrono::DateTime<chrono::Utc>>,
    /// The last trail entry the pushing host wrote (its anchor, format.md 11.1), when it
    /// knows one: read from its own cache, never looked up in the trail per segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trail: Option<Anchor>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Stored,
    /// The same file was already archived: success, nothing written.
    AlreadyArchived,
}

fn body_aad(m: &WalMeta) -> Vec<u8> {
    let mut aad = match m.trail {
        None => b"custos wal v1".to_vec(),
        Some(_) => b"custos wal v2".to_vec(),
    };
    aad.extend_from_slice(m.name.as_bytes());
    aad.extend_from_slice(&m.system_id.to_le_bytes());
    aad.extend_from_slice(m.digest.as_bytes());
    // v2 binds the rest of the label: when it was pushed (restore refuses targets after
    // it) and the anchor.
    if let Some(a) = &m.trail {
        match m.pushed {
            Some(t) => {
                aad.push(1);
                aad.extend_from_slice(&t.timestamp().to_le_bytes());
                aad.extend_from_slice(&t.timestamp_subsec_nanos().to_le_bytes());
            }
            None => aad.push(0),
        }
        aad.extend_from_slice(&a.seq.to_le_bytes());
        aad.extend_from_slice(a.hash.as_bytes());
    }
    aad
}

fn digest(keys: &MasterKeys, data: &[u8]) -> String {
    blake3::keyed_hash(&keys.id_key, data).to_hex().to_string()
}

/// The label and wrapped data key at the head of a WAL object, and where its body starts.
fn parse_head(bytes: &[u8], what: &str) -> Result<(WalMeta, Vec<u8>, usize)> {
    let bad = || Error::integrity(format!("{what} is truncated or not a WAL object"));
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(bad());
    }
    let ml = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let meta_end = 12 + ml;
    let meta: WalMeta =
        serde_json::from_slice(bytes.get(12..meta_end).ok_or_else(bad)?).map_err(|_| bad())?;
    let wl = u32::from_le_bytes(
        bytes
            .get(meta_end..meta_end + 4)
            .ok_or_else(bad)?
            .try_into()
            .unwrap(),
    ) as usize;
    let body = meta_end + 4 + wl;
    let wrapped = bytes.get(meta_end + 4..body).ok_or_else(bad)?.to_vec();
    Ok((meta, wrapped, body))
}

/// Fuzzing: a WAL object's head and split.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    let _ = split(data, "wal");
}

fn split(bytes: &[u8], what: &str) -> Result<(WalMeta, Vec<u8>, Vec<u8>)> {
    let (meta, wrapped, body) = parse_head(bytes, what)?;
    Ok((meta, wrapped, bytes[body..].to_vec()))
}

/// zstd's first fast level: on pgbench WAL 1.32 GB/s per core at 9.1x, against 0.99 GB/s
/// at 10.7x for level 1 and 0.77 GB/s at 12.2x for level 3. archive_command waits on it
/// and a backlog drains at its pace: speed is worth the 17% more archive.
const WAL_ZSTD_LEVEL: i32 = -1;

thread_local! {
    // The async pusher's threads push file after file: each keeps its zstd context and
    // its two buffers (compressed file, object being built), so a 16 MiB segment costs no
    // fresh allocation and no page faults on new memory.
    static WAL_COMPRESSOR: std::cell::RefCell<zstd::bulk::Compressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(WAL_ZSTD_LEVEL).expect("zstd context"));
    static WAL_BUFFERS: std::cell::RefCell<(Vec<u8>, Vec<u8>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Replaces `out`'s content by zstd(`data`), one frame.
fn compress_wal(data: &[u8], out: &mut Vec<u8>) -> Result<()> {
    out.clear();
    out.reserve(zstd::zstd_safe::compress_bound(data.len()));
    WAL_COMPRESSOR
        .with(|c| c.borrow_mut().compress_to_buffer(data, out))
        .map(|_| ())
        .map_err(|e| Error::internal(e.to_string()))
}

/// Digest of one file, and its compressed body in `out` (cleared first). `parallel`: two
/// threads, one hashing the whole file then compressing its first part, the other
/// compressing the rest: two zstd frames, which decompress as one. (zstd's own workers
/// copy the input and cost more.)
fn digest_and_compress(
    keys: &MasterKeys,
    data: &[u8],
    parallel: bool,
    out: &mut Vec<u8>,
) -> Result<String> {
    if !parallel || data.len() < (1 << 20) {
        let d = digest(keys, data);
        compress_wal(data, out)?;
        return Ok(d);
    }
    // Hashing runs at about a fifth of compression's time: the hashing thread takes less.
    let mid = (data.len() * 7 / 16) & !8191;
    let (first, rest) = data.split_at(mid);
    std::thread::scope(|s| {
        let second = s.spawn(|| {
            let mut z = vec![];
            compress_wal(rest, &mut z).map(|_| z)
        });
        let d = digest(keys, data);
        compress_wal(first, out)?;
        out.extend_from_slice(&second.join().expect("compression thread")?);
        Ok(d)
    })
}

impl Repository {
    /// Archives one WAL file. Durable when this returns `Ok`. `anchor`: the last trail
    /// entry this host wrote, recorded in the label (format.md 11.1).
    pub fn wal_push(
        &self,
        system_id: u64,
        name: &str,
        data: &[u8],
        anchor: Option<&Anchor>,
    ) -> Result<PushOutcome> {
        self.wal_push_with(system_id, name, data, true, anchor)
    }

    /// `parallel`: compress on two threads (one file waits: archive_command); the async
    /// pusher, which pushes several files at once, compresses each on one.
    pub fn wal_push_with(
        &self,
        system_id: u64,
        name: &str,
        data: &[u8],
        parallel: bool,
        anchor: Option<&Anchor>,
    ) -> Result<PushOutcome> {
        let path = paths::wal(system_id, name);
        // Cheap check first: re-pushes happen after every archiver retry.
        if self.storage.size(&path)?.is_some() {
            return self.compare_existing(&path, name, &digest(&self.keys, data));
        }
        WAL_BUFFERS.with(|b| {
            let (compressed, out) = &mut *b.borrow_mut();
            // archive_command waits on this: digest and compression run side by side.
            let meta_digest = digest_and_compress(&self.keys, data, parallel, compressed)?;
            let use_z = compressed.len() + 64 < data.len();
            let meta = WalMeta {
                name: name.into(),
                system_id,
                size: data.len() as u64,
                digest: meta_digest.clone(),
                compressed: use_z,
                pushed: Some(chrono::Utc::now()),
                trail: anchor.cloned(),
            };
            let mut dek = Zeroizing::new([0u8; 32]);
            rand::RngCore::fill_bytes(&mut rand::rng(), dek.as_mut());
            let wrapped = wrap::wrap(&self.keys.public, KEY_AAD, dek.as_ref())?;
            let meta_json = serde_json::to_vec(&meta).expect("serializable");
            out.clear();
            out.extend_from_slice(MAGIC);
            out.extend_from_slice(&(meta_json.len() as u32).to_le_bytes());
            out.extend_from_slice(&meta_json);
            out.extend_from_slice(&(wrapped.len() as u32).to_le_bytes());
            out.extend_from_slice(&wrapped);
            let plain = if use_z { &compressed[..] } else { data };
            aead::seal_append(&dek, &body_aad(&meta), plain, out);
            match self.storage.put(&path, out, PutMode::CreateOnly)? {
                PutOutcome::Created => Ok(PushOutcome::Stored),
                PutOutcome::AlreadyExists => self.compare_existing(&path, name, &meta_digest),
            }
        })
    }

    fn compare_existing(&self, path: &str, name: &str, digest: &str) -> Result<PushOutcome> {
        let existing = self.storage.get_prefix(path, HEAD)?;
        let (meta, _, _) = parse_head(&existing, &format!("archived {name}"))?;
        if meta.digest == digest {
            Ok(PushOutcome::AlreadyArchived)
        } else {
            Err(Error::new(Kind::Conflict, format!("{name} is already archived with different content; refusing to replace it"))
                .hint("two clusters may be archiving to the same repository under one system identifier, or the archived file is damaged: check `custos pg check` and the archive_command of every cluster"))
        }
    }

    /// The label of one archived WAL file (no key needed); `Ok(None)` if not archived.
    pub fn wal_meta(&self, system_id: u64, name: &str) -> Result<Option<WalMeta>> {
        Ok(self.wal_head(system_id, name)?.map(|(meta, _)| meta))
    }

    /// The data key of one archived file as stored (wrapped to the pair of its time).
    pub fn wal_wrapped_key(&self, system_id: u64, name: &str) -> Result<Vec<u8>> {
        self.wal_head(system_id, name)?
            .map(|(_, wrapped)| wrapped)
            .ok_or_else(|| Error::integrity(format!("archived {name} disappeared")))
    }

    /// Label and wrapped key of one archived file, read from its first 4 KiB only.
    fn wal_head(&self, system_id: u64, name: &str) -> Result<Option<(WalMeta, Vec<u8>)>> {
        let head = match self.storage.get_prefix(&paths::wal(system_id, name), HEAD) {
            Ok(b) => b,
            Err(e) if e.kind == Kind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let (meta, wrapped, _) = parse_head(&head, &format!("archived {name}"))?;
        Ok(Some((meta, wrapped)))
    }

    /// The anchor the label of each cluster's newest archived segment records (one
    /// listing and a 4 KiB read per cluster): what `audit verify` checks beside the
    /// snapshots' (`verify` checks every object's).
    pub fn wal_newest_anchors(&self) -> Result<Vec<(String, Anchor)>> {
        let mut newest: std::collections::BTreeMap<u64, String> = Default::default();
        for (sys, name, _) in self.wal_objects()? {
            if name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                let n = newest.entry(sys).or_default();
                if name > *n {
                    *n = name;
                }
            }
        }
        let mut out = vec![];
        for (sys, name) in newest {
            if let Some(a) = self.wal_meta(sys, &name)?.and_then(|m| m.trail) {
                out.push((format!("wal {sys:016x}/{name}"), a));
            }
        }
        Ok(out)
    }

    /// Every archived WAL object: (system id, name, stored size).
    pub fn wal_objects(&self) -> Result<Vec<(u64, String, u64)>> {
        let listed = self.storage.list_split(paths::WAL, &self.wal_splits())?;
        self.keep_wal_splits(&listed);
        let mut out = vec![];
        for e in listed {
            let mut parts = e.path.rsplitn(3, '/');
            let (Some(name), Some(sys)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Ok(sys) = u64::from_str_radix(sys, 16) else {
                continue;
            };
            out.push((sys, name.to_string(), e.size));
        }
        Ok(out)
    }

    /// Where to split the listing of `wal/` (format.md 7a): the names that cut this host's
    /// last listing of it in 16 even parts, when it was longer than a few pages. Names
    /// under `wal/` only, at most 64; anything else in the file is ignored (the answer is
    /// the same whatever the splits: they only spread the work).
    fn wal_splits(&self) -> Vec<String> {
        let Some(p) = self.host_cache().map(|d| d.join("wal-splits")) else {
            return vec![];
        };
        let Ok(text) = std::fs::read_to_string(p) else {
            return vec![];
        };
        text.lines()
            .filter(|l| l.starts_with("wal/") && l.len() <= 128)
            .take(64)
            .map(str::to_string)
            .collect()
    }

    /// Best effort: without the file, the next listing is one range.
    fn keep_wal_splits(&self, listed: &[custos_storage::Entry]) {
        let Some(dir) = self.host_cache() else {
            return;
        };
        let splits: String = if listed.len() > SPLIT_ABOVE {
            (1..WAL_RANGES)
                .map(|k| format!("{}\n", listed[k * listed.len() / WAL_RANGES].path))
                .collect()
        } else {
            String::new()
        };
        let p = dir.join("wal-splits");
        if std::fs::read_to_string(&p).is_ok_and(|t| t == splits) {
            return;
        }
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            let mut rnd = [0u8; 8];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut rnd);
            let tmp = dir.join(format!(".wal-splits-{}", hex::encode(rnd)));
            std::io::Write::write_all(
                &mut std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)?,
                splits.as_bytes(),
            )?;
            std::fs::rename(&tmp, &p).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
        };
        if let Err(e) = write() {
            tracing::debug!("where to split the WAL listing not kept: {e}");
        }
    }

    /// Checks one WAL object of the listed `size`: its layout and label always, from its
    /// head alone (`verify` reads 4 KiB of each, not years of archive); with `decrypt`
    /// (restore key), its content against its digest (and so its label's anchor). Returns
    /// the anchor its label records.
    pub fn wal_check(
        &self,
        system_id: u64,
        name: &str,
        size: u64,
        decrypt: bool,
    ) -> Result<Option<Anchor>> {
        if decrypt {
            return self
                .wal_read(system_id, name)?
                .map(|(meta, _)| meta.trail)
                .ok_or_else(|| {
                    Error::integrity(format!("archived {name} disappeared during verification"))
                });
        }
        if size > MAX_OBJECT {
            return Err(Error::integrity(format!(
                "archived {name} is {size} bytes, more than a WAL file of 1 GiB is stored in"
            )));
        }
        let head = self
            .storage
            .get_prefix(&paths::wal(system_id, name), HEAD)?;
        let (meta, _, body) = parse_head(&head, &format!("archived {name}"))?;
        if size < body as u64 + SEAL {
            return Err(Error::integrity(format!(
                "archived {name} is truncated: {size} bytes, its label and key take {body}"
            )));
        }
        if meta.name != name || meta.system_id != system_id {
            return Err(Error::integrity(format!(
                "archived {name} is labelled {} of cluster {:016x}",
                meta.name, meta.system_id
            )));
        }
        Ok(meta.trail)
    }

    /// Reads one archived WAL file; `Ok(None)` when it was never archived.
    pub fn wal_fetch(&self, system_id: u64, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.wal_read(system_id, name)?.map(|(_, data)| data))
    }

    /// One archived WAL file and its label, authenticated.
    fn wal_read(&self, system_id: u64, name: &str) -> Result<Option<(WalMeta, Vec<u8>)>> {
        if self.keys.secret.is_none() {
            return Err(crate::snapshot::restore_key_required("read archived WAL"));
        }
        let bytes = match custos_storage::get_bounded(
            &*self.storage,
            &paths::wal(system_id, name),
            MAX_OBJECT,
            "archived WAL file",
        ) {
            Ok(b) => b,
            Err(e) if e.kind == Kind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let what = format!("archived {name}");
        let (meta, wrapped, body) = split(&bytes, &what)?;
        if meta.name != name || meta.system_id != system_id {
            return Err(Error::integrity(format!(
                "{what} is labelled {} of cluster {:016x}",
                meta.name, meta.system_id
            )));
        }
        // The object's own wrapping first: the re-wrap table is read only when that no
        // longer opens (it names every WAL object; a wal-fetch should not read it for a
        // segment archived since the rotation).
        let dek = match self.keys.unwrap(KEY_AAD, &wrapped, &what) {
            Ok(k) => k,
            Err(err) => match self
                .rewrapped_key(&paths::wal(system_id, name))
                .map(|w| self.keys.unwrap(KEY_AAD, &w, &what))
            {
                Some(Ok(k)) => k,
                _ => return Err(err),
            },
        };
        let dek: [u8; 32] = dek
            .as_slice()
            .try_into()
            .map_err(|_| Error::integrity(format!("{what}: bad data key")))?;
        let plain = aead::open(&dek, &body_aad(&meta), &body, &what)?;
        // The size is not authenticated (the digest is): bounded before it sizes a buffer.
        if meta.size > MAX_WAL_FILE {
            return Err(Error::integrity(format!(
                "{what} claims {} bytes: more than a WAL file can be (1 GiB)",
                meta.size
            )));
        }
        let data = if meta.compressed {
            zstd::bulk::decompress(&plain, meta.size as usize)
                .map_err(|e| Error::integrity(format!("{what}: {e}")))?
        } else {
            plain
        };
        if data.len() as u64 != meta.size || digest(&self.keys, &data) != meta.digest {
            return Err(Error::integrity(format!(
                "{what} does not match its digest"
            )));
        }
        Ok(Some((meta, data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two frames written in parallel read back as the one file, as wal-fetch reads
    /// them, and the digest is of the whole file.
    #[test]
    fn parallel_compression_reads_back_whole() {
        let keys = MasterKeys::generate();
        let data: Vec<u8> = (0..(16u32 << 20))
            .map(|i| (i / 3 % 251) as u8 ^ (i >> 20) as u8)
            .collect();
        let mut z = b"left over from the file before".to_vec();
        let d = digest_and_compress(&keys, &data, true, &mut z).unwrap();
        assert_eq!(d, digest(&keys, &data));
        assert!(z.len() < data.len() / 4);
        assert_eq!(zstd::bulk::decompress(&z, data.len()).unwrap(), data);
        // One thread, into the buffer the previous file left behind.
        digest_and_compress(&keys, &data, false, &mut z).unwrap();
        assert_eq!(zstd::bulk::decompress(&z, data.len()).unwrap(), data);
    }
}
