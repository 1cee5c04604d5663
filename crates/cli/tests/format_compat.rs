//! Repositories that earlier builds wrote stay readable, and writable, by this one.
//! History kept for seven years is restored by the custos of seven years later: every
//! object an older build wrote (key files, packs, index objects, snapshots of each kind,
//! WAL objects, trail entries) must still open, verify and restore exactly, and the
//! Shamir shares it wrote must still rebuild the restore key.
//!
//! Each folder under `tests/fixtures/format/` is a repository an older build wrote, with
//! `expect.json` (what it holds, and what each restore must give) and `made-by.txt` (the
//! commit). `make_format_fixture` below wrote them; to add one after a change of format:
//!
//! ```text
//! git worktree add /tmp/old REV && (cd /tmp/old && cargo build -p custos-cli)
//! CUSTOS_FIXTURE_BIN=/tmp/old/target/debug/custos CUSTOS_FIXTURE_REV=REV \
//!   CUSTOS_FIXTURE_OUT=crates/cli/tests/fixtures/format/REV \
//!   cargo nextest run -p custos-cli --test format_compat --run-ignored only
//! ```
//! and add a test for the new folder at the end of this file.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use custos_testkit::{pg18_bin, PgCluster};

const BACKUP_PW: &str = "backup role password";

fn snapshot_of(v: &serde_json::Value) -> String {
    v["snapshot"]
        .as_str()
        .or_else(|| v["backup"]["snapshot"].as_str())
        .unwrap_or_else(|| panic!("no snapshot id in {v}"))
        .to_string()
}

/// The stream the fixtures back up: a dump-like text of 300 KB.
fn stream_bytes() -> Vec<u8> {
    (0..6000u32)
        .flat_map(|i| {
            format!(
                "INSERT INTO notes VALUES ({i}, 'visit {}', 'stable');\n",
                i * 7
            )
            .into_bytes()
        })
        .collect()
}

/// A content hash of a table's rows in key order, as PostgreSQL prints them.
fn table_md5(pg: &PgCluster, table: &str) -> String {
    pg.psql(&format!(
        "SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY id), '')) FROM {table} t"
    ))
}

fn ledger(pg: &PgCluster) -> String {
    pg.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM ledger")
}

