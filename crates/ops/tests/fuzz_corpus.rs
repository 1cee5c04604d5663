//! Every fuzz target's corpus (`fuzz/corpus/<target>`, kept in the repository: real
//! objects of a repository, plaintexts, and what the fuzzers found) replayed on the stable
//! toolchain, each input also cut short and with bytes flipped: a decoder that panics on
//! any of them fails the suite, naming the input. The long runs are cargo fuzz's
//! (`fuzz/`, bench/RESULTS.md).

use std::path::Path;

#[test]
fn every_fuzz_corpus_replays_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let targets = custos_ops::fuzzing::targets();
    for (name, f) in &targets {
        assert!(
            root.join("fuzz_targets")
                .join(format!("{name}.rs"))
                .exists(),
            "fuzz target {name} has no fuzz_targets/{name}.rs"
        );
        let dir = root.join("corpus").join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no corpus for {name}");
        for file in files {
            let data = std::fs::read(&file).unwrap();
            let mut inputs = vec![data.clone()];
            for k in 1..8 {
                inputs.push(data[..data.len() * k / 8].to_vec());
            }
            for k in 0..16 {
                if data.is_empty() {
                    break;
                }
                let mut d = data.clone();
                let i = (k * 7919 + 13) % d.len();
                d[i] ^= 0x80 | (k as u8);
                inputs.push(d);
            }
            for (n, input) in inputs.iter().enumerate() {
                let r = std::panic::catch_unwind(|| f(input));
                assert!(
                    r.is_ok(),
                    "fuzz target {name} panicked on {} (variant {n})",
                    file.display()
                );
            }
        }
    }
    let mut names: Vec<&str> = targets.iter().map(|(n, _)| *n).collect();
    // custos.toml's parser lives in the CLI (a binary crate): its corpus is replayed by
    // the CLI's unit test `settings::tests::config_corpus_replays_without_panics`.
    names.push("custos_toml");
    for t in std::fs::read_dir(root.join("fuzz_targets"))
        .unwrap()
        .flatten()
    {
        let n = t.path().file_stem().unwrap().to_string_lossy().into_owned();
        assert!(
            names.contains(&n.as_str()),
            "fuzz_targets/{n}.rs is not replayed here"
        );
    }
}
