//! `custos agent` end to end: the real binary with a real repository, real PostgreSQL,
//! a real webhook receiver, promtool and headless Chromium.
//! - a simulated week of the seed's matrix (the agent's test clock) against a real
//!   cluster: every job ran exactly as often as its schedule says; a two-hour outage
//!   costs each job one catch-up run, not one per missed slot;
//! - SIGKILL during a backup, then a restart: the run counts as interrupted and runs
//!   again, nothing ran twice at once, the repository verifies; SIGHUP with a broken file
//!   is refused by line number while the schedule goes on; SIGTERM exits 0;
//! - WAL archiving broken under load: the lag alert reaches the webhook, then "resolved";
//!   /metrics passes promtool and matches the jobs run; the status page in Chromium
//!   shows every category and the failing one as failing.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use custos_testkit::{pg15_bin, PgCluster};

/// The agent as a child process; its address read from its first line of output.
struct Agent {
    /// What the test started (runuser, when the agent runs as postgres).
    child: Child,
    /// The agent itself, from its first line.
    pid: i32,
    addr: String,
}

impl Agent {
    fn start(t: &T, cfg: &Path, extra: &[(&str, &str)]) -> Agent {
        let mut c = t.command(&[
            "--config",
            cfg.to_str().unwrap(),
            "agent",
            "--listen",
            "127.0.0.1:0",
        ]);
        for (k, v) in extra {
            c.env(k, v);
        }
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .map(String::from);
        let Some(addr) = addr else {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("the agent did not start: {line}\n{err}");
        };
        // Keep draining stderr so the agent never blocks on a full pipe.
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut sink = vec![];
            let _ = err.read_to_end(&mut sink);
            std::fs::write(
                std::env::temp_dir().join(format!("custos-agent-{}.log", std::process::id())),
                sink,
            )
            .ok();
        });
        let pid = line
            .split("(pid ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line}"));
        Agent { child, pid, addr }
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.addr, path, None)
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory preconditions.
        unsafe { libc::kill(self.pid, sig) };
    }

    /// SIGTERM, and the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not stop on SIGTERM"
            );
            sleep_ms(100);
        }
    }
}

fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// A webhook receiver: every POST body, parsed.
fn webhook() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let got = Arc::new(Mutex::new(vec![]));
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            if let Ok(v) = serde_json::from_slice(&body) {
                g.lock().unwrap().push(v);
            }
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (url, got)
}

