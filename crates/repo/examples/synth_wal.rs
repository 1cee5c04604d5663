//! Archives `N` WAL segments of 16 MiB (synthetic: repeated text with every eighth byte
//! random, about 7x compressible, as pgbench's WAL is 9x) for one made-up cluster into a local repository, as `wal-push` stores
//! them, for `bench/scale.sh`'s measure of `verify` over years of archive.
//!
//! Usage: CUSTOS_PASSWORD=... synth_wal <local repository folder> <segments>

use std::sync::Arc;

use custos_repo::{OpenOptions, Repository};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (dir, n): (&str, u32) = match &args[..] {
        [_, d, n] => (d, n.parse().expect("a number of segments")),
        _ => {
            eprintln!("usage: synth_wal <local repository folder> <segments>");
            std::process::exit(2);
        }
    };
    let pw = std::env::var("CUSTOS_PASSWORD").expect("CUSTOS_PASSWORD");
    let storage = Arc::new(custos_storage::local::LocalStorage::new(dir));
    let repo = Repository::open(storage, pw.as_bytes(), OpenOptions::default()).expect("open");
    let mut seg = vec![0u8; 16 << 20];
    for (i, b) in seg.iter_mut().enumerate() {
        *b = if i % 8 == 0 {
            rand::random()
        } else {
            b"INSERT INTO pgbench_history VALUES "[i % 35]
        };
    }
    let system_id = 0x7000_0000_0000_0001u64;
    for i in 0..n {
        seg[..4].copy_from_slice(&i.to_le_bytes());
        let name = format!("00000001{:08X}{:08X}", (i + 1) / 256, (i + 1) % 256);
        repo.wal_push_with(system_id, &name, &seg, false, None)
            .expect("push");
    }
    println!("{n} segments archived");
}
