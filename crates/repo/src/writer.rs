//! Parallel writing of new chunks: deduplication, then packing (compress + encrypt) on one
//! thread per core, then uploads on their own threads.
//!
//! Memory stays bounded: the queue in front of the packers holds at most a few chunks, each
//! packer holds one pack, each uploader one, and one more may wait for an uploader.
//! [`BlobWriter::finish`] returns the new packs only once every one is durably stored; the
//! caller then writes the index, then the snapshot (packs -> index -> snapshot).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use custos_crypto::wrap::PublicKey;
use custos_model::{ChunkId, Error, Id, PackId, Result};
use custos_storage::{DynStorage, PutMode};

use crate::blob::BlobKind;
use crate::index::{Index, IndexPack};
use crate::pack::{FinishedPack, PackBuilder};
use crate::paths;

#[derive(Debug, Clone, Default)]
pub struct WriteStats {
    pub chunks_new: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
    pub packs: u64,
}

struct Shared {
    seen: Mutex<HashSet<ChunkId>>,
    error: Mutex<Option<Error>>,
    packs: Mutex<Vec<IndexPack>>,
    stats: Mutex<WriteStats>,
}

impl Shared {
    fn fail(&self, e: Error) {
        let mut g = self.error.lock().unwrap();
        if g.is_none() {
            *g = Some(e);
        }
    }
    fn failed(&self) -> Option<Error> {
        self.error.lock().unwrap().clone()
    }
}

pub struct BlobWriter {
    index: Arc<Index>,
    tx: Option<Sender<(ChunkId, BlobKind, Vec<u8>)>>,
    packers: Vec<JoinHandle<()>>,
    up_tx: Option<Sender<FinishedPack>>,
    uploaders: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

pub struct WriterOptions {
    pub pack_size: usize,
    pub packers: usize,
    pub uploaders: usize,
}

impl BlobWriter {
    pub fn new(
        storage: DynStorage,
        public: PublicKey,
        index: Arc<Index>,
        opts: WriterOptions,
    ) -> BlobWriter {
        let shared = Arc::new(Shared {
            seen: Mutex::new(HashSet::new()),
            error: Mutex::new(None),
            packs: Mutex::new(vec![]),
            stats: Mutex::new(WriteStats::default()),
        });
        let (tx, rx) = bounded::<(ChunkId, BlobKind, Vec<u8>)>(opts.packers * 2);
        // A finished pack is handed straight to a free uploader: one queued between them
        // only held another 16 MiB (the packer waits instead, and so do the readers).
        let (up_tx, up_rx) = bounded::<FinishedPack>(0);
        let packers = (0..opts.packers)
            .map(|_| {
                let rx = rx.clone();
                let up = up_tx.clone();
                let shared = shared.clone();
                let size = opts.pack_size;
                std::thread::spawn(move || packer(rx, up, public, size, shared))
            })
            .collect();
        let uploaders = (0..opts.uploaders)
            .map(|_| {
                let rx = up_rx.clone();
                let st = storage.clone();
                let shared = shared.clone();
                std::thread::spawn(move || uploader(rx, st, shared))
            })
            .collect();
        BlobWriter {
            index,
            tx: Some(tx),
            packers,
            up_tx: Some(up_tx),
            uploaders,
            shared,
        }
    }

