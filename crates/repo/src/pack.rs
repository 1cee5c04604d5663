//! Pack objects: many encrypted blobs, a sealed header listing them, and the pack's data
//! key wrapped to the repository's public key.
//!
//! ```text
//! "CSTPACK1"
//! blob*        nonce(12) || AES-256-GCM(DEK, AAD = chunk id, zstd(plaintext) or plaintext) || tag(16)
//! header       nonce || AES-256-GCM(DEK, AAD = "custos pack header v1", zstd JSON [PackEntry]) || tag
//! wrapped DEK  HPKE(repository public key, AAD = "custos pack key v1", DEK)   (80 bytes)
//! trailer      u32 LE header length || u32 LE wrapped-key length || "CSTPEND1"
//! ```
//! A blob moved to another place fails authentication (its AAD is its id); a truncated pack
//! has no trailer; a flipped byte fails AES-GCM. A backup-role writer can build packs
//! (it needs only the public key) but cannot open them.

use custos_crypto::{aead, wrap};
use custos_model::{ChunkId, Error, Result};
use zeroize::Zeroizing;

use crate::blob::{BlobKind, BlobLoc, PackEntry};
use crate::format::{from_zjson, to_zjson, ZSTD_LEVEL};

pub const MAGIC: &[u8; 8] = b"CSTPACK1";
pub const END: &[u8; 8] = b"CSTPEND1";
pub const TRAILER_LEN: usize = 16;
pub(crate) const HEADER_AAD: &[u8] = b"custos pack header v1";
pub const KEY_AAD: &[u8] = b"custos pack key v1";

thread_local! {
    // Creating a zstd context per blob costs more than compressing a small blob; each
    // packer or reader thread keeps one of each.
    static COMPRESSOR: std::cell::RefCell<zstd::bulk::Compressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).expect("zstd context"));
    static FAST_COMPRESSOR: std::cell::RefCell<zstd::bulk::Compressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Compressor::new(1).expect("zstd context"));
    static DECOMPRESSOR: std::cell::RefCell<zstd::bulk::Decompressor<'static>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().expect("zstd context"));
    // A compressed blob's decrypted body, before decompression: one buffer per thread.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Compresses a blob at [`ZSTD_LEVEL`], or at level 1 when a sample says it barely
/// compresses: on data like embeddings (random floats) level 3 takes twice as long as
/// level 1 for the same size (measured: 1.18x either way on a pgvector table), while on
/// text, tables and indexes it is worth its cost.
fn compress(data: &[u8]) -> Vec<u8> {
    const SAMPLE: usize = 8192;
    let poor = data.len() >= 8 * SAMPLE
        && FAST_COMPRESSOR.with(|c| {
            let sample = &data[..SAMPLE];
            c.borrow_mut()
                .compress(sample)
                .map(|z| z.len() * 3 > sample.len() * 2)
                .unwrap_or(false)
        });
    let ctx = if poor { &FAST_COMPRESSOR } else { &COMPRESSOR };
    ctx.with(|c| {
        c.borrow_mut()
            .compress(data)
            .expect("zstd compress in memory")
    })
}

pub struct PackBuilder {
    dek: Zeroizing<[u8; 32]>,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
    raw_bytes: u64,
}

pub struct FinishedPack {
    pub bytes: Vec<u8>,
    pub entries: Vec<PackEntry>,
    pub wrapped_key: Vec<u8>,
    pub raw_bytes: u64,
}

