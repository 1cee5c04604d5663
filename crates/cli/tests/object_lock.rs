//! S3 Object Lock on a real server (SeaweedFS): every object custos writes carries a
//! retain-until date from the retention policy; a promoted snapshot's objects get theirs
//! extended by `lock refresh`; forget and prune delete only what the store no longer
//! holds and say until when the rest is kept; not even the server's admin credentials
//! delete a locked pack.

mod common;
use common::*;
use custos_storage::objectlock::{LockMode, WriteLock};
use custos_storage::remote::{RemoteStorage, S3Options};
use custos_storage::Storage;
use custos_testkit::{S3Server, ACCESS_KEY, SECRET_KEY};

fn opts(server: &S3Server, bucket: &str, root: &str) -> S3Options {
    S3Options {
        bucket: bucket.into(),
        root: root.into(),
        endpoint: Some(server.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some(ACCESS_KEY.into()),
        secret_access_key: Some(SECRET_KEY.into()),
        ..Default::default()
    }
}

/// The store's view with the server's admin credentials (the same identity custos uses
/// here: SeaweedFS's one admin).
fn admin(server: &S3Server) -> RemoteStorage {
    let o = opts(server, "worm", "clinic");
    RemoteStorage::s3(&o)
        .unwrap()
        .with_object_lock(
            &o,
            WriteLock {
                mode: LockMode::Governance,
                // Dated kinds: a delete is of every version, never a delete marker.
                spans: vec![("data".into(), std::time::Duration::from_secs(1))],
            },
        )
        .unwrap()
}

fn until(s: &RemoteStorage, path: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    s.object_lock()
        .unwrap()
        .retention(path)
        .unwrap()
        .map(|r| r.until)
}

/// `backup stream` of `data`, at `time` when given; the new snapshot's id.
fn stream(t: &T, name: &str, time: Option<&str>, data: &[u8]) -> String {
    let mut args = vec!["backup", "stream", "--name", name, "--json"];
    if let Some(x) = time {
        args.extend(["--time", x]);
    }
    let o = t.run_stdin(&args, data);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    r["snapshot"].as_str().unwrap().to_string()
}

#[test]
fn object_lock_dates_every_write_extends_promotions_and_holds_forget_and_prune() {
    let server = S3Server::start();
    RemoteStorage::create_locked_bucket(&opts(&server, "worm", "")).unwrap();
    server.create_bucket("plain");
    let mut t = T::bare();
    let cfg = t.path("custos.toml");
    let write_cfg = |url: &str| {
        std::fs::write(
            &cfg,
            format!(
                "[repository]\nurl = \"{url}\"\n[storage.s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"{ACCESS_KEY}\"\n\
                 [retention]\nkeep_monthly = 2\nkeep_within = \"5s\"\n[object_lock]\nmode = \"governance\"\n\
                 [[job]]\nname = \"lock-refresh\"\nrun = \"lock-refresh\"\nschedule = \"30 6 * * *\"\n",
                server.endpoint
            ),
        )
        .unwrap();
    };
    t.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    t.set("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    t.unset("CUSTOS_REPO");

    // A bucket without Object Lock is refused, with what to do.
    write_cfg("s3://plain/clinic");
    let e = t.fails(
        &["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"],
        2,
    );
    assert!(
        e.contains("has no Object Lock") && e.contains("bucket-policy"),
        "{e}"
    );

    write_cfg("s3://worm/clinic");
    t.ok(&["config", "check"]);
    t.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    let now = chrono::Utc::now();
    let old_time = (now - chrono::Duration::days(40))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    // Last month's snapshot (its month has a later snapshot: the monthly pick is final),
    // then this month's.
    let old = stream(&t, "ledger", Some(&old_time), b"last month's ledger rows");
    let s = admin(&server);
    let snaps = s.list("snapshots").unwrap();
    assert_eq!(snaps.len(), 1);
    let old_path = snaps[0].path.clone();
    let packs_before: Vec<String> = s
        .list("data")
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert!(!packs_before.is_empty());
    // Every object custos dates carries a date from its write: the policy's shortest
    // span (5 s); the trail the longest retention (the audit log's 6 years).
    let written = until(&s, &old_path).expect("the snapshot is dated");
    assert!(
        written > now && written < now + chrono::Duration::seconds(30),
        "{written}"
    );
    for p in &packs_before {
        assert!(until(&s, p).is_some(), "pack {p} undated");
    }
    for e in s.list("index").unwrap() {
        assert!(until(&s, &e.path).is_some(), "index {} undated", e.path);
    }
    let trail = s.list("audit").unwrap();
    assert!(!trail.is_empty());
    let trail_until = until(&s, &trail[0].path).expect("the trail is dated");
    assert!(
        trail_until > now + chrono::Duration::days(365 * 6 - 2),
        "{trail_until}"
    );
    assert_eq!(until(&s, "config"), None, "config is not dated");

    // A fresh snapshot this month: the old one becomes last month's monthly, final.
    let newest = stream(&t, "ledger", None, b"this month's ledger rows");

    let st = t.json(&["lock", "status"]);
    let rows = st["snapshots"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().any(|r| r["behind"] == true), "{st}");

    let r = t.json(&["lock", "refresh"]);
    assert!(r["extended"].as_u64().unwrap() >= 2, "{r}");
    // The promoted snapshot and its data: two months from its time.
    let want = chrono::DateTime::parse_from_rfc3339(&old_time)
        .unwrap()
        .with_timezone(&chrono::Utc)
        .checked_add_months(chrono::Months::new(2))
        .unwrap();
    let got = until(&s, &old_path).unwrap();
    assert!((got - want).num_seconds().abs() <= 1, "{got} vs {want}");
    for p in &packs_before {
        assert!(
            until(&s, p).unwrap() >= want - chrono::Duration::seconds(1),
            "pack {p}"
        );
    }
    let st = t.json(&["lock", "status"]);
    assert_eq!(st["behind"], 0, "{st}");
    let text = t.ok(&["lock", "refresh"]);
    assert!(
        text.contains("extended 0"),
        "a second refresh changes nothing: {text}"
    );

    // Not even the server's admin credentials delete a locked pack: the store refuses.
    let e = s.delete(&packs_before[0]).unwrap_err();
    assert!(e.message.contains("under Object Lock"), "{}", e.message);
    assert!(s.size(&packs_before[0]).unwrap().is_some());

    // A restore key with delete rights cannot shorten history: forget names the date.
    assert!(old_path.ends_with(&old));
    let out = t.ok(&["forget", &old]);
    assert!(
        out.contains("by Object Lock") && out.contains(&want.format("%Y-%m-%d").to_string()),
        "{out}"
    );
    assert!(s.size(&old_path).unwrap().is_some());

    // A snapshot whose date has passed goes, and prune frees its data; a pack still held
    // (here extended by hand, as a longer policy would have) stays until its date.
    let scratch: Vec<u8> = (0..300_000u32)
        .map(|i| (i % 251) as u8 ^ (i >> 9) as u8)
        .collect();
    let packs_mid: Vec<String> = s
        .list("data")
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .collect();
    let scratch_id = stream(&t, "scratch", None, &scratch);
    let new_packs: Vec<String> = s
        .list("data")
        .unwrap()
        .into_iter()
        .map(|e| e.path)
        .filter(|p| !packs_mid.contains(p))
        .collect();
    assert_eq!(new_packs.len(), 1, "{new_packs:?}");
    let early = t.ok(&["forget", &scratch_id]);
    assert!(
        early.contains("kept until") && early.contains("by Object Lock"),
        "{early}"
    );
    std::thread::sleep(std::time::Duration::from_secs(6));
    let held_until = chrono::Utc::now() + chrono::Duration::seconds(6);
    let held_pack = new_packs
        .last()
        .expect("the scratch data has a pack")
        .clone();
    s.object_lock()
        .unwrap()
        .extend(&held_pack, held_until)
        .unwrap();
    let gone = t.ok(&["forget", &scratch_id]);
    assert!(gone.contains("removed 1 snapshot"), "{gone}");
    let p = t.ok(&["prune"]);
    assert!(p.contains("by Object Lock") && p.contains("data 1"), "{p}");
    assert!(
        s.size(&held_pack).unwrap().is_some(),
        "a held pack was deleted"
    );
    t.ok(&["verify", "--read-data"]);
    std::thread::sleep(
        (held_until - chrono::Utc::now())
            .to_std()
            .unwrap_or_default()
            + std::time::Duration::from_secs(1),
    );
    let p = t.ok(&["prune"]);
    assert!(!p.contains("data 1"), "{p}");
    assert_eq!(
        s.size(&held_pack).unwrap(),
        None,
        "the pack outlived its date"
    );
    for pk in &packs_before {
        assert!(
            s.size(pk).unwrap().is_some(),
            "the promoted snapshot's pack {pk} went"
        );
    }
    t.ok(&["verify", "--read-data"]);
    let o = t.run(&["restore", "stream", &newest]);
    assert!(o.status.success());
    assert_eq!(o.stdout, b"this month's ledger rows");
}

#[test]
fn bucket_policy_names_lock_versioning_and_the_seeds_tiers() {
    let t = T::bare();
    let out = t.ok(&[
        "bucket-policy",
        "--bucket",
        "backups",
        "--prefix",
        "prod",
        "--cold-class",
        "GLACIER",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["versioning"]["Status"], "Enabled");
    assert_eq!(v["object_lock"]["ObjectLockEnabled"], "Enabled");
    let rules = v["lifecycle"]["Rules"].as_array().unwrap();
    let packs = rules
        .iter()
        .find(|r| r["Filter"]["And"]["Prefix"] == "prod/data/")
        .expect("packs tiered");
    // Only data packs (tagged): the packs holding manifests stay hot.
    assert_eq!(packs["Filter"]["And"]["Tags"][0]["Key"], "custos-tier");
    assert_eq!(packs["Filter"]["And"]["Tags"][0]["Value"], "archival");
    assert_eq!(packs["Transitions"][0]["Days"], 91);
    assert_eq!(packs["Transitions"][0]["StorageClass"], "STANDARD_IA");
    assert_eq!(packs["Transitions"][1]["Days"], 366);
    assert_eq!(packs["Transitions"][1]["StorageClass"], "GLACIER");
    assert!(
        rules
            .iter()
            .all(|r| r["Filter"]["Prefix"] != "prod/snapshots/"),
        "snapshots stay hot"
    );
    // No custos policy lets anyone bypass a retention.
    for role in ["backup", "restore", "audit"] {
        let p = t.ok(&[
            "iam-policy",
            "--role",
            role,
            "--bucket",
            "backups",
            "--allow-delete",
        ]);
        assert!(!p.contains("BypassGovernanceRetention"), "{role}: {p}");
    }
}

/// Packs the bucket's lifecycle moved to an archival class (a proxy plays S3's answers for
/// them: SeaweedFS has no GLACIER): a restore names the cause and the way out instead of a
/// denial; `--request-cold` asks every pack back at once and waits (exit 21), asks nothing
/// twice, and restores the data once the store brought them back.
#[test]
fn archived_packs_are_asked_back_all_at_once_and_the_restore_waits() {
    let server = S3Server::start();
    server.create_bucket("docs");
    let proxy = custos_testkit::proxy::S3Proxy::start(&server.endpoint);
    let mut t = T::bare();
    t.on_s3(&proxy.endpoint, "s3://docs/r");
    t.ok(&[
        "init",
        "--kdf-memory-mib",
        "8",
        "--kdf-iterations",
        "1",
        "--pack-size-mib",
        "1",
    ]);
    let src = t.path("src");
    make_tree(&src, 11, 30, 300_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let all = RemoteStorage::s3(&opts(&server, "docs", "r"))
        .unwrap()
        .list("data")
        .unwrap()
        .len();
    // The lifecycle rule moves packs tagged archival: data only. The manifest's pack is not
    // tagged, so listing and planning a restore need nothing brought back.
    let packs = proxy.archive_tagged();
    assert!(packs >= 2 && packs < all, "{packs} of {all} packs tagged");
    assert!(proxy
        .tagged()
        .iter()
        .all(|p| p.starts_with("/docs/r/data/")));
    let ls = t.ok(&["ls", "latest"]);
    assert!(ls.lines().count() >= 30, "{ls}");

    let out = t.path("out");
    let e = t.fails(
        &["restore", "files", "latest", "--to", out.to_str().unwrap()],
        15,
    );
    assert!(
        e.contains("cold storage class") && e.contains("--request-cold"),
        "{e}"
    );
    assert!(!e.contains("denied"), "{e}");
    let _ = std::fs::remove_dir_all(&out);

    let args = [
        "restore",
        "files",
        "latest",
        "--to",
        out.to_str().unwrap(),
        "--request-cold",
    ];
    let e = t.fails(&args, 21);
    assert!(e.contains(&format!("{packs} requested now")), "{e}");
    assert_eq!(
        proxy.requested().len(),
        packs,
        "every pack asked back at once"
    );
    assert!(!out.exists(), "the restore waits before it writes anything");
    let e = t.fails(&args, 21);
    assert!(
        e.contains("0 requested now") && e.contains(&format!("{packs} already on their way")),
        "{e}"
    );
    assert_eq!(proxy.requested().len(), packs);

    proxy.finish_restores();
    let _ = std::fs::remove_dir_all(&out);
    t.ok(&args);
    assert_eq!(describe(&out), describe(&src));
}

/// A secondary with Object Lock (`[[secondary]] object_lock = true`): `copy` streams each
/// object from one bucket into the other and dates it there as the primary's writes are.
#[test]
fn a_locked_secondary_gets_every_copied_object_dated() {
    let (a, b) = (S3Server::start(), S3Server::start());
    RemoteStorage::create_locked_bucket(&opts(&a, "worm", "")).unwrap();
    RemoteStorage::create_locked_bucket(&opts(&b, "drsite", "")).unwrap();
    let mut t = T::bare();
    let cfg = t.path("custos.toml");
    let secret = t.path("dr.secret");
    std::fs::write(&secret, SECRET_KEY).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nurl = \"s3://worm/clinic\"\n[storage.s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"{ACCESS_KEY}\"\n\
             [retention]\nkeep_monthly = 2\nkeep_within = \"1h\"\n[object_lock]\nmode = \"governance\"\n\
             [[secondary]]\nname = \"dr\"\nurl = \"s3://drsite/clinic\"\nobject_lock = true\n[secondary.s3]\nendpoint = \"{}\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key_file = \"{}\"\n",
            a.endpoint, b.endpoint, secret.display()
        ),
    )
    .unwrap();
    t.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    t.set("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    t.unset("CUSTOS_REPO");
    t.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    stream(&t, "ledger", None, &data);
    let before = chrono::Utc::now();
    t.ok(&["copy"]);
    let dr = {
        let o = opts(&b, "drsite", "clinic");
        RemoteStorage::s3(&o)
            .unwrap()
            .with_object_lock(
                &o,
                WriteLock {
                    mode: LockMode::Governance,
                    // A dated kind: its delete is of every version, not a marker.
                    spans: vec![("data".into(), std::time::Duration::from_secs(1))],
                },
            )
            .unwrap()
    };
    let primary = RemoteStorage::s3(&opts(&a, "worm", "clinic")).unwrap();
    let packs = dr.list("data").unwrap();
    assert!(!packs.is_empty());
    for dir in ["data", "index", "snapshots"] {
        for e in dr.list(dir).unwrap() {
            let u = until(&dr, &e.path).unwrap_or_else(|| panic!("{} undated", e.path));
            assert!(
                u > before + chrono::Duration::minutes(50),
                "{}: {u}",
                e.path
            );
            assert_eq!(dr.get(&e.path).unwrap(), primary.get(&e.path).unwrap());
        }
    }
    // The store holds them: not even its admin deletes a copied pack early.
    assert!(dr.delete(&packs[0].path).is_err());
    let o = t.run(&["--secondary", "dr", "restore", "stream", "latest"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout == data, "the secondary's restore differs");
}
