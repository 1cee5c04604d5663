//! WAL archiving with a real PostgreSQL 15 cluster: `archive_command = custos wal-push %p`.
//! Archived segments come back byte for byte; a re-push is idempotent; a different file
//! under an archived name and a segment of another cluster are refused; a missing file is
//! a quick, quiet non-zero exit; a backup-role key archives but cannot fetch.

mod common;
use common::*;

use std::time::{Duration, Instant};

use custos_testkit::{give_to_postgres, pg15_bin, PgCluster};

#[test]
fn archive_command_round_trip_and_refusals() {
    let (t, bin, cfg) = pg_repo();
    let copies = t.path("copies");
    std::fs::create_dir_all(&copies).unwrap();
    give_to_postgres(&copies);
    // The archiver runs custos with the backup-role key (config file); a plain copy beside
    // it gives the test the original bytes to compare with.
    let conf = format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push %p && cp %p {}/%f'\nwal_level = replica\n",
        bin.display(),
        cfg.display(),
        copies.display()
    );
    let pg = PgCluster::init(pg15_bin(), &conf);
    pg.start();
    pg.psql("CREATE TABLE ledger (id serial primary key, note text); INSERT INTO ledger (note) SELECT md5(g::text) FROM generate_series(1, 20000) g;");
    for _ in 0..3 {
        pg.psql("INSERT INTO ledger (note) SELECT 'x' FROM generate_series(1, 1000); SELECT pg_switch_wal();");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: u32 = pg
            .psql("SELECT archived_count FROM pg_stat_archiver")
            .parse()
            .unwrap();
        if n >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "archiver did not archive 3 segments:\n{}",
            pg.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        pg.psql("SELECT failed_count FROM pg_stat_archiver"),
        "0",
        "{}",
        pg.log()
    );
    let data = pg.data.to_str().unwrap();

    // Every archived file comes back identical (restore key).
    let mut r = t.with_password(PW);
    let mut names: Vec<String> = std::fs::read_dir(&copies)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(names.len() >= 3, "{names:?}");
    for n in &names {
        let out = r.path(&format!("fetched-{n}"));
        r.ok(&["wal-fetch", n, out.to_str().unwrap(), "--pgdata", data]);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(copies.join(n)).unwrap(),
            "{n} differs"
        );
    }

    // Idempotent: the same segment pushed again succeeds without writing.
    let seg = names.iter().find(|n| n.len() == 24).unwrap().clone();
    let before = r.repo_state();
    r.ok(&[
        "wal-push",
        copies.join(&seg).to_str().unwrap(),
        "--pgdata",
        data,
    ]);
    assert_eq!(r.repo_state(), before);

    // A different file under an archived name is refused, and the archive keeps the original.
    let mut altered = std::fs::read(copies.join(&seg)).unwrap();
    altered[100_000] ^= 0xff;
    let dir = r.path("altered");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(&seg), &altered).unwrap();
    let err = r.fails(
        &[
            "wal-push",
            dir.join(&seg).to_str().unwrap(),
            "--pgdata",
            data,
        ],
        18,
    );
    assert!(err.contains("different content"), "{err}");
    assert_eq!(r.repo_state(), before);

    // A segment of another cluster is refused.
    let other = PgCluster::init(pg15_bin(), "");
    let err = r.fails(
        &[
            "wal-push",
            copies.join(&seg).to_str().unwrap(),
            "--pgdata",
            other.data.to_str().unwrap(),
        ],
        18,
    );
    assert!(err.contains("belongs to another cluster"), "{err}");

    // A file never archived: non-zero, quick and quiet (PostgreSQL asks for these).
    let start = Instant::now();
    let o = r.run(&[
        "wal-fetch",
        "00000001000000FF000000FF",
        r.path("nope").to_str().unwrap(),
        "--pgdata",
        data,
    ]);
    assert_eq!(o.status.code(), Some(16));
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!r.path("nope").exists());
    assert!(start.elapsed() < Duration::from_secs(10));

    // verify covers the archive: every file decrypted and checked; a flipped byte in one
    // archived object is found and named.
    let v = r.json(&["verify", "--read-data"]);
    assert_eq!(
        v["wal_files"].as_u64().unwrap() as usize,
        names.len(),
        "{v}"
    );
    let obj = wal_object(&r, &seg);
    let mut bytes = std::fs::read(&obj).unwrap();
    let n = bytes.len();
    bytes[n - 1000] ^= 1;
    std::fs::write(&obj, &bytes).unwrap();
    let err = r.fails(&["verify", "--read-data"], 14);
    assert!(err.contains(&seg), "{err}");

    // `verify` reads only each object's head (not years of archive): a truncated body is
    // still found from the listed size. An object of gigabytes at an archived name (any
    // key can write `wal/`) is named, and no command reads it whole.
    let (_, at, len) = wal_label(&bytes);
    let wrapped = u32::from_le_bytes(bytes[at + len..at + len + 4].try_into().unwrap()) as usize;
    std::fs::write(&obj, &bytes[..at + len + 4 + wrapped + 20]).unwrap();
    let err = r.fails(&["verify"], 14);
    assert!(err.contains(&seg) && err.contains("truncated"), "{err}");
    std::fs::File::options()
        .write(true)
        .open(&obj)
        .unwrap()
        .set_len(3 << 30)
        .unwrap();
    let err = r.fails(&["verify"], 14);
    assert!(
        err.contains(&seg) && err.contains("3221225472 bytes, more than a WAL file"),
        "{err}"
    );
    let err = r.fails(
        &[
            "wal-fetch",
            &seg,
            r.path("huge").to_str().unwrap(),
            "--pgdata",
            data,
        ],
        14,
    );
    assert!(err.contains("larger than any custos writes"), "{err}");
    assert!(!r.path("huge").exists());
    std::fs::write(&obj, &bytes).unwrap();

    // The backup role (the archiver's key) cannot read the archive back.
    let b = t.with_password("backup role password");
    let err = b.fails(
        &[
            "wal-fetch",
            &seg,
            b.path("x").to_str().unwrap(),
            "--pgdata",
            data,
        ],
        13,
    );
    assert!(err.contains("backup role"), "{err}");

    // After `key rotate --rewrap`, a restore key made afterwards (it holds only the newest
    // secret) reads the archive written under the first key pair.
    r.ok(&["key", "rotate", "--rewrap"]);
    r.add_key("restore", "made after the rewrap", &[]);
    let fresh = r.with_password("made after the rewrap");
    let other = names.iter().find(|n| n.len() == 24 && **n != seg).unwrap();
    let out = fresh.path("after-rewrap");
    fresh.ok(&["wal-fetch", other, out.to_str().unwrap(), "--pgdata", data]);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(copies.join(other)).unwrap()
    );
}