fn history(state: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state.join("history.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A time in a history record.
fn ts(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
        .unwrap()
        .to_utc()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep_ms(200);
    }
}

/// The metric's value for a sample line starting with `prefix` (name and labels).
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn pg_conf(bin: &Path, cfg: &Path) -> String {
    format!(
        "archive_mode = on\narchive_command = '{} --config {} wal-push %p'\nwal_level = replica\n",
        bin.display(),
        cfg.display()
    )
}

fn append(cfg: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new().append(true).open(cfg).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

#[test]
fn a_simulated_week_runs_the_matrix_and_an_outage_costs_one_catch_up_run() {
    let (t, bin, cfg) = pg_repo();
    let pg = PgCluster::init(pg15_bin(), &pg_conf(&bin, &cfg));
    pg.start();
    pg.psql("CREATE TABLE notes (id serial PRIMARY KEY, body text); INSERT INTO notes (body) SELECT 'n' || g FROM generate_series(1, 1000) g");
    pg.psql("CREATE TABLE audit_log (id bigserial PRIMARY KEY, actor text NOT NULL); INSERT INTO audit_log (actor) SELECT 'dr.' || g FROM generate_series(1, 500) g");
    let env_file = t.path("platform.env");
    std::fs::write(
        &env_file,
        "APP_MODE=production\nAPP_SECRET_KEY=sk_live_0123456789abcdefghij\n",
    )
    .unwrap();
    custos_testkit::give_to_postgres(&env_file);
    let docs = t.path("documents");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "clinical document").unwrap();
    custos_testkit::give_to_postgres(&docs);
    let state = t.path("agent-state");
    append(
        &cfg,
        &format!(
            r#"
[postgres]
host = "{sock}"
port = {port}
user = "postgres"

[retention]
keep_daily = 30
keep_weekly = 12

[agent]
state_dir = "{state}"
probe_interval = "6h"
repository_interval = "6h"

[[source]]
name = "documents"
kind = "files"
paths = ["{docs}"]

[[source]]
name = "notes-table"
kind = "table"
tables = ["notes"]

[[source]]
name = "audit-log"
kind = "audit-log"
table = "audit_log"
order_by = "id"

[[source]]
name = "platform-env"
kind = "env"
allow = ["APP_*"]
env_file = "{env}"

[[job]]
name = "db-incremental"
run = "postgres-incremental"
schedule = "0 * * * *"
retries = 0

[[job]]
name = "notes-hourly"
run = "notes-table"
schedule = "15 * * * *"

[[job]]
name = "audit-log-hourly"
run = "audit-log"
schedule = "5 * * * *"

[[job]]
name = "config-daily"
run = "config"
schedule = "0 3 * * *"

[[job]]
name = "db-full"
run = "postgres-full"
schedule = "0 2 * * *"

[[job]]
name = "documents-hourly"
run = "documents"
schedule = "30 * * * *"

[[job]]
name = "verify"
run = "verify"
schedule = "0 5 * * *"

[[job]]
name = "forget"
run = "forget"
schedule = "0 6 * * *"

[[job]]
name = "prune"
run = "prune"
schedule = "0 7 * * SUN"
"#,
            sock = pg.dir.display(),
            port = pg.port,
            state = state.display(),
            docs = docs.display(),
            env = env_file.display(),
        ),
    );
    // Monday 2026-11-30 00:00 to Monday 2026-12-07 00:00, down from Thursday 10:50 to
    // 12:40: the slots 11:00, 11:30, 12:00 and 12:30 are missed.
    let week_start = "2026-11-29T23:59:00Z";
    let down = "2026-12-03T10:50:00Z";
    let up = "2026-12-03T12:40:00Z";
    let week_end = "2026-12-06T23:59:00Z";
    for (from, to) in [(week_start, down), (up, week_end)] {
        let mut a = Agent::start(&t, &cfg, &[("CUSTOS_TEST_CLOCK", &format!("{from}..{to}"))]);
        // On a simulated clock the agent stops by itself at the period's end.
        let status = loop {
            if let Some(s) = a.child.try_wait().unwrap() {
                break s;
            }
            sleep_ms(200);
        };
        assert!(status.success(), "the simulated agent failed: {status}");
    }
    let runs = history(&state);
    let count = |job: &str| runs.iter().filter(|r| r["job"] == job).count();
    let failed: Vec<_> = runs.iter().filter(|r| r["outcome"] != "ok").collect();
    assert!(failed.is_empty(), "runs failed: {failed:?}");
    // 168 hourly slots, two of each hourly job missed in the outage and run once at its end
    // (the vector-store export at :15 missed 11:15 and 12:15, the audit log 11:05, 12:05).
    for hourly in [
        "db-incremental",
        "documents-hourly",
        "notes-hourly",
        "audit-log-hourly",
    ] {
        assert_eq!(count(hourly), 168 - 1, "{hourly}");
    }
    assert_eq!(count("config-daily"), 7);
    assert_eq!(count("db-full"), 7);
    assert_eq!(count("verify"), 7);
    assert_eq!(count("forget"), 7);
    assert_eq!(count("prune"), 1);
    // The catch-up ran once, at the restart, for the newest missed slot.
    for (job, newest_missed, older) in [
        (
            "db-incremental",
            "2026-12-03T12:00:00Z",
            "2026-12-03T11:00:00Z",
        ),
        (
            "documents-hourly",
            "2026-12-03T12:30:00Z",
            "2026-12-03T11:30:00Z",
        ),
    ] {
        let catch_up: Vec<_> = runs
            .iter()
            .filter(|r| r["job"] == job && r["slot"] == newest_missed)
            .collect();
        assert_eq!(catch_up.len(), 1, "{job}");
        assert_eq!(catch_up[0]["start"], up, "{job}");
        assert!(
            !runs.iter().any(|r| r["job"] == job && r["slot"] == older),
            "{job}"
        );
    }
    // Every run is in the signed trail, and each full and incremental left a backup.
    let trail = t.json(&["--config", cfg.to_str().unwrap(), "audit", "log"]);
    let entries = trail.as_array().unwrap();
    let agent_runs = entries
        .iter()
        .filter(|e| e["entry"]["command"] == "agent job")
        .count();
    assert_eq!(
        agent_runs,
        runs.len(),
        "one trail entry per run: {}",
        serde_json::to_string(&entries[entries.len().saturating_sub(3)..]).unwrap()
    );
    let backups: usize = runs
        .iter()
        .filter(|r| r["job"] == "db-incremental" || r["job"] == "db-full")
        .map(|r| r["snapshots"].as_array().unwrap().len())
        .sum();
    assert_eq!(backups, 167 + 7);
    // The daily reports: one per day, stored in the repository; Wednesday's says every
    // scheduled run started.
    let rep = t.json(&[
        "--config",
        cfg.to_str().unwrap(),
        "report",
        "daily",
        "--date",
        "2026-12-02",
    ]);
    let jobs = rep["jobs"].as_array().unwrap();
    let day = |job: &str| jobs.iter().find(|j| j["job"] == job).unwrap().clone();
    assert_eq!(day("db-incremental")["scheduled"], 24);
    assert_eq!(day("db-incremental")["started"], 24);
    assert_eq!(day("db-full")["started"], 1);
    assert_eq!(day("prune")["scheduled"], 0);
    // Thursday's shows the outage: two scheduled runs of each hourly job did not start.
    let o = t.run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--json",
        "report",
        "daily",
        "--date",
        "2026-12-03",
    ]);
    assert_eq!(
        o.status.code(),
        Some(20),
        "a day with missed runs is not clean: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let thu: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let inc = thu["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["job"] == "db-incremental")
        .unwrap();
    assert_eq!(
        (inc["scheduled"].as_u64(), inc["started"].as_u64()),
        (Some(24), Some(23))
    );
    t.ok(&["--config", cfg.to_str().unwrap(), "verify"]);
    // 167 hourly audit-log exports form one unbroken chain.
    t.ok(&["--config", cfg.to_str().unwrap(), "audit-log", "verify"]);
}

