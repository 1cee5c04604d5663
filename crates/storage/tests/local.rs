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
