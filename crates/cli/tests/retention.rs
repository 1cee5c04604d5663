//! Retention and garbage collection: the plan explains itself, the dry run changes
//! nothing, prune frees exactly the unreferenced data, and kept snapshots still restore.

mod common;
use common::*;

fn content(day: u32) -> Vec<u8> {
    // ~300 kB per day, unique per day, so forgotten days free space.
    (0..300_000u32)
        .map(|i| ((i ^ day.wrapping_mul(7919)).wrapping_mul(2654435761) >> 7) as u8)
        .collect()
}

#[test]
fn forget_plan_dry_run_execute_and_prune() {
    let t = T::new();
    // 100 daily backups at 02:00, starting 2026-01-01.
    let start = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
    for d in 0..100u32 {
        let day = start + chrono::Duration::days(i64::from(d));
        let time = format!("{}T02:00:00Z", day.format("%Y-%m-%d"));
        let o = t.run_stdin(
            &["backup", "stream", "--name", "db-dump", "--time", &time],
            &content(d),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), 100);
    let policy = [
        "--keep-daily",
        "7",
        "--keep-weekly",
        "4",
        "--keep-monthly",
        "3",
    ];

    let before = t.repo_state();
    let mut args = vec!["forget", "--dry-run"];
    args.extend(policy);
    let plan = t.json(&args);
    assert_eq!(t.repo_state(), before, "a dry run must change nothing");
    let decisions = plan["plan"]["groups"][0]["decisions"].as_array().unwrap();
    let kept: Vec<&serde_json::Value> = decisions.iter().filter(|d| d["keep"] == true).collect();
    // Slots count back from the newest snapshot (2026-04-10): 7 daily (Apr 4..10); weekly
    // W15 and W14 fall on kept days, W13 and W12 add two; monthly April falls on a kept
    // day, March and February add two. 7 + 2 + 2 = 11.
    let reasons: Vec<String> = kept
        .iter()
        .map(|d| {
            d["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .collect();
    assert!(
        reasons[0].contains("daily snapshot for 2026-04-10"),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("monthly snapshot for 2026-02")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("weekly snapshot for 2026-W13")),
        "{reasons:?}"
    );
    assert_eq!(kept.len(), 11, "{reasons:?}");
    assert!(
        !reasons.iter().any(|r| r.contains("2026-01")),
        "January is past 3 monthly slots: {reasons:?}"
    );
    for d in decisions.iter().filter(|d| d["keep"] == false) {
        assert_eq!(d["reasons"][0], "matched no rule of the policy");
    }
    let text = t.ok(&[
        "forget",
        "--dry-run",
        "--keep-daily",
        "7",
        "--keep-weekly",
        "4",
        "--keep-monthly",
        "3",
    ]);
    assert!(
        text.contains("remove")
            && text.contains("keep")
            && text.contains("dry run: 89 snapshot(s) would be removed"),
        "{text}"
    );

    let mut args = vec!["forget"];
    args.extend(policy);
    t.ok(&args);
    let snaps = t.json(&["snapshots"]);
    assert_eq!(snaps.as_array().unwrap().len(), 11);

    let size = |t: &T| -> u64 {
        t.packs()
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    };
    let before_prune = size(&t);
    let dry = t.json(&["prune", "--dry-run"]);
    assert!(dry["report"].is_null());
    assert_eq!(size(&t), before_prune);
    let pr = t.json(&["prune"]);
    assert!(pr["report"]["packs_deleted"].as_u64().unwrap() > 0, "{pr}");
    let after = size(&t);
    assert!(
        after < before_prune / 4,
        "prune freed too little: {before_prune} -> {after}"
    );
    t.ok(&["verify", "--read-data"]);

    // Every kept snapshot restores exactly.
    for s in snaps.as_array().unwrap() {
        let time =
            chrono::DateTime::parse_from_rfc3339(s["summary"]["time"].as_str().unwrap()).unwrap();
        let day = (time.date_naive() - start).num_days() as u32;
        let o = t.run(&["restore", "stream", s["id"].as_str().unwrap()]);
        assert!(o.status.success());
        assert_eq!(
            o.stdout,
            content(day),
            "snapshot of day {day} differs after prune"
        );
    }
    // A second prune finds nothing to do.
    let pr = t.json(&["prune"]);
    assert!(pr["report"].is_null(), "{pr}");
}

#[test]
fn prune_waits_for_running_backups() {
    let mut t = T::new();
    let o = t.run_stdin(&["backup", "stream", "--name", "a"], b"first");
    assert!(o.status.success());
    // A backup that is running (its command sleeps) holds a shared lock.
    let mut slow = t
        .command(&[
            "backup",
            "stream",
            "--name",
            "slow",
            "--command",
            "sleep 4; echo done",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let err = t.fails(&["prune"], 11);
    assert!(
        err.contains("locked") && err.contains("backup stream"),
        "{err}"
    );
    assert!(slow.wait().unwrap().success());
    t.ok(&["prune"]);
    let o = t.run(&["restore", "stream", "latest"]);
    assert_eq!(o.stdout, b"done\n");

    // With --lock-wait prune waits for the backup instead, and a wait too short says
    // how long it waited.
    let mut slow = t
        .command(&[
            "backup",
            "stream",
            "--name",
            "slow",
            "--command",
            "sleep 4; echo again",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let err = t.fails(&["prune", "--lock-wait", "1s"], 11);
    assert!(err.contains("waited 1s"), "{err}");
    // The bound from the environment (what an agent's unit file sets) works as the flag.
    t.set("CUSTOS_LOCK_WAIT", "2m");
    let pr = t.json(&["prune"]);
    assert!(slow.wait().unwrap().success());
    // Prune ran after the backup: its snapshot and data are whole.
    assert!(pr.is_object(), "{pr}");
    let o = t.run(&["restore", "stream", "latest"]);
    assert_eq!(o.stdout, b"again\n");
    t.ok(&["verify", "--read-data"]);
    let bad = t.fails(&["prune", "--lock-wait", "soon"], 2);
    assert!(bad.contains("lock wait `soon`"), "{bad}");
    t.set("CUSTOS_LOCK_WAIT", "soon");
    let bad = t.fails(&["prune"], 2);
    assert!(bad.contains("lock wait `soon`"), "{bad}");
}

#[test]
fn keep_within_and_verify_subset() {
    let t = T::bare();
    t.ok(&[
        "init",
        "--kdf-memory-mib",
        "8",
        "--kdf-iterations",
        "1",
        "--pack-size-mib",
        "1",
    ]);
    // Ten snapshots twelve hours apart, each with 1.5 MiB of its own data (two packs).
    for i in 0..10u32 {
        let time = format!("2026-03-{:02}T{:02}:00:00Z", 1 + i / 2, (i % 2) * 12);
        let o = t.run_stdin(
            &["backup", "stream", "--name", "s", "--time", &time],
            &content(i).repeat(5),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let plan = t.json(&["forget", "--dry-run", "--keep-within", "2d"]);
    let kept: Vec<_> = plan["plan"]["groups"][0]["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == true)
        .collect();
    // Newest is 2026-03-05 12:00; within two days: 03-03 12:00 .. 03-05 12:00, five snapshots.
    assert_eq!(kept.len(), 5, "{plan}");
    assert!(
        kept.iter().all(|d| d["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("within 2days")),
        "{plan}"
    );
    t.fails(&["forget", "--keep-within", "two days"], 2);

    // --subset reads about that share of the packs, and every byte with 100%.
    let all = t.json(&["verify", "--read-data"]);
    let packs = all["packs"].as_u64().unwrap();
    assert_eq!(all["packs_read"].as_u64().unwrap(), packs);
    let half = t.json(&["verify", "--read-data", "--subset", "50%"]);
    assert_eq!(
        half["packs_read"].as_u64().unwrap(),
        packs.div_ceil(2),
        "{half}"
    );
    t.fails(&["verify", "--read-data", "--subset", "150%"], 2);
}

/// A PostgreSQL backup's summary for the cluster `sys`, ending at `time`, with WAL from
/// segment `seg` on (16 MiB segments).
fn pg_info(
    sys: u64,
    seg: u64,
    time: chrono::DateTime<chrono::Utc>,
) -> custos_repo::snapshot::PgInfo {
    custos_repo::snapshot::PgInfo {
        system_id: sys,
        cluster: None,
        version_num: 150000,
        backup_type: custos_repo::snapshot::PgBackupType::Full,
        timeline: 1,
        start_lsn: custos_model::Lsn(seg << 24),
        stop_lsn: custos_model::Lsn((seg << 24) + 0x100),
        start_time: time,
        stop_time: time,
        next_xid: 1000,
        segment_size: 16 << 20,
        wal_included: false,
        data_checksums: true,
        damaged_pages: 0,
    }
}

#[test]
fn retention_groups_postgresql_backups_by_cluster_not_host() {
    // A failover (or backups from a standby) made two groups of one cluster, and kept
    // twice what the policy says.
    let t = T::new();
    let a = common::attack::Attacker::open(&t, PW);
    let day0 = chrono::DateTime::parse_from_rfc3339("2026-11-01T02:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let (cluster, other) = (7_713_358_116_659_438_404u64, 42u64);
    let mut ids = vec![];
    for d in 0..6u64 {
        let host = if d < 3 { "db-1" } else { "db-2" };
        let time = day0 + chrono::Duration::days(d as i64);
        ids.push(a.plant_pg_backup(host, time, pg_info(cluster, 2 + d * 4, time)));
        for s in 0..4 {
            let name = format!("00000001000000000000{:04X}", 2 + d * 4 + s);
            a.repo
                .wal_push(cluster, &name, b"stand-in segment", None)
                .unwrap();
        }
    }
    a.plant_pg_backup("db-9", day0, pg_info(other, 2, day0));

    let plan = t.json(&["forget", "--keep-last", "2", "--dry-run"]);
    let groups = plan["plan"]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{plan}");
    let g = groups
        .iter()
        .find(|g| g["system_id"].as_str() == Some(cluster.to_string().as_str()))
        .unwrap();
    let kept = g["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["keep"] == true)
        .count();
    assert_eq!(kept, 2, "{g}");
    assert_eq!(g["decisions"].as_array().unwrap().len(), 6, "{g}");
    // The plan says how far back the cluster can be restored, before and after.
    let w = &g["window"];
    assert_eq!(w["from_before"], "2026-11-01T02:00:00Z", "{w}");
    assert_eq!(w["from_after"], "2026-11-05T02:00:00Z", "{w}");
    assert_eq!(w["wal_freed"], 16, "{w}");
    let text = t.ok(&["forget", "--keep-last", "2", "--dry-run"]);
    assert!(text.contains("recovery window shrinks"), "{text}");

    // `info` shows the cluster once, with its newest backup.
    let info = t.json(&["info"]);
    let c = info["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["system_id"].as_str() == Some(cluster.to_string().as_str()))
        .unwrap();
    assert_eq!(c["backups"], 6);
    assert_eq!(c["newest"]["snapshot"], ids[5].to_hex());
    assert_eq!(c["wal_files"], 24);
    assert!(c["gaps"].as_array().unwrap().is_empty(), "{c}");

    // `forget ID...` removes exactly the named snapshots (even the newest of a group).
    let name = ids[5].to_hex();
    let plan = t.json(&["forget", &name[..10], "--dry-run"]);
    assert_eq!(
        plan["plan"]["groups"].as_array().unwrap().len(),
        1,
        "{plan}"
    );
    t.ok(&["forget", &name[..10]]);
    let left: Vec<String> = t
        .json(&["snapshots"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left.len(), 6);
    assert!(!left.contains(&name));
    t.fails(&["forget", "ffffffffff"], 16);
    let err = t.fails(&["forget", &left[0][..10], "--keep-last", "1"], 2);
    assert!(err.contains("not both"), "{err}");
}

/// The retention interlock: whatever forget is told, the newest snapshot of a source that
/// a clean, whole `verify --read-data` (restore key) proved restorable stays, and forget
/// says which rule kept it. A subset read proves nothing and keeps nothing.
#[test]
fn forget_keeps_the_newest_snapshot_last_proven_restorable() {
    let t = T::new();
    let src = t.path("src");
    let mut ids = vec![];
    for i in 0..3 {
        make_tree(&src.join(format!("v{i}")), i, 3, 50_000);
        ids.push(
            t.json(&["backup", "files", src.to_str().unwrap()])["snapshot"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // A partial read proves nothing.
    t.ok(&["verify", "--read-data", "--subset", "50%"]);
    let named: Vec<String> = ids.iter().map(|i| i[..12].to_string()).collect();
    let mut dry = vec!["forget", "--dry-run"];
    dry.extend(named.iter().map(String::as_str));
    let plan = t.ok(&dry);
    assert!(!plan.contains("proven restorable"), "{plan}");
    t.ok(&["verify", "--read-data"]);
    let proven = ids[2].clone();
    for i in 3..5 {
        make_tree(&src.join(format!("v{i}")), i, 3, 50_000);
        ids.push(
            t.json(&["backup", "files", src.to_str().unwrap()])["snapshot"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // Every snapshot named: the proven one stays, and forget says why.
    let mut args = vec!["forget"];
    let short: Vec<String> = ids.iter().map(|i| i[..12].to_string()).collect();
    args.extend(short.iter().map(String::as_str));
    let out = t.ok(&args);
    assert!(out.contains("proven restorable"), "{out}");
    let left = t.json(&["snapshots"]);
    let left: Vec<&str> = left
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(left, vec![proven.as_str()]);
    // A policy that would remove it keeps it too.
    make_tree(&src.join("v9"), 9, 3, 50_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    t.ok(&["forget", "--keep-last", "1"]);
    let left = t.json(&["snapshots"]);
    assert!(
        left.as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == proven.as_str()),
        "{left}"
    );
}

#[test]
fn index_compact_rewrites_the_objects_of_many_backups_as_one_and_nothing_changes_for_readers() {
    let mut t = T::new();
    // Every command reads the index through the on-disk build (format.md 5.3).
    t.set("CUSTOS_INDEX_MEMORY_MB", "0");
    let mut ids = vec![];
    for d in 0..12u32 {
        let time = format!("2026-03-{:02}T02:00:00Z", d + 1);
        let o = t.run_stdin(
            &[
                "backup", "stream", "--name", "dump", "--time", &time, "--json",
            ],
            &content(d),
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        ids.push(r["snapshot"].as_str().unwrap().to_string());
    }
    let index_dir = t.path("repo/index");
    let objects = || std::fs::read_dir(&index_dir).unwrap().count();
    assert_eq!(objects(), 12, "one index object per backup");
    // <cache>/<repo id>/index-<reader>/current names the build the commands used.
    let built = std::fs::read_dir(t.path("cache"))
        .unwrap()
        .flat_map(|repo| std::fs::read_dir(repo.unwrap().path()).unwrap())
        .map(|d| d.unwrap().path())
        .any(|d| {
            d.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("index-")
                && d.join("current").exists()
        });
    assert!(
        built,
        "the commands read the index through a build in the cache folder"
    );
    // A backup key may not rewrite what other keys wrote.
    t.add_key("backup", "backup-pw", &[]);
    let backup = t.with_password("backup-pw");
    let err = backup.fails(&["index", "compact"], 13);
    assert!(err.contains("compact the index"), "{err}");
    assert_eq!(objects(), 12);

    let r = t.json(&["index", "compact"]);
    assert_eq!(
        (r["objects_before"].as_u64(), r["objects_after"].as_u64()),
        (Some(12), Some(1))
    );
    assert_eq!(objects(), 1);
    let again = t.json(&["index", "compact"]);
    assert_eq!(
        again["objects_after"], 1,
        "a compact index is left as it is"
    );

    // Readers see the same repository: each snapshot restores, a repeated backup stores
    // nothing new (the owner's packs are still its own), verify is clean.
    for (d, id) in ids.iter().enumerate() {
        let o = t.run(&["restore", "stream", id]);
        assert!(o.status.success());
        assert!(
            o.stdout == content(d as u32),
            "snapshot of day {d} restores"
        );
    }
    let o = t.run_stdin(
        &["backup", "stream", "--name", "dump", "--json"],
        &content(3),
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["stats"]["chunks_new"], 0, "{r}");
    let v = t.json(&["verify", "--read-data"]);
    assert_eq!(v["errors"].as_array().unwrap().len(), 0, "{v}");
    let trail = t.ok(&["audit", "log"]);
    assert!(trail.contains("index compact"), "{trail}");
}

#[test]
fn prune_reads_a_manifest_of_many_chunks_piece_by_piece_and_keeps_every_file_it_names() {
    let mut t = T::new();
    // The on-disk index (format.md 5.3): prune marks used copies by their numbers there.
    t.set("CUSTOS_INDEX_MEMORY_MB", "0");
    let src = t.path("src");
    // Enough entries for a manifest of several chunks (about 150 bytes an entry, 5 MB or
    // more; chunks of 1 MiB on average, 8 MiB at most): an entry cut by a chunk boundary
    // is read from both pieces.
    make_tree(&src, 7, 48_000, 400);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    // A quarter of the files go: their chunks, in the packs of the first backup, become
    // unused.
    let mut gone = 0;
    for (i, e) in walkdir(&src).into_iter().enumerate() {
        if e.is_file() && i % 4 == 0 {
            std::fs::remove_file(e).unwrap();
            gone += 1;
        }
    }
    assert!(gone > 7000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let expected = describe(&src);
    t.ok(&["forget", "--keep-last", "1"]);
    let pr = t.json(&["prune"]);
    // A chunk per distinct non-empty file (half of make_tree's files repeat a text).
    let nonempty = walkdir(&src)
        .iter()
        .filter(|p| p.is_file() && !p.is_symlink())
        .map(|p| std::fs::read(p).unwrap())
        .filter(|d| !d.is_empty())
        .collect::<std::collections::HashSet<_>>()
        .len() as u64;
    let used = pr["plan"]["chunks_used"].as_u64().unwrap();
    assert!(
        used >= nonempty + 2,
        "every file's chunk and a manifest of several chunks are in use: {used} for {nonempty} contents: {pr}"
    );
    assert!(pr["report"]["packs_deleted"].as_u64().unwrap() > 0, "{pr}");
    t.ok(&["verify", "--read-data"]);
    t.restore_latest("out");
    assert_eq!(describe(&t.path("out")), expected);
}

#[test]
fn a_backup_recording_facts_no_cluster_has_is_left_out_not_a_crash() {
    // A snapshot is whatever a backup key wrote. One whose WAL segment size was 0 made
    // prune divide by zero (exit 101), and any command that places WAL by it.
    let t = T::new();
    let a = common::attack::Attacker::open(&t, PW);
    let day0 = chrono::Utc::now() - chrono::Duration::days(2);
    let sys = 7_713_358_116_659_438_404u64;
    let good = a.plant_pg_backup("db-1", day0, pg_info(sys, 2, day0));
    for s in 2..6u64 {
        let name = format!("00000001000000000000{s:04X}");
        a.repo
            .wal_push(sys, &name, b"stand-in segment", None)
            .unwrap();
    }
    let later = day0 + chrono::Duration::days(1);
    let mut bad = pg_info(sys, 4, later);
    bad.segment_size = 0;
    let planted = a.plant_pg_backup("db-1", later, bad).to_hex();
    let short = &planted[..8];

    for args in [&["snapshots"][..], &["info"]] {
        let o = t.run(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {err}");
        assert!(
            err.contains(&format!("snapshot {short} cannot be read"))
                && err.contains("segment size 0"),
            "{args:?}: {err}"
        );
    }
    let listed = t.json(&["snapshots"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["id"], good.to_hex());
    // Deleting by policy stops with the reason, rather than crash or count without it.
    for args in [
        &["forget", "--keep-last", "1", "--dry-run"][..],
        &["prune", "--dry-run"],
    ] {
        let err = t.fails(args, 14);
        assert!(
            err.contains("no cluster has") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    let v = t.run(&["verify"]);
    assert_eq!(v.status.code(), Some(14));
    assert!(String::from_utf8_lossy(&v.stderr).contains("segment size 0"));
    t.ok(&["forget", short]);
    t.ok(&["verify"]);
    // A WAL object whose 24th byte falls inside a character (storage holds any name):
    // placing WAL sliced the name there and panicked.
    a.repo
        .storage
        .put(
            &custos_repo::paths::wal(sys, "00000001000000000000000\u{e9}.partial"),
            b"planted",
            custos_storage::PutMode::CreateOnly,
        )
        .unwrap();
    let plan = t.json(&["forget", "--keep-last", "1", "--dry-run"]);
    assert_eq!(
        plan["plan"]["groups"][0]["window"]["from_before"],
        serde_json::to_value(day0).unwrap(),
        "{plan}"
    );
}

#[test]
fn a_snapshot_dated_at_the_end_of_the_calendar_is_kept_not_a_crash() {
    // A backup key dates its snapshots as it likes. An audit-log export dated a day before
    // the latest time chrono can hold made forget add its six-year minimum retention past
    // that end, and panic (exit 101), so retention stopped for every source.
    let t = T::new();
    let a = common::attack::Attacker::open(&t, PW);
    let end = chrono::DateTime::<chrono::Utc>::MAX_UTC - chrono::Duration::days(1);
    let id = a.plant_audit_export(end, None);
    let plan = t.json(&[
        "forget",
        "--keep-last",
        "1",
        "--keep-daily",
        "4294967295",
        "--dry-run",
    ]);
    let d = &plan["plan"]["groups"][0]["decisions"][0];
    assert_eq!(d["item"], id.to_hex(), "{plan}");
    assert_eq!(d["keep"], true, "{plan}");
}
