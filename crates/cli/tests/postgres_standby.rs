//! Base backups taken from a streaming standby (PostgreSQL 18), so that the primary does
//! not pay for reading its files: the primary archives WAL through custos, a full backup
//! with --wal and an incremental without it are read from the standby's data directory,
//! a third one over the replication protocol from the standby; restores to a time after
//! each hold exactly the ledger rows the primary committed by then (pg_amcheck and
//! pg_checksums clean).

mod common;
use common::*;

use custos_testkit::{free_port, give_to_postgres, pg18_bin, PgCluster};

#[test]
fn backups_from_a_standby_restore_to_points_in_time() {
    let bin = pg18_bin();
    let (t, cbin, cfg) = pg_repo();
    let (mut backup, restorer, out_dir) = pg_roles(&t, &cfg);
    let conf = format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push %p'\nwal_level = replica\n\
         track_commit_timestamp = on\n",
        cbin.display(),
        cfg.display()
    );
    let primary = PgCluster::init(bin.clone(), &conf);
    primary.start();
    primary.psql("CREATE TABLE ledger (id bigserial PRIMARY KEY, note text NOT NULL)");
    primary.psql("INSERT INTO ledger (note) SELECT 'before ' || g FROM generate_series(1, 2000) g");
    primary.psql("CREATE TABLE scratch AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g");

    // A standby made the usual way: pg_basebackup -R, streaming from the primary.
    let standby_data = t.path("standby");
    let out = primary
        .client("pg_basebackup")
        .arg("-D")
        .arg(&standby_data)
        .args(["-R", "-X", "stream", "-c", "fast"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    std::fs::write(
        standby_data.join("postgresql.auto.conf"),
        format!(
            "{}port = {port}\nsummarize_wal = on\n",
            std::fs::read_to_string(standby_data.join("postgresql.auto.conf")).unwrap()
        ),
    )
    .unwrap();
    give_to_postgres(&standby_data);
    let standby = PgCluster::existing(bin.clone(), standby_data.clone(), port, primary.dir.clone());
    let (ok, log) = standby.try_start(&t.path("standby.log"));
    assert!(ok, "{log}");
    assert_eq!(standby.psql("SELECT pg_is_in_recovery()"), "t");
    // A file born less than a second before its parent backup started is stored in whole
    // blocks by the incremental (it may be a relation made again under the same name):
    // the standby's files, just written by pg_basebackup, must be older than that.
    sleep_ms(1500);
    let caught_up = |standby: &PgCluster| {
        let want = primary.psql("SELECT pg_current_wal_lsn()");
        for _ in 0..300 {
            let ok = standby.psql(&format!(
                "SELECT pg_last_wal_replay_lsn() >= '{want}'::pg_lsn"
            ));
            if ok == "t" {
                return;
            }
            sleep_ms(100);
        }
        panic!("the standby did not catch up with {want}");
    };

    backup.set("PGHOST", primary.dir.to_str().unwrap());
    backup.set("PGPORT", &port.to_string());
    backup.set("PGDATA", standby_data.to_str().unwrap());
    // Archiving is checked on the primary; asked of the standby, pg check says so.
    let err = backup.fails(&["pg", "check"], 2);
    assert!(err.contains("standby") && err.contains("primary"), "{err}");
    primary.psql("INSERT INTO ledger (note) SELECT 'more ' || g FROM generate_series(1, 500) g");
    caught_up(&standby);
    // With --wal the backup carries the WAL it needs from the standby's pg_wal.
    let full = backup.json(&["backup", "postgres", "--type", "full", "--wal"]);
    assert_eq!(full["pg"]["backup_type"], "full", "{full}");
    sleep_ms(300);
    let t_after_full = primary.psql("SELECT clock_timestamp()");
    sleep_ms(300);

    primary.psql("UPDATE scratch SET v = upper(v) WHERE id % 97 = 0");
    primary.psql("INSERT INTO ledger (note) SELECT 'later ' || g FROM generate_series(1, 500) g");
    // A standby's backup starts at its last restartpoint, made at a checkpoint the primary
    // wrote: without one since the full, the incremental would start before the full ended
    // and could not patch pages (it would still be right, storing whole blocks).
    primary.psql("CHECKPOINT");
    caught_up(&standby);
    // Without --wal, the segment holding the stop LSN must reach the archive: the standby
    // cannot switch segments, the primary does (here every half second, as a busy primary
    // or archive_timeout would).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let switcher = {
        let stop = stop.clone();
        let mut psql = primary.client("psql");
        psql.args([
            "-X",
            "-q",
            "-d",
            "postgres",
            "-c",
            "SELECT pg_logical_emit_message(false, 'custos-test', 'tick')",
            "-c",
            "SELECT pg_switch_wal()",
        ]);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = psql.output();
                sleep_ms(500);
            }
        })
    };
    let incr = backup.json(&["backup", "postgres", "--type", "incremental"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    switcher.join().unwrap();
    assert_eq!(incr["pg"]["backup_type"], "incremental", "{incr}");
    assert_eq!(incr["parent"], full["snapshot"]);
    assert!(
        incr["pages_patched"].as_u64().unwrap() + incr["units_patched"].as_u64().unwrap() > 0,
        "full {full}\nincremental {incr}"
    );
    sleep_ms(300);
    let t_after_incr = primary.psql("SELECT clock_timestamp()");
    sleep_ms(300);

    // The same standby over the replication protocol, as from another host, with its WAL.
    primary
        .psql("INSERT INTO ledger (note) SELECT 'streamed ' || g FROM generate_series(1, 300) g");
    caught_up(&standby);
    let o = backup.run(&[
        "backup",
        "postgres",
        "--replication",
        "--wal",
        "--pg-bin",
        bin.to_str().unwrap(),
        "--json",
    ]);
    let said = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{said}");
    let streamed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(streamed["via"], "replication", "{streamed}");
    // The standby summarizes WAL, so the server's own incremental is asked for. A standby
    // starts a backup at its last restartpoint, which may lie before the parent's end:
    // then the server refuses the parent, custos says so and streams every file.
    assert!(
        streamed["wal_summaries"] == true || said.contains("the server refused an incremental"),
        "{streamed}\n{said}"
    );
    sleep_ms(300);
    let t_after_streamed = primary.psql("SELECT clock_timestamp()");
    sleep_ms(300);
    primary.psql("INSERT INTO ledger (note) VALUES ('last')");
    primary.switch_and_archive();

    let full_id = full["snapshot"].as_str().unwrap();
    let incr_id = incr["snapshot"].as_str().unwrap();
    restore_ledger_at(
        &restorer,
        &primary,
        &out_dir,
        "after-full",
        &t_after_full,
        full_id,
    );
    restore_ledger_at(
        &restorer,
        &primary,
        &out_dir,
        "after-incremental",
        &t_after_incr,
        incr_id,
    );
    restore_ledger_at(
        &restorer,
        &primary,
        &out_dir,
        "after-streamed",
        &t_after_streamed,
        streamed["snapshot"].as_str().unwrap(),
    );
}
