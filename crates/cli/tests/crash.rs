//! Crash safety: `custos backup` and `custos prune` killed with SIGKILL at many moments.
//! After every kill, `verify --read-data` passes, the next run succeeds, and what it
//! stored restores byte for byte.
//!
//! Moments come from two sources: the test hook CUSTOS_TEST_KILL_BEFORE_WRITE=N, which
//! sends SIGKILL to the process right before its N-th storage write or delete (every write
//! boundary, deterministic), and plain SIGKILL from outside after a delay (mid-write,
//! mid-chunking moments, nondeterministic).

mod common;
use common::*;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use rand::{RngCore, SeedableRng};

/// Replaces the previous round's new files with new ones (~11 MiB of fresh data), so the
/// tree stays small while every backup has packs to write and every prune has garbage.
fn mutate(src: &std::path::Path, round: u64) {
    for f in std::fs::read_dir(src.join("docs")).unwrap() {
        let p = f.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("round-")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(round);
    for i in 0..12 {
        let mut data = vec![0u8; 700_000 + (i * 50_000)];
        rng.fill_bytes(&mut data);
        std::fs::write(src.join(format!("docs/round-{round}-{i}.bin")), &data).unwrap();
    }
    // Also rewrite an existing file, so some old chunks become garbage.
    let mut data = vec![0u8; 300_000];
    rng.fill_bytes(&mut data);
    std::fs::write(src.join("docs/file-0000.dat"), &data).unwrap();
}

/// Runs custos, killing it as asked; returns whether it died by SIGKILL and how long it ran.
fn killed(t: &T, args: &[&str], kill_before_write: Option<u64>, delay: Option<Duration>) -> bool {
    let mut c = t.command(args);
    if let Some(n) = kill_before_write {
        c.env("CUSTOS_TEST_KILL_BEFORE_WRITE", n.to_string());
    }
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    if let Some(d) = delay {
        std::thread::sleep(d);
        let _ = child.kill();
    }
    let st = child.wait().unwrap();
    st.signal() == Some(9)
}

fn check_after_kill(t: &T, src: &std::path::Path, what: &str) {
    let o = t.run(&["verify", "--read-data"]);
    assert!(
        o.status.success(),
        "verify failed after {what}:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let out = t.path("restore-check");
    let _ = std::fs::remove_dir_all(&out);
    t.ok(&["restore", "files", "latest", "--to", out.to_str().unwrap()]);
    assert_eq!(
        describe(&out),
        describe(src),
        "restore differs after {what}"
    );
}

#[test]
fn backup_killed_at_many_moments() {
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
    let src = t.path("src");
    make_tree(&src, 21, 30, 100_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let mut kills = 0;
    let mut round = 0;
    // Every write boundary of a backup that stores ~11 MiB in 1 MiB packs, until a run
    // gets past its last write.
    for n in 1..=40 {
        round += 1;
        mutate(&src, round);
        let died = killed(
            &t,
            &["backup", "files", src.to_str().unwrap()],
            Some(n),
            None,
        );
        check_after_kill(&t, &src, &format!("backup killed before write {n}"));
        if !died {
            break;
        }
        kills += 1;
    }
    // Kills from outside at fractions of an uninterrupted run (inside chunking, uploads, fsyncs).
    round += 1;
    mutate(&src, round);
    let start = std::time::Instant::now();
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let full = start.elapsed();
    for k in 1..=16u32 {
        round += 1;
        mutate(&src, round);
        let delay = full * k / 17;
        if killed(
            &t,
            &["backup", "files", src.to_str().unwrap()],
            None,
            Some(delay),
        ) {
            kills += 1;
        }
        check_after_kill(&t, &src, &format!("backup killed after {delay:?}"));
    }
    eprintln!("{kills} runs killed");
    assert!(kills >= 20, "only {kills} runs were actually killed");
}

#[test]
fn prune_killed_at_many_moments() {
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
    let src = t.path("src");
    make_tree(&src, 22, 30, 100_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let mut kills = 0;
    let mut round = 100;
    // One round: fresh data, forget the older snapshot, then prune (killed as asked).
    // Returns whether prune died by SIGKILL and how long it ran.
    let attempt = |kill: Option<u64>,
                   delay: Option<Duration>,
                   what: String,
                   round: &mut u64|
     -> (bool, Duration) {
        *round += 1;
        mutate(&src, *round);
        t.ok(&["backup", "files", src.to_str().unwrap()]);
        t.ok(&["forget", "--keep-last", "1"]);
        let start = std::time::Instant::now();
        let died = killed(&t, &["prune"], kill, delay);
        let took = start.elapsed();
        check_after_kill(&t, &src, &what);
        // The next prune completes and leaves a verified repository.
        t.ok(&["prune"]);
        t.ok(&["verify", "--read-data"]);
        (died, took)
    };
    for n in 1..=40 {
        if !attempt(
            Some(n),
            None,
            format!("prune killed before write {n}"),
            &mut round,
        )
        .0
        {
            break;
        }
        kills += 1;
    }
    let at_writes = kills;
    let (_, full) = attempt(None, None, "uninterrupted prune".into(), &mut round);
    for k in 1..=12u32 {
        let delay = full * k / 13;
        if attempt(
            None,
            Some(delay),
            format!("prune killed after {delay:?}"),
            &mut round,
        )
        .0
        {
            kills += 1;
        }
    }
    // Killing at each write is deterministic and is what must reach deep into prune;
    // the timed kills land wherever the machine's speed puts them (a loaded CI runner
    // finishes some runs before their delay), so they only add moments.
    eprintln!(
        "{at_writes} runs killed before a write, {} by timer",
        kills - at_writes
    );
    assert!(
        at_writes >= 12,
        "only {at_writes} runs were killed before a write: prune writes less than this test assumes"
    );
    assert!(
        kills > at_writes,
        "no timed kill landed: prune ran {full:?}"
    );
}