#[test]
fn sigkill_mid_backup_resumes_sighup_refuses_a_bad_file_and_sigterm_exits_0() {
    let (t, _bin, cfg) = pg_repo();
    let state = t.path("agent-state");
    let docs = t.path("documents");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "clinical document").unwrap();
    custos_testkit::give_to_postgres(&docs);
    let base = std::fs::read_to_string(&cfg).unwrap()
        + &format!(
            r#"
[agent]
state_dir = "{state}"
retry_base = "1s"
grace = "20s"

[[source]]
name = "slow"
kind = "stream"
command = "head -c 3000000 /dev/urandom; sleep 3"

[[source]]
name = "documents"
kind = "files"
paths = ["{docs}"]

[[job]]
name = "slow"
run = "slow"
schedule = "*/4 * * * * *"
retries = 1

[[job]]
name = "quick"
run = "documents"
schedule = "*/2 * * * * *"
"#,
            state = state.display(),
            docs = docs.display()
        );
    std::fs::write(&cfg, &base).unwrap();
    let running = |job: &str| {
        std::fs::read_to_string(state.join("jobs.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|v| !v["jobs"][job]["running_since"].is_null())
    };
    let a = Agent::start(&t, &cfg, &[]);
    wait_for("a slow run to start", 30, || running("slow"));
    sleep_ms(800);
    // SIGKILL: the agent and (by its parent-death signal) the backup it ran die at once.
    let mut a = a;
    a.signal(libc::SIGKILL);
    a.child.wait().unwrap();
    sleep_ms(500);
    let cfg_text = cfg.to_str().unwrap().to_string();
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&cfg_text) && c.contains("backup"))
        .collect();
    assert!(
        survivors.is_empty(),
        "a job outlived the killed agent: {survivors:?}"
    );

    let restarted = chrono::Utc::now();
    let a = Agent::start(&t, &cfg, &[]);
    wait_for("a slow run after the restart", 60, || {
        history(&state)
            .iter()
            .any(|r| r["job"] == "slow" && r["outcome"] == "ok" && ts(&r["start"]) > restarted)
    });
    let runs = history(&state);
    assert!(
        runs.iter()
            .any(|r| r["job"] == "slow" && r["outcome"] == "interrupted"),
        "the killed run is recorded as interrupted: {runs:?}"
    );
    // No two runs of a job overlapped, across the kill and restart.
    for job in ["slow", "quick"] {
        let mut spans: Vec<_> = runs
            .iter()
            .filter(|r| r["job"] == job && r["outcome"] != "interrupted")
            .map(|r| (ts(&r["start"]), ts(&r["end"])))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[1].0 >= w[0].1, "{job} overlapped: {w:?}");
        }
    }

    // SIGHUP with a broken file: refused by line number, the schedule goes on.
    let broken = base.replacen("[agent]", "[agent]\nlisten = ", 1);
    let line = broken.lines().position(|l| l == "listen = ").unwrap() + 1;
    std::fs::write(&cfg, &broken).unwrap();
    let quick_before = history(&state)
        .iter()
        .filter(|r| r["job"] == "quick")
        .count();
    a.signal(libc::SIGHUP);
    wait_for("the reload to be refused", 20, || {
        metric(
            &a.get("/metrics").1,
            "custos_agent_config_reloads_total{result=\"refused\"}",
        ) == Some(1.0)
    });
    let page = a.get("/").1;
    assert!(
        page.contains("configuration reload refused") && page.contains(&format!("line {line}")),
        "{page}"
    );
    wait_for("quick to run on under the old configuration", 30, || {
        history(&state)
            .iter()
            .filter(|r| r["job"] == "quick")
            .count()
            >= quick_before + 2
    });
    // A good file with one more job: taken.
    std::fs::write(
        &cfg,
        base.clone()
            + "\n[[job]]\nname = \"quick2\"\nrun = \"documents\"\nschedule = \"*/3 * * * * *\"\n",
    )
    .unwrap();
    a.signal(libc::SIGHUP);
    wait_for("the new job", 30, || {
        a.get("/metrics")
            .1
            .contains("custos_job_next_run_timestamp_seconds{job=\"quick2\"}")
    });
    assert!(!a.get("/").1.contains("configuration reload refused"));

    // SIGTERM: running jobs finish within the grace period, exit 0.
    let status = a.stop();
    assert!(status.success(), "SIGTERM: {status}");
    let after = std::fs::read_to_string(state.join("jobs.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&after).unwrap();
    assert!(
        v["jobs"]
            .as_object()
            .unwrap()
            .values()
            .all(|j| j["running_since"].is_null()),
        "no run left marked running: {after}"
    );
    let mut r = t.with_password(PW);
    r.run_as = None;
    r.ok(&["--config", cfg.to_str().unwrap(), "unlock"]);
    r.ok(&["--config", cfg.to_str().unwrap(), "verify"]);
}

#[test]
fn wal_lag_alert_metrics_and_status_page() {
    let (t, bin, cfg) = pg_repo();
    let pg = PgCluster::init(pg15_bin(), &pg_conf(&bin, &cfg));
    pg.start();
    let state = t.path("agent-state");
    let docs = t.path("documents");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "clinical document").unwrap();
    custos_testkit::give_to_postgres(&docs);
    let (url, got) = webhook();
    let hook_file = t.path("alerts.jsonl");
    append(
        &cfg,
        &format!(
            r#"
[postgres]
name = "clinical"
host = "{sock}"
port = {port}
user = "postgres"

[agent]
state_dir = "{state}"
probe_interval = "1s"
repository_interval = "2s"
wal_lag_alert = "5s"
retry_base = "1s"

[[alert]]
kind = "webhook"
url = "{url}"

[[alert]]
kind = "command"
command = "cat >> {hook}; echo >> {hook}"

[[source]]
name = "documents"
kind = "files"
paths = ["{docs}"]

[[source]]
name = "lab-results"
kind = "stream"
command = "echo starting; exit 3"

[[job]]
name = "db-incremental"
run = "postgres-incremental"
schedule = "*/20 * * * * *"

[[job]]
name = "documents-hourly"
run = "documents"
schedule = "*/5 * * * * *"                  # stale past 7.5 s: a loaded CI host keeps it ok

[[job]]
name = "lab-results"
run = "lab-results"
schedule = "*/3 * * * * *"
retries = 0
"#,
            sock = pg.dir.display(),
            port = pg.port,
            state = state.display(),
            docs = docs.display(),
            hook = hook_file.display(),
        ),
    );
    let a = Agent::start(&t, &cfg, &[]);
    let runs_of = |job: &str, outcome: &str| {
        history(&state)
            .iter()
            .filter(|r| r["job"] == job && r["outcome"] == outcome)
            .count()
    };
    wait_for("runs of each job", 90, || {
        runs_of("documents-hourly", "ok") >= 2
            && runs_of("lab-results", "failed") >= 1
            && runs_of("db-incremental", "ok") >= 1
    });
    assert_eq!(a.get("/healthz").0, 200);
    let (code, ready) = a.get("/readyz");
    assert_eq!(code, 200, "{ready}");

    // /metrics: promtool's lint passes, and the counts are the runs the state holds.
    let before = runs_of("documents-hourly", "ok");
    let (code, text) = a.get("/metrics");
    let after = runs_of("documents-hourly", "ok");
    assert_eq!(code, 200);
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/setup.sh installs it)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ok = metric(
        &text,
        "custos_job_runs_total{job=\"documents-hourly\",result=\"ok\"}",
    )
    .unwrap() as usize;
    assert!(before <= ok && ok <= after, "{before} <= {ok} <= {after}");
    assert!(
        metric(
            &text,
            "custos_job_runs_total{job=\"lab-results\",result=\"failed\"}"
        )
        .unwrap()
            >= 1.0
    );
    assert_eq!(metric(&text, "custos_repository_up"), Some(1.0), "{text}");
    assert!(
        metric(
            &text,
            "custos_wal_archive_lag_seconds{cluster=\"clinical\"}"
        )
        .is_some(),
        "{text}"
    );
    assert!(
        metric(&text, "custos_rpo_seconds{category=\"database\"}").is_some(),
        "{text}"
    );
    // Nothing names a file inside a backup or a secret.
    assert!(!text.contains("a.txt") && !text.contains(PW), "{text}");

    // The status page in Chromium: every category, the failing one failing.
    wait_for("the job_failed alert", 30, || {
        a.get("/").1.contains("job_failed")
    });
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("agent");
    std::fs::create_dir_all(&out_dir).unwrap();
    let shot = out_dir.join("status.png");
    let _ = std::fs::remove_file(&shot);
    let chrome = |extra: &[&str]| chromium(&a.addr, extra);
    let dom = chrome(&["--dump-dom"]);
    for (category, state) in [
        ("database", "ok"),
        ("documents", "ok"),
        ("lab-results", "fail"),
    ] {
        let row = format!("data-category=\"{category}\" data-state=\"{state}\"");
        assert!(dom.contains(&row), "{row} not in the rendered page:\n{dom}");
    }
    assert!(
        dom.contains("data-state=\"fail\"") && dom.contains("id=\"overall\""),
        "{dom}"
    );
    assert!(dom.contains("<svg") && dom.contains("lag-chart"), "{dom}");
    assert!(!dom.contains("<script"), "the page needs no JavaScript");
    chrome(&[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "screenshot {}",
        shot.display()
    );

    // WAL archiving breaks under load: the lag alert fires within a minute of crossing
    // the threshold, and resolves when archiving resumes.
    pg.psql("ALTER SYSTEM SET archive_command = 'false'");
    pg.psql("SELECT pg_reload_conf()");
    sleep_ms(500);
    pg.psql("CREATE TABLE t (x int)");
    for i in 0..3 {
        pg.psql(&format!(
            "INSERT INTO t SELECT generate_series(1, 1000) + {i}; SELECT pg_switch_wal();"
        ));
    }
    wait_for("the archiver to fail", 30, || {
        pg.psql("SELECT failed_count FROM pg_stat_archiver") != "0"
    });
    let crossed = Instant::now() + Duration::from_secs(5);
    let fired = |status: &str| {
        got.lock()
            .unwrap()
            .iter()
            .any(|v| v["alert"] == "wal_archive_lag" && v["status"] == status)
    };
    wait_for("the WAL lag alert", 65, || fired("firing"));
    assert!(Instant::now() < crossed + Duration::from_secs(60));
    let firing = got
        .lock()
        .unwrap()
        .iter()
        .find(|v| v["alert"] == "wal_archive_lag")
        .cloned()
        .unwrap();
    assert_eq!(firing["subject"], "cluster clinical");
    assert_eq!(firing["severity"], "critical");
    assert!(
        metric(
            &a.get("/metrics").1,
            "custos_alerts_firing{alert=\"wal_archive_lag\"}"
        ) == Some(1.0)
    );
    pg.psql(&format!(
        "ALTER SYSTEM SET archive_command = '{} --config {} wal-push %p'",
        bin.display(),
        cfg.display()
    ));
    pg.psql("SELECT pg_reload_conf()");
    wait_for("the WAL lag alert to resolve", 90, || fired("resolved"));
    // The command sink got the same, as JSON on stdin (just after the webhook).
    wait_for("the command sink's resolution", 20, || {
        let hooked = std::fs::read_to_string(&hook_file).unwrap_or_default();
        hooked
            .lines()
            .any(|l| l.contains("\"wal_archive_lag\"") && l.contains("\"resolved\""))
    });

    // `custos alert test` reaches the sinks.
    let mut r = t.with_password(PW);
    r.run_as = None;
    r.ok(&["--config", cfg.to_str().unwrap(), "alert", "test"]);
    wait_for("the test alert", 10, || {
        got.lock().unwrap().iter().any(|v| v["status"] == "test")
    });

    assert!(a.stop().success());
    // Each alert and each resolution is in the signed trail.
    let trail = r
        .json(&["--config", cfg.to_str().unwrap(), "audit", "log"])
        .to_string();
    assert!(
        trail.contains("agent alert firing") && trail.contains("agent alert resolved"),
        "{trail}"
    );
    assert!(trail.contains("wal_archive_lag"));
}