/// Where a local repository stores archived file `name` (of its one cluster).
fn wal_object(t: &T, name: &str) -> std::path::PathBuf {
    std::fs::read_dir(std::path::Path::new(&t.repo).join("wal"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join(name)
}

fn wait_archived(pg: &PgCluster, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg
        .psql("SELECT archived_count FROM pg_stat_archiver")
        .parse::<u32>()
        .unwrap()
        < n
    {
        assert!(
            Instant::now() < deadline,
            "archiver did not archive {n} segments:\n{}",
            pg.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn pg_check_reports_health_gaps_and_lag() {
    let (t, bin, cfg) = pg_repo();
    let conf = format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push %p'\n",
        bin.display(),
        cfg.display()
    );
    let pg = PgCluster::init(pg15_bin(), &conf);
    pg.start();
    pg.psql("CREATE TABLE t (x int)");
    for i in 0..5 {
        pg.psql(&format!(
            "INSERT INTO t SELECT {i}; SELECT pg_switch_wal();"
        ));
    }
    wait_archived(&pg, 5);
    let mut r = t.with_password(PW);
    r.set("PGHOST", pg.dir.to_str().unwrap());
    r.set("PGPORT", &pg.port.to_string());
    r.set("PGUSER", "postgres");
    let ok = r.json(&["pg", "check"]);
    assert_eq!(ok["ok"], true, "{ok}");
    assert!(ok["archived_in_repository"].as_u64().unwrap() >= 5, "{ok}");
    assert_eq!(ok["pending_segments"], 0);
    assert!(r.ok(&["pg", "check"]).contains("healthy"));

    // A segment removed from the repository behind custos's back is a named gap.
    let sys = format!(
        "{:016x}",
        ok["archiver"]["system_id"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    );
    let mut segs: Vec<String> =
        std::fs::read_dir(std::path::Path::new(&r.repo).join("wal").join(&sys))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.len() == 24)
            .collect();
    segs.sort();
    let victim = segs[segs.len() / 2].clone();
    std::fs::remove_file(
        std::path::Path::new(&r.repo)
            .join("wal")
            .join(&sys)
            .join(&victim),
    )
    .unwrap();
    let o = r.run(&["pg", "check", "--json"]);
    assert_eq!(o.status.code(), Some(20));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["gaps"][0], victim.as_str(), "{v}");

    // A failing archiver: segments wait, the lag passes the limit, the check says why.
    pg.psql("ALTER SYSTEM SET archive_command = 'false'");
    pg.psql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..2 {
        pg.psql(&format!(
            "INSERT INTO t SELECT {i}; SELECT pg_switch_wal();"
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while pg.psql("SELECT failed_count FROM pg_stat_archiver") == "0" {
        assert!(
            Instant::now() < deadline,
            "archiver did not fail:\n{}",
            pg.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let o = r.run(&["pg", "check", "--max-lag", "1s", "--json"]);
    assert_eq!(o.status.code(), Some(20));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let problems = v["problems"].to_string();
    assert!(v["pending_segments"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        problems.contains("lags")
            && problems.contains("failing")
            && problems.contains("does not call"),
        "{problems}"
    );
    // The default limit (15 minutes) is not yet passed: only the failures are reported.
    let o = r.run(&["pg", "check", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!v["problems"].to_string().contains("lags"), "{v}");
}

#[test]
fn pg_check_on_unreachable_database_is_one_clear_error() {
    let (t, _, _) = pg_repo();
    let mut r = t.with_password(PW);
    r.set("PGHOST", r.path("no-such-socket-dir").to_str().unwrap());
    r.set("PGPORT", "5999");
    let err = r.fails(&["pg", "check"], 17);
    assert!(
        err.contains("cannot connect to PostgreSQL") && err.contains("PGHOST"),
        "{err}"
    );
}

/// `wal-push --async`: a background pusher reads ahead what PostgreSQL has ready and
/// uploads in parallel; the archiver is answered only once the repository holds the file,
/// so every segment PostgreSQL counts as archived is already in the repository, byte for
/// byte. While the repository cannot be written, nothing is acknowledged (the archiver
/// retries and `pg check` reports the pusher failing); once it can, archiving resumes.
#[test]
fn async_archiving_acknowledges_only_what_is_stored() {
    let (t, bin, cfg) = pg_repo();
    let copies = t.path("copies");
    std::fs::create_dir_all(&copies).unwrap();
    give_to_postgres(&copies);
    let conf = format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push --async --async-timeout 3s %p && cp %p {}/%f'\nwal_level = replica\n",
        bin.display(),
        cfg.display(),
        copies.display()
    );
    let pg = PgCluster::init(pg15_bin(), &conf);
    pg.start();
    let repo_names = || -> std::collections::BTreeSet<String> {
        let wal = std::path::Path::new(&t.repo).join("wal");
        std::fs::read_dir(&wal)
            .map(|d| {
                d.flat_map(|e| std::fs::read_dir(e.unwrap().path()).unwrap())
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default()
    };
    let acked = || -> std::collections::BTreeSet<String> {
        std::fs::read_dir(&copies)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    pg.psql("CREATE TABLE t (id int, v text)");
    for _ in 0..6 {
        pg.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
        pg.switch_and_archive();
        // Acknowledged means stored: no waiting for a background upload.
        assert!(
            acked().is_subset(&repo_names()),
            "{:?} not all in {:?}",
            acked(),
            repo_names()
        );
    }
    assert_eq!(
        pg.psql("SELECT failed_count FROM pg_stat_archiver"),
        "0",
        "{}",
        pg.log()
    );
    let r = t.with_password(PW);
    let data = pg.data.to_str().unwrap();
    for n in &acked() {
        let out = r.path(&format!("fetched-{n}"));
        r.ok(&["wal-fetch", n, out.to_str().unwrap(), "--pgdata", data]);
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(copies.join(n)).unwrap(),
            "{n}"
        );
    }

    // The repository cannot be written: nothing more is acknowledged.
    let wal_dir = std::path::Path::new(&t.repo).join("wal");
    let sys_dir = std::fs::read_dir(&wal_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sys_dir, std::fs::Permissions::from_mode(0o500)).unwrap();
    let before = acked();
    pg.psql("INSERT INTO t SELECT g, 'blocked' FROM generate_series(1, 1000) g");
    let seg = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    pg.psql("SELECT pg_switch_wal()");
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg.psql("SELECT failed_count FROM pg_stat_archiver") == "0" {
        assert!(
            Instant::now() < deadline,
            "the archiver never saw a failure:\n{}",
            pg.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        acked(),
        before,
        "a segment was acknowledged while the repository refused it"
    );
    assert!(!repo_names().contains(&seg));
    let mut check = t.with_password(PW);
    check.set("PGHOST", pg.dir.to_str().unwrap());
    check.set("PGPORT", &pg.port.to_string());
    let out = check.run(&["pg", "check"]);
    assert_eq!(
        out.status.code(),
        Some(20),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pusher is failing"));

    // Writable again: the archiver's retry goes through.
    std::fs::set_permissions(&sys_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !acked().contains(&seg) {
        assert!(
            Instant::now() < deadline,
            "archiving did not resume:\n{}",
            pg.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(repo_names().contains(&seg));
}

#[test]
fn a_gap_in_the_wal_archive_is_invisible_until_postgresql_fails() {
    // One archived segment deleted: `snapshots` showed the window whole, a restore to a
    // time after the gap "succeeded" (PostgreSQL then stopped short of the target), and
    // `verify` found no problem.
    let (t, bin, cfg) = pg_repo();
    let (mut backup, restorer, out_dir) = pg_roles(&t, &cfg);
    let conf = format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push %p'\n",
        bin.display(),
        cfg.display()
    );
    let pg = PgCluster::init(pg15_bin(), &conf);
    pg.start();
    backup.set("PGHOST", pg.dir.to_str().unwrap());
    backup.set("PGPORT", &pg.port.to_string());
    pg.psql("CREATE TABLE notes (id int, body text)");
    let full = backup.json(&["backup", "postgres", "--type", "full"]);
    let stop_segment = full["pg"]["stop_lsn"].as_str().unwrap().to_string();
    for i in 0..4 {
        pg.psql(&format!(
            "INSERT INTO notes SELECT g, 'note {i}' FROM generate_series(1, 100) g"
        ));
        pg.switch_and_archive();
    }
    let after_all = pg.psql("SELECT clock_timestamp()");
    pg.switch_and_archive();

    let sys = format!(
        "{:016x}",
        full["pg"]["system_id"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
    );
    let wal = std::path::Path::new(&t.repo).join("wal").join(&sys);
    let mut segs: Vec<String> = std::fs::read_dir(&wal)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.len() == 24)
        .collect();
    segs.sort();
    // The second segment after the one the backup stopped in.
    let stop_name = {
        let (hi, lo) = stop_segment.split_once('/').unwrap();
        let lsn =
            (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
        format!(
            "00000001{:08X}{:08X}",
            (lsn - 1) >> 32,
            ((lsn - 1) >> 24) & 0xff
        )
    };
    let at = segs.iter().position(|s| *s == stop_name).unwrap();
    let victim = segs[at + 2].clone();
    let before_gap = segs[at + 1].clone();
    std::fs::remove_file(wal.join(&victim)).unwrap();

    // The listing shows where the window ends and why.
    let snaps = t.with_password(PW).json(&["snapshots"]);
    let w = &snaps[0]["restorable"];
    assert_eq!(w["gap"], victim.as_str(), "{w}");
    assert_eq!(w["archive_end_segment"], before_gap.as_str(), "{w}");
    let listed = t.with_password(PW).ok(&["snapshots"]);
    assert!(
        listed.contains("WAL GAP") && listed.contains(&victim),
        "{listed}"
    );

    // A target past the gap is refused before anything is written.
    let dir = out_dir.join("past-the-gap");
    let err = restorer.fails(
        &[
            "restore",
            "postgres",
            "--to",
            dir.to_str().unwrap(),
            "--target-time",
            &after_all,
        ],
        14,
    );
    assert!(err.contains(&victim) && err.contains("gap"), "{err}");
    assert!(!dir.exists(), "a refused restore wrote {}", dir.display());
    // Restoring to the latest point warns that recovery stops at the gap.
    let dir = out_dir.join("latest");
    let out = restorer.run(&[
        "restore",
        "postgres",
        "--to",
        dir.to_str().unwrap(),
        "--no-archiving",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("gap") && err.contains(&victim), "{err}");
    // On the original's host, port and socket folder: said before anyone starts it.
    assert!(
        err.contains(&format!("already listens on port {}", pg.port)),
        "{err}"
    );

    // The README's restore as root: restore_command would name a password file that
    // PostgreSQL (running as postgres) cannot read. Refused before anything is written.
    let mut as_root = t.with_password("unused");
    as_root.unset("CUSTOS_PASSWORD");
    // A binary postgres can run (the checkout may be closed to it: that is refused too).
    as_root.bin = Some(bin.clone());
    let private = t.path("root-only");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(
        &private,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    std::fs::write(private.join("restore.pw"), PW).unwrap();
    as_root.set(
        "CUSTOS_PASSWORD_FILE",
        private.join("restore.pw").to_str().unwrap(),
    );
    let dir = out_dir.join("as-root");
    let err = as_root.fails(&["restore", "postgres", "--to", dir.to_str().unwrap()], 2);
    assert!(
        err.contains("as postgres") && err.contains("root-only"),
        "{err}"
    );
    assert!(!dir.exists(), "a refused restore wrote {}", dir.display());
    // So is a custos binary postgres cannot run (a checkout under /root, say).
    std::fs::copy(&bin, private.join("custos")).unwrap();
    as_root.bin = Some(private.join("custos"));
    as_root.set(
        "CUSTOS_PASSWORD_FILE",
        t.path("restore.pw").to_str().unwrap(),
    );
    let err = as_root.fails(&["restore", "postgres", "--to", dir.to_str().unwrap()], 2);
    assert!(
        err.contains("root-only/custos") && err.contains("not open to it"),
        "{err}"
    );
    assert!(!dir.exists(), "a refused restore wrote {}", dir.display());

    // verify checks continuity offline and names the hole.
    let err = t.with_password(PW).fails(&["verify"], 14);
    assert!(err.contains(&victim), "{err}");
    // info shows the cluster's window and the gap; pg check names a stale newest backup.
    let info = t.with_password(PW).json(&["info"]);
    assert_eq!(info["clusters"][0]["gaps"][0], victim.as_str(), "{info}");
    let mut check = t.with_password(PW);
    check.set("PGHOST", pg.dir.to_str().unwrap());
    check.set("PGPORT", &pg.port.to_string());
    std::thread::sleep(Duration::from_millis(1500));
    let out = check.run(&["pg", "check", "--max-backup-age", "1s", "--json"]);
    assert_eq!(out.status.code(), Some(20));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["problems"]
            .to_string()
            .contains("newest base backup ended"),
        "{v}"
    );
    let out = check.run(&["pg", "check", "--max-backup-age", "1d", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !v["problems"].to_string().contains("newest base backup"),
        "{v}"
    );
}

#[test]
fn async_archiving_hides_its_error() {
    // The background pusher could not open the repository: PostgreSQL's log said only
    // "not stored within 60 s", pointing at a .last-error nobody wrote, and `pg check`
    // stopped at the repository instead of reporting the archiver.
    let (t, bin, cfg) = pg_repo();
    let wrong = t.path("wrong.pw");
    std::fs::write(&wrong, "not the backup key's password").unwrap();
    give_to_postgres(&wrong);
    let bad = t.path("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&cfg).unwrap().replace(
            t.path("backup.pw").to_str().unwrap(),
            wrong.to_str().unwrap(),
        ),
    )
    .unwrap();
    give_to_postgres(&bad);
    let conf = format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push --async --async-timeout 600s %p'\n",
        bin.display(),
        bad.display()
    );
    let pg = PgCluster::init(pg15_bin(), &conf);
    pg.start();
    pg.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
    pg.psql("SELECT pg_switch_wal()");
    // With a 600 s timeout, a failure seen at all is the pusher's error coming back.
    let deadline = Instant::now() + Duration::from_secs(120);
    while pg.psql("SELECT failed_count FROM pg_stat_archiver") == "0" {
        assert!(
            Instant::now() < deadline,
            "no failure reported:\n{}",
            pg.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = pg.log();
    assert!(
        log.contains("could not start") && log.contains("password does not open"),
        "{log}"
    );
    let spool = std::fs::read_dir(t.path("cache/wal-spool"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let last = std::fs::read_to_string(spool.join(".last-error")).unwrap();
    assert!(last.contains("password does not open"), "{last}");

    let mut check = t.with_password(PW);
    check.set("PGHOST", pg.dir.to_str().unwrap());
    check.set("PGPORT", &pg.port.to_string());
    check.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    let out = check.run(&["pg", "check", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(20),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["spool_last_error"].as_str().unwrap().contains("password"),
        "{v}"
    );
    assert!(
        v["problems"].to_string().contains("pusher is failing"),
        "{v}"
    );

    // A repository that will not open is a problem of the check, not the end of it.
    check.set("CUSTOS_PASSWORD", "wrong too");
    let out = check.run(&["pg", "check", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(20),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["problems"].to_string().contains("cannot be opened"),
        "{v}"
    );
    assert!(v["archiver"]["failed_count"].as_u64().unwrap() >= 1, "{v}");
}

/// The label of a WAL object parsed as wal-push wrote it: (label JSON, where it starts,
/// its length).
fn wal_label(bytes: &[u8]) -> (serde_json::Value, usize, usize) {
    let len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[12..12 + len]).unwrap(),
        12,
        len,
    )
}

/// Every WAL object's label records the last trail entry the pushing host wrote (its
/// anchor, read from its cache, not looked up per segment). A trail cut back behind it is
/// caught by `verify` and `audit verify` on a host that remembers nothing, even where no
/// snapshot saw the entries that went; a label whose anchor was removed does not decrypt.
#[test]
fn wal_objects_anchor_the_trail_and_a_cut_behind_them_is_caught() {
    let t = T::new();
    let src = t.path("src");
    make_tree(&src, 1, 5, 10_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    // What this host remembers: the entry of the backup it just made.
    let remembered = std::fs::read_dir(t.path("cache"))
        .unwrap()
        .map(|e| e.unwrap().path().join("trail-last"))
        .find(|p| p.exists())
        .expect("the host's trail-last");
    let text = std::fs::read_to_string(&remembered).unwrap();
    let (seq, hash) = text.trim().split_once(' ').unwrap();
    let seq: u64 = seq.parse().unwrap();

    // A real segment of a cluster made for it (initdb's first), archived.
    let pg = PgCluster::init(pg15_bin(), "");
    let seg = std::fs::read_dir(pg.data.join("pg_wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.len() == 24)
        .unwrap();
    let data = pg.data.to_str().unwrap();
    t.ok(&[
        "wal-push",
        pg.data.join("pg_wal").join(&seg).to_str().unwrap(),
        "--pgdata",
        data,
    ]);
    let obj = wal_object(&t, &seg);
    let stored = std::fs::read(&obj).unwrap();
    let (label, at, len) = wal_label(&stored);
    assert_eq!(label["trail"]["seq"].as_u64(), Some(seq), "{label}");
    assert_eq!(label["trail"]["hash"].as_str(), Some(hash), "{label}");
    t.ok(&["verify", "--read-data"]);
    t.ok(&["audit", "verify"]);

    // Storage removes the anchor from the label: the object no longer opens.
    let mut stripped = label.clone();
    stripped.as_object_mut().unwrap().remove("trail");
    let new_label = serde_json::to_vec(&stripped).unwrap();
    let mut forged = stored[..8].to_vec();
    forged.extend_from_slice(&(new_label.len() as u32).to_le_bytes());
    forged.extend_from_slice(&new_label);
    forged.extend_from_slice(&stored[at + len..]);
    std::fs::write(&obj, &forged).unwrap();
    let e = t.fails(&["verify", "--read-data"], 14);
    assert!(e.contains(&seg), "{e}");
    std::fs::write(&obj, &stored).unwrap();

    // The trail is cut back to before that entry. The snapshot saw the head before its
    // own entry, which is still there: only the WAL object's anchor shows the cut.
    for s in seq.. {
        let p = std::path::Path::new(&t.repo).join(format!("audit/{s:016x}"));
        if std::fs::remove_file(&p).is_err() {
            break;
        }
    }
    let mut other = t.with_password(PW);
    other.set("CUSTOS_CACHE_DIR", t.path("other-cache").to_str().unwrap());
    let e = other.fails(&["audit", "verify"], 14);
    assert!(
        e.contains(&seg) && e.contains("entries were removed"),
        "{e}"
    );
    let v = other.run(&["verify", "--json"]);
    assert_eq!(v.status.code(), Some(14));
    let j: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert!(
        j["errors"].as_array().unwrap().iter().any(|x| {
            let x = x.as_str().unwrap();
            // (`audit verify` may have appended an entry under the number that was cut.)
            x.starts_with("trail:")
                && x.contains(&seg)
                && (x.contains("entries were removed") || x.contains("rewritten"))
        }),
        "{j}"
    );
}
