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
    let t = T::new();
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