#[test]
fn beyond_the_loopback_the_agent_needs_a_token() {
    let t = T::new();
    let cfg = t.path("custos.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nstate_dir = \"{}\"\nlisten = \"0.0.0.0:0\"\n\n[[job]]\nname = \"v\"\nrun = \"verify\"\nschedule = \"0 5 * * *\"\n",
            t.path("state").display()
        ),
    )
    .unwrap();
    let err = t.fails(&["--config", cfg.to_str().unwrap(), "agent"], 2);
    assert!(err.contains("without a bearer token"), "{err}");
    let token = "0123456789abcdef0123456789abcdef";
    std::fs::write(t.path("token"), token).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "listen = \"0.0.0.0:0\"",
        &format!(
            "listen = \"127.0.0.2:0\"\ntoken_file = \"{}\"",
            t.path("token").display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let mut c = t.command(&["--config", cfg.to_str().unwrap(), "agent"]);
    c.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(http_get(&addr, "/metrics", None).0, 401);
    // Liveness and readiness stay open for probes; they say nothing else.
    assert_eq!(http_get(&addr, "/healthz", None), (200, "ok\n".to_string()));
    assert_eq!(
        http_get(&addr, "/", Some("wrong-token-wrong-token-wrong-tok")).0,
        401
    );
    let (code, body) = http_get(&addr, "/metrics", Some(token));
    assert_eq!(code, 200);
    assert!(body.contains("custos_agent_start_timestamp_seconds"));
    assert!(!body.contains(token));
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn the_systemd_unit_verifies() {
    let root = custos_testkit::workspace_root();
    let unit = std::fs::read_to_string(root.join("deploy/custos-agent.service")).unwrap();
    for needed in [
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "User=custos",
        "custos agent",
    ] {
        assert!(unit.contains(needed), "{needed}");
    }
    // systemd-analyze needs the ExecStart program to exist: point it at the build.
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_custos");
    let local = dir.path().join("custos-agent.service");
    std::fs::write(&local, unit.replace("/usr/local/bin/custos", exe)).unwrap();
    let verify = |path: &Path| {
        let o = std::process::Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(path)
            .output()
            .expect("systemd-analyze (Debian package systemd)");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).trim().to_string(),
        )
    };
    let (ok, err) = verify(&local);
    assert!(ok && err.is_empty(), "systemd-analyze verify:\n{err}");
    // The check can fail: systemd only warns about a bad value, and that warning counts.
    let bad = dir.path().join("bad.service");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&local)
            .unwrap()
            .replace("ProtectSystem=strict", "ProtectSystem=bogus"),
    )
    .unwrap();
    assert!(verify(&bad).1.contains("ProtectSystem") || verify(&bad).1.contains("protect system"));
}