/// Writes a fixture with an older build (`CUSTOS_FIXTURE_BIN`) into `CUSTOS_FIXTURE_OUT`:
/// two files snapshots (the second on the first), a stream, a full and an incremental
/// database backup of a PostgreSQL 18 cluster whose WAL that build archived, and a table
/// export of a pgvector table, all through its command line.
#[test]
#[ignore = "writes a fixture from an older build; see the module's documentation"]
fn make_format_fixture() {
    let old = PathBuf::from(std::env::var("CUSTOS_FIXTURE_BIN").expect("CUSTOS_FIXTURE_BIN"));
    let out = PathBuf::from(std::env::var("CUSTOS_FIXTURE_OUT").expect("CUSTOS_FIXTURE_OUT"));
    let rev = std::env::var("CUSTOS_FIXTURE_REV").expect("CUSTOS_FIXTURE_REV");
    assert!(!out.exists(), "{} exists", out.display());
    let mut bare = T::bare();
    bare.bin = Some(old);
    let (t, cbin, cfg) = pg_host(bare, |t| {
        t.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
        t.add_key("backup", BACKUP_PW, &[]);
    });
    let (mut backup, _restorer, _) = pg_roles(&t, &cfg);

    // Files: a tree, then the same tree changed (an incremental on the first).
    let src = t.path("src");
    make_tree(&src, 21, 30, 48 * 1024);
    custos_testkit::give_to_postgres(&src);
    let files1 = snapshot_of(&t.json(&["backup", "files", src.to_str().unwrap()]));
    let tree1 = describe(&src);
    std::fs::write(src.join("docs/file-0001.dat"), b"revised note\n").unwrap();
    std::fs::remove_file(src.join("docs/nested/file-0004.dat")).unwrap();
    std::fs::write(src.join("docs/added.txt"), vec![b'x'; 70_000]).unwrap();
    custos_testkit::give_to_postgres(&src);
    let files2 = snapshot_of(&t.json(&["backup", "files", src.to_str().unwrap()]));
    let tree2 = describe(&src);

    // The restore key's password in shares, as custodians keep them for years.
    let shares = t.path("shares");
    t.ok(&[
        "key",
        "split",
        "--shares",
        "3",
        "--threshold",
        "2",
        "--out",
        shares.to_str().unwrap(),
    ]);

    let o = t.run_stdin(
        &["backup", "stream", "--name", "dump", "--json"],
        &stream_bytes(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stream = snapshot_of(&serde_json::from_slice(&o.stdout).unwrap());

    // A database whose WAL the older build archived, a full and an incremental backup,
    // a time between them, and a pgvector table exported.
    let conf = format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push %p'\nwal_level = replica\n\
         track_commit_timestamp = on\n",
        cbin.display(),
        cfg.display()
    );
    let pg = PgCluster::init(pg18_bin(), &conf);
    pg.start();
    backup.set("PGHOST", pg.dir.to_str().unwrap());
    backup.set("PGPORT", &pg.port.to_string());
    backup.set("PGUSER", "postgres");
    backup.set("PGDATABASE", "postgres");
    pg.psql("CREATE TABLE ledger (id bigserial PRIMARY KEY, note text NOT NULL)");
    pg.psql("CREATE EXTENSION vector");
    pg.psql(
        "SELECT setseed(0.3); CREATE TABLE docs (id bigint PRIMARY KEY, chunk text NOT NULL, \
         embedding vector(16) NOT NULL); INSERT INTO docs SELECT g, 'note ' || g, \
         (SELECT array_agg(random()::real - 0.5) FROM generate_series(1, 16) WHERE g > 0)::vector \
         FROM generate_series(1, 400) g",
    );
    let insert = |n: u32| {
        pg.psql(&format!(
            "INSERT INTO ledger (note) SELECT 'row ' || g FROM generate_series(1, {n}) g"
        ))
    };
    insert(50);
    let full = snapshot_of(&backup.json(&["backup", "postgres", "--type", "full"]));
    insert(50);
    sleep_ms(300);
    let between = pg.psql("SELECT clock_timestamp()");
    sleep_ms(300);
    insert(50);
    let incr = snapshot_of(&backup.json(&["backup", "postgres", "--type", "incremental"]));
    let table = snapshot_of(&backup.json(&["backup", "table", "--table", "docs"]));
    insert(50);
    pg.switch_and_archive();
    assert_eq!(
        pg.psql("SELECT failed_count FROM pg_stat_archiver"),
        "0",
        "{}",
        pg.log()
    );
    let expect = serde_json::json!({
        "files": [
            {"snapshot": files1, "tree": tree1},
            {"snapshot": files2, "tree": tree2},
        ],
        "stream": {"snapshot": stream, "blake3": blake3::hash(&stream_bytes()).to_hex().to_string()},
        "postgres": {
            "full": full,
            "incremental": incr,
            "between": between,
            "ledger_between": committed_until(&pg, &between),
            "ledger_end": ledger(&pg),
        },
        "table": {"snapshot": table, "table": "docs", "md5": table_md5(&pg, "docs"), "rows": 400},
    });
    pg.stop();

    // The operator's config, as that build's healthcare profile wrote it (builds before
    // the agent have none), and the jobs it read from it.
    let profile = t.path("custos-healthcare.toml");
    let made = t.run(&[
        "config",
        "init",
        "--profile",
        "healthcare",
        "--to",
        profile.to_str().unwrap(),
    ]);
    let jobs = if made.status.success() {
        let mut c = t.with_password(PW);
        c.bin = t.bin.clone();
        c.set("CUSTOS_CONFIG", profile.to_str().unwrap());
        Some(config_jobs(&c))
    } else {
        None
    };

    // The repository, the shares, and the host's cache folder (its trail anchor, the
    // snapshots and summaries it keeps, its files cache): an upgraded host goes on with it.
    std::fs::create_dir_all(&out).unwrap();
    copy_dir(Path::new(&t.repo), &out.join("repo"));
    copy_dir(&shares, &out.join("shares"));
    copy_dir(&t.path("cache"), &out.join("cache"));
    for transient in ["repo/locks", "repo/.tmp"] {
        let _ = std::fs::remove_dir_all(out.join(transient));
    }
    // Unit hashes of the database's files serve only its next backup, and the database
    // is not kept: a thousand small files for nothing.
    for e in walkdir(&out.join("cache")) {
        let rel = e
            .strip_prefix(out.join("cache"))
            .unwrap()
            .display()
            .to_string();
        if rel.contains("/units-") || rel.ends_with(".lock") {
            std::fs::remove_file(&e).unwrap();
        }
    }
    let mut expect = expect;
    if let Some(jobs) = jobs {
        std::fs::copy(&profile, out.join("custos-healthcare.toml")).unwrap();
        expect["config_jobs"] = jobs;
    }
    std::fs::write(
        out.join("expect.json"),
        serde_json::to_string_pretty(&expect).unwrap(),
    )
    .unwrap();
    std::fs::write(
        out.join("made-by.txt"),
        format!("custos {rev}, by `make_format_fixture` (tests/format_compat.rs)\n"),
    )
    .unwrap();
}

/// Restores files snapshot `id` as `who` into `to`; what landed there, as [`describe`].
fn restored_tree(who: &T, id: &str, to: &Path) -> BTreeMap<String, String> {
    who.ok(&["restore", "files", id, "--to", to.to_str().unwrap()]);
    describe(to)
}

/// A files snapshot of `expect.json` and the tree it must restore to.
fn snapshot_and_tree(f: &serde_json::Value) -> (&str, BTreeMap<String, String>) {
    (
        f["snapshot"].as_str().unwrap(),
        serde_json::from_value(f["tree"].clone()).unwrap(),
    )
}

/// The jobs `config check` reads from the config `t` names: name, what it runs, when.
fn config_jobs(t: &T) -> serde_json::Value {
    let v = t.json(&["config", "check"]);
    v["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no jobs: {v}"))
        .iter()
        .map(|j| serde_json::json!([j["name"], j["run"], j["schedule"]]))
        .collect()
}

