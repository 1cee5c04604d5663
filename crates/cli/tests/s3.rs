//! The same repository on a real S3-compatible server (SeaweedFS on 127.0.0.1), and
//! buckets as a backup source.

mod common;
use common::*;
use custos_testkit::{S3Server, ACCESS_KEY, SECRET_KEY};

#[test]
fn repository_on_s3_backup_restore_verify_prune() {
    let server = S3Server::start();
    server.create_bucket("backups");
    let mut t = T::bare();
    t.on_s3(&server.endpoint, "s3://backups/clinic/prod");
    t.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    let src = t.path("src");
    make_tree(&src, 5, 40, 400_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    std::fs::write(src.join("docs/added.txt"), b"new document").unwrap();
    let r = t.json(&["backup", "files", src.to_str().unwrap()]);
    assert_eq!(r["stats"]["bytes_read"], 12);
    t.restore_latest("out");
    assert_eq!(describe(&t.path("out")), describe(&src));
    t.ok(&["verify", "--read-data"]);
    t.ok(&["forget", "--keep-last", "1"]);
    t.ok(&["prune"]);
    t.ok(&["verify", "--read-data"]);
    t.restore_latest("out2");
    assert_eq!(describe(&t.path("out2")), describe(&src));

    // Bad credentials: one clear storage error naming what to check, no secret shown.
    t.set("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let err = t.fails(&["snapshots"], 15);
    assert!(
        err.contains("refused the credentials") || err.contains("denied"),
        "{err}"
    );
    assert!(
        err.contains("AWS_SECRET_ACCESS_KEY") && !err.contains("not-the-secret"),
        "{err}"
    );
}

#[test]
fn bucket_objects_as_a_backup_source() {
    let server = S3Server::start();
    server.create_bucket("repo");
    server.create_bucket("documents");
    let mut t = T::bare();
    t.on_s3(&server.endpoint, "s3://repo/r");
    t.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    // Fill the source bucket through custos's own storage layer (a plain S3 client).
    let opts = custos_storage::remote::S3Options {
        bucket: "documents".into(),
        root: String::new(),
        endpoint: Some(server.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some(ACCESS_KEY.into()),
        secret_access_key: Some(SECRET_KEY.into()),
        session_token: None,
        ..Default::default()
    };
    let bucket = custos_storage::remote::RemoteStorage::s3(&opts).unwrap();
    use custos_storage::Storage;
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..12 {
        let body: Vec<u8> = (0..(i * 37_000 + 5)).map(|j| (j * (i + 3)) as u8).collect();
        let key = format!("uploads/patient-{i:03}/scan.pdf");
        bucket
            .put(&key, &body, custos_storage::PutMode::Overwrite)
            .unwrap();
        expected.insert(format!("patient-{i:03}/scan.pdf"), body);
    }
    bucket
        .put(
            "other/ignored.txt",
            b"outside the prefix",
            custos_storage::PutMode::Overwrite,
        )
        .unwrap();
    let r = t.json(&["backup", "files", "s3://documents/uploads"]);
    assert_eq!(r["stats"]["files"], 12);
    assert_eq!(r["kind"], "bucket");
    t.restore_latest("out");
    for (k, v) in &expected {
        assert_eq!(&std::fs::read(t.path("out").join(k)).unwrap(), v, "{k}");
    }
    assert!(!t.path("out/other").exists() && !t.path("out/ignored.txt").exists());

    // The next backup reads only what changed: an object rewritten (the same size, other
    // bytes), a new one; one deleted is gone from the snapshot. Unchanged objects (size,
    // modification time and MD5 as recorded) are not read again.
    let changed: Vec<u8> = expected["patient-003/scan.pdf"]
        .iter()
        .map(|b| b ^ 0x5a)
        .collect();
    bucket
        .put(
            "uploads/patient-003/scan.pdf",
            &changed,
            custos_storage::PutMode::Overwrite,
        )
        .unwrap();
    expected.insert("patient-003/scan.pdf".into(), changed.clone());
    bucket
        .put(
            "uploads/patient-100/new.pdf",
            b"a new scan",
            custos_storage::PutMode::Overwrite,
        )
        .unwrap();
    expected.insert("patient-100/new.pdf".into(), b"a new scan".to_vec());
    bucket.delete("uploads/patient-007/scan.pdf").unwrap();
    expected.remove("patient-007/scan.pdf");
    let r = t.json(&["backup", "files", "s3://documents/uploads"]);
    assert_eq!(r["stats"]["files"], 12, "{r}");
    assert_eq!(r["stats"]["files_unchanged"], 10, "{r}");
    assert_eq!(
        r["stats"]["bytes_read"].as_u64().unwrap(),
        changed.len() as u64 + 10,
        "{r}"
    );
    let out2 = t.path("out2");
    t.ok(&["restore", "files", "latest", "--to", out2.to_str().unwrap()]);
    let mut got = std::collections::BTreeMap::new();
    for f in walkdir(&out2) {
        let k = f.strip_prefix(&out2).unwrap().display().to_string();
        got.insert(k, std::fs::read(&f).unwrap());
    }
    assert_eq!(got, expected);
    // Nothing changed: nothing read.
    let r = t.json(&["backup", "files", "s3://documents/uploads"]);
    assert_eq!(r["stats"]["files_unchanged"], 12, "{r}");
    assert_eq!(r["stats"]["bytes_read"], 0, "{r}");
    t.ok(&["verify", "--read-data"]);
}

#[test]
fn unreachable_endpoint_fails_fast_and_clearly() {
    let mut t = T::bare();
    t.on_s3(custos_testkit::CLOSED_ENDPOINT, "s3://nowhere/x");
    let err = t.fails(&["snapshots"], 15);
    assert!(
        err.contains("cannot reach") && err.contains("endpoint"),
        "{err}"
    );
}

#[test]
fn s3_errors_a_missing_bucket_an_endpoint_that_never_answers_an_unknown_scheme() {
    let server = S3Server::start();
    let mut t = T::bare();
    t.on_s3(&server.endpoint, "s3://no-such-bucket/prod");
    // A missing bucket: one error with a hint, exit 15, for init as for any command.
    for args in [vec!["snapshots"], vec!["init", "--kdf-memory-mib", "8"]] {
        let err = t.fails(&args, 15);
        assert!(
            err.contains("bucket `no-such-bucket` does not exist"),
            "{err}"
        );
        assert!(err.contains("hint: create the bucket"), "{err}");
        assert_eq!(err.lines().count(), 2, "{err}");
    }

    // An endpoint that accepts connections and never answers: the configured wait, then
    // a clear storage error.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = vec![];
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let cfg = t.path("custos.toml");
    std::fs::write(
        &cfg,
        "[storage]\ntimeout = \"1s\"\nio_timeout = \"1s\"\nconnect_timeout = \"1s\"\nretries = 0\n",
    )
    .unwrap();
    t.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    t.set("AWS_ENDPOINT_URL", &format!("http://{addr}"));
    let err = t.fails(&["snapshots"], 15);
    assert!(err.contains("did not answer in time"), "{err}");
    assert!(err.contains("io_timeout"), "{err}");
    std::fs::write(&cfg, "[storage]\ntimeout = \"soon\"\n").unwrap();
    let err = t.fails(&["snapshots"], 2);
    assert!(err.contains("timeout = \"soon\""), "{err}");

    // An unknown scheme lists the ones there are.
    t.unset("CUSTOS_CONFIG");
    t.set("CUSTOS_REPO", "gdrive://backups");
    let err = t.fails(&["snapshots"], 2);
    assert!(
        err.contains("unknown storage scheme") && err.contains("s3://"),
        "{err}"
    );
}

/// S3 over HTTPS with a private CA: with the CA named as `ca_file` a backup and restore
/// work and verify; a server certificate signed by another CA, or no `ca_file` at all, is
/// refused with one clear error (exit 15) and nothing is written.
#[test]
fn s3_over_https_trusts_the_named_ca_and_refuses_any_other() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = custos_testkit::tls_files(certs.path(), "site");
    let (other_ca, _, _) = custos_testkit::tls_files(certs.path(), "other");
    let server = S3Server::start_tls(&cert, &key);
    assert!(server.endpoint.starts_with("https://"));
    server.create_bucket("secure");
    let mut t = T::bare();
    t.unset("CUSTOS_REPO");
    let secret = t.path("s3.secret");
    std::fs::write(&secret, SECRET_KEY).unwrap();
    let cfg = t.path("custos.toml");
    let write = |ca: Option<&std::path::Path>| {
        std::fs::write(
            &cfg,
            format!(
                "[repository]\nurl = \"s3://secure/clinic\"\n[storage.s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key_file = \"{}\"\n{}",
                server.endpoint,
                secret.display(),
                ca.map(|c| format!("ca_file = \"{}\"\n", c.display())).unwrap_or_default()
            ),
        )
        .unwrap();
    };
    t.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    write(Some(&ca));
    t.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
    let src = t.path("src");
    make_tree(&src, 2, 10, 100_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let out = t.path("out");
    t.ok(&["restore", "files", "latest", "--to", out.to_str().unwrap()]);
    assert_eq!(describe(&out), describe(&src));
    t.ok(&["verify", "--read-data"]);

    for wrong in [Some(other_ca.as_path()), None] {
        write(wrong);
        let e = t.fails(&["backup", "files", src.to_str().unwrap()], 15);
        assert!(
            e.contains("TLS certificate is not trusted") && e.contains("ca_file"),
            "{e}"
        );
        assert_eq!(e.matches("custos: error").count(), 1, "{e}");
    }
    write(Some(&ca));
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), 1);
}

/// A store that throttles (503 SlowDown), cuts uploads off half-way, and loses the answer
/// to a write it carried out: each write is retried, the backup completes, every operation
/// is in the trail once, and what was stored restores exactly. A store that keeps
/// throttling fails the backup with one clear error, leaves no snapshot behind, and the
/// next run completes.
#[test]
fn throttling_and_dropped_connections_are_retried_and_nothing_is_half_written() {
    use custos_testkit::proxy::{Fault, S3Proxy};
    let server = S3Server::start();
    server.create_bucket("flaky");
    let proxy = S3Proxy::start(&server.endpoint);
    let mut t = T::bare();
    t.on_s3(&proxy.endpoint, "s3://flaky/r");
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
    make_tree(&src, 4, 12, 300_000);
    let kinds = [Fault::SlowDown, Fault::DropRequest, Fault::DropResponse];
    proxy.faults(2, &kinds.repeat(4));
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let dealt = proxy.dealt();
    for k in kinds {
        assert!(
            dealt.iter().any(|(f, _)| *f == k),
            "{k:?} never dealt: {dealt:?}"
        );
    }
    // The answer lost to each kind of create-only write (the store holds the object, the
    // retry finds it there), one backup for each.
    let kinds_of_object = ["audit/", "index/", "snapshots/", "locks/", "hints/"];
    for (i, prefix) in kinds_of_object.iter().enumerate() {
        std::fs::write(
            src.join(format!("docs/more-{i}.bin")),
            vec![i as u8; 400_000],
        )
        .unwrap();
        let before = proxy.dealt().len();
        proxy.faults_on(&format!("/flaky/r/{prefix}"), 1, &[Fault::DropResponse]);
        t.ok(&["backup", "files", src.to_str().unwrap()]);
        assert_eq!(proxy.dealt().len(), before + 1, "{prefix}: no fault dealt");
    }
    // Every operation is in the trail once: no entry doubled by a retry.
    let log = t.json(&["audit", "log"]);
    let commands: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["entry"]["command"].as_str())
        .collect();
    assert_eq!(
        commands.iter().filter(|c| **c == "backup files").count(),
        1 + kinds_of_object.len(),
        "{commands:?}"
    );
    let snapshots = 1 + kinds_of_object.len();
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), snapshots);
    t.ok(&["audit", "verify"]);
    t.ok(&["verify", "--read-data"]);
    t.restore_latest("out");
    assert_eq!(describe(&t.path("out")), describe(&src));

    // Throttled for good: one clear error, no snapshot, nothing the next run trips on.
    std::fs::write(src.join("docs/new.bin"), vec![7u8; 900_000]).unwrap();
    proxy.throttle(true);
    let err = t.fails(&["backup", "files", src.to_str().unwrap()], 15);
    assert!(err.contains("SlowDown") || err.contains("throttl"), "{err}");
    assert!(err.lines().count() <= 6, "{err}");
    proxy.throttle(false);
    assert_eq!(t.json(&["snapshots"]).as_array().unwrap().len(), snapshots);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    assert_eq!(
        t.json(&["snapshots"]).as_array().unwrap().len(),
        snapshots + 1
    );
    t.ok(&["verify", "--read-data"]);
    t.restore_latest("out2");
    assert_eq!(describe(&t.path("out2")), describe(&src));
}