#[test]
fn prune_waits_for_the_lock_a_running_backup_holds() {
    let t = T::new();
    let state = t.path("agent-state");
    let cfg = t.path("custos.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[agent]
state_dir = "{state}"
retry_base = "1s"

[[job]]
name = "prune"
run = "prune"
schedule = "*/2 * * * * *"
retries = 0
"#,
            state = state.display()
        ),
    )
    .unwrap();
    // A backup from elsewhere (cron, another host) holds the shared lock for 6 s.
    let mut backup = t
        .command(&[
            "backup",
            "stream",
            "--name",
            "slow",
            "--command",
            "head -c 100000 /dev/urandom; sleep 6",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the backup's lock", 20, || {
        std::fs::read_dir(Path::new(&t.repo).join("locks"))
            .map(|d| d.count() > 0)
            .unwrap_or(false)
    });
    let a = Agent::start(&t, &cfg, &[]);
    wait_for("a prune run", 60, || {
        history(&state).iter().any(|r| r["job"] == "prune")
    });
    assert!(backup.wait().unwrap().success());
    let runs = history(&state);
    let prune = runs.iter().find(|r| r["job"] == "prune").unwrap();
    // Prune found the backup's lock and waited for it (without using a retry: it has
    // none), then ran.
    assert_eq!(prune["outcome"], "ok", "{runs:?}");
    assert!(prune["attempts"].as_u64().unwrap() >= 2, "{prune}");
    assert!(a.stop().success());
}

