//! The WAL archive listed in ranges on a bucket (format.md 7a): whatever this host's file of
//! splits says (its own quantiles, or garbage someone wrote into the cache folder), the
//! listing is the whole archive, once.

use std::sync::Arc;

use custos_crypto::kdf::KdfParams;
use custos_repo::{OpenOptions, Repository};
use custos_storage::remote::{RemoteStorage, S3Options};
use custos_storage::{DynStorage, PutMode};
use custos_testkit::{S3Server, ACCESS_KEY, SECRET_KEY};

#[test]
fn the_wal_archive_is_listed_whole_whatever_the_splits() {
    let server = S3Server::start();
    server.create_bucket("wal");
    let storage: DynStorage = Arc::new(
        RemoteStorage::s3(&S3Options {
            bucket: "wal".into(),
            root: "repo".into(),
            endpoint: Some(server.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(SECRET_KEY.into()),
            ..Default::default()
        })
        .unwrap(),
    );
    let cache = tempfile::tempdir().unwrap();
    let opts = OpenOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        ..Default::default()
    };
    let repo = Repository::init(
        storage.clone(),
        b"pw",
        KdfParams::new(Some(8), Some(1)),
        opts,
        None,
        None,
    )
    .unwrap();
    let mut names = vec![];
    for sys in [0x7000_0000_0000_0001u64, 0x7000_0000_0000_0002] {
        for i in 1..=20u32 {
            let name = format!("00000001{:08X}{:08X}", i / 4, i % 4);
            storage
                .put(&format!("wal/{sys:016x}/{name}"), b"w", PutMode::CreateOnly)
                .unwrap();
            names.push((sys, name, 1u64));
        }
    }
    names.sort();
    let listed = || {
        let mut v = repo.wal_objects().unwrap();
        v.sort();
        v
    };
    assert_eq!(listed(), names);

    // This host's file of splits, as it keeps it (a short listing: none), and as someone
    // who can write the cache folder might: names between and outside the archive, other
    // folders, repeats, unsorted, thousands of lines, long lines.
    let file = cache
        .path()
        .join(repo.config.id.to_hex())
        .join("wal-splits");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "");
    let mut hostile = vec![
        "wal/7000000000000001/000000010000000300000000".to_string(),
        "wal/7000000000000001/00000001000000010000000".into(),
        "wal/7000000000000002/00000001000000020000000".into(),
        "wal/7000000000000001/000000010000000300000000".into(),
        "wal/0".into(),
        "wal/z".into(),
        "data/00".into(),
        "\u{0}".into(),
        format!("wal/{}", "f".repeat(500)),
    ];
    hostile.extend((0..5000).map(|i| format!("wal/7000000000000002/{i:024X}")));
    std::fs::write(&file, hostile.join("\n")).unwrap();
    assert_eq!(listed(), names);
    std::fs::write(&file, b"\xff\xfe not text").unwrap();
    assert_eq!(listed(), names);
}
