//! A second site (issue 19): `custos copy` to a secondary repository, `--secondary NAME`
//! to read, verify and restore from it, `wal-push` writing each segment to both.
//!
//! - Two SeaweedFS servers; a PostgreSQL 15 cluster under pgbench load archives through
//!   the async pusher to the primary and the secondary; full and incremental backups;
//!   copies run during the load. The primary's server is then stopped and its folder
//!   deleted: a point-in-time restore from the secondary to a time during the load holds
//!   exactly the ledger rows committed by then.
//! - `copy` killed with SIGKILL at ten moments: the secondary verifies after each, and the
//!   next copy completes it.
//! - The secondary's own retention (forget and prune with --secondary, tombstones), a
//!   revoked key, direct writes refused, a conflicting object, a damaged pack on the
//!   primary, `copy --check`'s exit code.

mod common;
use common::*;

use custos_testkit::{pg15_bin, PgCluster, S3Server, ACCESS_KEY, SECRET_KEY};

/// custos.toml for a primary and a secondary `dr`, on S3 servers or local paths.
fn config(
    t: &T,
    primary: &str,
    primary_s3: Option<&S3Server>,
    dr: &str,
    dr_s3: Option<&S3Server>,
    extra: &str,
) -> std::path::PathBuf {
    let secret = t.path("s3.secret");
    std::fs::write(&secret, SECRET_KEY).unwrap();
    let mut c = format!(
        "[repository]\nurl = \"{primary}\"\npassword_file = \"{}\"\ncache_dir = \"{}\"\n",
        t.path("backup.pw").display(),
        t.path("cache").display()
    );
    if let Some(s) = primary_s3 {
        c += &format!(
            "[storage.s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key_file = \"{}\"\n",
            s.endpoint,
            secret.display()
        );
    }
    c += &format!("[[secondary]]\nname = \"dr\"\nurl = \"{dr}\"\n{extra}\n");
    if let Some(s) = dr_s3 {
        c += &format!(
            "[secondary.s3]\nendpoint = \"{}\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key_file = \"{}\"\n",
            s.endpoint,
            secret.display()
        );
    }
    let p = t.path("custos.toml");
    std::fs::write(&p, c).unwrap();
    std::fs::write(t.path("restore.pw"), PW).unwrap();
    std::fs::write(t.path("backup.pw"), "backup role password").unwrap();
    p
}

/// A T on that config: the restore key's password from the environment (init, key add).
/// How many snapshots `custos [ARGS] snapshots` lists.
fn snapshots(r: &T, args: &[&str]) -> usize {
    let mut a = args.to_vec();
    a.push("snapshots");
    r.json(&a).as_array().unwrap().len()
}

/// `copy --check` fails (exit 20) with exactly one snapshot not yet on the secondary; its
/// stderr.
fn one_snapshot_behind(r: &T) -> std::process::Output {
    let chk = r.run(&["copy", "--check", "--json"]);
    assert_eq!(chk.status.code(), Some(20));
    let j: serde_json::Value = serde_json::from_slice(&chk.stdout).unwrap();
    assert!(
        j["secondaries"][0]["report"]["missing"]["snapshots"]["objects"] == 1,
        "{j}"
    );
    chk
}

fn on_config(cfg: &std::path::Path) -> T {
    let mut t = T::bare();
    t.unset("CUSTOS_REPO");
    t.unset("CUSTOS_CACHE_DIR");
    t.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    t
}

