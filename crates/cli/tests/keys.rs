//! Keys and roles: a password opens exactly one key; a backup key writes but cannot read.

mod common;
use common::*;

#[test]
fn backup_role_writes_and_deduplicates_but_cannot_read() {
    let mut t = T::new();
    let src = t.path("src");
    make_tree(&src, 3, 20, 50_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);

    t.set("CUSTOS_NEW_PASSWORD", "backup-only password");
    let added = t.json(&[
        "key",
        "add",
        "--role",
        "backup",
        "--kdf-memory-mib",
        "8",
        "--kdf-iterations",
        "1",
    ]);
    assert_eq!(added["role"], "backup");

    let mut b = t.with_password("backup-only password");
    b.set("CUSTOS_CACHE_DIR", b.path("cache").to_str().unwrap());
    // It backs up, deduplicating against data the restore key stored (no cache here).
    let r = b.json(&["backup", "files", src.to_str().unwrap()]);
    assert_eq!(
        r["stats"]["chunks_new"], 0,
        "backup key must deduplicate against the index"
    );
    std::fs::write(src.join("new.txt"), b"written by the backup role").unwrap();
    let r = b.json(&["backup", "files", src.to_str().unwrap()]);
    assert!(r["stats"]["chunks_new"].as_u64().unwrap() >= 1);
    // It lists snapshots (summaries) ...
    assert_eq!(b.json(&["snapshots"]).as_array().unwrap().len(), 3);
    // ... but cannot list file names, restore, forget or prune.
    for args in [
        vec!["ls", "latest"],
        vec!["restore", "files", "latest", "--to", "/tmp/never"],
        vec!["restore", "stream", "latest"],
        vec!["forget", "--keep-last", "1"],
        vec!["prune"],
    ] {
        let err = b.fails(&args, 13);
        assert!(err.contains("backup role"), "{args:?}: {err}");
    }
    assert!(!std::path::Path::new("/tmp/never").exists());
    // The restore key reads what the backup key wrote.
    t.restore_latest("out");
    assert_eq!(
        std::fs::read(t.path("out/new.txt")).unwrap(),
        b"written by the backup role"
    );
}

#[test]
fn key_management_and_wrong_password() {
    let mut t = T::new();
    t.set("CUSTOS_NEW_PASSWORD", "second restore password");
    // Granted deletion: it removes the first key below.
    t.ok(&[
        "key",
        "add",
        "--role",
        "restore",
        "--allow-delete",
        "--kdf-memory-mib",
        "8",
        "--kdf-iterations",
        "1",
    ]);
    let keys = t.json(&["key", "list"]);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let listing = t.ok(&["key", "list"]);
    assert!(!listing.contains(PW) && !listing.contains("second restore password"));

    // A password opens exactly one key: adding a password in use is refused.
    let err = t.fails(
        &[
            "key",
            "add",
            "--role",
            "backup",
            "--kdf-memory-mib",
            "8",
            "--kdf-iterations",
            "1",
        ],
        2,
    );
    assert!(err.contains("already opens"), "{err}");

    // Wrong password: exit 12, clear message, no secret echoed.
    t.set("CUSTOS_PASSWORD", "not the password");
    let err = t.fails(&["snapshots"], 12);
    assert!(
        err.contains("does not open any key") && !err.contains("not the password"),
        "{err}"
    );

    // Password from a file and from a command.
    t.unset("CUSTOS_PASSWORD");
    std::fs::write(t.path("pwfile"), format!("{PW}\n")).unwrap();
    t.set("CUSTOS_PASSWORD_FILE", t.path("pwfile").to_str().unwrap());
    t.ok(&["snapshots"]);
    t.unset("CUSTOS_PASSWORD_FILE");
    t.set("CUSTOS_PASSWORD_COMMAND", "echo 'second restore password'");
    t.ok(&["snapshots"]);
    // No password source and no terminal: a clear error, not a hang.
    t.unset("CUSTOS_PASSWORD_COMMAND");
    let err = t.fails(&["snapshots"], 2);
    assert!(err.contains("CUSTOS_PASSWORD_FILE"), "{err}");

    // passwd replaces the key file; the old password stops working.
    t.set("CUSTOS_PASSWORD", "second restore password");
    t.set("CUSTOS_NEW_PASSWORD", "third password");
    let new = t.json(&[
        "key",
        "passwd",
        "--kdf-memory-mib",
        "8",
        "--kdf-iterations",
        "1",
    ]);
    t.fails(&["snapshots"], 12);
    t.set("CUSTOS_PASSWORD", "third password");
    t.ok(&["snapshots"]);

    // Removing the key in use is refused; removing the other works; the last restore key stays.
    let keys = t.json(&["key", "list"]);
    let other = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] != new["id"])
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    t.fails(&["key", "remove", &new["id"].as_str().unwrap()[..8]], 2);
    t.ok(&["key", "remove", &other[..8]]);
    assert_eq!(t.json(&["key", "list"]).as_array().unwrap().len(), 1);
    t.set("CUSTOS_PASSWORD", PW);
    t.fails(&["snapshots"], 12);
}

#[test]
fn key_files_are_private_and_hold_no_plain_secret() {
    let t = T::new();
    for e in std::fs::read_dir(t.path("repo/keys")).unwrap() {
        let p = e.unwrap().path();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let text = std::fs::read_to_string(&p).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["kdf"]["algorithm"], "argon2id");
        for field in ["id_key", "meta_key", "secret", "public"] {
            assert!(!text.contains(field), "key file shows {field} in clear");
        }
    }
    // init on an existing repository is refused and changes nothing.
    let before = t.repo_state();
    t.fails(
        &["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"],
        19,
    );
    assert_eq!(t.repo_state(), before);
}