    /// The index this writer deduplicates against (as loaded when the run began).
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Whether the chunk is already stored where this writer trusts it (its own packs,
    /// or packs a restore key vouched for, intact), or queued.
    pub fn has(&self, id: &ChunkId) -> bool {
        self.index.holds_trusted(id) || self.shared.seen.lock().unwrap().contains(id)
    }

    /// Queues a chunk unless it is already stored where this writer trusts it; returns
    /// whether it was new. A copy in a pack nobody vouches for (another backup key's,
    /// which could hold any bytes under this id) does not count: this one is stored too.
    pub fn add(&self, id: ChunkId, kind: BlobKind, data: Vec<u8>) -> Result<bool> {
        if let Some(e) = self.shared.failed() {
            return Err(e);
        }
        if self.index.holds_trusted(&id) || !self.shared.seen.lock().unwrap().insert(id) {
            return Ok(false);
        }
        let tx = self.tx.as_ref().expect("writer not finished");
        if tx.send((id, kind, data)).is_err() {
            return Err(self
                .shared
                .failed()
                .unwrap_or_else(|| Error::internal("packer stopped")));
        }
        Ok(true)
    }

    /// Flushes every pack, waits until all are stored, and returns them for the index.
    pub fn finish(mut self) -> Result<(Vec<IndexPack>, WriteStats)> {
        drop(self.tx.take());
        for h in self.packers.drain(..) {
            let _ = h.join();
        }
        drop(self.up_tx.take());
        for h in self.uploaders.drain(..) {
            let _ = h.join();
        }
        if let Some(e) = self.shared.failed() {
            return Err(e);
        }
        let packs = std::mem::take(&mut *self.shared.packs.lock().unwrap());
        let stats = self.shared.stats.lock().unwrap().clone();
        Ok((packs, stats))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        drop(self.up_tx.take());
    }
}

fn packer(
    rx: Receiver<(ChunkId, BlobKind, Vec<u8>)>,
    up: Sender<FinishedPack>,
    public: PublicKey,
    size: usize,
    shared: Arc<Shared>,
) {
    // Tree blobs (manifests) go to packs of their own: every command that lists or walks
    // a snapshot reads them, so they stay in the hot tier while data packs may be archived
    // (format.md 4; the lifecycle rule of `bucket-policy` moves only tagged data packs).
    let fresh = |kind: BlobKind| {
        PackBuilder::new(if kind == BlobKind::Tree {
            64 << 10
        } else {
            size
        })
    };
    let mut packs = [fresh(BlobKind::Data), fresh(BlobKind::Tree)];
    let finish = |p: PackBuilder| -> bool {
        match p.finish(&public) {
            Ok(f) => up.send(f).is_ok(),
            Err(e) => {
                shared.fail(e);
                false
            }
        }
    };
    for (id, kind, data) in rx {
        if shared.failed().is_some() {
            return;
        }
        let pack = &mut packs[usize::from(kind == BlobKind::Tree)];
        pack.add(id, kind, &data);
        {
            let mut s = shared.stats.lock().unwrap();
            s.chunks_new += 1;
            s.bytes_new += data.len() as u64;
        }
        if pack.len() >= size {
            let full = std::mem::replace(pack, fresh(kind));
            if !finish(full) {
                return;
            }
        }
    }
    for pack in packs {
        if !pack.is_empty() && !finish(pack) {
            return;
        }
    }
}

fn uploader(rx: Receiver<FinishedPack>, storage: DynStorage, shared: Arc<Shared>) {
    for p in rx {
        if shared.failed().is_some() {
            continue;
        }
        let id = PackId(Id::of_bytes(&p.bytes));
        // A pack of data blobs only may move to an archival storage class; one holding a
        // manifest must not.
        let tier = p
            .entries
            .iter()
            .all(|e| e.kind == BlobKind::Data)
            .then_some(custos_storage::ARCHIVAL_TAG);
        let size = p.bytes.len() as u64;
        // The pack's bytes move into the upload (no copy of 16 MiB per pack in flight).
        let bytes = bytes::Bytes::from(p.bytes);
        match storage.put_tagged(&paths::pack(&id), bytes, PutMode::CreateOnly, tier) {
            Ok(_) => {
                let mut s = shared.stats.lock().unwrap();
                s.bytes_stored += size;
                s.packs += 1;
                drop(s);
                shared.packs.lock().unwrap().push(IndexPack {
                    id,
                    size,
                    key: p.wrapped_key,
                    blobs: p.entries,
                    writer: None,
                    vouched: false,
                });
            }
            Err(e) => shared.fail(e.context("storing a pack")),
        }
    }
}
