//! The operation trail and the audit role: every command that touches the repository is
//! recorded, hash-chained and signed; altering, removing, reordering or forging an entry
//! makes `audit verify` fail and name it; two processes writing at once do not fork it;
//! an audit key reads the trail and the listing but cannot decrypt, write or restore.

mod common;
use common::*;

const AUDIT_PW: &str = "auditor's own password";
const BACKUP_PW: &str = "backup role password";

fn repo_with_roles() -> T {
    let mut t = T::new();
    for (role, pw) in [("backup", BACKUP_PW), ("audit", AUDIT_PW)] {
        t.add_key(role, pw, &[]);
    }
    let src = t.path("src");
    make_tree(&src, 1, 20, 50_000);
    t.with_password(BACKUP_PW)
        .ok(&["backup", "files", src.to_str().unwrap()]);
    t.restore_latest("out");
    t
}

fn trail_file(t: &T, seq: u64) -> std::path::PathBuf {
    std::path::Path::new(&t.repo).join(format!("audit/{seq:016x}"))
}

fn verify_fails_at(t: &T, seq: u64, what: &str) {
    let err = t.with_password(AUDIT_PW).fails(&["audit", "verify"], 14);
    assert!(
        err.contains(&format!("first bad entry is {seq}")),
        "expected entry {seq} to be named: {err}"
    );
    assert!(err.contains(what), "{err}");
}

#[test]
fn every_operation_is_recorded_and_the_audit_role_reads_only() {
    let t = repo_with_roles();
    let a = t.with_password(AUDIT_PW);
    let log = a.json(&["audit", "log"]);
    let entries: Vec<(String, String, String)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert!(r["problems"].as_array().unwrap().is_empty(), "{r}");
            let e = &r["entry"];
            (
                e["command"].as_str().unwrap().to_string(),
                e["role"].as_str().unwrap().to_string(),
                e["result"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        ("init", "restore", "ok"),
        ("key add", "restore", "ok"),
        ("key add", "restore", "ok"),
        ("backup files", "backup", "ok"),
        ("restore files", "restore", "ok"),
    ];
    let got: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|(c, r, x)| (c.as_str(), r.as_str(), x.as_str()))
        .collect();
    assert_eq!(got, expected);
    // The backup entry names the snapshot it made.
    let snaps = t.json(&["snapshots"]);
    assert_eq!(log[3]["entry"]["touched"]["snapshot"], snaps[0]["id"]);
    a.ok(&["audit", "verify"]);

    // The audit key lists snapshots but cannot see inside them, restore, write or add keys.
    assert_eq!(a.json(&["snapshots"]).as_array().unwrap().len(), 1);
    for args in [
        vec!["ls", "latest"],
        vec!["restore", "files", "latest", "--to", "/tmp/never"],
        vec!["backup", "stream", "--name", "x", "--command", "echo x"],
        vec!["forget", "--keep-last", "1"],
        vec!["prune"],
    ] {
        let err = a.fails(&args, 13);
        assert!(err.contains("audit role"), "{args:?}: {err}");
    }
    let mut a2 = t.with_password(AUDIT_PW);
    a2.set("CUSTOS_NEW_PASSWORD", "another");
    assert!(a2
        .fails(&["key", "add", "--role", "backup"], 13)
        .contains("audit role"));
    // A refused command is recorded as refused.
    let log = a.json(&["audit", "log"]);
    let last = log.as_array().unwrap().last().unwrap();
    assert_eq!(last["entry"]["command"], "key add");
    assert_eq!(last["entry"]["role"], "audit");
    assert!(last["entry"]["result"]
        .as_str()
        .unwrap()
        .starts_with("error E13"));
    a.ok(&["audit", "verify"]);
}

#[test]
fn altered_entry_is_named() {
    let t = repo_with_roles();
    let p = trail_file(&t, 3);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    // Change one character of the sealed entry.
    let s = v["entry"].as_str().unwrap().to_string();
    let flipped = if s.as_bytes()[10] == b'A' { 'B' } else { 'A' };
    v["entry"] = format!("{}{}{}", &s[..10], flipped, &s[11..]).into();
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
    verify_fails_at(&t, 3, "altered");
}

#[test]
fn removed_entry_is_named() {
    let t = repo_with_roles();
    std::fs::remove_file(trail_file(&t, 2)).unwrap();
    verify_fails_at(&t, 3, "missing");
}

#[test]
fn reordered_entries_are_named() {
    let t = repo_with_roles();
    let (a, b) = (trail_file(&t, 2), trail_file(&t, 3));
    let (da, db) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    std::fs::write(&a, db).unwrap();
    std::fs::write(&b, da).unwrap();
    verify_fails_at(&t, 2, "reordered");
}