/// Folders 0700 and files 0600 under `root`, as custos writes a repository and its cache.
fn private_modes(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let set = |p: &Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    set(root, 0o700);
    for e in std::fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            private_modes(&e.path());
        } else {
            set(&e.path(), 0o600);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let copied = std::process::Command::new("cp")
        .args(["-a", "--no-preserve=ownership"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(copied.success(), "cp {} {}", from.display(), to.display());
}

/// Reads, restores and extends the repository in `tests/fixtures/format/<name>` with this
/// build, on a copy.
fn check_fixture(name: &str) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/format")
        .join(name);
    let expect: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("expect.json")).unwrap()).unwrap();
    // A host that never saw it reads and restores it; the host that wrote it, upgraded to
    // this build (its cache folder as that build left it), goes on writing to it.
    let (t, _, cfg) = pg_host(T::bare(), |t| {
        copy_dir(&fixture.join("repo"), Path::new(&t.repo));
        copy_dir(&fixture.join("cache"), &t.path("upgraded-cache"));
        copy_dir(&fixture.join("shares"), &t.path("shares"));
        // Git keeps no modes: give the copies those custos wrote them with.
        for p in [
            Path::new(&t.repo),
            &t.path("upgraded-cache"),
            &t.path("shares"),
        ] {
            private_modes(p);
        }
    });
    let (_, mut restorer, out) = pg_roles(&t, &cfg);
    let mut upgraded = t.with_password(PW);
    upgraded.set(
        "CUSTOS_CACHE_DIR",
        t.path("upgraded-cache").to_str().unwrap(),
    );
    upgraded.run_as = Some("postgres".into());

    // Every snapshot it wrote is listed and the whole repository verifies, data read.
    let listed: Vec<String> = t
        .json(&["snapshots"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let pgx = &expect["postgres"];
    let mut wanted: Vec<&str> = expect["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["snapshot"].as_str().unwrap())
        .collect();
    wanted.extend([
        expect["stream"]["snapshot"].as_str().unwrap(),
        pgx["full"].as_str().unwrap(),
        pgx["incremental"].as_str().unwrap(),
        expect["table"]["snapshot"].as_str().unwrap(),
    ]);
    for id in &wanted {
        assert!(
            listed.iter().any(|l| l == id),
            "{name}: snapshot {id} not listed: {listed:?}"
        );
    }
    assert_eq!(listed.len(), wanted.len(), "{name}: {listed:?}");
    t.ok(&["verify", "--read-data"]);
    t.ok(&["audit", "verify"]);
    // Its WAL archive reads as one unbroken run from each database backup on.
    for s in t.json(&["snapshots"]).as_array().unwrap() {
        if s["summary"]["kind"] == "postgres" {
            let w = &s["restorable"];
            assert!(w["gap"].is_null(), "{name}: {s}");
            assert_eq!(w["missing"], serde_json::json!([]), "{name}: {s}");
            assert!(w["archive_end_segment"].is_string(), "{name}: {s}");
        }
    }

    // Files and the stream restore exactly.
    for (i, f) in expect["files"].as_array().unwrap().iter().enumerate() {
        let (id, want) = snapshot_and_tree(f);
        let got = restored_tree(&t, id, &out.join(format!("files-{i}")));
        assert_eq!(got, want, "{name}: files snapshot {i}");
    }
    let o = t.run(&[
        "restore",
        "stream",
        expect["stream"]["snapshot"].as_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        blake3::hash(&o.stdout).to_hex().to_string(),
        expect["stream"]["blake3"].as_str().unwrap(),
        "{name}: stream"
    );

    // The database: to a time between the backups (the full and WAL the older build
    // archived), and to the end of its WAL (the incremental), each holding exactly the
    // rows committed by then; the table export into the latter.
    let bin = pg18_bin();
    // The cluster's own config names the old host's socket folder, which is not on this
    // one: the restore says so and what to do, and either remedy gives a server that starts.
    let socket_warning = |r: &serde_json::Value| {
        r["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| w.as_str())
            .find(|w| w.contains("socket"))
            .map(str::to_string)
    };
    let between = out.join("between");
    let (r, port) = restore_pg(
        &restorer,
        &between,
        &["--target-time", pgx["between"].as_str().unwrap()],
    );
    assert_eq!(r["snapshot"], pgx["full"], "{name}: {r}");
    let warning = socket_warning(&r).unwrap_or_else(|| panic!("{name}: no warning: {r}"));
    assert!(
        warning.contains("--socket-dir") && warning.contains("unix_socket_directories"),
        "{warning}"
    );
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(between.join("postgresql.auto.conf"))
        .unwrap();
    writeln!(f, "unix_socket_directories = '{}'", out.display()).unwrap();
    assert_eq!(
        start_and_read(&bin, &between, port, &out),
        pgx["ledger_between"].as_str().unwrap(),
        "{name}: restored to a time"
    );
    let end = out.join("end");
    let (r, port) = restore_pg(&restorer, &end, &["--socket-dir", out.to_str().unwrap()]);
    assert_eq!(r["snapshot"], pgx["incremental"], "{name}: {r}");
    assert_eq!(socket_warning(&r), None, "{name}: {r}");
    // A folder the server would take from its data directory is refused, before anything.
    let never = out.join("never");
    let err = restorer.fails(
        &[
            "restore",
            "postgres",
            "--to",
            never.to_str().unwrap(),
            "--socket-dir",
            "sockets",
        ],
        2,
    );
    assert!(err.contains("--socket-dir sockets"), "{err}");
    assert!(!never.exists());
    assert_eq!(
        start_and_read(&bin, &end, port, &out),
        pgx["ledger_end"].as_str().unwrap(),
        "{name}: restored to the end of the WAL"
    );
    let pg = PgCluster::existing(bin.clone(), end.clone(), port, out.clone());
    let (ok, log) = pg.try_start(&end.with_extension("log2"));
    assert!(ok, "{log}");
    restorer.set("PGHOST", out.to_str().unwrap());
    restorer.set("PGPORT", &port.to_string());
    restorer.set("PGUSER", "postgres");
    restorer.set("PGDATABASE", "postgres");
    let tab = &expect["table"];
    let r = restorer.json(&[
        "restore",
        "table",
        tab["snapshot"].as_str().unwrap(),
        "--table",
        tab["table"].as_str().unwrap(),
        "--as",
        "docs_restored",
    ]);
    assert_eq!(r["tables"][0]["rows_loaded"], tab["rows"], "{name}: {r}");
    assert_eq!(r["tables"][0]["digest_matches"], true, "{name}: {r}");
    assert_eq!(
        table_md5(&pg, "docs_restored"),
        tab["md5"].as_str().unwrap(),
        "{name}: table export"
    );
    pg.stop();

    // The upgraded host goes on writing to it: a new backup, the oldest files snapshot
    // forgotten and pruned, and everything still verifies and restores.
    let files = expect["files"].as_array().unwrap();
    let src = t.path("src-new");
    make_tree(&src, 77, 20, 40 * 1024);
    custos_testkit::give_to_postgres(&src);
    let new = snapshot_of(&upgraded.json(&["backup", "files", src.to_str().unwrap()]));
    let got = restored_tree(&t, &new, &out.join("files-new"));
    assert_eq!(got, describe(&src), "{name}: a new backup");
    upgraded.ok(&["forget", files[0]["snapshot"].as_str().unwrap()]);
    upgraded.ok(&["prune"]);
    // Its listing (from the snapshots and summaries it kept) drops the forgotten one.
    let mut after: Vec<String> = upgraded
        .json(&["snapshots"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let mut want: Vec<String> = wanted
        .iter()
        .filter(|id| **id != files[0]["snapshot"].as_str().unwrap())
        .map(|id| id.to_string())
        .chain([new.clone()])
        .collect();
    after.sort();
    want.sort();
    assert_eq!(
        after, want,
        "{name}: the upgraded host's listing after forget"
    );
    t.ok(&["verify", "--read-data"]);
    let (kept, want) = snapshot_and_tree(&files[1]);
    let got = restored_tree(&t, kept, &out.join("files-after-prune"));
    assert_eq!(got, want, "{name}: after prune");
    t.ok(&["audit", "verify"]);

    // The operator's config of that build still reads, with the same jobs.
    if let Some(jobs) = expect.get("config_jobs") {
        let mut c = T::bare();
        c.set(
            "CUSTOS_CONFIG",
            fixture.join("custos-healthcare.toml").to_str().unwrap(),
        );
        assert_eq!(&config_jobs(&c), jobs, "{name}: its healthcare config");
    }

    // The password is lost: two of the three shares that build wrote rebuild the key.
    let mut shares: Vec<String> = std::fs::read_dir(t.path("shares"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    shares.sort();
    assert_eq!(shares.len(), 3, "{name}: {shares:?}");
    let mut lost = t.with_password("unused");
    lost.unset("CUSTOS_PASSWORD");
    lost.set("CUSTOS_NEW_PASSWORD", "rebuilt from two shares");
    lost.ok(&[
        "key",
        "recover",
        &shares[2],
        &shares[0],
        "--kdf-memory-mib",
        "8",
        "--kdf-iterations",
        "1",
    ]);
    let rebuilt = t.with_password("rebuilt from two shares");
    let got = restored_tree(&rebuilt, kept, &t.path("rebuilt"));
    assert_eq!(got, want, "{name}: with the rebuilt key");
}

/// Written on 2026-12-04, when tables and the vector store had just landed (issue 17),
/// before the secondary site, Object Lock and archived tiers (issue 19).
#[test]
fn written_by_17f60543() {
    check_fixture("17f60543");
}

/// Written on 2026-12-05 before issue 21's changes of format: WAL labels without a trail
/// anchor (`custos wal v1`), index objects signed over their JSON (no `sig_v`),
/// snapshots that record no trail head, no head hint.
#[test]
fn written_by_c76bc141() {
    check_fixture("c76bc141");
}

/// Written on 2026-12-07 at the end of session 26: WAL labels with a trail anchor,
/// index objects signed over a BLAKE3 hash (`sig_v` 2), snapshots recording the trail
/// head, a head hint.
#[test]
fn written_by_fb69a017() {
    check_fixture("fb69a017");
}

/// A fixture folder without a test of its own would never be read.
#[test]
fn every_fixture_has_its_test() {
    const CHECKED: &[&str] = &["17f60543", "c76bc141", "fb69a017"];
    let mut found: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
    found.sort();
    assert_eq!(found, CHECKED, "add a test for each fixture folder");
}
