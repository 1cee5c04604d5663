//! Shared helpers for the CLI integration tests: run the real `custos` binary against a
//! real repository (local or SeaweedFS S3), build test trees, compare restored trees.
#![allow(dead_code)]

pub mod attack;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rand::{Rng, RngCore, SeedableRng};

pub const PW: &str = "correct horse battery staple";

pub struct T {
    pub dir: tempfile::TempDir,
    pub repo: String,
    pub envs: Vec<(String, String)>,
    /// Run custos as this user (through runuser) instead of the test's own.
    pub run_as: Option<String>,
    /// Run this copy of custos instead of the build's (one another user can execute: a
    /// restore as root checks that postgres can run the binary its restore_command names).
    pub bin: Option<PathBuf>,
}

impl T {
    /// A fresh local repository, initialised with a cheap KDF (tests open it many times).
    pub fn new() -> T {
        let t = T::bare();
        t.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
        t
    }

    /// Points this operator at `url` (`s3://bucket/prefix`) on the S3 server at
    /// `endpoint` (a test server or a proxy in front of one), with the test credentials.
    pub fn on_s3(&mut self, endpoint: &str, url: &str) {
        self.set("CUSTOS_REPO", url);
        self.set("AWS_ENDPOINT_URL", endpoint);
        self.set("AWS_ACCESS_KEY_ID", custos_testkit::ACCESS_KEY);
        self.set("AWS_SECRET_ACCESS_KEY", custos_testkit::SECRET_KEY);
        self.set("AWS_REGION", "us-east-1");
    }

    /// Environment only; no repository yet.
    pub fn bare() -> T {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo").display().to_string();
        let envs = vec![
            ("CUSTOS_REPO".into(), repo.clone()),
            ("CUSTOS_PASSWORD".into(), PW.into()),
            (
                "CUSTOS_CACHE_DIR".into(),
                dir.path().join("cache").display().to_string(),
            ),
            ("HOME".into(), dir.path().display().to_string()),
        ];
        T {
            dir,
            repo,
            envs,
            run_as: None,
            bin: None,
        }
    }

    /// Another operator on the same repository: own scratch folder, own password, run as
    /// the test's own user.
    pub fn with_password(&self, password: &str) -> T {
        let mut other = T {
            dir: tempfile::tempdir().unwrap(),
            repo: self.repo.clone(),
            envs: self.envs.clone(),
            run_as: None,
            bin: None,
        };
        other.set("CUSTOS_PASSWORD", password);
        other
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn set(&mut self, k: &str, v: &str) {
        self.envs.retain(|(a, _)| a != k);
        self.envs.push((k.into(), v.into()));
    }

    pub fn unset(&mut self, k: &str) {
        self.envs.retain(|(a, _)| a != k);
    }

    /// Adds a key of `role` opened by `password` (cheap KDF), with extra flags.
    pub fn add_key(&mut self, role: &str, password: &str, extra: &[&str]) -> serde_json::Value {
        self.set("CUSTOS_NEW_PASSWORD", password);
        let mut args = vec![
            "key",
            "add",
            "--role",
            role,
            "--kdf-memory-mib",
            "8",
            "--kdf-iterations",
            "1",
        ];
        args.extend_from_slice(extra);
        let v = self.json(&args);
        self.unset("CUSTOS_NEW_PASSWORD");
        v
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = match &self.run_as {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(self.shared_binary());
                c
            }
            None => Command::new(self.exe()),
        };
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .args(args)
            .stdin(Stdio::null());
        // `CUSTOS_INDEX_MEMORY_MB=0 ./scripts/test.sh` runs every command on the on-disk
        // index (format.md 5.3) rather than the index held in memory.
        if let Ok(mb) = std::env::var("CUSTOS_INDEX_MEMORY_MB") {
            c.env("CUSTOS_INDEX_MEMORY_MB", mb);
        }
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c
    }

    /// The custos this operator runs: its `bin`, else the build's.
    pub fn exe(&self) -> PathBuf {
        self.bin
            .clone()
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_custos").into())
    }

