//! Folder trees and streams: what a user restores equals what was backed up.

mod common;
use common::*;

#[test]
fn files_round_trip_with_metadata_dedup_and_unchanged_detection() {
    let t = T::new();
    let src = t.path("src");
    make_tree(&src, 1, 60, 300_000);
    // A file large enough to be cut into several CDC chunks (random: about 1 MiB each),
    // restored in runs of whole chunks written at once.
    let mut big = vec![0u8; 6_000_000];
    rand::RngCore::fill_bytes(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7),
        &mut big,
    );
    std::fs::write(src.join("docs/big.bin"), &big).unwrap();
    // The same bytes twice after a short prefix: most of its chunks are big.bin's, each
    // written at two places in this file and once in the other.
    let mut twice = b"prefix".to_vec();
    twice.extend_from_slice(&big);
    twice.extend_from_slice(&big);
    std::fs::write(src.join("docs/twice.bin"), &twice).unwrap();
    // A scan dated before 1970 keeps its date (times are signed).
    std::fs::write(src.join("docs/old-scan.dcm"), b"archived film").unwrap();
    filetime::set_file_mtime(
        src.join("docs/old-scan.dcm"),
        filetime::FileTime::from_unix_time(-86_400 * 400, 5),
    )
    .unwrap();

    let r1 = t.json(&["backup", "files", src.to_str().unwrap()]);
    assert_eq!(r1["stats"]["files_unchanged"], 0);
    // What the snapshot records is what the backup reported, duration included.
    let stored = t.json(&["snapshots"]);
    assert_eq!(stored[0]["summary"]["stats"], r1["stats"]);
    assert!(r1["stats"]["bytes_read"].as_u64().unwrap() > 6_000_000);

    // Second backup: nothing changed, nothing read, nothing stored.
    let r2 = t.json(&["backup", "files", src.to_str().unwrap()]);
    assert_eq!(r2["parent"], r1["snapshot"]);
    assert_eq!(
        r2["stats"]["bytes_read"], 0,
        "unchanged files must not be read again"
    );
    assert_eq!(r2["stats"]["files_unchanged"], r1["stats"]["files"]);
    assert_eq!(r2["stats"]["chunks_new"], 0);

    // Change one file: only it is read, and only its new chunk(s) stored.
    std::fs::write(
        src.join("docs/nested/deeper/file-0002.dat"),
        b"changed contents",
    )
    .unwrap();
    let r3 = t.json(&["backup", "files", src.to_str().unwrap()]);
    assert_eq!(r3["stats"]["bytes_read"], 16);
    assert_eq!(
        r3["stats"]["chunks_new"].as_u64().unwrap(),
        2,
        "the changed file and the manifest"
    );

    // Restore the latest and the first: both equal what was backed up then.
    let expected_now = describe(&src);
    t.restore_latest("out-latest");
    assert_eq!(describe(&t.path("out-latest")), expected_now);

    let first = r1["snapshot"].as_str().unwrap();
    t.ok(&[
        "restore",
        "files",
        &first[..12],
        "--to",
        t.path("out-first").to_str().unwrap(),
    ]);
    let restored = describe(&t.path("out-first"));
    assert_ne!(
        restored["docs/nested/deeper/file-0002.dat"],
        expected_now["docs/nested/deeper/file-0002.dat"]
    );
    let mut expected_first = expected_now.clone();
    expected_first.remove("docs/nested/deeper/file-0002.dat");
    let mut restored_wo = restored.clone();
    restored_wo.remove("docs/nested/deeper/file-0002.dat");
    assert_eq!(restored_wo, expected_first);

    // --include restores one subtree only.
    t.ok(&[
        "restore",
        "files",
        "latest",
        "--to",
        t.path("out-inc").to_str().unwrap(),
        "--include",
        "docs/nested/deeper",
    ]);
    let inc = describe(&t.path("out-inc"));
    assert!(
        inc.keys()
            .all(|k| k == "docs" || k == "docs/nested" || k.starts_with("docs/nested/deeper")),
        "{inc:?}"
    );
    assert_eq!(
        inc["docs/nested/deeper/file-0005.dat"],
        expected_now["docs/nested/deeper/file-0005.dat"]
    );

    // Restoring into a non-empty folder is refused unless --overwrite.
    let err = t.fails(
        &[
            "restore",
            "files",
            "latest",
            "--to",
            t.path("out-latest").to_str().unwrap(),
        ],
        2,
    );
    assert!(
        err.contains("not empty") && err.contains("--overwrite"),
        "{err}"
    );
    std::fs::write(t.path("out-latest/docs/big.bin"), b"damaged").unwrap();
    t.ok(&[
        "restore",
        "files",
        "latest",
        "--to",
        t.path("out-latest").to_str().unwrap(),
        "--overwrite",
    ]);
    assert_eq!(describe(&t.path("out-latest")), expected_now);

    // ls shows names, sizes and link targets.
    let ls = t.ok(&["ls", "latest"]);
    assert!(
        ls.contains("docs/big.bin") && ls.contains("link-to-file -> docs/file-0001.dat"),
        "{ls}"
    );
    // A new file around big.bin's bytes: its own chunks (the start, the end) follow each
    // other in the new pack but not in the file, big.bin's chunks go in between.
    let mut around = vec![0u8; 1_500_000];
    rand::RngCore::fill_bytes(
        &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(8),
        &mut around,
    );
    let mut gap = around[..700_000].to_vec();
    gap.extend_from_slice(&big);
    gap.extend_from_slice(&around[700_000..]);
    std::fs::write(src.join("docs/gap.bin"), &gap).unwrap();
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let out = t.path("out-gap");
    t.ok(&["restore", "files", "latest", "--to", out.to_str().unwrap()]);
    assert_eq!(describe(&out), describe(&src));
    t.ok(&["verify", "--read-data"]);
}

