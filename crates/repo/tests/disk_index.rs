//! The on-disk index (format.md 5.3) answers exactly what the index in memory answers, is
//! kept up to date as index objects come and go, and is rebuilt when it is stale or
//! damaged.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use custos_crypto::kdf::KdfParams;
use custos_model::{ChunkId, Id, PackId};
use custos_repo::blob::{BlobKind, PackEntry};
use custos_repo::index::IndexPack;
use custos_repo::{Index, OpenOptions, Repository};
use custos_storage::DynStorage;

fn id(rng: &mut u64) -> Id {
    let mut b = [0u8; 32];
    for x in b.iter_mut() {
        *rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *x = (*rng >> 56) as u8;
    }
    Id(b)
}

/// `n` packs of `per` blobs; every tenth blob is a chunk of `shared` (stored twice).
fn packs(rng: &mut u64, n: usize, per: usize, shared: &[ChunkId]) -> Vec<IndexPack> {
    (0..n)
        .map(|_| IndexPack {
            id: PackId(id(rng)),
            size: 1 << 20,
            key: id(rng).0.to_vec(),
            blobs: (0..per)
                .map(|i| PackEntry {
                    id: if i % 10 == 0 && !shared.is_empty() {
                        shared[(i / 10) % shared.len()]
                    } else {
                        ChunkId(id(rng))
                    },
                    kind: if i % 7 == 0 {
                        BlobKind::Tree
                    } else {
                        BlobKind::Data
                    },
                    offset: (i * 100) as u32,
                    length: 100,
                    raw_length: 150 + i as u32,
                    compressed: i % 2 == 0,
                })
                .collect(),
            writer: None,
            vouched: false,
        })
        .collect()
}