    /// A copy of the binary another user can execute: the checkout (and so target/) may
    /// sit in a folder only root can enter.
    pub fn shared_binary(&self) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let bin = self.dir.path().join(".bin/custos");
        if !bin.exists() {
            std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
            std::fs::copy(self.exe(), &bin).unwrap();
            std::fs::set_permissions(
                bin.parent().unwrap(),
                std::fs::Permissions::from_mode(0o755),
            )
            .unwrap();
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        bin
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    pub fn run_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut c = self.command(args);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let data = input.to_vec();
        let h = std::thread::spawn(move || stdin.write_all(&data));
        let out = child.wait_with_output().unwrap();
        h.join().unwrap().unwrap();
        out
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "custos {args:?} failed ({}):\n{}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// Restores the newest snapshot into `to` (a folder of this test's) and returns it.
    pub fn restore_latest(&self, to: &str) -> PathBuf {
        let out = self.path(to);
        self.ok(&["restore", "files", "latest", "--to", out.to_str().unwrap()]);
        out
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{out}"))
    }

    /// Runs a command that must fail with `code`; returns stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(
            o.status.code(),
            Some(code),
            "custos {args:?}: expected exit {code}, got {:?}\nstdout: {}\nstderr: {err}",
            o.status,
            String::from_utf8_lossy(&o.stdout)
        );
        err
    }

    /// Every object of a local repository with its content hash: to prove a failed
    /// command left the repository's data as it was. The operation trail (and the hint
    /// to its end) is left out: it records every attempt, failed ones included, by design
    /// (tests/audit.rs).
    pub fn repo_state(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for e in walk(Path::new(&self.repo)) {
            if e.starts_with(".tmp")
                || e.starts_with("locks")
                || e.starts_with("audit")
                || e.starts_with("hints")
            {
                continue;
            }
            let b = std::fs::read(Path::new(&self.repo).join(&e)).unwrap();
            out.insert(e, blake3::hash(&b).to_hex().to_string());
        }
        out
    }

    pub fn packs(&self) -> Vec<PathBuf> {
        walk(Path::new(&self.repo))
            .into_iter()
            .filter(|p| p.starts_with("data/"))
            .map(|p| Path::new(&self.repo).join(p))
            .collect()
    }
}