#[test]
fn forged_entry_is_named() {
    // Someone with write access to storage but no key of this repository appends an
    // entry taken from another repository's trail.
    let t = repo_with_roles();
    let other = repo_with_roles();
    let next = std::fs::read_dir(std::path::Path::new(&t.repo).join("audit"))
        .unwrap()
        .count() as u64
        + 1;
    std::fs::copy(trail_file(&other, 4), trail_file(&t, next)).unwrap();
    verify_fails_at(&t, next, "forged");
}

#[test]
fn concurrent_writers_keep_one_chain() {
    let t = repo_with_roles();
    let before = std::fs::read_dir(std::path::Path::new(&t.repo).join("audit"))
        .unwrap()
        .count();
    let b = t.with_password(BACKUP_PW);
    let mut children = vec![];
    for i in 0..12 {
        let mut c = if i % 2 == 0 {
            b.command(&[
                "backup",
                "stream",
                "--name",
                &format!("s{i}"),
                "--command",
                "head -c 100000 /dev/urandom",
            ])
        } else {
            t.command(&["snapshots"])
        };
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        children.push(c.spawn().unwrap());
    }
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!String::from_utf8_lossy(&out.stderr).contains("trail could not be written"));
    }
    let after = std::fs::read_dir(std::path::Path::new(&t.repo).join("audit"))
        .unwrap()
        .count();
    assert_eq!(
        after,
        before + 12,
        "every command appended exactly one entry"
    );
    t.with_password(AUDIT_PW).ok(&["audit", "verify"]);
}

/// The local hint of the trail's end (in the cache folder) saves listing the trail on
/// every command; a stale, wrong or garbled hint must never break the chain.
#[test]
fn a_wrong_trail_hint_does_not_break_the_chain() {
    let t = repo_with_roles();
    let cache = t.path("cache");
    let anchor = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|d| d.path().join("trail-last"))
        .find(|p| p.exists())
        .expect("commands leave the host's trail anchor in the cache");
    let count = |t: &T| t.json(&["audit", "log"]).as_array().unwrap().len() as u64;
    let before = count(&t);
    let text = std::fs::read_to_string(&anchor).unwrap();
    let (seq, hash) = text.trim().split_once(' ').expect("SEQ HASH");
    assert_eq!(
        seq,
        (before + 1).to_string(),
        "the anchor names the last entry (the listing above appended one)"
    );
    assert_eq!(hash.len(), 64);
    // The hint every appender leaves in the repository, stale, forged or garbage, and a
    // host record that is older or unreadable: a few more lookups, never a fork.
    let remote = std::path::Path::new(&t.repo).join("hints/trail");
    assert_eq!(std::fs::read_to_string(&remote).unwrap(), seq);
    for (local, shared) in [
        ("1", "999999"),
        ("not a number", "1"),
        ("0", "garbage"),
        ("", "18446744073709551615"),
    ] {
        std::fs::write(&anchor, local).unwrap();
        std::fs::write(&remote, shared).unwrap();
        t.ok(&["snapshots"]);
    }
    t.ok(&["audit", "verify"]);
    let log = t.json(&["audit", "log"]);
    let seqs: Vec<u64> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

