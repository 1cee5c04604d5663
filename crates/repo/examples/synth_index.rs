//! Writes a synthetic chunk index for `bench/scale.sh`: index objects naming `CHUNKS`
//! chunks in packs of 32, as prune would write them (100,000 blobs an object). The packs
//! themselves are not written: the measures that use it read the index only.
//!
//! Usage: CUSTOS_PASSWORD=... synth_index <local repository folder> <chunks>

use std::sync::Arc;

use custos_model::{ChunkId, Id, PackId};
use custos_repo::blob::{BlobKind, PackEntry};
use custos_repo::index::{IndexFile, IndexPack};
use custos_repo::{OpenOptions, Repository};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, chunks): (&str, u64) = match &args[..] {
        [_, d, n] => (d, n.parse().expect("a number of chunks")),
        _ => {
            eprintln!("usage: synth_index <local repository folder> <chunks>");
            std::process::exit(2);
        }
    };
    let pw = std::env::var("CUSTOS_PASSWORD").expect("CUSTOS_PASSWORD");
    let storage = Arc::new(custos_storage::local::LocalStorage::new(dir));
    let repo = Repository::open(storage, pw.as_bytes(), OpenOptions::default()).expect("open");
    let me = repo.signing_public().map(hex::encode);
    let per_object = custos_repo::repository::INDEX_OBJECT_BLOBS as u64;
    let mut done = 0u64;
    while done < chunks {
        let n = per_object.min(chunks - done);
        let mut f = IndexFile::default();
        let mut i = 0u64;
        while i < n {
            let blobs = 32.min(n - i);
            f.packs.push(IndexPack {
                id: PackId(Id(rand::random())),
                size: blobs * (1 << 20),
                key: rand::random::<[u8; 92]>().to_vec(),
                blobs: (0..blobs)
                    .map(|b| PackEntry {
                        id: ChunkId(Id(rand::random())),
                        kind: BlobKind::Data,
                        offset: (b as u32) << 20,
                        length: 1 << 20,
                        raw_length: 1 << 20,
                        compressed: false,
                    })
                    .collect(),
                writer: me.clone(),
                vouched: true,
            });
            i += blobs;
        }
        repo.write_index_files(f).expect("write");
        done += n;
    }
    eprintln!("wrote {chunks} chunk entries");
}
