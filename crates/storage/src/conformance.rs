//! The conformance suite every backend must pass (restic's idea: one behaviour, checked the
//! same way everywhere). Called from each backend's tests with a fresh, empty storage.

use std::sync::Arc;

use custos_model::Kind;

use crate::{PutMode, PutOutcome, Storage};

/// Runs every check; panics with the name of the first one that fails.
pub fn run(s: Arc<dyn Storage>) {
    let s = s.as_ref();
    // Missing objects.
    assert_eq!(
        s.size("data/00/missing").unwrap(),
        None,
        "size of missing object"
    );
    assert_eq!(
        s.get("data/00/missing").unwrap_err().kind,
        Kind::NotFound,
        "get of missing object"
    );
    s.delete("data/00/missing")
        .expect("deleting a missing object succeeds");
    assert!(
        s.list("snapshots").unwrap().is_empty(),
        "listing an empty folder"
    );

    // Write, read back whole and by range.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(
        s.put("data/ab/obj1", &data, PutMode::CreateOnly).unwrap(),
        PutOutcome::Created
    );
    assert_eq!(s.get("data/ab/obj1").unwrap(), data);
    // A prefix (bounded reads of objects fetched by name): shorter, exact, longer, empty,
    // missing.
    assert_eq!(s.get_prefix("data/ab/obj1", 10).unwrap(), data[..10]);
    assert_eq!(s.get_prefix("data/ab/obj1", 100_000).unwrap(), data);
    assert_eq!(s.get_prefix("data/ab/obj1", 1 << 40).unwrap(), data);
    s.put("data/ab/empty", b"", PutMode::CreateOnly).unwrap();
    assert_eq!(s.get_prefix("data/ab/empty", 5).unwrap(), b"");
    s.delete("data/ab/empty").unwrap();
    assert_eq!(
        s.get_prefix("data/00/missing", 5).unwrap_err().kind,
        Kind::NotFound,
        "prefix of a missing object"
    );
    let err = crate::get_bounded(s, "data/ab/obj1", 99_999, "test object").unwrap_err();
    assert_eq!(err.kind, Kind::Integrity, "{err}");
    assert!(
        err.message.contains("larger than any custos writes"),
        "{err}"
    );
    assert_eq!(
        crate::get_bounded(s, "data/ab/obj1", 100_000, "test object").unwrap(),
        data
    );
    // A checked write (copy's): create-only, and what arrived is what was sent.
    assert_eq!(
        s.put_checked("data/ab/obj9", data.clone().into(), None)
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        s.put_checked("data/ab/obj9", bytes::Bytes::from_static(b"other"), None)
            .unwrap(),
        PutOutcome::AlreadyExists,
        "a checked write replaced an object"
    );
    assert_eq!(s.get("data/ab/obj9").unwrap(), data);
    s.delete("data/ab/obj9").unwrap();
    // An object that arrives in many pieces reads back whole and in order.
    let big: Vec<u8> = (0..6_000_000u32).map(|i| (i * 13 % 241) as u8).collect();
    s.put("data/ab/big", &big, PutMode::CreateOnly).unwrap();
    assert!(
        s.get("data/ab/big").unwrap() == big,
        "a large object read back differs"
    );
    assert!(
        s.get_prefix("data/ab/big", 7_000_000).unwrap() == big,
        "a large object's prefix past its end differs"
    );
    assert!(
        s.get_prefix("data/ab/big", 5_000_000).unwrap() == big[..5_000_000],
        "a large object's prefix differs"
    );
    s.delete("data/ab/big").unwrap();
    // A shard of a folder lists that shard alone (large repositories list `data/` so).
    s.put("data/ac/obj2", b"x", PutMode::CreateOnly).unwrap();
    let shard: Vec<String> = s
        .list("data/ab")
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(shard, vec!["data/ab/obj1".to_string()]);
    let other: Vec<String> = s
        .list("data/ac")
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(other, vec!["data/ac/obj2".to_string()]);
    s.delete("data/ac/obj2").unwrap();
    // Objects named by their hash, listed by first digit: names that cannot be hashes
    // are left out, and the rest come sorted, with their sizes, as `list` gives them.
    for (name, body) in [
        ("snapshots/f1", &b"12"[..]),
        ("snapshots/0a", b"1"),
        ("snapshots/9b", b"123"),
        ("snapshots/zz", b"x"),
        ("snapshots/F2", b"x"),
        ("snapshotsX/00", b"x"),
    ] {
        s.put(name, body, PutMode::CreateOnly).unwrap();
    }
    let hex: Vec<(String, u64)> = s
        .list_hex("snapshots")
        .unwrap()
        .into_iter()
        .map(|e| (e.path, e.size))
        .collect();
    assert_eq!(
        hex,
        vec![
            ("snapshots/0a".to_string(), 1),
            ("snapshots/9b".to_string(), 3),
            ("snapshots/f1".to_string(), 2)
        ],
        "listing by first digit"
    );
    for name in ["f1", "0a", "9b", "zz", "F2"] {
        s.delete(&format!("snapshots/{name}")).unwrap();
    }
    s.delete("snapshotsX/00").unwrap();
    assert!(s.list_hex("snapshots").unwrap().is_empty());

    // A listing in ranges between splits gives the same answer whatever the splits:
    // keys that exist or not, unsorted, repeated, before the first or past the last, or
    // outside the folder.
    let names: Vec<String> = (1..=9).map(|i| format!("wal/0a/{i}")).collect();
    for n in &names {
        s.put(n, b"w", PutMode::CreateOnly).unwrap();
    }
    s.put("wal/0b", b"w", PutMode::CreateOnly).unwrap();
    for splits in [
        vec![],
        vec!["wal/0a/3", "wal/0a/7"],
        vec!["wal/0a/7", "wal/0a/3", "wal/0a/3"],
        vec!["wal/0a/35", "wal/0a/0", "wal/0a/99", "data/x", "zzz"],
        vec![
            "wal/0a/1", "wal/0a/2", "wal/0a/3", "wal/0a/4", "wal/0a/5", "wal/0a/9",
        ],
    ] {
        let splits: Vec<String> = splits.into_iter().map(String::from).collect();
        let got: Vec<String> = s
            .list_split("wal/0a", &splits)
            .unwrap()
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(got, names, "listing split at {splits:?}");
    }
    for n in &names {
        s.delete(n).unwrap();
    }
    s.delete("wal/0b").unwrap();

    // Listings say when an object was written, where the store knows.
    let listed = s.list("data").unwrap();
    assert!(listed
        .iter()
        .all(|e| e.modified.is_some() || s.location().starts_with("vercel")));
    assert_eq!(
        s.get_range("data/ab/obj1", 1000, 5000).unwrap(),
        &data[1000..6000]
    );
    assert_eq!(s.size("data/ab/obj1").unwrap(), Some(data.len() as u64));
    assert!(
        s.get_range("data/ab/obj1", 99_000, 5000).is_err(),
        "range past the end is an error"
    );

    // Create-only never replaces.
    assert_eq!(
        s.put("data/ab/obj1", b"other", PutMode::CreateOnly)
            .unwrap(),
        PutOutcome::AlreadyExists
    );
    assert_eq!(
        s.get("data/ab/obj1").unwrap(),
        data,
        "create-only must not replace"
    );
    // Overwrite replaces.
    s.put("locks/l1", b"v1", PutMode::Overwrite).unwrap();
    s.put("locks/l1", b"v2", PutMode::Overwrite).unwrap();
    assert_eq!(s.get("locks/l1").unwrap(), b"v2");

    // Empty objects.
    s.put("keys/empty", b"", PutMode::CreateOnly).unwrap();
    assert_eq!(s.get("keys/empty").unwrap(), b"");

    // Listing is recursive, relative to the root, and sees sizes.
    s.put("data/cd/obj2", b"xyz", PutMode::CreateOnly).unwrap();
    let l = s.list("data").unwrap();
    let names: Vec<_> = l.iter().map(|e| (e.path.as_str(), e.size)).collect();
    assert_eq!(names, vec![("data/ab/obj1", 100_000), ("data/cd/obj2", 3)]);

    // Concurrent create-only: exactly one writer wins.
    let wins = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                sc.spawn(move || {
                    s.put(
                        "locks/race",
                        format!("w{i}").as_bytes(),
                        PutMode::CreateOnly,
                    )
                    .unwrap()
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .filter(|o| *o == PutOutcome::Created)
            .count()
    });
    assert_eq!(wins, 1, "exactly one concurrent create-only write succeeds");

    // Delete.
    s.delete("data/cd/obj2").unwrap();
    assert_eq!(s.size("data/cd/obj2").unwrap(), None);
    assert_eq!(s.list("data").unwrap().len(), 1);
}