fn walk(root: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// A varied tree: text, random binary, empty files, nested folders, a symlink, odd modes.
pub fn make_tree(root: &Path, seed: u64, files: usize, max_size: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    std::fs::create_dir_all(root.join("docs/nested/deeper")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    for i in 0..files {
        let dir = match i % 3 {
            0 => root.join("docs"),
            1 => root.join("docs/nested"),
            _ => root.join("docs/nested/deeper"),
        };
        let size = if i % 7 == 0 {
            0
        } else {
            rng.random_range(1..max_size)
        };
        let mut data = vec![0u8; size];
        if i % 2 == 0 {
            rng.fill_bytes(&mut data);
        } else {
            for (j, b) in data.iter_mut().enumerate() {
                *b = b"patient note: stable, vitals normal\n"[j % 36];
            }
        }
        let p = dir.join(format!("file-{i:04}.dat"));
        std::fs::write(&p, &data).unwrap();
        std::fs::set_permissions(
            &p,
            std::fs::Permissions::from_mode(if i % 5 == 0 { 0o600 } else { 0o644 }),
        )
        .unwrap();
        let t =
            filetime::FileTime::from_unix_time(1_600_000_000 + i as i64 * 1000, (i as u32) * 1000);
        filetime::set_file_mtime(&p, t).unwrap();
    }
    std::os::unix::fs::symlink("docs/file-0001.dat", root.join("link-to-file")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    std::fs::set_permissions(
        root.join("empty-dir"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
}

/// Describes a tree: path -> (kind, mode, mtime, content hash or link target).
pub fn describe(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (rel, p) in walk_paths(root) {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let desc = if m.file_type().is_symlink() {
            format!(
                "link {}",
                exact(std::fs::read_link(&p).unwrap().as_os_str())
            )
        } else if m.is_dir() {
            format!("dir {:o} {}", m.mode() & 0o7777, m.mtime())
        } else {
            format!(
                "file {:o} {}.{} {}",
                m.mode() & 0o7777,
                m.mtime(),
                m.mtime_nsec(),
                blake3::hash(&std::fs::read(&p).unwrap()).to_hex()
            )
        };
        out.insert(rel, desc);
    }
    out
}

/// A name as text that keeps every byte apart (names that are not UTF-8 included).
pub fn exact(name: &std::ffi::OsStr) -> String {
    use std::os::unix::ffi::OsStrExt;
    custos_model::path::escape_bytes(name.as_bytes()).into_owned()
}

/// Every path under `root`, relative to it (as [`exact`] text).
pub fn walk_all(root: &Path) -> Vec<String> {
    walk_paths(root).into_iter().map(|(rel, _)| rel).collect()
}

/// Every path under `root`: relative (as [`exact`] text) and whole.
fn walk_paths(root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let rel = exact(e.path().strip_prefix(root).unwrap().as_os_str());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
            out.push((rel, e.path()));
        }
    }
    out.sort();
    out
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

pub fn chown_tree(root: &Path, user: &str) {
    let ok = Command::new("chown")
        .args(["-R", user])
        .arg(root)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown {user} {}", root.display());
}

pub fn flip_byte(path: &Path, offset_from_start: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[offset_from_start] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

/// A repository, custos binary and config that the postgres user can use.
pub fn pg_repo() -> (T, std::path::PathBuf, std::path::PathBuf) {
    pg_host(T::bare(), |t| {
        t.ok(&["init", "--kdf-memory-mib", "8", "--kdf-iterations", "1"]);
        t.add_key("backup", "backup role password", &[]);
    })
}

/// A host the postgres user can work on: a copy of `t`'s custos binary (its `bin`, else
/// the build's), the restore key's password (`PW`) and the backup key's ("backup role
/// password") in files, and a config naming the latter. `repository` makes or brings the
/// repository before everything is given to the postgres user.
pub fn pg_host(
    mut t: T,
    repository: impl FnOnce(&mut T),
) -> (T, std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(t.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = t.path("bin/custos");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::copy(t.exe(), &bin).unwrap();
    std::fs::write(t.path("restore.pw"), PW).unwrap();
    std::fs::write(t.path("backup.pw"), "backup role password").unwrap();
    let cfg = t.path("custos.toml");
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nurl = \"{}\"\npassword_file = \"{}\"\ncache_dir = \"{}\"\n",
            t.repo,
            t.path("backup.pw").display(),
            t.path("cache").display()
        ),
    )
    .unwrap();
    repository(&mut t);
    custos_testkit::give_to_postgres(t.dir.path());
    t.run_as = Some("postgres".into());
    (t, bin, cfg)
}

// PostgreSQL restores: the ledger a restored cluster must hold, and starting one to read it.

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(std::time::Duration::from_millis(ms));
}

/// The ledger ids committed at or before `t` (by commit timestamp), on the source.
pub fn committed_until(pg: &custos_testkit::PgCluster, t: &str) -> String {
    pg.psql(&format!(
        "SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM ledger \
         WHERE pg_xact_commit_timestamp(xmin) <= '{t}'"
    ))
}

/// Starts a restored data directory, returns its ledger, checks it with pg_amcheck, stops
/// it and checks page checksums offline.
pub fn start_and_read(bin: &Path, data: &Path, port: u16, socket: &Path) -> String {
    let c = custos_testkit::PgCluster::existing(
        bin.to_path_buf(),
        data.to_path_buf(),
        port,
        socket.to_path_buf(),
    );
    let log = data.with_extension("log");
    let (ok, text) = c.try_start(&log);
    assert!(ok, "restored cluster did not start:\n{text}");
    // Recovery ends with a promotion: wait until it accepts writes.
    for _ in 0..600 {
        if c.psql("SELECT pg_is_in_recovery()") == "f" {
            break;
        }
        sleep_ms(100);
    }
    assert_eq!(
        c.psql("SELECT pg_is_in_recovery()"),
        "f",
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let ledger = c.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM ledger");
    let out = c
        .client("pg_amcheck")
        .args(["--all", "--install-missing", "--heapallindexed"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_amcheck found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    c.stop();
    let out = custos_testkit::as_postgres(&bin.join("pg_checksums"))
        .arg("--check")
        .arg("-D")
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_checksums --check failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ledger
}

/// Every file under `p`, recursively.
pub fn walkdir(p: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(p).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Everything as the postgres user, as on a database host: a backup runner with the
/// backup-role key from the config, a restore runner with the restore key from a password
/// file, and a folder the postgres user can restore into.
pub fn pg_roles(t: &T, cfg: &Path) -> (T, T, PathBuf) {
    let mut backup = t.with_password("unused");
    backup.bin = t.bin.clone();
    backup.unset("CUSTOS_PASSWORD");
    backup.set("CUSTOS_CONFIG", cfg.to_str().unwrap());
    backup.run_as = Some("postgres".into());
    let mut restorer = t.with_password("unused");
    restorer.bin = t.bin.clone();
    restorer.unset("CUSTOS_PASSWORD");
    restorer.set(
        "CUSTOS_PASSWORD_FILE",
        t.path("restore.pw").to_str().unwrap(),
    );
    restorer.run_as = Some("postgres".into());
    let out_dir = t.path("restores");
    std::fs::create_dir_all(&out_dir).unwrap();
    custos_testkit::give_to_postgres(&out_dir);
    (backup, restorer, out_dir)
}

/// `restore postgres --to DIR ARGS... --port P --no-archiving`: a restore that starts on
/// a free port of its own and does not archive. Its JSON report and the port.
pub fn restore_pg(restorer: &T, dir: &Path, args: &[&str]) -> (serde_json::Value, u16) {
    let port = custos_testkit::free_port();
    let port_s = port.to_string();
    let mut a = vec!["restore", "postgres", "--to", dir.to_str().unwrap()];
    a.extend_from_slice(args);
    a.extend(["--port", port_s.as_str(), "--no-archiving"]);
    (restorer.json(&a), port)
}

/// Restores the backup custos picks for `target` (a time) into `out/name`, checks it is
/// `expect` and that restore_command names the password file, never the password; starts
/// it and checks its ledger holds exactly the rows `pg` committed by `target`. Returns
/// that ledger.
pub fn restore_ledger_at(
    restorer: &T,
    pg: &custos_testkit::PgCluster,
    out: &Path,
    name: &str,
    target: &str,
    expect: &str,
) -> String {
    let dir = out.join(name);
    let (r, port) = restore_pg(restorer, &dir, &["--target-time", target]);
    assert_eq!(
        r["snapshot"].as_str(),
        Some(expect),
        "{name}: wrong base backup"
    );
    let auto = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
    assert!(auto.contains("restore.pw") && !auto.contains(PW), "{auto}");
    let got = start_and_read(&pg.bin, &dir, port, &pg.dir);
    let want = committed_until(pg, target);
    assert!(!want.is_empty(), "{name}: no rows before the target");
    assert_eq!(
        got, want,
        "{name}: restored ledger differs from the rows committed by {target}"
    );
    got
}

/// The ledger table, pgbench's tables at `scale`, then a pgbench load of two clients at
/// `rate` transactions a second for `secs` seconds: half tpcb-like, half ledger inserts
/// (rows whose commit timestamps say what a restore to a time must hold).
pub fn start_ledger_load(
    t: &T,
    pg: &custos_testkit::PgCluster,
    scale: u32,
    rate: u32,
    secs: u32,
) -> std::process::Child {
    pg.psql("CREATE TABLE ledger (id bigserial PRIMARY KEY, note text NOT NULL)");
    let init = pg
        .client("pgbench")
        .args(["-i", "-q", "-s", &scale.to_string(), "postgres"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let script = t.path("ledger.sql");
    std::fs::write(
        &script,
        "INSERT INTO ledger (note) VALUES ('client ' || :client_id);\n",
    )
    .unwrap();
    custos_testkit::give_to_postgres(&script);
    pg.client("pgbench")
        .args([
            "-n",
            "-c",
            "2",
            "-R",
            &rate.to_string(),
            "-T",
            &secs.to_string(),
        ])
        .args(["-b", "tpcb-like@1", "-f"])
        .arg(format!("{}@1", script.display()))
        .arg("postgres")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Lays `made` (stopped) out as Debian does: postgresql.conf, pg_hba.conf and
/// pg_ident.conf moved to a folder of their own (`etc` beside the data directory), the
/// configuration naming the data directory and the other two files. Returns the server
/// as pg_ctlcluster runs it (pg_ctl -D on the configuration folder) and that folder.
pub fn configured_outside(
    made: &custos_testkit::PgCluster,
) -> (custos_testkit::PgCluster, PathBuf) {
    use std::io::Write;
    let etc = made.dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    for f in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
        std::fs::rename(made.data.join(f), etc.join(f)).unwrap();
    }
    let mut conf = std::fs::OpenOptions::new()
        .append(true)
        .open(etc.join("postgresql.conf"))
        .unwrap();
    writeln!(
        conf,
        "data_directory = '{}'\nhba_file = '{}'\nident_file = '{}'",
        made.data.display(),
        etc.join("pg_hba.conf").display(),
        etc.join("pg_ident.conf").display()
    )
    .unwrap();
    custos_testkit::give_to_postgres(&etc);
    let pg = custos_testkit::PgCluster::existing(
        made.bin.clone(),
        etc.clone(),
        made.port,
        made.dir.clone(),
    );
    (pg, etc)
}