impl PackBuilder {
    pub fn new(capacity: usize) -> PackBuilder {
        let mut dek = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rng(), dek.as_mut());
        let mut buf = Vec::with_capacity(capacity + 4096);
        buf.extend_from_slice(MAGIC);
        PackBuilder {
            dek,
            buf,
            entries: vec![],
            raw_bytes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Compresses (when that saves space) and encrypts one blob into the pack.
    pub fn add(&mut self, id: ChunkId, kind: BlobKind, plaintext: &[u8]) {
        let compressed = compress(plaintext);
        let (body, is_compressed) = if compressed.len() + 16 < plaintext.len() {
            (&compressed[..], true)
        } else {
            (plaintext, false)
        };
        let offset = self.buf.len();
        aead::seal_append(&self.dek, &id.0 .0, body, &mut self.buf);
        self.entries.push(PackEntry {
            id,
            kind,
            offset: offset as u32,
            length: (self.buf.len() - offset) as u32,
            raw_length: plaintext.len() as u32,
            compressed: is_compressed,
        });
        self.raw_bytes += plaintext.len() as u64;
    }

    pub fn finish(mut self, public: &wrap::PublicKey) -> Result<FinishedPack> {
        let header = aead::seal(&self.dek, HEADER_AAD, &to_zjson(&self.entries));
        let wrapped = wrap::wrap(public, KEY_AAD, self.dek.as_ref())?;
        self.buf.extend_from_slice(&header);
        self.buf.extend_from_slice(&wrapped);
        self.buf
            .extend_from_slice(&(header.len() as u32).to_le_bytes());
        self.buf
            .extend_from_slice(&(wrapped.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(END);
        Ok(FinishedPack {
            bytes: self.buf,
            entries: self.entries,
            wrapped_key: wrapped,
            raw_bytes: self.raw_bytes,
        })
    }
}

/// Opens a blob's ciphertext with the pack's data key and checks its id.
pub fn open_blob(
    dek: &[u8; 32],
    id_key: &[u8; 32],
    entry_id: &ChunkId,
    loc: &BlobLoc,
    sealed: &[u8],
) -> Result<Vec<u8>> {
    let mut plain = vec![0u8; loc.raw_length as usize];
    open_blob_into(dek, id_key, entry_id, loc, sealed, &mut plain)?;
    Ok(plain)
}

/// [`open_blob`] into `out`, which must be `loc.raw_length` bytes: a restore decodes a
/// block straight into its place in an aligned buffer.
pub fn open_blob_into(
    dek: &[u8; 32],
    id_key: &[u8; 32],
    entry_id: &ChunkId,
    loc: &BlobLoc,
    sealed: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let what = || format!("chunk {}", entry_id.short());
    let filled = if loc.compressed {
        SCRATCH.with(|b| -> Result<bool> {
            let mut body = b.borrow_mut();
            body.resize(sealed.len().saturating_sub(aead::OVERHEAD), 0);
            aead::open_to(dek, &entry_id.0 .0, sealed, &mut body, &what())?;
            let n = DECOMPRESSOR
                .with(|d| d.borrow_mut().decompress_to_buffer(&body[..], out))
                .map_err(|e| Error::integrity(format!("{}: cannot decompress: {e}", what())))?;
            Ok(n == out.len())
        })?
    } else if sealed.len() == out.len() + aead::OVERHEAD {
        // Stored as is: decrypted in its place, no copy in between.
        aead::open_to(dek, &entry_id.0 .0, sealed, out, &what())?;
        true
    } else {
        false
    };
    if !filled
        || out.len() != loc.raw_length as usize
        || blake3::keyed_hash(id_key, out).as_bytes() != &entry_id.0 .0
    {
        return Err(Error::integrity(format!(
            "chunk {} does not match its id",
            entry_id.short()
        )));
    }
    Ok(())
}

/// Parses a whole pack: returns its entries and the wrapped data key.
pub fn parse_trailer(pack: &[u8], what: &str) -> Result<(std::ops::Range<usize>, Vec<u8>)> {
    let n = pack.len();
    if n < MAGIC.len() + TRAILER_LEN || &pack[..8] != MAGIC || &pack[n - 8..] != END {
        return Err(Error::integrity(format!(
            "{what} is truncated or not a pack"
        )));
    }
    let hl = u32::from_le_bytes(pack[n - 16..n - 12].try_into().unwrap()) as usize;
    let wl = u32::from_le_bytes(pack[n - 12..n - 8].try_into().unwrap()) as usize;
    let end = n - TRAILER_LEN;
    if hl + wl + MAGIC.len() > end {
        return Err(Error::integrity(format!("{what} has a damaged trailer")));
    }
    let wrapped = pack[end - wl..end].to_vec();
    Ok((end - wl - hl..end - wl, wrapped))
}

pub fn open_header(dek: &[u8; 32], sealed: &[u8], what: &str) -> Result<Vec<PackEntry>> {
    let plain = aead::open(dek, HEADER_AAD, sealed, &format!("{what} header"))?;
    from_zjson(&plain, &format!("{what} header"))
}
