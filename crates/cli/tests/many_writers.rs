//! Many writers on one bucket (issue 21, part 3): six PostgreSQL clusters (15 and 18)
//! archive WAL through custos under pgbench into one repository on SeaweedFS while two base
//! backups and two files backups run, and a `forget` + `prune` starts in the middle. Every
//! command either succeeds or waits for the exclusive lock within its `--lock-wait` bound;
//! no archive_command fails; every cluster's WAL is continuous (`pg check`); the trail is
//! one chain holding every operation once; `verify --read-data` is clean; one cluster
//! restored to a time during the load holds exactly the rows committed by then. The
//! wal-push latencies under this contention are printed (and kept under the test's
//! target folder) for bench/RESULTS.md.

mod common;
use common::*;

use custos_testkit::{pg15_bin, pg18_bin, PgCluster, S3Server, ACCESS_KEY, SECRET_KEY};

const CLUSTERS: usize = 6;

/// A T that runs custos as postgres against `cfg` with the backup key, pointed at `pg`.
fn on_cluster(base: &T, pg: &PgCluster) -> T {
    let mut b = base.with_password("unused");
    b.unset("CUSTOS_PASSWORD");
    b.unset("CUSTOS_REPO");
    b.run_as = Some("postgres".into());
    b.set("PGHOST", pg.dir.to_str().unwrap());
    b.set("PGPORT", &pg.port.to_string());
    b.set("PGUSER", "postgres");
    b
}

