//! Writes synthetic file snapshots over a synthetic index (`synth_index`) for
//! `bench/scale.sh`'s prune measure: `SNAPSHOTS` snapshots whose manifests (real tree
//! blobs in real packs) name, between them, every chunk of every other pack of the index,
//! one file entry per pack. The data packs themselves do not exist, so prune has whole
//! packs to delete (the odd ones) and none to repack: what it measures is marking,
//! planning and rewriting the index, not reading data.
//!
//! Usage: CUSTOS_PASSWORD=... synth_snapshots <local repository folder> <snapshots>

use std::sync::Arc;

use custos_repo::snapshot::{SnapshotBody, SnapshotStats, SnapshotSummary, SourceKind};
use custos_repo::{Index, OpenOptions, Repository};
use custos_sources::files::{Entry, EntryKind};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, snapshots): (&str, u32) = match &args[..] {
        [_, d, n] => (d, n.parse().expect("a number of snapshots")),
        _ => {
            eprintln!("usage: synth_snapshots <local repository folder> <snapshots>");
            std::process::exit(2);
        }
    };
    let pw = std::env::var("CUSTOS_PASSWORD").expect("CUSTOS_PASSWORD");
    let storage = Arc::new(custos_storage::local::LocalStorage::new(dir));
    let repo = Repository::open(storage, pw.as_bytes(), OpenOptions::default()).expect("open");
    let index = repo.load_index_fresh().expect("index");
    let packs = index.pack_count() as u32;
    let mut named = 0u64;
    for s in 0..snapshots {
        let entries: Vec<Entry> = (0..packs)
            .filter(|pos| pos % 2 == 0 && (pos / 2) % snapshots == s)
            .map(|pos| {
                let blobs = index.pack_copies(pos).1;
                named += blobs.len() as u64;
                Entry {
                    path: format!("pack-{pos:08}").into(),
                    kind: EntryKind::File,
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                    mtime_ns: 0,
                    size: blobs.iter().map(|(_, l)| u64::from(l.raw_length)).sum(),
                    target: None,
                    chunks: blobs.iter().map(|(c, _)| *c).collect(),
                    pages: None,
                    etag: None,
                }
            })
            .collect();
        let writer = repo.writer(Arc::new(Index::default()));
        let manifest = custos_ops::manifest::store(&repo, &writer, &entries).expect("manifest");
        let (new, _) = writer.finish().expect("packs");
        repo.write_index(new).expect("index object");
        let summary = SnapshotSummary {
            time: chrono::Utc::now(),
            kind: SourceKind::Files,
            source: "/synthetic".into(),
            host: repo.opts.host.clone(),
            user: repo.opts.user.clone(),
            parent: None,
            tags: vec![],
            stats: SnapshotStats {
                files: entries.len() as u64,
                ..Default::default()
            },
            key: repo.key_id,
            pg: None,
            facts: None,
            trail: None,
        };
        let body = SnapshotBody {
            paths: vec!["/synthetic".into()],
            manifest,
            ..Default::default()
        };
        repo.save_snapshot(&summary, &body).expect("snapshot");
    }
    eprintln!("{snapshots} snapshots naming {named} chunks of {packs} packs");
}