/// Headless Chromium on the agent's status page: what it prints (the DOM with
/// `--dump-dom`).
fn chromium(addr: &str, extra: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(format!("http://{addr}/"))
        .output()
        .expect("chromium (Debian package chromium; scripts/setup.sh installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The second site watched: a secondary nobody copies to falls behind its max_lag and the
/// `secondary_behind` alert reaches the webhook; a configuration with a copy job (SIGHUP)
/// brings it in sync, /metrics says so and the alert resolves.
#[test]
fn a_secondary_behind_alerts_and_a_copy_job_resolves_it() {
    let t = T::new();
    let state = t.path("agent-state");
    let cfg = t.path("custos.toml");
    let (url, got) = webhook();
    let base = format!(
        r#"
[repository]
url = "{repo}"
[agent]
state_dir = "{state}"
repository_interval = "1s"
probe_interval = "1s"
[[alert]]
kind = "webhook"
url = "{url}"
[[secondary]]
name = "dr"
url = "{dr}"
max_lag = "3s"
"#,
        repo = t.repo,
        state = state.display(),
        dr = t.path("dr").display()
    );
    // A copy job that will not come round during the test.
    std::fs::write(
        &cfg,
        format!("{base}\n[[job]]\nname = \"copy\"\nrun = \"copy\"\nschedule = \"0 0 1 1 *\"\n"),
    )
    .unwrap();
    let src = t.path("src");
    make_tree(&src, 1, 3, 50_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    let a = Agent::start(&t, &cfg, &[]);
    let fired = |status: &str| {
        got.lock()
            .unwrap()
            .iter()
            .any(|v| v["alert"] == "secondary_behind" && v["status"] == status)
    };
    wait_for("the secondary_behind alert", 60, || fired("firing"));
    let row = |state: &str| format!("data-secondary=\"dr\" data-state=\"{state}\"");
    let dom = chromium(&a.addr, &["--dump-dom"]);
    assert!(dom.contains(&row("fail")), "{dom}");
    assert!(dom.contains("never copied to"), "{dom}");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("agent/status-secondary.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    chromium(&a.addr, &[&format!("--screenshot={}", shot.display())]);
    assert!(std::fs::read(&shot).unwrap().starts_with(b"\x89PNG"));
    let (_, m) = a.get("/metrics");
    assert!(
        metric(&m, "custos_secondary_lag_seconds{secondary=\"dr\"}").unwrap() > 3.0,
        "{m}"
    );
    // Now copied every two seconds.
    std::fs::write(
        &cfg,
        format!("{base}\n[[job]]\nname = \"copy\"\nrun = \"copy\"\nschedule = \"*/2 * * * * *\"\n"),
    )
    .unwrap();
    a.signal(libc::SIGHUP);
    wait_for("a copy run", 60, || {
        history(&state)
            .iter()
            .any(|r| r["job"] == "copy" && r["outcome"] == "ok")
    });
    wait_for("the secondary_behind alert to resolve", 60, || {
        fired("resolved")
    });
    let (_, m) = a.get("/metrics");
    assert!(
        metric(
            &m,
            "custos_secondary_in_sync_timestamp_seconds{secondary=\"dr\"}"
        )
        .is_some(),
        "{m}"
    );
    assert!(
        metric(&m, "custos_secondary_lag_seconds{secondary=\"dr\"}").unwrap() < 3.0,
        "{m}"
    );
    let dom = chromium(&a.addr, &["--dump-dom"]);
    assert!(dom.contains(&row("ok")), "{dom}");
    assert!(a.stop().success());
    // The copy is whole: the secondary lists what the primary does.
    assert_eq!(
        t.json(&[
            "--config",
            cfg.to_str().unwrap(),
            "--secondary",
            "dr",
            "snapshots"
        ]),
        t.json(&["snapshots"])
    );
}

/// A restore drill the agent runs: one that fails is the critical `drill_failed` alert and
/// the status page says so; once there is something to restore the next run passes, the
/// alert resolves and the page shows the passed drill.
#[test]
fn a_failed_drill_alerts_and_the_status_page_shows_the_last_drill() {
    let t = T::new();
    let state = t.path("agent-state");
    let scratch = t.path("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let cfg = t.path("custos.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nstate_dir = \"{}\"\nretry_base = \"1s\"\n\n[drill]\nscratch = \"{}\"\n\n\
             [[job]]\nname = \"drill-files\"\nrun = \"drill-files\"\nschedule = \"*/2 * * * * *\"\nretries = 0\n",
            state.display(),
            scratch.display()
        ),
    )
    .unwrap();
    let a = Agent::start(&t, &cfg, &[]);
    // Nothing backed up yet: the drill has nothing to restore and fails.
    wait_for("the drill_failed alert", 60, || {
        metric(
            &a.get("/metrics").1,
            "custos_alerts_firing{alert=\"drill_failed\"}",
        ) == Some(1.0)
    });
    assert!(
        a.get("/").1.contains("FAILED"),
        "the status page hides the failed drill"
    );
    let src = t.path("src");
    make_tree(&src, 4, 6, 20_000);
    t.ok(&["backup", "files", src.to_str().unwrap()]);
    wait_for("the alert to resolve", 60, || {
        metric(
            &a.get("/metrics").1,
            "custos_alerts_firing{alert=\"drill_failed\"}",
        ) == Some(0.0)
    });
    let page = a.get("/").1;
    assert!(page.contains("passed"), "{page}");
    assert!(a.stop().success());
    assert!(
        std::fs::read_dir(&scratch).unwrap().next().is_none(),
        "scratch left behind"
    );
}