#[test]
fn six_clusters_two_base_backups_two_file_backups_and_a_prune_share_one_bucket() {
    let s3 = S3Server::start();
    s3.create_bucket("shared");
    let (mut t, cbin, cfg) = pg_repo();
    // pg_repo made a local repository; this test's is on S3.
    t.run_as = None;
    let secret = t.path("s3.secret");
    std::fs::write(&secret, SECRET_KEY).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nurl = \"s3://shared/platform\"\npassword_file = \"{}\"\ncache_dir = \"{}\"\n\
             [storage.s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key_file = \"{}\"\n",
            t.path("backup.pw").display(),
            t.path("cache").display(),
            s3.endpoint,
            secret.display()
        ),
    )
    .unwrap();
    let mut admin = T::bare();
    admin.unset("CUSTOS_REPO");
    admin.unset("CUSTOS_CACHE_DIR");
    admin.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    admin.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    admin.add_key("backup", "backup role password", &[]);
    // Each archive_command run is timed into a file of its cluster: `push.sh TAG COMMAND...`.
    let lat = t.path("latency");
    std::fs::create_dir_all(&lat).unwrap();
    let push = t.path("push.sh");
    std::fs::write(
        &push,
        format!(
            "#!/bin/sh
tag=$1; shift
s=$(date +%s%N)
\"$@\" || exit $?
echo $(( $(date +%s%N) - s )) >> \"{}/$tag\"\n",
            lat.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&push, std::fs::Permissions::from_mode(0o755)).unwrap();
    let trees: Vec<_> = (0..3).map(|i| t.path(&format!("tree-{i}"))).collect();
    for (i, d) in trees.iter().enumerate() {
        make_tree(d, 40 + i as u64, 30, 200_000);
    }
    custos_testkit::give_to_postgres(t.dir.path());
    let (backup, restorer, out_dir) = pg_roles(&t, &cfg);
    let mut restorer = restorer;
    restorer.unset("CUSTOS_REPO");
    restorer.set("CUSTOS_CONFIG", cfg.to_str().unwrap());

    // Six clusters, PostgreSQL 15 and 18 in turn, each archiving through custos.
    let clusters: Vec<PgCluster> = (0..CLUSTERS)
        .map(|i| {
            let conf = format!(
                "archive_mode = on\narchive_command = '{} c{i} {} --config {} wal-push %p'\n\
                 wal_level = replica\ntrack_commit_timestamp = on\nmax_connections = 30\n\
                 shared_buffers = 16MB\narchive_timeout = 2s\n",
                push.display(),
                cbin.display(),
                cfg.display()
            );
            let pg = PgCluster::init(if i % 2 == 0 { pg15_bin() } else { pg18_bin() }, &conf);
            pg.start();
            pg
        })
        .collect();
    let roles: Vec<T> = clusters.iter().map(|pg| on_cluster(&backup, pg)).collect();
    // A files snapshot that will be forgotten and pruned mid-way.
    let old = roles[0].json(&["backup", "files", trees[2].to_str().unwrap()]);
    let mut loads: Vec<_> = clusters
        .iter()
        .map(|pg| start_ledger_load(&t, pg, 1, 30, 30))
        .collect();
    // Clusters 2..5 get their base backup now; 0 and 1 during the storm.
    for r in &roles[2..] {
        r.json(&["backup", "postgres", "--type", "full", "--lock-wait", "5m"]);
    }
    sleep_ms(2000);

    let wait = ["--lock-wait", "5m"];
    let (fulls, files, pruned) = std::thread::scope(|s| {
        let fulls: Vec<_> = roles[..2]
            .iter()
            .map(|r| {
                s.spawn(move || {
                    let mut a = vec!["backup", "postgres", "--type", "full"];
                    a.extend(wait);
                    r.json(&a)
                })
            })
            .collect();
        let files: Vec<_> = (0..2)
            .map(|i| {
                let (r, tree) = (&roles[i + 2], &trees[i]);
                s.spawn(move || {
                    let mut a = vec!["backup", "files", tree.to_str().unwrap()];
                    a.extend(wait);
                    r.json(&a)
                })
            })
            .collect();
        let restorer = &restorer;
        let old_id = old["snapshot"].as_str().unwrap().to_string();
        let pruned = s.spawn(move || {
            sleep_ms(1500);
            restorer.ok(&["forget", &old_id, "--lock-wait", "5m"]);
            restorer.json(&["prune", "--lock-wait", "5m"])
        });
        (
            fulls
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>(),
            files
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>(),
            pruned.join().unwrap(),
        )
    });
    // Prune removed the forgotten snapshot's data and the WAL before every cluster's
    // oldest backup, and nothing anyone else needed (below).
    assert!(
        pruned["report"]["packs_deleted"].as_u64().unwrap() > 0,
        "{pruned}"
    );
    let target = clusters[1].psql("SELECT clock_timestamp()");
    sleep_ms(1000);
    for l in &mut loads {
        assert!(l.wait().unwrap().success(), "pgbench failed");
    }
    for pg in &clusters {
        pg.psql("INSERT INTO ledger (note) VALUES ('last')");
        pg.switch_and_archive();
    }

    // No archive_command failed, and every cluster's WAL is continuous from its backup.
    for (i, (pg, r)) in clusters.iter().zip(&roles).enumerate() {
        assert_eq!(
            pg.psql("SELECT failed_count FROM pg_stat_archiver"),
            "0",
            "cluster {i}: an archive_command failed: {}",
            pg.psql("SELECT last_failed_wal FROM pg_stat_archiver")
        );
        let check = r.json(&["pg", "check"]);
        assert_eq!(check["ok"], true, "cluster {i}: {check}");
        assert_eq!(check["pending_segments"], 0, "cluster {i}: {check}");
    }

    // The trail: one chain (audit verify), every operation in it once.
    restorer.ok(&["audit", "verify"]);
    let log = restorer.json(&["audit", "log"]);
    let commands: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["entry"]["command"].as_str())
        .collect();
    let count = |c: &str| commands.iter().filter(|x| **x == c).count();
    assert_eq!(count("backup postgres"), CLUSTERS, "{commands:?}");
    assert_eq!(count("backup files"), 3, "{commands:?}");
    assert_eq!(count("forget"), 1, "{commands:?}");
    assert_eq!(count("prune"), 1, "{commands:?}");
    let snaps = restorer.json(&["snapshots"]);
    let ids: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    for r in fulls.iter().chain(&files) {
        assert!(ids.contains(&r["snapshot"].as_str().unwrap()), "{r}");
    }
    assert!(!ids.contains(&old["snapshot"].as_str().unwrap()));
    let v = restorer.json(&["verify", "--read-data"]);
    assert_eq!(v["errors"].as_array().map(Vec::len), Some(0), "{v}");

    // A cluster backed up during the storm restores to a time in it, exactly.
    let c1 = &clusters[1];
    let system_id = c1.psql("SELECT system_identifier FROM pg_control_system()");
    let dir = out_dir.join("c1");
    let (r, port) = restore_pg(
        &restorer,
        &dir,
        &["--cluster", &system_id, "--target-time", &target],
    );
    assert_eq!(r["snapshot"], fulls[1]["snapshot"], "{r}");
    let want = committed_until(c1, &target);
    assert!(!want.is_empty());
    let got = start_and_read(&c1.bin, &dir, port, &c1.dir);
    assert_eq!(
        got, want,
        "cluster 1 restored differs from what was committed by {target}"
    );

    // wal-push latency under contention, for bench/RESULTS.md.
    let mut ms: Vec<f64> = std::fs::read_dir(&lat)
        .unwrap()
        .flatten()
        .flat_map(|f| {
            std::fs::read_to_string(f.path())
                .unwrap()
                .lines()
                .filter_map(|l| l.trim().parse::<f64>().ok())
                .map(|ns| ns / 1e6)
                .collect::<Vec<_>>()
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    assert!(ms.len() >= CLUSTERS * 2, "{} pushes timed", ms.len());
    let q = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    let summary = format!(
        "wal-push under contention: {} segments from {CLUSTERS} clusters; ms p50 {:.0}, p90 {:.0}, p99 {:.0}, max {:.0}",
        ms.len(),
        q(0.5),
        q(0.9),
        q(0.99),
        ms[ms.len() - 1]
    );
    eprintln!("{summary}");
    let keep = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("many-writers.txt");
    std::fs::write(&keep, format!("{summary}\n")).unwrap();
    for pg in &clusters {
        pg.stop();
    }
}