#[test]
fn streams_from_stdin_and_commands() {
    let t = T::new();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i % 253) as u8 ^ (i >> 11) as u8)
        .collect();
    let o = t.run_stdin(&["backup", "stream", "--name", "pgdump", "--json"], &data);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = t.run(&["restore", "stream", r["snapshot"].as_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(o.stdout, data, "restored stream differs");

    // A command's output; the command sees no repository secret in its environment.
    let r = t.json(&[
        "backup",
        "stream",
        "--name",
        "tfstate",
        "--command",
        "printf '{\"version\": 4}'; env | grep -c CUSTOS_PASSWORD || true",
    ]);
    let o = t.run(&["restore", "stream", r["snapshot"].as_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "{\"version\": 4}0\n");

    // A failing command fails the backup and records nothing.
    let before = t.json(&["snapshots"]).as_array().unwrap().len();
    let err = t.fails(
        &[
            "backup",
            "stream",
            "--name",
            "tfstate",
            "--command",
            "echo half; exit 4",
        ],
        17,
    );
    assert!(
        err.contains("failed") && err.contains("nothing was recorded"),
        "{err}"
    );
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), before);
    // Streams and files are told apart on restore.
    let err = t.fails(
        &[
            "restore",
            "files",
            r["snapshot"].as_str().unwrap(),
            "--to",
            t.path("x").to_str().unwrap(),
        ],
        2,
    );
    assert!(err.contains("restore stream"), "{err}");
}

#[test]
fn configured_sources_run_from_custos_toml() {
    let mut t = T::new();
    let src = t.path("docs");
    make_tree(&src, 7, 10, 10_000);
    let cfg = t.path("custos.toml");
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nurl = \"{}\"\n\n[retention]\nkeep_daily = 2\n\n[[source]]\nname = \"documents\"\nkind = \"files\"\npaths = [\"{}\"]\n\n[[source]]\nname = \"terraform\"\nkind = \"stream\"\ncommand = \"echo state\"\n",
            t.repo,
            src.display()
        ),
    )
    .unwrap();
    t.unset("CUSTOS_REPO");
    t.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    let r = t.json(&["backup", "all"]);
    assert_eq!(r["backups"].as_array().unwrap().len(), 2);
    // One recovery point binds both snapshots; `points` lists it.
    let parts = r["point"]["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{r}");
    for (p, b) in parts.iter().zip(r["backups"].as_array().unwrap()) {
        assert_eq!(p["snapshot"], b["snapshot"]);
    }
    let points = t.json(&["points"]);
    assert_eq!(points.as_array().unwrap().len(), 1);
    assert_eq!(points[0]["id"], r["point"]["id"]);
    assert_eq!(points[0]["parts"], r["point"]["parts"]);
    let snaps = t.json(&["snapshots"]);
    let sources: Vec<_> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["summary"]["source"].as_str().unwrap().to_string())
        .collect();
    assert!(sources.contains(&"terraform".to_string()), "{sources:?}");
    // The retention policy comes from the file when no flag is given.
    let plan = t.json(&["forget", "--dry-run"]);
    assert_eq!(plan["plan"]["policy"]["keep_daily"], 2);
}

