use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use custos_storage::local::LocalStorage;
use custos_storage::{PutMode, Storage};

#[test]
fn local_storage_conforms() {
    let dir = tempfile::tempdir().unwrap();
    custos_storage::conformance::run(Arc::new(LocalStorage::new(dir.path().join("repo"))));
}

#[test]
fn local_files_are_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStorage::new(dir.path().join("repo"));
    s.put("data/ab/x", b"secret-ish", PutMode::CreateOnly)
        .unwrap();
    let f = std::fs::metadata(dir.path().join("repo/data/ab/x")).unwrap();
    assert_eq!(f.permissions().mode() & 0o777, 0o600);
    let d = std::fs::metadata(dir.path().join("repo/data/ab")).unwrap();
    assert_eq!(d.permissions().mode() & 0o777, 0o700);
    assert!(
        s.list(".tmp").unwrap().is_empty(),
        "no temp file left behind"
    );
}

/// Another command removing objects while this one lists (locks released by concurrent
/// commands): the listing never fails, it just leaves out what went.
#[test]
fn a_listing_while_objects_are_removed_does_not_fail() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(LocalStorage::new(dir.path().join("repo")));
    for round in 0..10 {
        let names: Vec<String> = (0..300).map(|i| format!("locks/{round}-{i:04}")).collect();
        for n in &names {
            s.put(n, b"lock", PutMode::CreateOnly).unwrap();
        }
        let remover = {
            let s = s.clone();
            std::thread::spawn(move || {
                for n in names.iter().rev() {
                    s.delete(n).unwrap();
                }
            })
        };
        while !remover.is_finished() {
            let listed = s.list("locks").unwrap();
            assert!(listed.len() <= 300);
        }
        remover.join().unwrap();
        assert!(s.list("locks").unwrap().is_empty());
    }
}
