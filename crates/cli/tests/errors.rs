//! Bad input gets one clear error, a documented exit code, and leaves the repository as
//! it was: a flipped byte, a truncated or missing pack, a missing index, a malformed
//! config, a missing repository.

mod common;
use common::*;

fn backed_up() -> T {
    let t = T::new();
    let src = t.path("src");
    make_tree(&src, 11, 30, 200_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    t
}

#[test]
fn flipped_byte_in_a_pack_is_detected_and_restore_refuses() {
    let t = backed_up();
    t.ok(&["verify", "--read-data"]);
    let packs = t.packs();
    let biggest = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    flip_byte(biggest, 100);
    let before = t.repo_state();
    // Structure is intact (sizes match), so plain verify passes; reading the data does not.
    t.ok(&["verify"]);
    let err = t.fails(&["verify", "--read-data"], 14);
    assert!(err.contains("does not match its hash"), "{err}");
    let v: serde_json::Value =
        serde_json::from_slice(&t.run(&["verify", "--read-data", "--json"]).stdout).unwrap();
    assert_eq!(v["errors"].as_array().unwrap().len(), 1, "{v}");
    // Restore names the damage and does not pass off damaged data.
    let err = t.fails(
        &[
            "restore",
            "files",
            "latest",
            "--to",
            t.path("out").to_str().unwrap(),
        ],
        14,
    );
    assert!(
        err.contains("fails authentication") || err.contains("does not match"),
        "{err}"
    );
    // Verify records the damaged copy (one index object, signed by the repository's
    // authority, so that backups store that chunk again); nothing else changes.
    let after = t.repo_state();
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert_eq!(added.len(), 1, "{added:?}");
    assert!(added[0].starts_with("index/"), "{added:?}");
    assert!(
        before.iter().all(|(k, v)| after.get(k) == Some(v)),
        "a failed verify or restore changed or removed an object"
    );
}

#[test]
fn truncated_and_missing_packs_are_reported_by_structure_check() {
    let t = backed_up();
    let packs = t.packs();
    let p0 = &packs[0];
    let b = std::fs::read(p0).unwrap();
    std::fs::write(p0, &b[..b.len() / 2]).unwrap();
    let err = t.fails(&["verify"], 14);
    assert!(err.contains("bytes in storage, the index says"), "{err}");
    std::fs::remove_file(p0).unwrap();
    let err = t.fails(&["verify"], 14);
    assert!(err.contains("missing from storage"), "{err}");
    let err = t.fails(
        &[
            "restore",
            "files",
            "latest",
            "--to",
            t.path("out").to_str().unwrap(),
        ],
        14,
    );
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn missing_index_is_reported() {
    let t = backed_up();
    for e in std::fs::read_dir(t.path("repo/index")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let err = t.fails(&["verify"], 14);
    assert!(err.contains("not in the index"), "{err}");
    let err = t.fails(
        &[
            "restore",
            "files",
            "latest",
            "--to",
            t.path("out").to_str().unwrap(),
        ],
        14,
    );
    assert!(err.contains("not in the index"), "{err}");
    // Prune must refuse rather than delete every pack as "unreferenced".
    let packs = t.packs().len();
    let err = t.fails(&["prune"], 14);
    assert!(err.contains("prune cannot read"), "{err}");
    assert_eq!(
        t.packs().len(),
        packs,
        "prune deleted packs on an incomplete index"
    );
}

#[test]
fn an_unreadable_snapshot_is_named_and_every_other_snapshot_still_restores() {
    // One snapshot object that does not decode (bit rot, or bytes planted by anyone who
    // can write the storage or holds a backup key) used to stop every restore, listing,
    // forget and verify, whichever snapshot they were about.
    let t = T::new();
    let src = t.path("src");
    make_tree(&src, 21, 20, 100_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let first_tree = describe(&src);
    let first = t.json(&["snapshots"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    make_tree(&src.join("more"), 22, 5, 50_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let newest = t.json(&["snapshots"])[1]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let short = &newest[..8];
    let object = t.path(&format!("repo/snapshots/{newest}"));
    let text = std::fs::read_to_string(&object).unwrap();
    std::fs::write(&object, text.replacen("\"version\":1", "\"version\": 1", 1)).unwrap();

    // This host keeps copies of the snapshot objects it read (they never change): it
    // lists from its copy, while verify reads storage and names the damage.
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), 2);
    let err = t.fails(&["verify"], 14);
    assert!(
        err.contains(short) && err.contains("does not match its id"),
        "{err}"
    );
    // A host without the copy (another one, or this one with its cache lost):
    for e in std::fs::read_dir(t.path("cache")).unwrap() {
        let repo_cache = e.unwrap().path();
        let copies = repo_cache.join("snapshots");
        if copies.exists() {
            std::fs::remove_dir_all(copies).unwrap();
            std::fs::remove_file(repo_cache.join("summaries")).unwrap();
        }
    }

    // Listing: the readable one, and a warning naming the other.
    let o = t.run(&["snapshots", "--json"]);
    assert!(o.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], first.as_str());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("snapshot {short} cannot be read"))
            && err.contains("does not match its id"),
        "{err}"
    );

    // `latest` is the newest readable one, and the warning says why.
    let o = t.run(&[
        "restore",
        "files",
        "latest",
        "--to",
        t.path("out").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains(short));
    assert_eq!(describe(&t.path("out")), first_tree);
    // The unreadable one asked for by id: exit 14, nothing written, the remedy named.
    let err = t.fails(
        &[
            "restore",
            "files",
            short,
            "--to",
            t.path("out2").to_str().unwrap(),
        ],
        14,
    );
    assert!(
        err.contains("does not match its id") && err.contains(&format!("custos forget {short}")),
        "{err}"
    );
    assert!(
        !t.path("out2").exists() || std::fs::read_dir(t.path("out2")).unwrap().next().is_none()
    );

    // verify names it and still checks the rest (the packs of the first are read).
    let o = t.run(&["verify", "--read-data", "--json"]);
    assert_eq!(o.status.code(), Some(14));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["snapshots"], 1, "{v}");
    let errors = v["errors"].to_string();
    assert!(
        errors.contains(short) && errors.contains("does not match its id"),
        "{v}"
    );
    assert_eq!(v["errors"].as_array().unwrap().len(), 1, "{v}");

    // What deletes by policy stops rather than count without it; nothing is removed.
    let before = t.repo_state();
    let err = t.fails(&["forget", "--keep-last", "1"], 14);
    assert!(err.contains("stop until it is dealt with"), "{err}");
    t.fails(&["prune"], 14);
    assert_eq!(t.repo_state(), before);

    // Named, it is removed; then everything is clean and the first still restores whole.
    let out = t.ok(&["forget", short]);
    assert!(out.contains(&format!("remove {short}")), "{out}");
    t.ok(&["verify", "--read-data"]);
    t.ok(&["prune"]);
    t.ok(&["verify", "--read-data"]);
    assert_eq!(describe(&t.restore_latest("out3")), first_tree);
}

#[test]
fn malformed_config_missing_repo_and_usage_errors() {
    let mut t = T::bare();
    std::fs::write(
        t.path("custos.toml"),
        "[repository]\nurl = \"/x\"\nretention = 3\nkeep_daily = \"many\"\n",
    )
    .unwrap();
    t.set("CUSTOS_CONFIG", t.path("custos.toml").to_str().unwrap());
    let err = t.fails(&["snapshots"], 2);
    assert!(err.contains("malformed") && err.contains("line"), "{err}");

    std::fs::write(
        t.path("custos.toml"),
        "[storage.s3]\nsecret_access_key = \"AKIA-secret-value\"\n",
    )
    .unwrap();
    let err = t.fails(&["snapshots"], 2);
    assert!(
        err.contains("must not contain secret_access_key") && !err.contains("AKIA-secret-value"),
        "{err}"
    );

    t.unset("CUSTOS_CONFIG");
    let err = t.fails(&["snapshots"], 10);
    assert!(
        err.contains("no custos repository") && err.contains("custos init"),
        "{err}"
    );
    t.unset("CUSTOS_REPO");
    let err = t.fails(&["snapshots"], 2);
    assert!(err.contains("CUSTOS_REPO"), "{err}");
    // clap usage errors exit 2 as well.
    t.fails(&["backup", "files"], 2);
}

#[test]
fn unreadable_file_makes_a_partial_snapshot_with_its_own_exit_code() {
    use std::os::unix::fs::PermissionsExt;
    // Root reads every file, so the backup runs as `nobody` when the test runs as root.
    let mut t = T::bare();
    let src = t.path("src");
    make_tree(&src, 2, 5, 1000);
    if is_root() {
        chown_tree(t.dir.path(), "nobody");
        std::fs::set_permissions(t.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        t.run_as = Some("nobody".into());
    }
    t.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    std::fs::write(src.join("secret.txt"), b"x").unwrap();
    if is_root() {
        chown_tree(&src.join("secret.txt"), "root");
    }
    std::fs::set_permissions(
        src.join("secret.txt"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    let err = t.fails(&["backup", "files", src.to_str().unwrap()], 3);
    assert!(
        err.contains("partial") && err.contains("secret.txt"),
        "{err}"
    );
    // The snapshot exists, holds everything else, and leaves the unreadable file out.
    t.restore_latest("out");
    assert!(!t.path("out/secret.txt").exists());
    assert!(t.path("out/docs/file-0000.dat").exists());
}

#[test]
fn loosened_permissions_are_reported_by_verify() {
    use std::os::unix::fs::PermissionsExt;
    let t = backed_up();
    t.ok(&["verify"]);
    let pack = &t.packs()[0];
    std::fs::set_permissions(pack, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = t.fails(&["verify"], 14);
    assert!(
        err.contains("permissions") && err.contains("should be 600"),
        "{err}"
    );
}

/// Mounts a tmpfs with `opts` at `dir` for as long as the value lives; None without the
/// privilege to mount.
struct Tmpfs(std::ffi::CString);

impl Tmpfs {
    fn mount(dir: &std::path::Path, opts: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (fs, at, o) = (c("tmpfs"), c(dir.to_str().unwrap()), c(opts));
        // SAFETY: mount with valid C strings; fails without privileges.
        let r = unsafe { libc::mount(fs.as_ptr(), at.as_ptr(), fs.as_ptr(), 0, o.as_ptr().cast()) };
        (r == 0).then_some(Tmpfs(at))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // SAFETY: unmounting what this test mounted.
        unsafe { libc::umount(self.0.as_ptr()) };
    }
}

#[test]
fn restore_onto_a_full_file_system_stops_with_a_clear_error() {
    let t = backed_up();
    let src = t.path("src");
    // Too small for the data: refused before anything is written.
    let small = t.path("small");
    let Some(fs) = Tmpfs::mount(&small, "size=256k") else {
        eprintln!("tmpfs not mountable here (needs CAP_SYS_ADMIN): not checked");
        return;
    };
    let out = small.join("out");
    let err = t.fails(
        &["restore", "files", "latest", "--to", out.to_str().unwrap()],
        2,
    );
    assert!(
        err.contains("free; the restore needs") && err.contains("larger file system"),
        "{err}"
    );
    assert!(
        std::fs::read_dir(&out).map_or(true, |d| d
            .filter_map(|e| e.ok())
            .all(|e| e.path().is_dir())),
        "nothing but folders may be written before the refusal"
    );
    drop(fs);

    // Room for one copy and a half: a restore fits, and so does restoring it again with
    // --overwrite (the files it replaces are counted as free).
    let rels = walk_all(&src);
    let need: u64 = rels
        .iter()
        .filter_map(|r| src.join(r).symlink_metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len().next_multiple_of(4096))
        .sum();
    let fs = Tmpfs::mount(&small, &format!("size={}k", (need + need / 2) / 1024)).unwrap();
    t.ok(&["restore", "files", "latest", "--to", out.to_str().unwrap()]);
    t.ok(&[
        "restore",
        "files",
        "latest",
        "--to",
        out.to_str().unwrap(),
        "--overwrite",
    ]);
    assert_eq!(describe(&out), describe(&src));
    drop(fs);

    // Room for the bytes but not for the files (inodes run out while the data is being
    // written): the writers fail, the restore stops with the file system's error and what
    // to do, and does not hang.
    let dirs = rels.iter().filter(|r| src.join(r).is_dir()).count();
    let empty = rels
        .iter()
        .filter(|r| {
            src.join(r)
                .metadata()
                .is_ok_and(|m| m.is_file() && m.len() == 0)
        })
        .count();
    // The mount's root, `out`, the folders, the empty files (made while planning), and
    // two of the files with data.
    let inodes = 1 + 1 + dirs + empty + 2;
    let _fs = Tmpfs::mount(&small, &format!("size=64m,nr_inodes={inodes}")).unwrap();
    let err = t.fails(
        &["restore", "files", "latest", "--to", out.to_str().unwrap()],
        2,
    );
    assert!(
        err.contains("No space left on device") && err.contains("the file system is full"),
        "{err}"
    );
}

#[test]
fn a_target_time_without_a_zone_is_read_as_utc_silently() {
    let t = T::new();
    let out = t.path("never");
    for (time, said) in [
        ("2026-11-28 02:55:00", "does not say its time zone"),
        ("2026-11-28T02:55", "does not say its time zone"),
        ("yesterday", "is not a time"),
    ] {
        let err = t.fails(
            &[
                "restore",
                "postgres",
                "--to",
                out.to_str().unwrap(),
                "--target-time",
                time,
            ],
            2,
        );
        assert!(err.contains(said), "{time}: {err}");
    }
    // With a zone it gets past the time (and stops at the empty repository).
    let err = t.fails(
        &[
            "restore",
            "postgres",
            "--to",
            out.to_str().unwrap(),
            "--target-time",
            "2026-11-28 02:55:00 UTC",
            "--restore-command",
            "true",
        ],
        16,
    );
    assert!(err.contains("no PostgreSQL backup"), "{err}");
    assert!(!out.exists());
}

#[test]
fn output_for_machines_progress_json_usage_errors_and_plain_logs() {
    let mut t = T::new();
    let src = t.path("src");
    make_tree(&src, 21, 40, 400_000);
    t.set("CUSTOS_PROGRESS_SECONDS", "0");
    // Not a terminal: progress comes as lines on stderr, the result alone on stdout.
    let out = t.run(&["backup", "files", src.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.lines()
            .filter(|l| l.starts_with("custos: backup "))
            .count()
            >= 2,
        "{err}"
    );
    // With --json: progress events, one JSON object a line; stdout one document.
    let out = t.run(&[
        "restore",
        "files",
        "latest",
        "--to",
        t.path("out").to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(!events.is_empty() && events.iter().all(|e| e["progress"]["phase"] == "restore"));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["files"].as_u64().unwrap() > 0);
    // A usage error honours --json.
    let out = t.run(&["backup", "--json", "no-such-source"]);
    assert_eq!(out.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["error"]["code"], 2, "{doc}");
    // Logs to a file or a pipe carry no colour codes.
    t.set("CUSTOS_LOG", "debug");
    let out = t.run(&["snapshots"]);
    assert!(!out.stderr.is_empty() && !out.stderr.contains(&0x1b));
}

/// A damaged index object stops every command with the way out; `index rebuild` (a key
/// that may delete) indexes the packs again from their headers and removes it, after
/// which backups and restores complete. The same when every index object is gone.
#[test]
fn a_damaged_or_missing_index_object_is_rebuilt_from_the_packs() {
    let mut t = backed_up();
    // Read from the objects themselves (a host's on-disk build holds what it read before
    // the damage; a new host's build is checked below).
    t.set("CUSTOS_INDEX_MEMORY_MB", "16");
    let src = t.path("src");
    let index_dir = t.path("repo/index");
    let objects = || -> Vec<std::path::PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(&index_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let first = objects();
    let before = t.json(&["snapshots"])[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let first_tree = describe(&src);
    std::fs::write(src.join("docs/second.bin"), vec![3u8; 300_000]).unwrap();
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    assert_eq!(objects().len(), 2);
    // The second backup's object: it indexes only what the first snapshot does not need.
    let damaged = objects().into_iter().find(|o| !first.contains(o)).unwrap();
    let mut b = std::fs::read(&damaged).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 1;
    std::fs::write(&damaged, b).unwrap();
    let err = t.fails(&["backup", "files", src.to_str().unwrap()], 14);
    assert!(err.contains("custos index rebuild"), "{err}");
    // A new host building its on-disk index refuses the damaged object too.
    let mut fresh = t.with_password(PW);
    fresh.set("CUSTOS_INDEX_MEMORY_MB", "0");
    fresh.set(
        "CUSTOS_CACHE_DIR",
        t.path("other-host-cache").to_str().unwrap(),
    );
    let err = fresh.fails(&["backup", "files", src.to_str().unwrap()], 14);
    assert!(err.contains("custos index rebuild"), "{err}");

    // verify names the damaged object and still checks the rest: the snapshot whose
    // chunks only that object indexed is named too, and the trail is read (in memory and
    // when the index is built on disk).
    for (memory, who) in [("16", &t), ("0", &fresh)] {
        let mut v = who.with_password(PW);
        v.set("CUSTOS_INDEX_MEMORY_MB", memory);
        let out = v.run(&["verify", "--json"]);
        assert_eq!(out.status.code(), Some(14), "{memory}");
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let errors: Vec<&str> = j["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        let name = damaged.file_name().unwrap().to_str().unwrap();
        assert!(
            errors[0].starts_with(&format!("index: index {}", &name[..8]))
                && errors[0].contains("altered")
                && errors[0].contains("index rebuild"),
            "{memory} {j}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("snapshot ") && e.contains("not in the index")),
            "{memory} {j}"
        );
        assert_eq!(j["snapshots"], 2, "{memory} {j}");
        assert!(j["trail_entries"].as_u64().unwrap() > 0, "{memory} {j}");
    }

    // A restore reads around the damaged object: the first snapshot, which does not need
    // it, comes back whole (with a warning); the second stops before writing anything,
    // with the way out.
    let out = t.run(&[
        "restore",
        "files",
        &before,
        "--to",
        t.path("out-first").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("altered") && err.contains("index rebuild"),
        "{err}"
    );
    assert_eq!(describe(&t.path("out-first")), first_tree);
    let to = t.path("out-second");
    let err = t.fails(
        &["restore", "files", "latest", "--to", to.to_str().unwrap()],
        14,
    );
    assert!(
        err.contains("not in the index") && err.contains("index rebuild"),
        "{err}"
    );
    assert!(
        !to.exists() || std::fs::read_dir(&to).unwrap().next().is_none(),
        "a restore that cannot complete wrote into its target"
    );

    t.add_key("backup", "backup key", &[]);
    let backup = t.with_password("backup key");
    backup.fails(&["index", "rebuild"], 13);
    assert!(damaged.exists());

    let r = t.json(&["index", "rebuild"]);
    assert_eq!(r["damaged"].as_array().unwrap().len(), 1, "{r}");
    assert!(r["packs_recovered"].as_u64().unwrap() > 0, "{r}");
    assert!(!damaged.exists());
    t.restore_latest("out");
    assert_eq!(describe(&t.path("out")), describe(&src));
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    t.ok(&["verify", "--read-data"]);
    let again = t.json(&["index", "rebuild"]);
    assert_eq!(again["packs_recovered"], 0, "{again}");

    // Every index object gone: every pack comes back; both first snapshots restore.
    for o in objects() {
        std::fs::remove_file(o).unwrap();
    }
    let r = t.json(&["index", "rebuild"]);
    assert_eq!(
        r["packs_recovered"].as_u64().unwrap() as usize,
        t.packs().len(),
        "{r}"
    );
    let snaps = t.json(&["snapshots"]);
    for s in snaps.as_array().unwrap() {
        let id = s["id"].as_str().unwrap();
        let out = t.path(&format!("out-{}", &id[..8]));
        t.ok(&["restore", "files", id, "--to", out.to_str().unwrap()]);
    }
    assert_eq!(
        describe(&t.path(&format!(
                "out-{}",
                &snaps[snaps.as_array().unwrap().len() - 1]["id"]
                    .as_str()
                    .unwrap()[..8]
            ))),
        describe(&src)
    );
    t.ok(&["verify", "--read-data"]);
    t.ok(&["audit", "verify"]);
}

#[test]
fn a_cache_folder_that_cannot_be_written_costs_a_build_not_the_command() {
    // The on-disk index goes to the cache folder; one this user cannot write (another
    // user's, a file in its place) must not stop a backup or a restore.
    let mut t = T::new();
    t.set("CUSTOS_INDEX_MEMORY_MB", "0");
    t.ok(&["backup", "stream", "--name", "a", "--command", "echo first"]);
    let blocked = t.path("not-a-folder");
    std::fs::write(&blocked, "a file where the cache folder should be").unwrap();
    t.set("CUSTOS_CACHE_DIR", blocked.to_str().unwrap());
    let o = t.run(&[
        "backup",
        "stream",
        "--name",
        "a",
        "--command",
        "echo second",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("cannot write the on-disk index") && err.contains("temporary folder"),
        "{err}"
    );
    let o = t.run(&["restore", "stream", "latest"]);
    assert_eq!(o.stdout, b"second\n");
    assert_eq!(
        std::fs::read_to_string(&blocked).unwrap(),
        "a file where the cache folder should be"
    );
}

/// A restore that stops while writing (a pack gone mid-restore) says it stopped part-way
/// and leaves only complete files: each file the target holds is the snapshot's, the
/// unfinished ones are removed rather than left at full size with holes. With the pack
/// back, `--delta` on the same target restores the rest.
#[test]
fn a_restore_that_stops_part_way_leaves_only_complete_files_and_delta_finishes_it() {
    use rand::{RngCore, SeedableRng};
    let t = T::new();
    let src = t.path("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..8 {
        // Incompressible: 48 MiB over several packs.
        let mut b = vec![0u8; 6 << 20];
        rng.fill_bytes(&mut b);
        std::fs::write(src.join(format!("f{i}")), b).unwrap();
    }
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let packs = t.packs();
    assert!(packs.len() >= 3, "{packs:?}");
    let biggest = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap()
        .clone();
    let aside = t.path("aside");
    std::fs::rename(&biggest, &aside).unwrap();
    let out = t.path("out");
    let err = t.fails(
        &["restore", "files", "latest", "--to", out.to_str().unwrap()],
        14,
    );
    assert!(
        err.contains("is missing from the repository")
            && err.contains("the restore stopped part-way")
            && err.contains("every file there is complete")
            && err.contains("--delta restores the rest"),
        "{err}"
    );
    let mut missing = 0;
    for i in 0..8 {
        let name = format!("f{i}");
        match std::fs::read(out.join(&name)) {
            Ok(got) => assert!(
                got == std::fs::read(src.join(&name)).unwrap(),
                "{name} is in the target but not the snapshot's"
            ),
            Err(_) => missing += 1,
        }
    }
    assert!(
        missing > 0,
        "no file was left unfinished: the pack was not needed"
    );
    std::fs::rename(&aside, &biggest).unwrap();
    t.ok(&[
        "restore",
        "files",
        "latest",
        "--to",
        out.to_str().unwrap(),
        "--delta",
    ]);
    assert_eq!(describe(&out), describe(&src));
}

/// The repository config is plain JSON that whoever can write the storage can change. A
/// value custos never writes (a pack of 2^62 bytes, a chunker that cannot cut) made
/// backups abort on an allocation or panic; now every command refuses it, exit 14,
/// naming the field, and writes nothing.
#[test]
fn an_altered_repository_config_is_refused_before_anything_is_written() {
    let t = backed_up();
    let src = t.path("src");
    let config = std::path::Path::new(&t.repo).join("config");
    let good = std::fs::read(&config).unwrap();
    let packs = t.packs().len();
    for (field, value, says) in [
        ("pack_size", serde_json::json!(1u64 << 62), "pack_size"),
        (
            "chunker",
            serde_json::json!({"kind": "cdc", "min": 0, "avg": 0, "max": 0}),
            "chunker min 0",
        ),
        (
            "block_chunker",
            serde_json::json!({"kind": "fixed", "size": 4294967295u32}),
            "block_chunker size",
        ),
    ] {
        let mut c: serde_json::Value = serde_json::from_slice(&good).unwrap();
        c[field] = value;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&config, c.to_string()).unwrap();
        let err = t.fails(&["backup", "files", src.to_str().unwrap()], 14);
        assert!(
            err.contains(says) && err.contains("altered") && err.contains("secondary"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(t.packs().len(), packs, "{field}");
        t.fails(&["snapshots"], 14);
    }
    std::fs::write(&config, &good).unwrap();
    t.ok(&["backup", "files", src.to_str().unwrap()]);
}

#[test]
fn this_hosts_copies_of_snapshots_are_used_only_while_they_hash_to_their_names() {
    // Listing every snapshot fetched every snapshot object, each command (a backup's
    // parent, `restore latest`): thousands of GETs after years of history. A host now
    // keeps copies; they are checked against their names, and go with their snapshots.
    let t = T::new();
    let src = t.path("src");
    make_tree(&src, 41, 4, 10_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    make_tree(&src.join("b"), 42, 4, 10_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let listed = t.json(&["snapshots"]);
    let ids: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let cache = std::fs::read_dir(t.path("cache"))
        .unwrap()
        .map(|e| e.unwrap().path().join("snapshots"))
        .find(|p| p.exists())
        .expect("a folder of snapshot copies");
    let copy = |id: &str| cache.join(id);
    assert!(ids.iter().all(|id| copy(id).exists()));
    // The summaries this host decoded, in one file: sealed (no source path in it).
    let summaries = cache.with_file_name("summaries");
    let sealed = std::fs::read(&summaries).unwrap();
    let needle = src.to_str().unwrap().as_bytes();
    assert!(!sealed.windows(needle.len()).any(|w| w == needle));
    // Garbage, and another repository's file, are not believed; the file is made again.
    let other = T::new();
    other.ok(&["backup", "files", src.to_str().unwrap()]);
    other.ok(&["snapshots"]);
    let theirs = std::fs::read_dir(other.path("cache"))
        .unwrap()
        .map(|e| e.unwrap().path().join("summaries"))
        .find(|p| p.exists())
        .expect("the other repository's summaries");
    for planted in [b"garbage".to_vec(), std::fs::read(&theirs).unwrap()] {
        std::fs::write(&summaries, &planted).unwrap();
        assert_eq!(t.json(&["snapshots"]), listed);
        assert_ne!(std::fs::read(&summaries).unwrap(), planted);
    }

    // Without the summaries (a host that has only the copies):
    std::fs::remove_file(&summaries).unwrap();

    // One copy holds the other's (valid) bytes, the other garbage; a copy of a snapshot
    // storage does not hold is planted. None of it is believed.
    let a = std::fs::read(copy(&ids[0])).unwrap();
    let b = std::fs::read(copy(&ids[1])).unwrap();
    std::fs::write(copy(&ids[0]), &b).unwrap();
    std::fs::write(copy(&ids[1]), b"garbage").unwrap();
    let planted = "cd".repeat(32);
    std::fs::write(copy(&planted), &a).unwrap();
    let o = t.run(&["snapshots", "--json"]);
    assert!(o.status.success());
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap(),
        listed
    );
    assert_eq!(std::fs::read(copy(&ids[0])).unwrap(), a);
    assert_eq!(std::fs::read(copy(&ids[1])).unwrap(), b);
    assert!(!copy(&planted).exists());

    // A forgotten snapshot's copy goes at the next listing, and its summary is not listed
    // from the file.
    assert!(summaries.exists());
    t.ok(&["forget", &ids[0][..8]]);
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), 1);
    assert!(!copy(&ids[0]).exists() && copy(&ids[1]).exists());
    assert_eq!(describe(&t.restore_latest("out")), describe(&src));
}