/// The newest entries deleted (the chain that is left is intact): the host that wrote
/// them refuses to go on (exit 14, nothing done) until told the trail is as it should be;
/// another host without that memory is stopped by `verify` and `audit verify`, through the
/// head each snapshot recorded; a head witnessed outside the repository proves the cut;
/// `verify --read-data` names a damaged trail object.
#[test]
fn a_trail_cut_short_is_caught_by_the_host_the_snapshots_and_a_witness() {
    let t = repo_with_roles();
    let src = t.path("src");
    for i in 0..3 {
        std::fs::write(src.join(format!("later-{i}.txt")), format!("later {i}")).unwrap();
        t.ok(&["backup", "files", src.to_str().unwrap()]);
    }
    let head = t.json(&["audit", "head"]);
    let witnessed = head["head"].as_str().unwrap().to_string();
    let seq = head["seq"].as_u64().unwrap();
    t.ok(&["audit", "verify", "--expect-head", &witnessed]);
    // Every snapshot recorded the head it saw.
    let snaps = t.json(&["snapshots"]);
    assert!(
        snaps
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["summary"]["trail"]["seq"].is_u64()),
        "{snaps}"
    );

    // The newest entries go: those of the commands since, the witnessed head (the last
    // backup's own entry) and the one before it (the head the last snapshot saw).
    let present = std::fs::read_dir(std::path::Path::new(&t.repo).join("audit"))
        .unwrap()
        .count() as u64;
    assert!(present > seq);
    for s in seq - 1..=present {
        std::fs::remove_file(trail_file(&t, s)).unwrap();
    }
    let before = std::fs::read_dir(std::path::Path::new(&t.repo).join("snapshots"))
        .unwrap()
        .count();
    let e = t.fails(&["backup", "files", src.to_str().unwrap()], 14);
    assert!(
        e.contains("entries were removed") && e.contains("audit head --accept"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_dir(std::path::Path::new(&t.repo).join("snapshots"))
            .unwrap()
            .count(),
        before,
        "a backup ran on a trail cut short"
    );
    t.fails(&["snapshots"], 14);

    // A host that never wrote here has no memory of it (and its next entry takes a number
    // that was cut): the snapshots' anchors and the witness stop it.
    let mut other = t.with_password(PW);
    other.set("CUSTOS_CACHE_DIR", t.path("other-cache").to_str().unwrap());
    let e = other.fails(&["audit", "verify"], 14);
    assert!(
        e.contains("snapshot") && e.contains("entries were removed"),
        "{e}"
    );
    // Every entry left is sound: the error names the cut, not an entry.
    assert!(
        e.contains("was cut short or its end rewritten") && !e.contains("first bad entry"),
        "{e}"
    );
    other.ok(&["snapshots"]);
    let e = other.fails(&["audit", "verify"], 14);
    assert!(e.contains("snapshot") && e.contains("rewritten"), "{e}");
    let v = other.run(&["verify", "--json"]);
    assert_eq!(v.status.code(), Some(14));
    let j: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert!(
        j["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x.as_str().unwrap().starts_with("trail:")),
        "{j}"
    );
    // The witnessed entry's number is taken again by then: its bytes differ.
    let e = other.fails(&["audit", "verify", "--expect-head", &witnessed], 14);
    assert!(e.contains("not the one witnessed"), "{e}");
    let e = other.fails(&["audit", "verify", "--expect-head", "12"], 2);
    assert!(e.contains("SEQ:HASH"), "{e}");

    // The host that was refused investigates: its `audit verify` is recorded under a
    // number after the cut, which must not become the host's record (it would let the
    // next backup go on as if nothing had happened).
    let e = t.fails(&["audit", "verify"], 14);
    assert!(
        e.contains("entries were removed") || e.contains("rewritten"),
        "{e}"
    );
    let e = t.fails(&["backup", "files", src.to_str().unwrap()], 14);
    assert!(e.contains("not the one this host wrote"), "{e}");

    // Accepting the trail as it is lets the host go on, and is recorded.
    t.ok(&["audit", "head", "--accept"]);
    t.ok(&["snapshots"]);
    let log = t.ok(&["audit", "log", "--since", "1h"]);
    assert!(log.contains("audit head accept"), "{log}");

    // A damaged trail object is an error of verify.
    let t2 = repo_with_roles();
    flip_byte(&trail_file(&t2, 2), 40);
    let v = t2.run(&["verify", "--read-data", "--json"]);
    assert_ne!(v.status.code(), Some(0));
    let j: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert!(
        j["errors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x.as_str().unwrap().starts_with("trail entry 2")),
        "{j}"
    );
}

/// `audit log --since` lists the entries of its period (dated by the test clock over a
/// month), in order, and only those.
#[test]
fn audit_log_since_lists_only_its_period() {
    let mut t = T::bare();
    t.set("CUSTOS_TEST_NOW", "2026-11-01T00:00:00Z");
    t.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    for day in 2..=28 {
        t.set("CUSTOS_TEST_NOW", &format!("2026-11-{day:02}T12:00:00Z"));
        t.ok(&["snapshots"]);
    }
    t.set("CUSTOS_TEST_NOW", "2026-11-28T13:00:00Z");
    let all = t.json(&["audit", "log"]);
    let since = t.json(&["audit", "log", "--since", "2026-11-20T00:00:00Z"]);
    let want: Vec<&serde_json::Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["entry"]["time"].as_str().unwrap() >= "2026-11-20")
        .collect();
    assert_eq!(
        want.len(),
        9,
        "the snapshots of the 20th to the 28th: {all}"
    );
    // And the first `audit log`'s own entry, written after it listed.
    let got: Vec<&serde_json::Value> = since.as_array().unwrap().iter().collect();
    assert_eq!(got.len(), want.len() + 1, "{since}");
    assert_eq!(
        got[..want.len()]
            .iter()
            .map(|e| e["seq"].clone())
            .collect::<Vec<_>>(),
        want.iter().map(|e| e["seq"].clone()).collect::<Vec<_>>()
    );
    assert_eq!(got[want.len()]["entry"]["command"], "audit log");
    assert!(
        got.iter()
            .all(|e| e["problems"].as_array().unwrap().is_empty()),
        "{since}"
    );
    // A duration counts back from now (the test clock).
    let d = t.json(&["audit", "log", "--since", "2d"]);
    assert_eq!(d.as_array().unwrap().len(), 4, "{d}");
}