fn open(storage: &DynStorage, cache: Option<&Path>, memory: u64) -> Repository {
    Repository::open(
        storage.clone(),
        b"pw",
        OpenOptions {
            host: "h".into(),
            user: "u".into(),
            threads: 2,
            cache_dir: cache.map(Path::to_path_buf),
            index_memory: Some(memory),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Everything a reader asks of an index, in a comparable form.
fn view(i: &Index, chunks: &[ChunkId]) -> String {
    let mut out = String::new();
    for c in chunks {
        // Copies of equal rank come in listing order, which differs with the path taken:
        // the best one's rank, then every copy.
        let best = i
            .get(c)
            .map(|(m, l)| (m.trusted, m.vouched, i.is_bad(c, &l)));
        let mut locs: Vec<String> = i
            .locations(c)
            .iter()
            .map(|(m, l)| {
                format!(
                    "{}@{}+{}/{}/{:?}/{}/t{}v{}w{}b{}",
                    m.id.short(),
                    l.offset,
                    l.length,
                    l.raw_length,
                    l.kind,
                    l.compressed,
                    m.trusted,
                    m.vouched,
                    m.writer.is_some(),
                    i.is_bad(c, l)
                )
            })
            .collect();
        locs.sort();
        out += &format!(
            "{} {} {} {} {best:?} {:?}\n",
            c.0.short(),
            i.contains(c),
            i.holds_trusted(c),
            i.holds_intact(c),
            locs
        );
    }
    let mut packs: Vec<String> = i
        .packs()
        .map(|p| format!("{} {} {}", p.id.short(), p.size, hex::encode(&p.key)))
        .collect();
    packs.sort();
    out += &packs.join("\n");
    let by: BTreeMap<String, usize> = i
        .by_pack()
        .into_iter()
        .map(|(p, b)| {
            // Pack by pack (what verify reads) as in the whole grouping.
            let one: Vec<_> = i.blobs_of(&p).iter().map(|(c, l)| (*c, l.offset)).collect();
            let all: Vec<_> = b.iter().map(|(c, l)| (*c, l.offset)).collect();
            assert_eq!(one, all, "blobs of pack {}", p.short());
            (p.short(), b.len())
        })
        .collect();
    // Copy numbers (what prune marks used): each pack's copies are numbered in one run,
    // the runs cover 0..copies() once, and a chunk's numbers name exactly its copies.
    let mut numbered: BTreeMap<u64, (ChunkId, u32)> = BTreeMap::new();
    for pos in 0..i.pack_count() as u32 {
        let (first, blobs) = i.pack_copies(pos);
        for (k, (c, l)) in blobs.iter().enumerate() {
            let was = numbered.insert(first + k as u64, (*c, l.offset));
            assert!(was.is_none(), "copy {} numbered twice", first + k as u64);
        }
    }
    assert_eq!(numbered.len() as u64, i.copies());
    assert!(numbered.keys().copied().eq(0..i.copies()));
    let mut spans = custos_repo::index::disk::Spans::default();
    for c in chunks {
        let mut named: Vec<u32> = i
            .copy_numbers(c, &mut spans)
            .unwrap()
            .iter()
            .map(|n| {
                let (chunk, offset) = numbered[n];
                assert_eq!(chunk, *c);
                offset
            })
            .collect();
        let mut offsets: Vec<u32> = i.locations(c).iter().map(|(_, l)| l.offset).collect();
        named.sort();
        offsets.sort();
        assert_eq!(named, offsets, "copies of {}", c.0.short());
    }
    // All at once, as prune marks a batch: the same numbers as one by one.
    let mut one_by_one: Vec<u64> = chunks
        .iter()
        .flat_map(|c| i.copy_numbers(c, &mut spans).unwrap())
        .collect();
    let mut together = i
        .copy_numbers_many(chunks, &mut custos_repo::index::disk::Spans::default())
        .unwrap();
    one_by_one.sort();
    together.sort();
    assert_eq!(together, one_by_one);
    out += &format!("\ncopies {}", i.copies());
    let files: BTreeMap<String, usize> = i
        .file_packs()
        .unwrap()
        .into_iter()
        .map(|(f, p)| (f.0.short(), p.len()))
        .collect();
    let mut names: Vec<String> = i.files.iter().map(|f| f.0.short()).collect();
    names.sort();
    format!(
        "{out}\n{by:?}\n{files:?}\n{names:?}\ndamaged {}",
        i.damaged_copies()
    )
}

/// Equal views, or the first line where they differ.
#[track_caller]
fn same(got: &str, want: &str) {
    if let Some((g, w)) = got.lines().zip(want.lines()).find(|(g, w)| g != w) {
        panic!("the indexes differ:\n got {g}\nwant {w}");
    }
    assert_eq!(got.lines().count(), want.lines().count());
}

fn current(cache: &Path) -> String {
    let mut found = vec![];
    for e in walk(cache) {
        if e.file_name().is_some_and(|n| n == "current") {
            found.push(std::fs::read_to_string(&e).unwrap());
        }
    }
    assert_eq!(found.len(), 1, "one build per repository and key");
    found.pop().unwrap()
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(p).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn the_disk_index_answers_as_the_memory_index_through_additions_deletions_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let storage: DynStorage = Arc::new(custos_storage::local::LocalStorage::new(dir.path()));
    let owner = Repository::init(
        storage.clone(),
        b"pw",
        KdfParams::new(Some(8), Some(1)),
        OpenOptions::default(),
        None,
        None,
    )
    .unwrap();
    drop(owner);
    let mut rng = 7u64;
    let shared: Vec<ChunkId> = (0..5).map(|_| ChunkId(id(&mut rng))).collect();
    let repo = open(&storage, None, u64::MAX);
    // The owner's packs (trusted), a stranger's (signed by another key: stored, not
    // trusted), and an authority object naming one damaged copy of a shared chunk.
    let own = packs(&mut rng, 30, 40, &shared);
    repo.write_index(own[..20].to_vec()).unwrap();
    repo.write_index(own[20..].to_vec()).unwrap();
    let mut stranger = open(&storage, None, u64::MAX);
    stranger.keys.authority = None;
    stranger.keys.sign_seed = Some(custos_crypto::sign::generate());
    let theirs = packs(&mut rng, 10, 40, &shared);
    let victim = theirs[0].blobs[0].id;
    stranger.write_index(theirs.clone()).unwrap();
    let mut marked = custos_repo::index::IndexFile {
        packs: vec![own[0].clone()],
        ..Default::default()
    };
    marked.packs[0].writer = repo.signing_public().map(hex::encode);
    marked.packs[0].vouched = true;
    marked.bad.push((own[0].id, own[0].blobs[0].id));
    repo.write_index_file(marked).unwrap();

    let mut chunks: Vec<ChunkId> = own
        .iter()
        .chain(&theirs)
        .flat_map(|p| p.blobs.iter().map(|b| b.id))
        .collect();
    chunks.push(ChunkId(id(&mut rng))); // stored nowhere
    chunks.sort_by_key(|c| c.0 .0);
    chunks.dedup();

    let memory = repo.load_index().unwrap();
    assert!(memory.holds_trusted(&own[1].blobs[1].id));
    assert!(memory.contains(&victim) && memory.damaged_copies() == 1);
    let expected = view(&memory, &chunks);

    // Built on disk (no room in memory), then reopened from the cache unchanged.
    let disk = open(&storage, Some(cache.path()), 0).load_index().unwrap();
    same(&view(&disk, &chunks), &expected);
    let built = current(cache.path());
    let again = open(&storage, Some(cache.path()), 0).load_index().unwrap();
    same(&view(&again, &chunks), &expected);
    assert_eq!(
        current(cache.path()),
        built,
        "an up-to-date build is reused"
    );

    // A new object: held in memory over the build while it is small...
    let more = packs(&mut rng, 3, 40, &shared);
    repo.write_index(more.clone()).unwrap();
    chunks.extend(more.iter().flat_map(|p| p.blobs.iter().map(|b| b.id)));
    chunks.sort_by_key(|c| c.0 .0);
    chunks.dedup();
    let expected = view(
        &open(&storage, None, u64::MAX).load_index().unwrap(),
        &chunks,
    );
    let over = open(&storage, Some(cache.path()), u64::MAX)
        .load_index()
        .unwrap();
    same(&view(&over, &chunks), &expected);
    assert_eq!(current(cache.path()), built);
    // ...and merged into a new build when it is not.
    let merged = open(&storage, Some(cache.path()), 0).load_index().unwrap();
    same(&view(&merged, &chunks), &expected);
    let rebuilt = current(cache.path());
    assert_ne!(rebuilt, built);

    // An object deleted (as prune does): the build that names it is not used.
    let gone = storage
        .list(custos_repo::paths::INDEX)
        .unwrap()
        .into_iter()
        .find(|e| {
            let f = memory.file_packs().unwrap();
            f.iter()
                .any(|(id, p)| custos_repo::paths::index(id) == e.path && p.contains(&theirs[0].id))
        })
        .unwrap();
    storage.delete(&gone.path).unwrap();
    let expected = view(
        &open(&storage, None, u64::MAX).load_index().unwrap(),
        &chunks,
    );
    let after = open(&storage, Some(cache.path()), u64::MAX)
        .load_index()
        .unwrap();
    assert!(!after.contains(&theirs[3].blobs[3].id));
    same(&view(&after, &chunks), &expected);

    // A damaged build (a file cut short, the pointer garbled) is rebuilt, not believed.
    let now = current(cache.path());
    let records = walk(cache.path())
        .into_iter()
        .find(|p| p.ends_with(format!("{now}/records")))
        .unwrap();
    let len = std::fs::metadata(&records).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&records)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let healed = open(&storage, Some(cache.path()), 0).load_index().unwrap();
    same(&view(&healed, &chunks), &expected);
    let pointer = walk(cache.path())
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "current"))
        .unwrap();
    std::fs::write(&pointer, "../../etc").unwrap();
    let healed = open(&storage, Some(cache.path()), 0).load_index().unwrap();
    same(&view(&healed, &chunks), &expected);

    // Another key of the same repository gets its own build: what it trusts differs.
    let builds = || -> HashSet<String> {
        walk(cache.path())
            .iter()
            .filter(|p| p.ends_with("meta.json"))
            .map(|p| p.parent().unwrap().parent().unwrap().display().to_string())
            .collect()
    };
    assert_eq!(builds().len(), 1);
    let mut other = open(&storage, Some(cache.path()), 0);
    other.keys.sign_seed = stranger.keys.sign_seed.clone();
    other.keys.authority = None;
    let theirs_view = other.load_index().unwrap();
    assert_eq!(builds().len(), 2);
    other.opts.cache_dir = None;
    other.opts.index_memory = Some(u64::MAX);
    same(
        &view(&theirs_view, &chunks),
        &view(&other.load_index().unwrap(), &chunks),
    );
}
