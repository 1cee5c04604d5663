//! Base backups with a real PostgreSQL 15 cluster: a damaged data page is reported by the
//! backup (file and block), a backup taken with --wal restores without any archive, prune
//! removes archived WAL that no kept backup needs and keeps what they need, bad
//! connection settings or a data directory of another cluster give one clear error, and a
//! configuration kept outside the data directory (Debian) is named by backup and restore.

mod common;
use common::*;

use custos_testkit::{free_port, give_to_postgres, pg15_bin, PgCluster};

/// Points a repository made by `pg_repo` (commands run as postgres) at a cluster.
fn connect(t: &mut T, pg: &PgCluster) {
    t.set("PGHOST", pg.dir.to_str().unwrap());
    t.set("PGPORT", &pg.port.to_string());
}

#[test]
fn damaged_page_is_reported_and_wal_included_backup_restores_alone() {
    // No archiving at all: only --wal makes the backup restorable.
    let pg = PgCluster::init(pg15_bin(), "wal_level = replica\n");
    pg.start();
    pg.psql("CREATE TABLE intact (id int PRIMARY KEY, v text); INSERT INTO intact SELECT g, md5(g::text) FROM generate_series(1, 5000) g;");
    pg.psql("CREATE TABLE victim (id int, v text); INSERT INTO victim SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g;");
    let rel = pg.psql("SELECT pg_relation_filepath('victim')");
    pg.psql("CHECKPOINT");
    pg.stop();
    // Damage block 3 of the table on disk behind PostgreSQL's back.
    let file = pg.data.join(&rel);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[3 * 8192 + 4000] ^= 0x5a;
    std::fs::write(&file, bytes).unwrap();
    pg.start();
    let (mut t, _, _) = pg_repo();
    connect(&mut t, &pg);

    // Without archiving and without --wal the backup would be useless: refused.
    let err = t.fails(&["backup", "postgres", "--type", "full"], 2);
    assert!(err.contains("archive_mode is off"), "{err}");

    let out = t.run(&["backup", "postgres", "--type", "full", "--wal"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a damaged page must fail the run visibly: {err}"
    );
    assert!(err.contains(&format!("{rel} block 3")), "{err}");
    let snaps = t.json(&["snapshots"]);
    let pg_info = &snaps[0]["summary"]["pg"];
    assert_eq!(pg_info["damaged_pages"], 1);
    assert_eq!(pg_info["wal_included"], true);

    // The snapshot restores and recovers with no archive (restore_command finds nothing).
    let dir = t.path("restored");
    t.unset("CUSTOS_PASSWORD");
    t.set(
        "CUSTOS_PASSWORD_FILE",
        t.path("restore.pw").to_str().unwrap(),
    );
    let (_, port) = restore_pg(&t, &dir, &["--target", "immediate"]);
    let c = PgCluster::existing(pg.bin.clone(), dir.clone(), port, pg.dir.clone());
    let (ok, log) = c.try_start(&t.path("restored.log"));
    assert!(ok, "{log}");
    for _ in 0..300 {
        if c.psql("SELECT pg_is_in_recovery()") == "f" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        c.psql("SELECT count(*), sum(length(v)) FROM intact"),
        pg.psql("SELECT count(*), sum(length(v)) FROM intact")
    );
    c.stop();

    // A damaged repository: the restore fails and leaves no half-laid data directory.
    for p in t.packs() {
        let len = std::fs::metadata(&p).unwrap().len() as usize;
        flip_byte(&p, len / 2);
    }
    let dir = t.path("never-started");
    let err = t.fails(
        &[
            "restore",
            "postgres",
            "--to",
            dir.to_str().unwrap(),
            "--target",
            "immediate",
        ],
        14,
    );
    assert!(err.contains("altered or damaged"), "{err}");
    assert!(!dir.exists(), "a failed restore left {}", dir.display());
}

#[test]
fn prune_keeps_the_wal_kept_backups_need() {
    let (mut t, cbin, cfg) = pg_repo();
    let conf = format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push %p'\nwal_level = replica\n",
        cbin.display(),
        cfg.display()
    );
    let pg = PgCluster::init(pg15_bin(), &conf);
    pg.start();
    connect(&mut t, &pg);
    pg.psql("CREATE TABLE t (id int)");
    for _ in 0..3 {
        pg.psql("INSERT INTO t SELECT generate_series(1, 1000)");
        pg.switch_and_archive();
    }
    let first = t.json(&["backup", "postgres", "--type", "full"]);
    for _ in 0..3 {
        pg.psql("INSERT INTO t SELECT generate_series(1, 1000)");
        pg.switch_and_archive();
    }
    let second = t.json(&["backup", "postgres", "--type", "incremental"]);
    pg.switch_and_archive();
    let wal_names = |t: &T| -> Vec<String> {
        let mut v: Vec<String> = walkdir(&std::path::PathBuf::from(&t.repo).join("wal"))
            .into_iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = wal_names(&t);
    let start_of = |b: &serde_json::Value| -> String {
        let lsn: custos_model::Lsn = b["pg"]["start_lsn"].as_str().unwrap().parse().unwrap();
        format!(
            "00000001{:08X}{:08X}",
            lsn.0 >> 32,
            (lsn.0 & 0xFFFF_FFFF) >> 24
        )
    };
    let first_start = start_of(&first);
    assert!(
        before.iter().any(|n| n.as_str() < first_start.as_str()),
        "{before:?}"
    );

    // With both backups kept, WAL before the first backup goes; the rest stays.
    t.ok(&["prune"]);
    let after = wal_names(&t);
    assert!(
        after.iter().all(|n| n.as_str() >= first_start.as_str()),
        "{after:?}"
    );
    // Everything from the first backup on stays (the archiver may have added a file since
    // `before` was listed: a busy machine archives the backup's history file late).
    for n in before.iter().filter(|n| n.as_str() >= first_start.as_str()) {
        assert!(
            after.contains(n),
            "prune deleted {n}, which a kept backup needs"
        );
    }
    // `pg check` finds the archive continuous from the oldest backup.
    let check = t.json(&["pg", "check"]);
    assert_eq!(check["gaps"].as_array().unwrap().len(), 0, "{check}");

    // Forget the first backup: the WAL between the backups goes too.
    t.ok(&["forget", "--keep-last", "1", "--prune"]);
    let second_start = start_of(&second);
    let last = wal_names(&t);
    assert!(
        last.iter().all(|n| n.as_str() >= second_start.as_str()),
        "{last:?}"
    );
    assert!(
        last.iter().any(|n| n.as_str() == second_start.as_str()),
        "{last:?}"
    );
    t.ok(&["verify", "--read-data"]);
}

#[test]
fn bad_connection_and_wrong_data_directory_are_clear_errors() {
    let pg = PgCluster::init(
        pg15_bin(),
        "archive_mode = on\narchive_command = '/bin/true'\n",
    );
    pg.start();
    let other = PgCluster::init(pg15_bin(), "");
    let (mut t, _, _) = pg_repo();
    connect(&mut t, &pg);
    // Nothing listens on this port.
    t.set("PGPORT", &free_port().to_string());
    let err = t.fails(&["backup", "postgres"], 17);
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");
    assert!(err.contains("PGHOST"), "{err}");
    t.set("PGPORT", &pg.port.to_string());
    give_to_postgres(&other.data);
    let err = t.fails(
        &[
            "backup",
            "postgres",
            "--pgdata",
            other.data.to_str().unwrap(),
        ],
        2,
    );
    assert!(err.contains("belongs to cluster"), "{err}");
    assert!(t.json(&["snapshots"]).as_array().unwrap().is_empty());
}

/// A cluster laid out as Debian lays it out: postgresql.conf, pg_hba.conf and
/// pg_ident.conf in a folder of their own (/etc/postgresql/<version>/<cluster>), the data
/// directory without them. A base backup holds the data directory only: the backup names
/// the files it lacks, the restore says the server will not start as it is and what to do,
/// and doing that gives a server with the rows.
#[test]
fn configuration_outside_the_data_directory_is_named_at_backup_and_restore() {
    let made = PgCluster::init(pg15_bin(), "wal_level = replica\n");
    let (pg, etc) = configured_outside(&made);
    let files = ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"];
    pg.start();
    pg.psql("CREATE TABLE ledger (id int PRIMARY KEY); INSERT INTO ledger SELECT generate_series(1, 300)");

    let (mut t, _, _) = pg_repo();
    connect(&mut t, &pg);
    let o = t.run(&["backup", "postgres", "--type", "full", "--wal", "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let named: Vec<&str> = r["config_outside"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let want: Vec<String> = files
        .iter()
        .map(|f| etc.join(f).display().to_string())
        .collect();
    assert_eq!(named, want, "{r}");
    assert!(
        err.contains("outside its data directory") && err.contains(&want[0]),
        "{err}"
    );

    t.unset("CUSTOS_PASSWORD");
    t.set(
        "CUSTOS_PASSWORD_FILE",
        t.path("restore.pw").to_str().unwrap(),
    );
    let dir = t.path("restored");
    let (r, port) = restore_pg(&t, &dir, &["--target", "immediate"]);
    let warning = r["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w.as_str())
        .find(|w| w.contains("no postgresql.conf"))
        .unwrap_or_else(|| panic!("no warning: {r}"))
        .to_string();
    assert!(
        warning.contains(&want[0]) && warning.contains("config_file"),
        "{warning}"
    );
    assert!(!dir.join("postgresql.conf").exists());

    // What the warning says: the configuration in, without the lines naming the old
    // places; the server starts and holds the rows.
    for f in files {
        let text = std::fs::read_to_string(etc.join(f)).unwrap();
        let kept: String = text
            .lines()
            .filter(|l| {
                !["data_directory", "hba_file", "ident_file"]
                    .iter()
                    .any(|k| l.trim_start().starts_with(k))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(dir.join(f), kept).unwrap();
        give_to_postgres(&dir.join(f));
    }
    let c = PgCluster::existing(pg.bin.clone(), dir.clone(), port, pg.dir.clone());
    let (ok, log) = c.try_start(&t.path("restored.log"));
    assert!(ok, "{log}");
    assert_eq!(c.psql("SELECT count(*) FROM ledger"), "300", "{}", c.log());
    c.stop();
}
