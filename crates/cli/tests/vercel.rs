//! Vercel Blob, the seed's document store, as a backup source. The real service cannot be
//! reached from here, so a small server in this file speaks its documented HTTP API:
//! listing with cursor pagination (three blobs a page, so a store spans several), the
//! token in the `Authorization` header, downloads from each blob's URL.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

const TOKEN: &str = "vercel_blob_rw_Ab3dEf6hIj9kLm2nOp5q_Rs8tUv1wXy4z";

#[derive(Default)]
struct Store {
    blobs: BTreeMap<String, Vec<u8>>,
    /// Listed, but gone by the time they are downloaded.
    vanishing: Vec<String>,
    /// Download requests that carried an Authorization header.
    leaked_token: usize,
    list_calls: usize,
}

fn respond(mut s: std::net::TcpStream, status: &str, ctype: &str, body: &[u8]) {
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(body);
}

fn query(q: &str, key: &str) -> Option<String> {
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%2F", "/").replace("%2f", "/"))
    })
}

/// Serves the store on 127.0.0.1; returns the API's address.
fn serve(store: Arc<Mutex<Store>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    let base = addr.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            let store = store.clone();
            let base = base.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let mut auth = None;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        if k.eq_ignore_ascii_case("authorization") {
                            auth = Some(v.trim().to_string());
                        }
                    }
                }
                let (path, q) = target.split_once('?').unwrap_or((&target, ""));
                let mut st = store.lock().unwrap();
                if let Some(name) = path.strip_prefix("/dl/") {
                    if auth.is_some() {
                        st.leaked_token += 1;
                    }
                    let name = name.split_once('/').map(|x| x.1).unwrap_or("");
                    match st.blobs.get(name) {
                        Some(b) if !st.vanishing.iter().any(|v| v == name) => {
                            respond(conn, "200 OK", "application/octet-stream", b)
                        }
                        _ => respond(conn, "404 Not Found", "text/plain", b"not found"),
                    }
                    return;
                }
                if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
                    respond(
                        conn,
                        "403 Forbidden",
                        "application/json",
                        br#"{"error":{"code":"forbidden","message":"Access denied, please provide a valid token for this resource."}}"#,
                    );
                    return;
                }
                st.list_calls += 1;
                let prefix = query(q, "prefix").unwrap_or_default();
                let start: usize = query(q, "cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
                let matching: Vec<(&String, &Vec<u8>)> = st
                    .blobs
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix))
                    .collect();
                let page: Vec<serde_json::Value> = matching
                    .iter()
                    .skip(start)
                    .take(3)
                    .map(|(k, v)| {
                        serde_json::json!({
                            "url": format!("{base}/dl/x7Yq2/{k}"),
                            "downloadUrl": format!("{base}/dl/x7Yq2/{k}?download=1"),
                            "pathname": k,
                            "size": v.len(),
                            "uploadedAt": "2026-11-30T10:00:00.000Z",
                            "contentDisposition": "attachment",
                        })
                    })
                    .collect();
                let more = start + 3 < matching.len();
                let body = serde_json::json!({
                    "blobs": page,
                    "cursor": if more { Some((start + 3).to_string()) } else { None },
                    "hasMore": more,
                });
                respond(
                    conn,
                    "200 OK",
                    "application/json",
                    body.to_string().as_bytes(),
                );
            });
        }
    });
    addr
}

#[test]
fn vercel_blob_store_is_backed_up_across_pages_with_a_vanished_blob_and_a_wrong_token() {
    let store = Arc::new(Mutex::new(Store::default()));
    {
        let mut s = store.lock().unwrap();
        for i in 0..8 {
            s.blobs.insert(
                format!("clinical/patient-{i:04}/note.pdf"),
                format!("%PDF-1.7 clinical note {i} ")
                    .repeat(500 + i * 37)
                    .into_bytes(),
            );
        }
        s.blobs
            .insert("other/ignored.txt".into(), b"not under the prefix".to_vec());
        s.vanishing.push("clinical/patient-0005/note.pdf".into());
    }
    let api = serve(store.clone());
    let mut t = T::new();
    let cfg = t.path("custos.toml");
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nurl = \"{}\"\n\n[storage.options]\nvercel_blob_api = \"{api}\"\n",
            t.repo
        ),
    )
    .unwrap();
    t.set("CUSTOS_CONFIG", cfg.to_str().unwrap());

    // A wrong token: one clear error, nothing written.
    t.set("BLOB_READ_WRITE_TOKEN", "vercel_blob_rw_wrong");
    let before = t.repo_state();
    let err = t.fails(&["backup", "files", "vercel_blob://clinical"], 12);
    assert!(
        err.contains("Vercel Blob refused the token") && err.contains("BLOB_READ_WRITE_TOKEN"),
        "{err}"
    );
    assert!(!err.contains("vercel_blob_rw_wrong"), "{err}");
    assert_eq!(t.repo_state(), before);

    // No token at all.
    t.unset("BLOB_READ_WRITE_TOKEN");
    let err = t.fails(&["backup", "files", "vercel_blob://clinical"], 2);
    assert!(err.contains("BLOB_READ_WRITE_TOKEN"), "{err}");

    t.set("BLOB_READ_WRITE_TOKEN", TOKEN);
    let out = t.run(&["backup", "files", "vercel_blob://clinical"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Partial (exit 3): the vanished blob is named; the snapshot is still made.
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("patient-0005/note.pdf: deleted after it was listed"),
        "{stderr}"
    );
    assert!(!stderr.contains(TOKEN));
    {
        let s = store.lock().unwrap();
        assert!(
            s.list_calls >= 3,
            "the listing did not page: {} calls",
            s.list_calls
        );
        assert_eq!(s.leaked_token, 0, "the token was sent to a download URL");
    }
    let to = t.path("restored");
    t.ok(&["restore", "files", "latest", "--to", to.to_str().unwrap()]);
    let s = store.lock().unwrap();
    let mut restored = 0;
    for (name, data) in &s.blobs {
        let Some(rel) = name.strip_prefix("clinical/") else {
            assert!(!to.join(name).exists());
            continue;
        };
        let p = to.join(rel);
        if s.vanishing.contains(name) {
            assert!(!p.exists());
        } else {
            assert_eq!(&std::fs::read(&p).unwrap(), data, "{rel}");
            restored += 1;
        }
    }
    assert_eq!(restored, 7);
    drop(s);

    // The token is never accepted from a file.
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nurl = \"{}\"\n\n[storage.options]\ntoken = \"{TOKEN}\"\n",
            t.repo
        ),
    )
    .unwrap();
    let err = t.fails(&["snapshots"], 2);
    assert!(
        err.contains("must not contain [storage.options] token"),
        "{err}"
    );
}
