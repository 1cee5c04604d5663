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