/// Bytes read by a process so far (`rchar` of /proc/PID/io).
fn bytes_read_by(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("rchar: ").and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// A file of `size` bytes of a pattern no run of zeros could stand in for.
/// Returns its first block (1 MiB, the pattern's period a multiple of it).
fn patterned(path: &std::path::Path, size: usize) -> Vec<u8> {
    use std::io::Write;
    let block: Vec<u8> = (0..251 * 4096).map(|i| (i % 251) as u8 | 1).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len());
        f.write_all(&block[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
    block
}

#[test]
fn a_file_that_shrinks_while_it_is_read_is_stored_torn() {
    // A 400 MB file cut to 1 KB mid-read was restored at 400 MB, 1 KB of data and the
    // rest zeros, exit 0, and `verify --read-data` was clean.
    let t = T::new();
    let src = t.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let f = src.join("scan.dcm");
    let data = patterned(&f, 384 << 20);
    let mut child = t
        .command(&["backup", "files", src.to_str().unwrap(), "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Stopped once it has read some of the file, cut, and let go.
    let pid = child.id();
    while bytes_read_by(pid) < 8 << 20 && child.try_wait().unwrap().is_none() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(1024)
        .unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Read again after the change: the snapshot holds the file as it is now.
    let restored = t.path("out");
    t.ok(&[
        "restore",
        "files",
        "latest",
        "--to",
        restored.to_str().unwrap(),
    ]);
    let got = std::fs::read(restored.join("scan.dcm")).unwrap();
    assert_eq!(got.len(), 1024, "stored at {} bytes", got.len());
    assert!(
        got == data[..1024],
        "the restored file is not the file as cut"
    );
}

#[test]
fn a_file_that_keeps_changing_while_it_is_read_is_named_and_never_padded() {
    let t = T::new();
    let src = t.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let f = src.join("audit.log");
    patterned(&f, 160 << 20);
    std::fs::write(src.join("steady.txt"), b"unchanged").unwrap();
    // A log written to all through the backup.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            use std::io::Write;
            let mut log = std::fs::OpenOptions::new().append(true).open(&f).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                log.write_all(&[b'x'; 4096]).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        })
    };
    let out = t.run(&["backup", "files", src.to_str().unwrap()]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("audit.log") && err.contains("changed while it was read"),
        "{err}"
    );
    // Stored as read: a prefix of the log as it is now, never longer than what was read.
    let restored = t.path("out");
    t.ok(&[
        "restore",
        "files",
        "latest",
        "--to",
        restored.to_str().unwrap(),
    ]);
    let got = std::fs::read(restored.join("audit.log")).unwrap();
    let now = std::fs::read(&f).unwrap();
    assert!(
        got.len() >= 160 << 20 && got.len() < now.len(),
        "{}",
        got.len()
    );
    assert!(
        got[..] == now[..got.len()],
        "the stored log is not a prefix of the log"
    );
    assert_eq!(
        std::fs::read(restored.join("steady.txt")).unwrap(),
        b"unchanged"
    );
    t.ok(&["verify", "--read-data"]);
}

#[test]
fn include_restores_into_documents_documents_and_ls_latest_picks_another_snapshot() {
    let mut t = T::new();
    let srv = t.path("srv");
    let patient = srv.join("documents/patient-0042");
    std::fs::create_dir_all(&patient).unwrap();
    std::fs::write(patient.join("consent.pdf"), b"signed").unwrap();
    std::fs::create_dir_all(srv.join("documents/patient-0043")).unwrap();
    std::fs::create_dir_all(srv.join("platform")).unwrap();
    std::fs::write(srv.join("platform/app.toml"), b"[app]").unwrap();
    t.ok(&[
        "backup",
        "files",
        srv.join("documents").to_str().unwrap(),
        srv.join("platform").to_str().unwrap(),
    ]);
    // A stream after it: the newest snapshot, which neither ls nor restore files takes.
    t.ok(&[
        "backup",
        "stream",
        "--name",
        "terraform",
        "--command",
        "echo state",
    ]);

    // --include keeps the path's place in the snapshot...
    let out = t.path("restore");
    t.ok(&[
        "restore",
        "files",
        "latest",
        "--to",
        out.to_str().unwrap(),
        "--include",
        "documents/patient-0042",
    ]);
    assert_eq!(
        std::fs::read(out.join("documents/patient-0042/consent.pdf")).unwrap(),
        b"signed"
    );
    assert!(!out.join("documents/patient-0043").exists() && !out.join("platform").exists());
    // ...and SNAPSHOT:PATH restores what is under the path into the folder itself.
    let out = t.path("patient-0042");
    t.ok(&[
        "restore",
        "files",
        "latest:documents/patient-0042",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(out.join("consent.pdf")).unwrap(), b"signed");
    assert_eq!(walk_all(&out), vec!["consent.pdf".to_string()]);
    let err = t.fails(
        &[
            "restore",
            "files",
            "latest:documents/nobody",
            "--to",
            t.path("x").to_str().unwrap(),
        ],
        16,
    );
    assert!(err.contains("holds nothing at `documents/nobody`"), "{err}");

    // `ls latest` lists what `restore files latest` restores.
    let out = t.run(&["ls", "latest"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("documents/patient-0042/consent.pdf"),
        "{listed}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("files"),
        "{listed}"
    );

    // Without a terminal, `key add` names the variable that gives the new password.
    t.unset("CUSTOS_NEW_PASSWORD");
    let err = t.fails(&["key", "add", "--role", "backup"], 2);
    assert!(err.contains("CUSTOS_NEW_PASSWORD_FILE"), "{err}");
}

/// `restore all --point`: every part of one recovery point back as it was, the hooks in
/// order around it; a failing pre-hook stops the run before anything is touched and runs
/// the failure hook.
#[test]
fn restore_all_brings_back_a_point_with_its_hooks_in_order() {
    let mut t = T::new();
    let src = t.path("docs");
    make_tree(&src, 9, 15, 40_000);
    let state = t.path("state.json");
    std::fs::write(&state, r#"{"serial": 87}"#).unwrap();
    let log = t.path("hooks.log");
    let cfg = t.path("custos.toml");
    let repo = t.repo.clone();
    let write = |pre: &str| {
        std::fs::write(
            &cfg,
            format!(
                "[repository]\nurl = \"{}\"\n\n[[source]]\nname = \"documents\"\nkind = \"files\"\npaths = [\"{}\"]\n\n\
                 [[source]]\nname = \"terraform-state\"\nkind = \"stream\"\ncommand = \"cat {}\"\n\n\
                 [restore_all]\npre = [\"{pre}\"]\npost = [\"echo post $CUSTOS_POINT >> {log}\"]\non_failure = [\"echo failed >> {log}\"]\n",
                repo,
                src.display(),
                state.display(),
                log = log.display()
            ),
        )
        .unwrap();
    };
    write(&format!("echo pre >> {}", log.display()));
    t.unset("CUSTOS_REPO");
    t.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    let b = t.json(&["backup", "all"]);
    let id = b["point"]["id"].as_str().unwrap().to_string();
    let want_docs = describe(&src);
    // Later changes are not in the point.
    std::fs::write(&state, r#"{"serial": 88}"#).unwrap();
    std::fs::write(src.join("later.txt"), "after the point").unwrap();
    t.ok(&["backup", "all"]);

    let out = t.path("restored");
    let r = t.json(&[
        "restore",
        "all",
        "--point",
        &id[..8],
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r["point"], id.as_str());
    let steps: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps.first().copied(),
        Some(format!("pre-hook: echo pre >> {}", log.display()).as_str())
    );
    assert!(steps.last().unwrap().starts_with("post-hook"), "{steps:?}");
    assert_eq!(describe(&out.join("documents")), want_docs);
    assert_eq!(
        std::fs::read_to_string(out.join("terraform-state")).unwrap(),
        r#"{"serial": 87}"#
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        format!("pre\npost {id}\n")
    );

    // A failing pre-hook: nothing restored, the failure hook ran, the step is named.
    std::fs::remove_file(&log).unwrap();
    write("exit 3");
    let out2 = t.path("restored2");
    let e = t.fails(&["restore", "all", "--to", out2.to_str().unwrap()], 17);
    assert!(e.contains("pre-hook") && e.contains("exit 3"), "{e}");
    assert!(
        !out2.exists(),
        "something was restored after a failed pre-hook"
    );
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "failed\n");
}
