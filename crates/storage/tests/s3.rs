use std::sync::Arc;

use custos_model::Kind;
use custos_storage::remote::{RemoteStorage, S3Options};
use custos_storage::Storage;
use custos_testkit::{S3Server, ACCESS_KEY, SECRET_KEY};

fn opts(server: &S3Server, bucket: &str) -> S3Options {
    S3Options {
        bucket: bucket.into(),
        root: "repo/one".into(),
        endpoint: Some(server.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some(ACCESS_KEY.into()),
        secret_access_key: Some(SECRET_KEY.into()),
        session_token: None,
        ..Default::default()
    }
}

#[test]
fn s3_storage_conforms_and_refuses_bad_credentials() {
    let server = S3Server::start();
    server.create_bucket("conf");
    custos_storage::conformance::run(Arc::new(RemoteStorage::s3(&opts(&server, "conf")).unwrap()));

    let mut bad = opts(&server, "conf");
    bad.secret_access_key = Some("wrong-secret".into());
    let e = RemoteStorage::s3(&bad)
        .unwrap()
        .list("snapshots")
        .unwrap_err();
    assert_eq!(e.kind, Kind::Storage);
    assert!(
        e.hint.unwrap().contains("AWS_SECRET_ACCESS_KEY"),
        "{}",
        e.message
    );
    assert!(
        !e.message.contains("wrong-secret"),
        "secret leaked into message"
    );
}

#[test]
fn unreachable_endpoint_is_a_clear_storage_error() {
    let o = S3Options {
        bucket: "b".into(),
        endpoint: Some(custos_testkit::CLOSED_ENDPOINT.to_string()),
        access_key_id: Some(ACCESS_KEY.into()),
        secret_access_key: Some(SECRET_KEY.into()),
        ..Default::default()
    };
    let e = RemoteStorage::s3(&o).unwrap().get("config").unwrap_err();
    assert_eq!(e.kind, Kind::Storage);
    assert!(e.message.contains("cannot reach"), "{}", e.message);
}

/// Object Lock on a real S3 server: writes carry their date, an object under lock cannot
/// be deleted (not by custos, not by the server's admin credentials deleting the version),
/// a date can be extended and not shortened, and once it passes the object goes for good.
#[test]
fn object_lock_dates_writes_refuses_early_deletes_and_extends() {
    use custos_storage::objectlock::{LockMode, WriteLock};
    use custos_storage::PutMode;
    let server = S3Server::start();
    let o = opts(&server, "locked");
    RemoteStorage::create_locked_bucket(&o).unwrap();
    // A plain bucket is refused for Object Lock, with what to do.
    server.create_bucket("plain");
    let w = WriteLock {
        mode: LockMode::Governance,
        spans: vec![
            ("data".into(), std::time::Duration::from_secs(4)),
            ("trail".into(), std::time::Duration::from_secs(3600)),
        ],
    };
    let e = RemoteStorage::s3(&opts(&server, "plain"))
        .unwrap()
        .with_object_lock(&opts(&server, "plain"), w.clone())
        .err()
        .expect("a bucket without Object Lock is refused");
    assert!(e.message.contains("has no Object Lock"), "{}", e.message);

    let s = RemoteStorage::s3(&o)
        .unwrap()
        .with_object_lock(&o, w)
        .unwrap();
    let l = s.object_lock().expect("lock");
    let t0 = chrono::Utc::now();
    assert_eq!(
        s.put("data/ab/p1", b"pack one", PutMode::CreateOnly)
            .unwrap(),
        custos_storage::PutOutcome::Created
    );
    assert_eq!(
        s.put("data/ab/p1", b"other", PutMode::CreateOnly).unwrap(),
        custos_storage::PutOutcome::AlreadyExists
    );
    s.put("locks/l1", b"lock", PutMode::CreateOnly).unwrap();
    let r = l
        .retention("data/ab/p1")
        .unwrap()
        .expect("written with a date");
    assert_eq!(r.mode, LockMode::Governance);
    assert!(
        r.until > t0 && r.until <= t0 + chrono::Duration::seconds(6),
        "{r:?}"
    );
    assert_eq!(l.retention("locks/l1").unwrap(), None);
    // A lock object has no date: it goes, every version of it.
    s.delete("locks/l1").unwrap();
    assert!(s.list("locks").unwrap().is_empty());
    // Under lock: custos's delete is refused with the object and its date.
    let e = s.delete("data/ab/p1").unwrap_err();
    assert!(
        e.message.contains("under Object Lock") && e.message.contains("data/ab/p1"),
        "{}",
        e.message
    );
    assert_eq!(s.get("data/ab/p1").unwrap(), b"pack one");
    // Extended past the first date, it survives that date.
    l.extend("data/ab/p1", t0 + chrono::Duration::seconds(8))
        .unwrap();
    let r2 = l.retention("data/ab/p1").unwrap().unwrap();
    assert!(r2.until >= t0 + chrono::Duration::seconds(7), "{r2:?}");
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert!(
        s.delete("data/ab/p1").is_err(),
        "deleted before its extended date"
    );
    std::thread::sleep(
        (r2.until - chrono::Utc::now()).to_std().unwrap_or_default()
            + std::time::Duration::from_secs(1),
    );
    s.delete("data/ab/p1").unwrap();
    assert!(s.list("data").unwrap().is_empty());
    assert_eq!(s.size("data/ab/p1").unwrap(), None);
}
