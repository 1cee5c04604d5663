//! Point-in-time recovery with real PostgreSQL 15 and 18 clusters under a running pgbench
//! load, WAL archived by `custos wal-push`, full and incremental base backups by
//! `custos backup postgres`. Each restore (to a time right after the full backup, between
//! the backups, after the incremental) must hold exactly the ledger rows committed up to
//! its target, by the commit timestamps PostgreSQL recorded; the restored clusters pass
//! pg_amcheck and pg_checksums. A delta restore over a changed, damaged data directory
//! ends equal to a clean restore. Targets outside what the repository can reach are
//! refused before anything is written.

mod common;
use common::*;

use std::path::PathBuf;

use custos_testkit::{pg15_bin, pg18_bin, PgCluster};

fn pitr(bin: PathBuf, extra_conf: &str) {
    let (t, cbin, cfg) = pg_repo();
    let (mut backup, restorer, out_dir) = pg_roles(&t, &cfg);

    let conf = format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push %p'\nwal_level = replica\n\
         track_commit_timestamp = on\nmax_connections = 40\n{extra_conf}",
        cbin.display(),
        cfg.display()
    );
    let pg = PgCluster::init(bin.clone(), &conf);
    pg.start();
    backup.set("PGHOST", pg.dir.to_str().unwrap());
    backup.set("PGPORT", &pg.port.to_string());
    // A setting that runs a command, as a backup key could plant in a snapshot: every
    // restore names it before the server is started.
    pg.psql("ALTER SYSTEM SET archive_cleanup_command = 'echo planted'");
    let mut load = start_ledger_load(&t, &pg, 3, 150, 28);
    let before_any = pg.psql("SELECT clock_timestamp()");
    sleep_ms(2500);

    let full = backup.json(&["backup", "postgres", "--type", "full"]);
    let full_id = full["snapshot"].as_str().unwrap().to_string();
    assert_eq!(full["pg"]["backup_type"], "full");
    sleep_ms(300);
    let t_after_full = pg.psql("SELECT clock_timestamp()");
    sleep_ms(2500);
    let t_between = pg.psql("SELECT clock_timestamp()");
    sleep_ms(2000);
    let incr = backup.json(&["backup", "postgres", "--type", "incremental"]);
    let incr_id = incr["snapshot"].as_str().unwrap().to_string();
    assert_eq!(incr["pg"]["backup_type"], "incremental");
    assert_eq!(incr["parent"].as_str(), Some(full_id.as_str()));
    let st = &incr["stats"];
    assert!(
        st["files_unchanged"].as_u64().unwrap() > 0,
        "incremental read every file: {st}"
    );
    assert!(
        st["bytes_read"].as_u64().unwrap() < st["bytes"].as_u64().unwrap(),
        "incremental read everything: {st}"
    );
    assert!(
        st["bytes_stored"].as_u64().unwrap() < full["stats"]["bytes_stored"].as_u64().unwrap(),
        "incremental stored as much as the full: {st} vs full {}",
        full["stats"]
    );
    // pgbench changed scattered pages of its tables: those went in as patches, most of
    // them as their changed 1 KiB units (the full left unit hashes in the cache).
    assert!(
        incr["units_patched"].as_u64().unwrap() > 0,
        "no unit-level incremental: {incr}"
    );
    sleep_ms(2000);
    let t_after_incr = pg.psql("SELECT clock_timestamp()");
    sleep_ms(1500);
    // A second incremental on the first: patches carried over, superseded, added.
    let incr2 = backup.json(&["backup", "postgres", "--type", "incremental"]);
    let incr2_id = incr2["snapshot"].as_str().unwrap().to_string();
    assert_eq!(incr2["parent"].as_str(), Some(incr_id.as_str()));
    assert!(incr2["units_patched"].as_u64().unwrap() > 0, "{incr2}");
    if extra_conf.contains("summarize_wal") {
        for i in [&incr, &incr2] {
            assert_eq!(i["wal_summaries"], true, "WAL summaries not used: {i}");
            assert!(i["blocks_skipped"].as_u64().unwrap() > 0, "{i}");
        }
    }
    sleep_ms(1500);
    let t_after_incr2 = pg.psql("SELECT clock_timestamp()");

    let status = load.wait().unwrap();
    assert!(status.success(), "pgbench failed");
    // WAL past every target reaches the archive.
    pg.psql("INSERT INTO ledger (note) VALUES ('last')");
    pg.switch_and_archive();
    assert_eq!(
        pg.psql("SELECT failed_count FROM pg_stat_archiver"),
        "0",
        "{}",
        pg.log()
    );

    // The listing shows database backups with their LSN range.
    let snaps = t.json(&["snapshots"]);
    let pgs: Vec<_> = snaps
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["summary"]["kind"] == "postgres")
        .collect();
    assert_eq!(pgs.len(), 3);
    assert!(pgs[0]["summary"]["pg"]["start_lsn"]
        .as_str()
        .unwrap()
        .contains('/'));

    let cases = [
        ("after-full", t_after_full.clone(), full_id.clone()),
        ("between", t_between.clone(), full_id.clone()),
        ("after-incremental", t_after_incr.clone(), incr_id.clone()),
        (
            "after-second-incremental",
            t_after_incr2.clone(),
            incr2_id.clone(),
        ),
    ];
    let mut ledgers = vec![];
    for (name, target, expect_snapshot) in &cases {
        let got = restore_ledger_at(&restorer, &pg, &out_dir, name, target, expect_snapshot);
        ledgers.push(got);
    }
    assert!(ledgers.windows(2).all(|w| w[0].len() < w[1].len()));

    // Delta: the first restore has since been promoted and written to; damage a table
    // file and add a stray one, then correct it in place to the last target.
    let dir = out_dir.join("after-full");
    let rel = pg.psql("SELECT pg_relation_filepath('pgbench_accounts')");
    let f = dir.join(&rel);
    let mut bytes = std::fs::read(&f).unwrap();
    for b in &mut bytes[8192 * 3 + 100..8192 * 3 + 200] {
        *b = 0xAA;
    }
    std::fs::write(&f, bytes).unwrap();
    std::fs::write(dir.join("base/stray_file"), b"not in the backup").unwrap();
    let (r, port) = restore_pg(
        &restorer,
        &dir,
        &["--target-time", &t_after_incr, "--delta"],
    );
    let risky = r["risky_settings"].as_array().unwrap();
    assert_eq!(risky.len(), 1, "{r}");
    assert_eq!(risky[0]["name"], "archive_cleanup_command");
    assert_eq!(risky[0]["value"], "echo planted");
    assert_eq!(risky[0]["file"], "postgresql.auto.conf");
    assert_eq!(r["written_by"]["role"], "backup", "{r}");
    let x = &r["restore"];
    // Blocks already right are not rewritten (pgbench changed most of its own table's
    // blocks between the two targets; the rest of the cluster is as it was).
    let (written, kept) = (
        x["bytes"].as_u64().unwrap(),
        x["bytes_unchanged"].as_u64().unwrap(),
    );
    assert!(
        kept * 5 > written + kept,
        "delta rewrote nearly everything: {x}"
    );
    assert!(x["removed"].as_u64().unwrap() >= 1, "{x}");
    assert!(!dir.join("base/stray_file").exists());
    assert_eq!(
        start_and_read(&bin, &dir, port, &pg.dir),
        ledgers[2],
        "delta restore differs from a clean restore"
    );

    // A restore that stops part-way (the full backup's biggest pack gone) into a folder
    // that was there: what it did not finish is removed and `global/pg_control` is laid
    // down last, so PostgreSQL cannot start the half-restored folder; with the pack
    // back, --delta finishes it.
    let dir = out_dir.join("part-way");
    std::fs::create_dir_all(&dir).unwrap();
    custos_testkit::give_to_postgres(&dir);
    let biggest = t
        .packs()
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let aside = t.path("aside");
    std::fs::rename(&biggest, &aside).unwrap();
    let err = restorer.fails(
        &[
            "restore",
            "postgres",
            "--to",
            dir.to_str().unwrap(),
            "--target-time",
            &t_after_full,
        ],
        14,
    );
    assert!(
        err.contains("stopped part-way") && err.contains("--delta"),
        "{err}"
    );
    assert!(!dir.join("global/pg_control").exists());
    let half = custos_testkit::PgCluster::existing(
        bin.clone(),
        dir.clone(),
        custos_testkit::free_port(),
        pg.dir.clone(),
    );
    let (started, log) = half.try_start(&dir.with_extension("log"));
    assert!(!started, "a half-restored data directory started:\n{log}");
    std::fs::rename(&aside, &biggest).unwrap();
    restore_pg(
        &restorer,
        &dir,
        &["--target-time", &t_after_full, "--delta"],
    );
    assert!(!dir.join("global/pg_control.custos-restore").exists());
    assert!(dir.join("global/pg_control").exists());
    // A delta restore over that whole data directory that stops part-way (a file it must
    // rewrite that the restoring user cannot open): the old pg_control goes first.
    let locked = dir.join(&rel);
    std::os::unix::fs::chown(&locked, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&locked, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    let out = restorer.run(&[
        "restore",
        "postgres",
        "--to",
        dir.to_str().unwrap(),
        "--target-time",
        &t_after_full,
        "--delta",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("stopped part-way"),
        "{err}"
    );
    assert!(!dir.join("global/pg_control").exists(), "{err}");
    // Removed with the other files it had not finished, or still there: given back.
    if locked.exists() {
        std::os::unix::fs::chown(&locked, Some(custos_testkit::postgres_uid()), None).unwrap();
    }
    let (_, port) = restore_pg(
        &restorer,
        &dir,
        &["--target-time", &t_after_full, "--delta"],
    );
    assert_eq!(start_and_read(&bin, &dir, port, &pg.dir), ledgers[0]);

    // Refused before anything is written: a target before the first backup ends, a
    // target past the archived WAL, a non-empty folder without --delta.
    for (target, what) in [
        (before_any.as_str(), "before the oldest backup"),
        ("2999-01-01 00:00:00+00", "past the end of the archived WAL"),
    ] {
        let dir = out_dir.join("refused");
        let err = restorer.fails(
            &[
                "restore",
                "postgres",
                "--to",
                dir.to_str().unwrap(),
                "--target-time",
                target,
            ],
            2,
        );
        assert!(err.contains(what), "{err}");
        assert!(!dir.exists(), "a refused restore wrote {}", dir.display());
    }
    let err = restorer.fails(
        &[
            "restore",
            "postgres",
            "--to",
            out_dir.join("between").to_str().unwrap(),
        ],
        2,
    );
    assert!(err.contains("--delta"), "{err}");
}

#[test]
fn pitr_postgres_15() {
    pitr(pg15_bin(), "");
}

#[test]
fn pitr_postgres_18() {
    // Incrementals read only the blocks the server's WAL summaries name.
    pitr(pg18_bin(), "summarize_wal = on\n");
}
