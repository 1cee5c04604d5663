//! Writes `N` small snapshot objects (summaries of hourly stream backups over the past,
//! empty bodies) into a local repository, for `bench/scale.sh`'s measure of commands that
//! list every snapshot after years of history.
//!
//! Usage: CUSTOS_PASSWORD=... synth_history <local repository folder> <snapshots>

use std::sync::Arc;

use custos_repo::snapshot::{SnapshotBody, SnapshotStats, SnapshotSummary, SourceKind};
use custos_repo::{OpenOptions, Repository};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, n): (&str, u32) = match &args[..] {
        [_, d, n] => (d, n.parse().expect("a number of snapshots")),
        _ => {
            eprintln!("usage: synth_history <local repository folder> <snapshots>");
            std::process::exit(2);
        }
    };
    let pw = std::env::var("CUSTOS_PASSWORD").expect("CUSTOS_PASSWORD");
    let storage = Arc::new(custos_storage::local::LocalStorage::new(dir));
    let repo = Repository::open(storage, pw.as_bytes(), OpenOptions::default()).expect("open");
    let now = chrono::Utc::now();
    for i in 0..n {
        let summary = SnapshotSummary {
            time: now - chrono::Duration::hours(i64::from(n - i)),
            kind: SourceKind::Stream,
            source: format!("history-{}", i % 10),
            host: "synth".into(),
            user: "synth".into(),
            parent: None,
            tags: vec![],
            stats: SnapshotStats::default(),
            key: repo.key_id,
            pg: None,
            facts: None,
            trail: None,
        };
        repo.save_snapshot(&summary, &SnapshotBody::default())
            .expect("snapshot");
    }
    println!("{n} snapshots written");
}
