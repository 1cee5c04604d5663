//! Base backups over the replication protocol (`backup postgres --replication`), as for a
//! cluster on another host: custos reaches PostgreSQL 15 and 18 over TCP as a role with
//! REPLICATION and a SCRAM password, under a running pgbench load with WAL archived by
//! custos. A full and an incremental restore to points in time with exactly the ledger rows
//! committed by then (pg_amcheck, pg_checksums clean); the incremental stores only what
//! changed. A wrong password and a cluster with tablespaces are clear errors that save
//! nothing, and the password appears in nothing custos prints or writes.

mod common;
use common::*;

use std::path::PathBuf;

use custos_testkit::{give_to_postgres, pg15_bin, pg18_bin, PgCluster};

const SECRET: &str = "s3cret-Replication-pw";

/// With `summaries` (PostgreSQL 17+, `summarize_wal = on`) the incrementals are the
/// server's own: it sends only the blocks changed since the parent, which custos lays over
/// the parent's blocks.
fn replication(bin: PathBuf, pg_bin_flag: bool, summaries: bool) {
    let (t, cbin, cfg) = pg_repo();
    let (mut backup, restorer, out_dir) = pg_roles(&t, &cfg);

    let conf =
        format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push %p'\nwal_level = replica\n\
         track_commit_timestamp = on\nlisten_addresses = '127.0.0.1'\n\
         password_encryption = 'scram-sha-256'\n{}",
        cbin.display(),
        cfg.display(),
        if summaries { "summarize_wal = on\n" } else { "" }
    );
    let pg = PgCluster::init(bin.clone(), &conf);
    // The backup role comes over TCP with a password; only local sockets are trusted.
    std::fs::write(
        pg.data.join("pg_hba.conf"),
        "local all all trust\n\
         host all custos_backup 127.0.0.1/32 scram-sha-256\n\
         host replication custos_backup 127.0.0.1/32 scram-sha-256\n",
    )
    .unwrap();
    pg.start();
    pg.psql(&format!(
        "CREATE ROLE custos_backup LOGIN REPLICATION PASSWORD '{SECRET}'; \
         GRANT pg_read_all_settings TO custos_backup; \
         GRANT EXECUTE ON FUNCTION pg_control_system() TO custos_backup; \
         GRANT EXECUTE ON FUNCTION pg_control_checkpoint() TO custos_backup; \
         GRANT EXECUTE ON FUNCTION pg_read_binary_file(text, bigint, bigint) TO custos_backup"
    ));
    backup.set("PGHOST", "127.0.0.1");
    backup.set("PGPORT", &pg.port.to_string());
    backup.set("PGUSER", "custos_backup");
    backup.set("PGDATABASE", "postgres");
    let mut args = vec!["backup", "postgres", "--replication"];
    let pg_bin = bin.display().to_string();
    if pg_bin_flag {
        args.extend(["--pg-bin", pg_bin.as_str()]);
    }

    // A wrong password: one clear error, nothing saved, and the password not echoed.
    backup.set("PGPASSWORD", "not-the-password");
    let err = backup.fails(&args, 17);
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");
    assert!(t.json(&["snapshots"]).as_array().unwrap().is_empty());
    backup.set("PGPASSWORD", SECRET);

    // Tables changed only between the backups, so that a restore of the incremental must
    // hold exactly what they hold now: scattered updates and growth in one, a tail cut
    // off inside a 128 KiB block in the other (later).
    pg.psql(
        "CREATE TABLE churn (id int PRIMARY KEY, v text); \
         INSERT INTO churn SELECT g, md5(g::text) FROM generate_series(1, 20000) g; \
         CREATE TABLE cut (id int, pad text) WITH (autovacuum_enabled = off); \
         INSERT INTO cut SELECT g, repeat('c', 1000) FROM generate_series(1, 7 * 32) g; \
         CREATE TABLE wide (id int, pad text) WITH (autovacuum_enabled = off); \
         INSERT INTO wide SELECT g, repeat('w', 1000) FROM generate_series(1, 7 * 2048) g",
    );
    for sql in [
        "VACUUM (FREEZE) churn",
        "VACUUM (FREEZE) cut",
        "VACUUM (FREEZE) wide",
        "CHECKPOINT",
    ] {
        pg.psql(sql);
    }
    let digest = |c: &PgCluster| {
        c.psql(
            "SELECT (SELECT md5(string_agg(id || v, ',' ORDER BY id)) FROM churn) || ' ' || \
             (SELECT md5(string_agg(id || pad, ',' ORDER BY id)) FROM cut) || ' ' || \
             (SELECT md5(string_agg(id || pad, ',' ORDER BY id)) FROM wide)",
        )
    };
    let mut load = start_ledger_load(&t, &pg, 2, 120, 14);
    sleep_ms(1500);

    let mut printed = String::new();
    let mut run = |extra: &[&str]| {
        let mut a = args.clone();
        a.extend(extra);
        a.push("--json");
        let out = backup.run(&a);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        printed.push_str(&text);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let full = run(&["--type", "full"]);
    assert_eq!(full["via"], "replication", "{full}");
    assert_eq!(full["pg"]["backup_type"], "full");
    let full_id = full["snapshot"].as_str().unwrap().to_string();
    sleep_ms(2000);
    let t_between = pg.psql("SELECT clock_timestamp()");
    pg.psql(
        "UPDATE churn SET v = v || 'x' WHERE id % 97 = 0; \
         INSERT INTO churn SELECT g, 'new' FROM generate_series(20001, 30000) g; \
         UPDATE wide SET pad = repeat('W', 1000) WHERE id = 3 * 7",
    );
    sleep_ms(2000);
    let incr = run(&["--type", "incremental"]);
    if summaries {
        // The server sent only changed blocks (two of the 16 MiB of `wide`; of the tables
        // that grew, their new pages), and custos patched them over the parent's: under
        // a third of what the full read (measured: 11 MB of 74 MB).
        assert_eq!(incr["wal_summaries"], true, "{incr}");
        assert!(incr["pages_patched"].as_u64().unwrap() > 0, "{incr}");
        assert!(
            incr["stats"]["bytes_read"].as_u64().unwrap() * 3
                < full["stats"]["bytes_read"].as_u64().unwrap(),
            "the server sent much of the cluster again: {incr} after {full}"
        );
    }
    let incr_id = incr["snapshot"].as_str().unwrap().to_string();
    assert_eq!(incr["parent"].as_str(), Some(full_id.as_str()));
    let st = &incr["stats"];
    assert!(
        st["files_unchanged"].as_u64().unwrap() > 0,
        "incremental hashed every file again: {st}"
    );
    assert!(
        st["bytes_stored"].as_u64().unwrap() < full["stats"]["bytes_stored"].as_u64().unwrap(),
        "incremental stored nearly as much as the full: {st} vs full {}",
        full["stats"]
    );
    let want_after = digest(&pg);
    sleep_ms(1500);
    let t_after = pg.psql("SELECT clock_timestamp()");
    assert!(load.wait().unwrap().success(), "pgbench failed");
    pg.psql("INSERT INTO ledger (note) VALUES ('last')");
    pg.switch_and_archive();

    for (name, target, expect) in [
        ("between", &t_between, &full_id),
        ("after-incremental", &t_after, &incr_id),
    ] {
        restore_ledger_at(&restorer, &pg, &out_dir, name, target, expect);
    }
    // The tables changed only before the incremental: restored as they were then.
    let reopen = |dir: &std::path::Path| {
        let auto = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
        let port: u16 = auto
            .lines()
            .find_map(|l| l.strip_prefix("port = "))
            .and_then(|v| v.trim().trim_matches('\'').parse().ok())
            .expect("restore set a port");
        let c = PgCluster::existing(pg.bin.clone(), dir.to_path_buf(), port, pg.dir.clone());
        let (ok, log) = c.try_start(&dir.with_extension("again.log"));
        assert!(ok, "{log}");
        let d = digest(&c);
        c.stop();
        d
    };
    assert_eq!(reopen(&out_dir.join("after-incremental")), want_after);
    // A delta restore of the incremental over the full's restore: the patched blocks, whose
    // content as restored custos could not know at backup time, are all rewritten.
    let between = out_dir.join("between");
    let (r, _) = restore_pg(
        &restorer,
        &between,
        &["--snapshot", &incr_id, "--target", "immediate", "--delta"],
    );
    assert_eq!(r["snapshot"].as_str(), Some(incr_id.as_str()));
    assert_eq!(
        reopen(&between),
        want_after,
        "delta restore differs from the incremental"
    );

    // A relation cut short inside a block since the parent (`cut`: 32 pages, then 20),
    // then an incremental: what the parent's blocks cannot rebuild comes over the whole
    // stream once more. The restore holds exactly the tables as they are.
    for sql in [
        "DELETE FROM cut WHERE (ctid::text::point)[0] >= 20",
        "VACUUM cut",
        "CHECKPOINT",
    ] {
        pg.psql(sql);
    }
    assert_eq!(pg.psql("SELECT pg_relation_size('cut') / 8192"), "20");
    let mut a = args.clone();
    a.extend(["--type", "incremental", "--json"]);
    let out = backup.run(&a);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    let last: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if summaries {
        assert!(said.contains("cut short inside a block"), "{said} {last}");
    }
    let want = digest(&pg);
    pg.switch_and_archive();
    let dir = out_dir.join("latest");
    let (r, port) = restore_pg(&restorer, &dir, &["--target", "immediate"]);
    assert_eq!(r["snapshot"], last["snapshot"]);
    start_and_read(&pg.bin, &dir, port, &pg.dir);
    assert_eq!(reopen(&dir), want, "the restored tables differ");

    if summaries {
        // WAL summaries gone (as wal_summary_keep_time removes them): the server refuses
        // to base an incremental on the parent; custos says so and streams every file.
        let lsn = pg.psql("SELECT pg_current_wal_lsn()");
        pg.switch_and_archive();
        pg.psql("CHECKPOINT");
        for _ in 0..300 {
            let q = format!("SELECT summarized_lsn >= '{lsn}' FROM pg_get_wal_summarizer_state()");
            if pg.psql(&q) == "t" {
                break;
            }
            sleep_ms(100);
        }
        for f in std::fs::read_dir(pg.data.join("pg_wal/summaries")).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        pg.psql("UPDATE churn SET v = 'again' WHERE id = 1");
        let out = backup.run(&a);
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{said}");
        assert!(said.contains("the server refused an incremental"), "{said}");
        let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(again["pg"]["backup_type"], "incremental");
        assert_eq!(again["wal_summaries"], false, "{again}");
    }

    // The password is in nothing custos printed, nor in its cache or repository files.
    assert!(!printed.contains(SECRET));
    let mut files = walkdir(std::path::Path::new(&t.repo));
    files.extend(walkdir(&t.path("cache")));
    for f in files {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{} holds the password",
            f.display()
        );
    }

    // Archiving broken: the server waits for it after the last file; custos stops the
    // backup at --archive-timeout with one clear error and saves nothing.
    let before = t.json(&["snapshots"]).as_array().unwrap().len();
    let archive_command = pg.psql("SHOW archive_command");
    pg.psql("ALTER SYSTEM SET archive_command = '/bin/false'");
    pg.psql("SELECT pg_reload_conf()");
    let mut a = args.clone();
    a.extend(["--type", "incremental", "--archive-timeout", "3s"]);
    let err = backup.fails(&a, 17);
    assert!(
        err.contains("did not finish the backup within 3 s"),
        "{err}"
    );
    assert!(err.contains("archive_command"), "{err}");
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), before);
    pg.psql(&format!(
        "ALTER SYSTEM SET archive_command = '{}'",
        archive_command.replace('\'', "''")
    ));
    pg.psql("SELECT pg_reload_conf()");

    // A page damaged on disk is reported (read again through the server to rule out a
    // page torn by a concurrent write), and the run fails visibly.
    pg.psql("CREATE TABLE victim (id int, v text); INSERT INTO victim SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g; CHECKPOINT");
    let rel = pg.psql("SELECT pg_relation_filepath('victim')");
    pg.stop();
    flip_byte(&pg.data.join(&rel), 3 * 8192 + 4000);
    pg.start();
    let mut a = args.clone();
    a.extend(["--type", "incremental"]);
    let out = backup.run(&a);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains(&format!("{rel} block 3")), "{err}");

    // A tablespace cannot come through one tar stream: refused, nothing saved.
    let space = t.path("space");
    std::fs::create_dir_all(&space).unwrap();
    give_to_postgres(&space);
    pg.psql(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        space.display()
    ));
    let before = t.json(&["snapshots"]).as_array().unwrap().len();
    let err = backup.fails(&args, 17);
    assert!(err.contains("tablespaces (extra)"), "{err}");
    assert!(err.contains("database host"), "{err}");
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), before);
}

#[test]
fn replication_backup_postgres_15() {
    // pg_basebackup found in Debian's folder for the server's major version.
    replication(pg15_bin(), false, false);
}

#[test]
fn replication_backup_postgres_18() {
    replication(pg18_bin(), true, true);
}
