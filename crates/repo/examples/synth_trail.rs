//! Appends a synthetic operation trail for `bench/scale.sh`: `ENTRIES` signed, chained
//! entries as hourly jobs would leave them, dated back from now (the last few within the
//! last day), each appended as a command appends it (create-only, after the head).
//!
//! Usage: CUSTOS_PASSWORD=... synth_trail <local repository folder> <entries>

use std::sync::Arc;

use custos_repo::trail::Entry;
use custos_repo::{OpenOptions, Repository};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, n): (&str, i64) = match &args[..] {
        [_, d, n] => (d, n.parse().expect("a number of entries")),
        _ => {
            eprintln!("usage: synth_trail <local repository folder> <entries>");
            std::process::exit(2);
        }
    };
    let pw = std::env::var("CUSTOS_PASSWORD").expect("CUSTOS_PASSWORD");
    let storage = Arc::new(custos_storage::local::LocalStorage::new(dir));
    let repo = Repository::open(storage, pw.as_bytes(), OpenOptions::default()).expect("open");
    let hint = std::env::temp_dir().join(format!("synth-trail-{}", std::process::id()));
    let w = repo.trail_writer().with_hint(hint.clone());
    let now = chrono::Utc::now();
    // Ten sources' hourly jobs: an entry every 6 minutes, oldest first.
    for i in 0..n {
        let back = chrono::Duration::minutes(6 * (n - i));
        let e = Entry {
            time: now - back,
            role: "backup".into(),
            key: repo.key_id,
            host: format!("db-{}", i % 10),
            user: "postgres".into(),
            command: "backup files".into(),
            touched: serde_json::json!({"snapshot": format!("{i:064x}"), "bytes": 1 << 20}),
            result: "ok".into(),
            introduces: None,
            introduces_role: None,
            authority: None,
        };
        w.append(&e).expect("append");
        if i % 100_000 == 0 && i > 0 {
            eprintln!("{i} entries");
        }
    }
    let _ = std::fs::remove_file(hint);
    eprintln!("appended {n} trail entries");
}