#[test]
fn the_secondary_restores_the_database_after_the_primary_is_destroyed() {
    let primary = S3Server::start();
    primary.create_bucket("main");
    let dr = S3Server::start();
    dr.create_bucket("second");
    let (mut t, cbin, cfg) = pg_repo();
    // pg_repo made a local repository: this test's is on S3, with the secondary's WAL
    // written by the pusher before PostgreSQL is told a segment is archived.
    t.run_as = None;
    let cfg2 = config(
        &t,
        "s3://main/db",
        Some(&primary),
        "s3://second/db",
        Some(&dr),
        "wal = true",
    );
    assert_eq!(cfg, cfg2);
    let mut admin = on_config(&cfg);
    admin.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    admin.add_key("backup", "backup role password", &[]);
    custos_testkit::give_to_postgres(t.dir.path());
    let (mut backup, mut restorer, out_dir) = pg_roles(&t, &cfg);
    backup.unset("CUSTOS_REPO");
    restorer.unset("CUSTOS_REPO");
    restorer.set("CUSTOS_CONFIG", cfg.to_str().unwrap());

    let conf = format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push --async %p'\nwal_level = replica\n\
         track_commit_timestamp = on\nmax_connections = 40\n",
        cbin.display(),
        cfg.display()
    );
    let pg = PgCluster::init(pg15_bin(), &conf);
    pg.start();
    backup.set("PGHOST", pg.dir.to_str().unwrap());
    backup.set("PGPORT", &pg.port.to_string());
    let mut load = start_ledger_load(&t, &pg, 3, 150, 24);
    sleep_ms(2000);
    let full = backup.json(&["backup", "postgres", "--type", "full"]);
    // The backup key copies: objects are encrypted already, nothing is decrypted.
    let c1 = backup.json(&["copy"]);
    assert!(
        c1["secondaries"][0]["copied"]["data"]["objects"]
            .as_u64()
            .unwrap()
            > 0,
        "{c1}"
    );
    sleep_ms(3000);
    let incr = backup.json(&["backup", "postgres", "--type", "incremental"]);
    assert_eq!(incr["parent"], full["snapshot"]);
    sleep_ms(2000);
    let target = pg.psql("SELECT clock_timestamp()");
    // Copies keep running while the load goes on; each is resumable and incremental.
    let mut lags = vec![];
    while load.try_wait().unwrap().is_none() {
        backup.json(&["copy"]);
        let chk = backup.json(&["copy", "--check", "--max-lag", "1h"]);
        lags.push(
            chk["secondaries"][0]["report"]["lag_seconds"]
                .as_f64()
                .unwrap_or(f64::NAN),
        );
        sleep_ms(1000);
    }
    assert!(load.wait().unwrap().success(), "pgbench failed");
    pg.psql("INSERT INTO ledger (note) VALUES ('last')");
    pg.switch_and_archive();
    // Acknowledged segments are on the secondary already: the pusher wrote both.
    let last_seg = pg.psql("SELECT last_archived_wal FROM pg_stat_archiver");
    restorer.ok(&["--secondary", "dr", "verify"]);
    backup.ok(&["copy"]);
    let want = committed_until(&pg, &target);
    assert!(!want.is_empty());
    eprintln!("secondary lag samples during the load (s): {lags:?}; last segment {last_seg}");
    assert!(lags.iter().all(|l| l.is_finite() && *l < 60.0), "{lags:?}");

    // The first site is lost: server stopped, its data folder gone.
    drop(primary);
    let dir = out_dir.join("from-dr");
    let (r, port) = restore_pg(
        &restorer,
        &dir,
        &["--secondary", "dr", "--target-time", &target],
    );
    assert_eq!(r["snapshot"], incr["snapshot"], "{r}");
    let auto = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("--secondary dr"), "{auto}");
    let got = start_and_read(&pg.bin, &dir, port, &pg.dir);
    assert_eq!(
        got, want,
        "the secondary's restore differs from what was committed by {target}"
    );
    let v = restorer.json(&["--secondary", "dr", "verify", "--read-data"]);
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
    // Nothing can be recorded in the lost primary's trail: said, not fatal.
    let o = restorer.run(&["--secondary", "dr", "snapshots"]);
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not recorded in the operation trail"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn copy_killed_at_ten_moments_leaves_a_secondary_that_verifies() {
    let t0 = T::bare();
    let cfg = config(
        &t0,
        &t0.path("primary").display().to_string(),
        None,
        &t0.path("dr").display().to_string(),
        None,
        "",
    );
    let t = on_config(&cfg);
    // Small packs: each round's backup writes several, so each copy has many writes.
    t.ok(&[
        "init",
        "--kdf-memory-mib",
        "8",
        "--kdf-iterations",
        "1",
        "--pack-size-mib",
        "1",
    ]);
    let mut restorer = on_config(&cfg);
    restorer.set("CUSTOS_PASSWORD", PW);
    let src = t0.path("src");
    let mut kills = 0;
    for (round, n) in [1u64, 2, 3, 4, 5, 6, 8, 10, 12, 15].into_iter().enumerate() {
        make_tree(&src.join(format!("round{round}")), round as u64, 8, 500_000);
        restorer.ok(&["backup", "files", src.to_str().unwrap()]);
        let mut k = restorer.with_password(PW);
        k.set("CUSTOS_TEST_KILL_BEFORE_WRITE", &n.to_string());
        let o = k.run(&["copy"]);
        if o.status.code().is_none() {
            kills += 1;
        }
        if t0.path("dr/config").exists() {
            let v = restorer.run(&["--secondary", "dr", "verify"]);
            assert!(
                v.status.success(),
                "round {round} (killed before write {n}): the secondary does not verify:\n{}{}",
                String::from_utf8_lossy(&v.stdout),
                String::from_utf8_lossy(&v.stderr)
            );
        }
    }
    assert!(kills >= 8, "only {kills} of the copies were killed");
    restorer.ok(&["copy"]);
    let v = restorer.json(&["--secondary", "dr", "verify", "--read-data"]);
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
    let a = restorer.ok(&["--secondary", "dr", "audit", "verify"]);
    assert!(!a.contains("missing"), "{a}");
    let out = t0.path("out");
    restorer.ok(&[
        "--secondary",
        "dr",
        "restore",
        "files",
        "latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(describe(&out), describe(&src));
    let p = restorer.json(&["snapshots"]);
    let s = restorer.json(&["--secondary", "dr", "snapshots"]);
    assert_eq!(p, s, "the secondary lists other snapshots than the primary");
}

#[test]
fn the_secondary_keeps_its_own_retention_refuses_other_writers_and_names_damage() {
    let t0 = T::bare();
    let dr = t0.path("dr");
    let cfg = config(
        &t0,
        &t0.path("primary").display().to_string(),
        None,
        &dr.display().to_string(),
        None,
        "max_lag = \"1s\"",
    );
    let mut r = on_config(&cfg);
    r.set("CUSTOS_PASSWORD", PW);
    r.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    let src = t0.path("src");
    for i in 0..3 {
        make_tree(&src.join(format!("v{i}")), i, 4, 200_000);
        r.ok(&["backup", "files", src.to_str().unwrap()]);
    }
    // Not a copy yet: --check says so and fails.
    let e = r.run(&["copy", "--check"]);
    assert_eq!(e.status.code(), Some(20));
    r.ok(&["copy"]);

    // Direct writes: refused before anything is written, by name or by location.
    let e = r.fails(
        &[
            "--secondary",
            "dr",
            "backup",
            "files",
            src.to_str().unwrap(),
        ],
        2,
    );
    assert!(e.contains("runs against the primary"), "{e}");
    let before = std::fs::read_dir(dr.join("snapshots")).unwrap().count();
    let mut direct = r.with_password(PW);
    direct.unset("CUSTOS_CONFIG");
    direct.set("CUSTOS_REPO", dr.to_str().unwrap());
    let e = direct.fails(&["backup", "files", src.to_str().unwrap()], 13);
    assert!(e.contains("secondary `dr`"), "{e}");
    assert_eq!(
        std::fs::read_dir(dr.join("snapshots")).unwrap().count(),
        before
    );
    let e = r.fails(&["--secondary", "nowhere", "snapshots"], 2);
    assert!(e.contains("the secondaries are: dr"), "{e}");

    // Its own retention: forget and prune there; copy does not bring the forgotten back.
    r.ok(&["--secondary", "dr", "forget", "--keep-last", "1"]);
    r.ok(&["--secondary", "dr", "prune"]);
    assert_eq!(snapshots(&r, &["--secondary", "dr"]), 1);
    let c = r.json(&["copy"]);
    assert!(
        c["secondaries"][0]["removed_here"].as_u64().unwrap() >= 2,
        "{c}"
    );
    assert_eq!(snapshots(&r, &["--secondary", "dr"]), 1);
    assert_eq!(snapshots(&r, &[]), 3);
    r.ok(&["--secondary", "dr", "verify", "--read-data"]);
    // Both operations are in the primary's trail, marked as the secondary's.
    let log = r.ok(&["audit", "log"]);
    assert!(
        log.contains("forget") && log.contains("\"secondary\":\"dr\""),
        "{log}"
    );

    // The primary's own retention catches up with part of it: a tombstoned name the
    // primary removed too is dropped by the next copy, one it still holds is kept (and
    // still not copied back).
    let tombstoned = || -> Vec<String> {
        walkdir(&dr.join("tombstones"))
            .iter()
            .flat_map(|p| {
                let t: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
                t["names"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n.as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    assert_eq!(tombstoned().len(), 2);
    r.ok(&["forget", "--keep-last", "2"]);
    r.ok(&["prune"]);
    let c = r.json(&["copy"]);
    assert_eq!(c["secondaries"][0]["tombstones_dropped"], 1, "{c}");
    assert_eq!(c["secondaries"][0]["removed_here"], 1, "{c}");
    let left = tombstoned();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(t0.path("primary").join(&left[0]).exists(), "{left:?}");
    assert_eq!(walkdir(&dr.join("tombstones")).len(), 1);
    assert_eq!(snapshots(&r, &["--secondary", "dr"]), 1);
    let c = r.json(&["copy"]);
    assert_eq!(c["secondaries"][0]["tombstones_dropped"], 0, "{c}");

    // Lag: a backup not yet copied, older than max_lag, fails the check.
    let had = walkdir(&t0.path("primary/snapshots"));
    make_tree(&src.join("v9"), 9, 2, 100_000);
    r.ok(&["backup", "files", src.to_str().unwrap()]);
    sleep_ms(1200);
    one_snapshot_behind(&r);

    // Whoever can write the secondary's storage (but holds no key) plants tombstones
    // naming the new snapshot: one without a MAC, one copying a genuine tombstone's MAC.
    // Neither keeps it off the secondary nor out of the lag.
    let new_snap = walkdir(&t0.path("primary/snapshots"))
        .into_iter()
        .find(|p| !had.contains(p))
        .unwrap();
    let name = format!(
        "snapshots/{}",
        new_snap.file_name().unwrap().to_str().unwrap()
    );
    let genuine: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&walkdir(&dr.join("tombstones"))[0]).unwrap())
            .unwrap();
    let mut forged = genuine.clone();
    forged["names"] = serde_json::json!([name]);
    let mut bare = forged.clone();
    bare.as_object_mut().unwrap().remove("mac");
    std::fs::write(dr.join("tombstones/planted-1"), bare.to_string()).unwrap();
    std::fs::write(dr.join("tombstones/planted-2"), forged.to_string()).unwrap();
    let chk = one_snapshot_behind(&r);
    assert!(
        String::from_utf8_lossy(&chk.stderr).contains("tombstone tombstones/planted-1 ignored"),
        "{}",
        String::from_utf8_lossy(&chk.stderr)
    );

    // A damaged pack on the primary is not copied, and said.
    let packs: Vec<_> = walkdir(&t0.path("primary/data"));
    let copied: std::collections::HashSet<_> = walkdir(&dr.join("data"))
        .iter()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    let new_pack = packs
        .iter()
        .find(|p| !copied.contains(p.file_name().unwrap()))
        .expect("the new backup wrote a pack");
    let good = std::fs::read(new_pack).unwrap();
    flip_byte(new_pack, 100);
    let e = r.fails(&["copy"], 3);
    assert!(e.contains("do not match their names"), "{e}");
    assert!(!dr
        .join("data")
        .join(new_pack.strip_prefix(t0.path("primary/data")).unwrap())
        .exists());
    std::fs::write(new_pack, good).unwrap();
    r.ok(&["copy"]);
    let chk = r.json(&["copy", "--check", "--max-lag", "1h"]);
    assert_eq!(chk["secondaries"][0]["behind"], false, "{chk}");
    assert!(
        dr.join(&name).exists(),
        "a planted tombstone kept {name} off"
    );
    assert_eq!(snapshots(&r, &["--secondary", "dr"]), 2);

    // A revoked key opens neither copy once copied.
    let mut r2 = r.with_password(PW);
    let added = r2.add_key("restore", "second operator", &[]);
    let id = added["id"].as_str().unwrap().to_string();
    r.ok(&["copy"]);
    let mut other = r.with_password("second operator");
    other.ok(&["--secondary", "dr", "snapshots"]);
    r.ok(&["key", "remove", &id[..8]]);
    let c = r.json(&["copy"]);
    assert_eq!(
        c["secondaries"][0]["keys_revoked"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "{c}"
    );
    other.set("CUSTOS_PASSWORD", "second operator");
    let e = other.fails(&["--secondary", "dr", "snapshots"], 12);
    assert!(!e.is_empty());

    // Something else wrote under a name the primary uses next: copy stops and says so.
    let trail: Vec<_> = walkdir(&t0.path("primary/audit"));
    let next = format!("{:016x}", trail.len() + 1);
    std::fs::write(dr.join("audit").join(&next), b"{\"planted\": true}").unwrap();
    r.ok(&["snapshots"]);
    // (The trail's own check: which of the two sites lies cannot be told from here.)
    let e = r.fails(&["copy"], 14);
    assert!(
        e.contains("differs") && e.contains("something other than copy"),
        "{e}"
    );
}

#[test]
fn copy_between_buckets_streams_checks_every_name_carries_tags_and_resumes_after_kills() {
    use custos_storage::remote::{RemoteStorage, S3Options};
    use custos_storage::{PutMode, Storage};
    let (a, b) = (S3Server::start(), S3Server::start());
    a.create_bucket("main");
    b.create_bucket("second");
    let t0 = T::bare();
    let cfg = config(&t0, "s3://main/r", Some(&a), "s3://second/r", Some(&b), "");
    let mut r = on_config(&cfg);
    r.set("CUSTOS_PASSWORD", PW);
    r.ok(&[
        "init",
        "--kdf-memory-mib",
        "8",
        "--kdf-iterations",
        "1",
        "--pack-size-mib",
        "1",
    ]);
    let src = t0.path("src");
    make_tree(&src.join("one"), 1, 24, 400_000);
    r.ok(&["backup", "files", src.to_str().unwrap()]);
    let store = |s: &S3Server, bucket: &str| {
        RemoteStorage::s3(&S3Options {
            bucket: bucket.into(),
            root: "r".into(),
            endpoint: Some(s.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some(custos_testkit::ACCESS_KEY.into()),
            secret_access_key: Some(custos_testkit::SECRET_KEY.into()),
            ..Default::default()
        })
        .unwrap()
    };
    let (pa, pb) = (store(&a, "main"), store(&b, "second"));
    let packs: Vec<String> = pa
        .list("data")
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert!(packs.len() >= 3, "{packs:?}");

    // One pack damaged on the primary (rewritten there with one byte changed): the
    // streamed PUT is cut short before its last piece, so the secondary never holds it.
    let victim = packs.last().unwrap().clone();
    let good = pa.get(&victim).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x40;
    pa.put(&victim, &bad, PutMode::Overwrite).unwrap();
    let e = r.fails(&["copy"], 3);
    assert!(e.contains("do not match their names"), "{e}");
    assert_eq!(
        pb.size(&victim).unwrap(),
        None,
        "a damaged pack reached the secondary"
    );
    assert!(pb.size("config").unwrap().is_some());
    pa.put(&victim, &good, PutMode::Overwrite).unwrap();

    // Killed while streaming at several moments: the secondary verifies, the next copy
    // completes it.
    make_tree(&src.join("two"), 2, 12, 400_000);
    r.ok(&["backup", "files", src.to_str().unwrap()]);
    let mut kills = 0;
    for n in [1u64, 3, 6] {
        let mut k = r.with_password(PW);
        k.set("CUSTOS_TEST_KILL_BEFORE_WRITE", &n.to_string());
        if k.run(&["copy"]).status.code().is_none() {
            kills += 1;
        }
        r.ok(&["--secondary", "dr", "verify"]);
    }
    assert!(kills >= 2, "only {kills} copies were killed");
    r.ok(&["copy"]);
    let chk = r.json(&["copy", "--check", "--max-lag", "1h"]);
    assert_eq!(chk["secondaries"][0]["behind"], false, "{chk}");

    // Every pack arrived byte for byte with the primary's tags (data-only packs carry
    // the archival tag a lifecycle rule moves by).
    let mut tagged = 0;
    for p in pa.list("data").unwrap() {
        assert_eq!(
            pb.get(&p.path).unwrap(),
            pa.get(&p.path).unwrap(),
            "{}",
            p.path
        );
        let tags = pa.tags(&p.path).unwrap();
        assert_eq!(pb.tags(&p.path).unwrap(), tags, "{}", p.path);
        tagged += tags.is_some() as usize;
    }
    assert!(tagged > 0, "no pack on the primary is tagged");
    let v = r.json(&["--secondary", "dr", "verify", "--read-data"]);
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");
    let out = t0.path("out");
    r.ok(&[
        "--secondary",
        "dr",
        "restore",
        "files",
        "latest",
        "--to",
        out.to_str().unwrap(),
    ]);
    assert_eq!(describe(&out), describe(&src));
}

/// Each site's trail checks the other's: newest entries removed from the primary's trail
/// (by someone with its storage credentials, seen from a host that never wrote them) are
/// still on the secondary, and `copy` and `copy --check` refuse and say so.
#[test]
fn a_primary_trail_cut_short_is_caught_by_the_secondary_copy() {
    let t0 = T::bare();
    let cfg = config(
        &t0,
        &t0.path("primary").display().to_string(),
        None,
        &t0.path("dr").display().to_string(),
        None,
        "",
    );
    let mut r = on_config(&cfg);
    r.set("CUSTOS_PASSWORD", PW);
    r.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    let src = t0.path("src");
    make_tree(&src, 3, 4, 50_000);
    r.ok(&["backup", "files", src.to_str().unwrap()]);
    r.ok(&["snapshots"]);
    r.ok(&["copy"]);
    let trail = t0.path("primary/audit");
    let mut entries: Vec<_> = walkdir(&trail);
    entries.sort();
    // The last two entries the secondary holds too (and the copy's own, which it lacks).
    for e in &entries[entries.len() - 2..] {
        std::fs::remove_file(e).unwrap();
    }
    let mut other = r.with_password(PW);
    other.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    other.set("CUSTOS_CACHE_DIR", t0.path("other-cache").to_str().unwrap());
    let e = other.fails(&["copy"], 14);
    assert!(
        e.contains("entries were removed from the primary's trail") && e.contains("secondary `dr`"),
        "{e}"
    );
    // The refused copy's own entry took one of the numbers cut: the bytes differ.
    let e = other.fails(&["copy", "--check"], 14);
    assert!(e.contains("differs") && e.contains("taken again"), "{e}");
}
