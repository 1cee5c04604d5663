//! Key lifecycle: the restore key split into Shamir shares (any M of N rebuild it, M-1 or
//! shares of another repository do not); key age against the crypto-period reported by
//! `key status`, `verify` and every backup, without ever stopping a backup; the IAM policy
//! that enforces the roles in S3.

mod common;
use common::*;

fn share_files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn any_three_of_five_shares_rebuild_the_restore_key() {
    let t = T::new();
    let src = t.path("src");
    make_tree(&src, 7, 15, 40_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let out = t.path("shares");
    t.ok(&[
        "key",
        "split",
        "--shares",
        "5",
        "--threshold",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let files = share_files(&out);
    assert_eq!(files.len(), 5);
    use std::os::unix::fs::PermissionsExt;
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    // The password is lost: only the shares remain.
    let mut lost = t.with_password("nobody knows this");
    lost.unset("CUSTOS_PASSWORD");
    lost.set("CUSTOS_NEW_PASSWORD", "rebuilt by three holders");

    // Two shares (and a duplicate) are not enough, and nothing is added.
    let keys_before = std::fs::read_dir(std::path::Path::new(&t.repo).join("keys"))
        .unwrap()
        .count();
    let err = lost.fails(
        &[
            "key",
            "recover",
            &files[0],
            &files[3],
            &files[3],
            "--kdf-memory-mib",
            "8",
            "--kdf-iterations",
            "1",
        ],
        2,
    );
    assert!(
        err.contains("2 different share(s) given; this split needs 3"),
        "{err}"
    );
    // A damaged share is named.
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files[1]).unwrap()).unwrap();
    let s = v["share"].as_str().unwrap().to_string();
    v["share"] = format!("{}{}", if s.starts_with('A') { "B" } else { "A" }, &s[1..]).into();
    let damaged = t.path("damaged.json");
    std::fs::write(&damaged, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = lost.fails(
        &[
            "key",
            "recover",
            &files[0],
            damaged.to_str().unwrap(),
            &files[4],
        ],
        2,
    );
    assert!(err.contains("checksum"), "{err}");
    // Shares of another repository are refused.
    let other = T::new();
    let oout = other.path("shares");
    other.ok(&[
        "key",
        "split",
        "--shares",
        "3",
        "--threshold",
        "2",
        "--out",
        oout.to_str().unwrap(),
    ]);
    let ofiles = share_files(&oout);
    let err = lost.fails(&["key", "recover", &ofiles[0], &ofiles[1]], 2);
    assert!(err.contains("not of this one"), "{err}");
    assert_eq!(
        std::fs::read_dir(std::path::Path::new(&t.repo).join("keys"))
            .unwrap()
            .count(),
        keys_before
    );

    // Any three rebuild it; the new key restores what was backed up.
    lost.ok(&[
        "key",
        "recover",
        &files[4],
        &files[1],
        &files[2],
        "--kdf-memory-mib",
        "8",
        "--kdf-iterations",
        "1",
    ]);
    let mut rebuilt = t.with_password("rebuilt by three holders");
    rebuilt.unset("CUSTOS_NEW_PASSWORD");
    let dest = t.path("restored");
    rebuilt.ok(&["restore", "files", "latest", "--to", dest.to_str().unwrap()]);
    assert_eq!(describe(&src), describe(&dest));
    // The trail records the split and the recovery.
    let log = rebuilt.json(&["audit", "log"]);
    let commands: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["entry"]["command"].as_str().unwrap())
        .collect();
    assert!(
        commands.contains(&"key split") && commands.contains(&"key recover"),
        "{commands:?}"
    );
    rebuilt.ok(&["audit", "verify"]);
}

#[test]
fn overdue_keys_are_reported_and_backups_still_run() {
    let mut t = T::new();
    let fresh = t.json(&["key", "status"]);
    assert!(
        fresh["keys"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k["overdue"] == false),
        "{fresh}"
    );
    assert_eq!(fresh["max_age_days"], 90);

    // A crypto-period of zero makes every key overdue.
    let cfg = t.path("custos.toml");
    std::fs::write(&cfg, "[keys]\nmax_age = \"0s\"\n").unwrap();
    t.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    let status = t.json(&["key", "status"]);
    let keys = status["keys"].as_array().unwrap();
    assert!(
        keys.len() >= 2 && keys.iter().all(|k| k["overdue"] == true),
        "{status}"
    );
    let out = t.run(&["key", "status"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("OVERDUE"));

    let v = t.json(&["verify"]);
    assert!(!v["key_findings"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["errors"].as_array().unwrap().is_empty(), "{v}");

    let src = t.path("src");
    make_tree(&src, 3, 5, 10_000);
    let out = t.run(&["backup", "files", src.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "an overdue key must not stop a backup"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("past the crypto-period"));

    std::fs::write(&cfg, "[keys]\nmax_age = \"ninety days\"\n").unwrap();
    let err = t.fails(&["key", "status"], 2);
    assert!(err.contains("max_age"), "{err}");
}

#[test]
fn iam_policy_denies_what_the_role_may_not_do() {
    let t = T::bare();
    let out = t.ok(&[
        "iam-policy",
        "--role",
        "backup",
        "--bucket",
        "backups",
        "--prefix",
        "prod",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let st = v["Statement"].as_array().unwrap();
    let deny_pack_read = st.iter().any(|s| {
        s["Effect"] == "Deny"
            && s["Action"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a == "s3:GetObject")
            && s["Resource"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| r == "arn:aws:s3:::backups/prod/data/*"))
    });
    assert!(deny_pack_read, "{out}");
    t.fails(&["iam-policy", "--role", "superuser", "--bucket", "b"], 2);
}

#[test]
fn rotation_keeps_old_data_readable_and_rewrap_retires_old_secrets() {
    let mut t = T::new();
    t.add_key("backup", "backup", &[]);
    let b = t.with_password("backup");
    let src = t.path("src");
    make_tree(&src, 11, 10, 30_000);
    let before = b.json(&["backup", "files", src.to_str().unwrap()]);
    let r = t.json(&["key", "rotate"]);
    assert_eq!(r["generation"], 1);
    // The backup key wraps new data to the new pair without being told.
    std::fs::write(src.join("after-rotation.txt"), "new").unwrap();
    let after = b.json(&["backup", "files", src.to_str().unwrap()]);
    // The rotating key reads both.
    for (snap, name) in [(&before, "before"), (&after, "after")] {
        let dest = t.path(&format!("r-{name}"));
        t.ok(&[
            "restore",
            "files",
            snap["snapshot"].as_str().unwrap(),
            "--to",
            dest.to_str().unwrap(),
        ]);
    }
    assert!(t.path("r-after/after-rotation.txt").exists());
    assert!(!t.path("r-before/after-rotation.txt").exists());

    // Re-wrap: a restore key made afterwards holds only the newest secret, and reads all.
    let r = t.json(&["key", "rotate", "--rewrap"]);
    assert_eq!(r["generation"], 2);
    assert!(
        r["rewrapped_packs"].as_u64().unwrap() > 0 && r["rewrapped_snapshots"] == 2,
        "{r}"
    );
    t.add_key("restore", "made after the rewrap", &[]);
    let fresh = t.with_password("made after the rewrap");
    let st = fresh.json(&["key", "status"]);
    assert_eq!(st["generation"], 2);
    assert_eq!(st["in_use"]["older_secrets_held"], 0, "{st}");
    for (snap, name) in [(&before, "before"), (&after, "after")] {
        let dest = t.path(&format!("fresh-{name}"));
        fresh.ok(&[
            "restore",
            "files",
            snap["snapshot"].as_str().unwrap(),
            "--to",
            dest.to_str().unwrap(),
        ]);
        assert_eq!(describe(&t.path(&format!("r-{name}"))), describe(&dest));
    }
    let v = fresh.json(&["verify", "--read-data"]);
    assert!(v["errors"].as_array().unwrap().is_empty(), "{v}");
    // The pair's age starts again at the rotation.
    assert_eq!(st["keys"][0]["what"], "data key pair");
    assert_eq!(st["keys"][0]["age_days"], 0);
    fresh.ok(&["audit", "verify"]);
}

#[test]
fn secrets_never_reach_outputs_the_trail_or_the_repository() {
    let t = T::new();
    let src = t.path("src");
    make_tree(&src, 5, 5, 10_000);
    let mut outputs = String::new();
    let mut run = |t: &T, args: &[&str]| {
        let o = t.run(args);
        outputs.push_str(&String::from_utf8_lossy(&o.stdout));
        outputs.push_str(&String::from_utf8_lossy(&o.stderr));
    };
    for args in [
        vec!["backup", "files", src.to_str().unwrap(), "-v", "-v"],
        vec!["snapshots", "--json"],
        vec!["ls", "latest"],
        vec!["verify", "--read-data", "--json"],
        vec!["key", "status", "--json"],
        vec!["key", "list", "--json"],
        vec!["audit", "log", "--json"],
        vec!["audit", "verify"],
    ] {
        run(&t, &args);
    }
    // A wrong password is refused without being echoed.
    let wrong = t.with_password("wrong-secret-8f2c91");
    run(&wrong, &["snapshots", "-v", "-v"]);
    run(
        &wrong,
        &["restore", "files", "latest", "--to", "/tmp/x", "--json"],
    );
    for secret in [PW, "wrong-secret-8f2c91"] {
        assert!(
            !outputs.contains(secret),
            "a password reached the output:\n{outputs}"
        );
    }
    // No object of the repository (trail included) holds the password in any form.
    fn walk(p: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(p).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out)
            } else {
                out.push(p)
            }
        }
    }
    let mut files = vec![];
    walk(std::path::Path::new(&t.repo), &mut files);
    assert!(files
        .iter()
        .any(|f| f.to_string_lossy().contains("/audit/")));
    for f in files {
        let b = std::fs::read(&f).unwrap();
        assert!(
            !b.windows(PW.len()).any(|w| w == PW.as_bytes()),
            "{} holds the password",
            f.display()
        );
    }
}

#[test]
fn restore_keys_delete_only_when_granted() {
    let mut t = T::new();
    let src = t.path("src");
    make_tree(&src, 9, 5, 10_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    t.add_key("restore", "reader", &[]);
    t.add_key("restore", "janitor", &["--allow-delete"]);
    let reader = t.with_password("reader");
    // Reads and decrypts...
    reader.ok(&[
        "restore",
        "files",
        "latest",
        "--to",
        t.path("out").to_str().unwrap(),
    ]);
    reader.ok(&["forget", "--keep-last", "1", "--dry-run"]);
    // ...but deletes nothing.
    let before = t.repo_state();
    for args in [
        vec!["forget", "--keep-last", "1"],
        vec!["prune"],
        vec!["key", "remove", "0"],
    ] {
        let err = reader.fails(&args, 13);
        assert!(err.contains("may not delete"), "{args:?}: {err}");
    }
    assert_eq!(t.repo_state(), before);
    // Nor can it grant deletion.
    let mut r2 = t.with_password("reader");
    r2.set("CUSTOS_NEW_PASSWORD", "escalated");
    assert!(r2
        .fails(&["key", "add", "--role", "restore", "--allow-delete"], 13)
        .contains("may not delete"));
    // The granted key forgets and prunes.
    let janitor = t.with_password("janitor");
    janitor.ok(&["forget", "--keep-last", "1", "--prune"]);
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), 1);
}
