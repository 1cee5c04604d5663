//! One run of a job: the custos command line as a child process (its own process group,
//! killed with the agent if the agent dies), with a timeout per attempt, retries with
//! exponential backoff and jitter, and a wait for the repository's exclusive lock instead
//! of a failure. A child is the unit of isolation: a crash, a leak or a hang in one backup
//! does not touch the agent, and what stops a child early (timeout, SIGTERM past the
//! grace period) is what any custos command already survives: a kill.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use tokio::io::AsyncReadExt;
use zeroize::Zeroizing;

use crate::config::JobSpec;
use crate::state::{Outcome, RunRecord};

/// How the agent starts custos: its own executable, the global flags every child gets
/// (`--config`, `--repo`), and the secrets it hands over in the child's environment
/// (never in argv).
#[derive(Clone)]
pub struct ChildCommand {
    pub exe: PathBuf,
    pub global: Vec<OsString>,
    pub env: Vec<(String, Zeroizing<String>)>,
}

/// Exit codes of custos (custos_model::Kind).
const EXIT_CONFIG: i32 = 2;
const EXIT_PARTIAL: i32 = 3;
const EXIT_LOCKED: i32 = 11;

/// What one attempt gave.
struct Attempt {
    outcome: Outcome,
    exit_code: Option<i32>,
    error_kind: Option<String>,
    error: Option<String>,
    json: Option<serde_json::Value>,
}

/// Stops a running job early: the process group gets SIGTERM, then SIGKILL.
#[derive(Clone, Default)]
pub struct StopHandle(std::sync::Arc<std::sync::Mutex<Option<i32>>>);

impl StopHandle {
    fn set(&self, pid: Option<i32>) {
        *self.0.lock().unwrap() = pid;
    }
    pub fn pid(&self) -> Option<i32> {
        *self.0.lock().unwrap()
    }
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill has no memory preconditions; a negative pid names the group.
            unsafe { libc::kill(-pid, sig) };
        }
    }
}

/// Runs the job to its end (all attempts). `now` reads the agent's clock.
pub async fn run_job(
    spec: &JobSpec,
    child: &ChildCommand,
    slot: DateTime<Utc>,
    retry_base: Duration,
    stop: &StopHandle,
    stopping: &tokio::sync::watch::Receiver<bool>,
    now: &(dyn Fn() -> DateTime<Utc> + Send + Sync),
) -> (RunRecord, Option<String>) {
    let start = now();
    let started = std::time::Instant::now();
    let mut attempts = 0;
    let mut retries_left = spec.retries;
    let mut delay = retry_base;
    let last = loop {
        attempts += 1;
        let a = attempt(
            spec,
            child,
            spec.timeout.saturating_sub(started.elapsed()),
            stop,
        )
        .await;
        let again = match (a.outcome, a.exit_code) {
            (Outcome::Ok | Outcome::Partial | Outcome::Interrupted, _) => false,
            // A config error does not pass by retrying.
            (_, Some(EXIT_CONFIG)) => false,
            // The exclusive lock is held (prune while a backup runs, or the other way
            // round): wait for it, within the job's timeout, without using a retry.
            (_, Some(EXIT_LOCKED)) => started.elapsed() < spec.timeout,
            _ => {
                let go = retries_left > 0;
                retries_left = retries_left.saturating_sub(1);
                go
            }
        };
        if !again || *stopping.borrow() {
            break a;
        }
        let wait = if a.exit_code == Some(EXIT_LOCKED) {
            retry_base.min(Duration::from_secs(30))
        } else {
            let w = delay;
            delay = (delay * 2).min(Duration::from_secs(3600));
            w
        };
        // Jitter: 75% to 125% of the wait, so that agents of several hosts do not retry
        // in step.
        let wait = wait.mul_f64(rand::rng().random_range(0.75..1.25));
        tracing::info!(
            "job `{}`: attempt {attempts} ended {} (exit {:?}); next attempt in {:.1}s",
            spec.name,
            a.outcome.as_str(),
            a.exit_code,
            wait.as_secs_f64()
        );
        let mut stopping = stopping.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopping.wait_for(|s| *s) => break a,
        }
    };
    let (mut bytes_read, mut bytes_stored, mut snapshots) = (0, 0, vec![]);
    let mut in_sync = std::collections::BTreeMap::new();
    if let Some(j) = &last.json {
        collect(j, &mut bytes_read, &mut bytes_stored, &mut snapshots);
        in_sync = copied(j);
    }
    let record = RunRecord {
        job: spec.name.clone(),
        slot,
        start,
        end: now().max(start),
        outcome: last.outcome,
        attempts,
        exit_code: last.exit_code,
        error_kind: last.error_kind,
        bytes_read,
        bytes_stored,
        snapshots,
        in_sync,
    };
    (record, last.error)
}

/// From `copy --json`: per secondary the time as of which it is in sync.
fn copied(v: &serde_json::Value) -> std::collections::BTreeMap<String, DateTime<Utc>> {
    v.get("secondaries")
        .and_then(|s| s.as_array())
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let name = s.get("secondary")?.as_str()?.to_string();
            let t = s.get("in_sync_as_of")?.as_str()?.parse().ok()?;
            Some((name, t))
        })
        .collect()
}

/// Snapshot ids and byte counts from a command's JSON output (a backup report, a list of
/// them, or a PostgreSQL backup report around one).
fn collect(v: &serde_json::Value, read: &mut u64, stored: &mut u64, snaps: &mut Vec<String>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect(x, read, stored, snaps)),
        serde_json::Value::Object(o) => {
            if let (Some(id), Some(stats)) =
                (o.get("snapshot").and_then(|s| s.as_str()), o.get("stats"))
            {
                snaps.push(id.to_string());
                *read += stats.get("bytes").and_then(|b| b.as_u64()).unwrap_or(0);
                *stored += stats
                    .get("bytes_stored")
                    .and_then(|b| b.as_u64())
                    .unwrap_or(0);
            } else if let Some(b) = o.get("backup").or_else(|| o.get("backups")) {
                collect(b, read, stored, snaps);
            }
        }
        _ => {}
    }
}

async fn attempt(
    spec: &JobSpec,
    child: &ChildCommand,
    timeout: Duration,
    stop: &StopHandle,
) -> Attempt {
    let mut cmd = tokio::process::Command::new(&child.exe);
    cmd.args(&child.global)
        .args(["--json", "--quiet"])
        .args(&spec.argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (k, v) in &child.env {
        cmd.env(k, v.as_str());
    }
    // Its trail entry names the job (the report ties a failure to it).
    cmd.env("CUSTOS_AGENT_JOB", &spec.name);
    // On the agent's test clock the command lives at the simulated time too.
    if let Some(t) = custos_model::clock::simulated() {
        cmd.env("CUSTOS_TEST_NOW", t.to_rfc3339());
    }
    // The child dies with the agent (SIGKILL included), so that a restarted agent never
    // finds the last run still going beside its new one.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut proc = match cmd.spawn() {
        Ok(p) => p,
        Err(e) => {
            return Attempt {
                outcome: Outcome::Failed,
                exit_code: None,
                error_kind: Some("spawn".into()),
                error: Some(format!("cannot start {}: {e}", child.exe.display())),
                json: None,
            }
        }
    };
    stop.set(proc.id().map(|p| p as i32));
    let mut stdout = proc.stdout.take().expect("piped");
    let mut stderr = proc.stderr.take().expect("piped");
    let read_out = async move {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b).await;
        b
    };
    let read_err = async move {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b).await;
        b
    };
    let waited = async {
        let (out, err, status) = tokio::join!(read_out, read_err, proc.wait());
        (out, err, status)
    };
    let result = tokio::time::timeout(timeout, waited).await;
    let (out, err, status) = match result {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(
                "job `{}`: timed out after {}",
                spec.name,
                humantime::format_duration(timeout)
            );
            stop.signal(libc::SIGTERM);
            tokio::time::sleep(Duration::from_secs(5)).await;
            stop.signal(libc::SIGKILL);
            stop.set(None);
            return Attempt {
                outcome: Outcome::Timeout,
                exit_code: None,
                error_kind: Some("timeout".into()),
                error: Some(format!(
                    "stopped after its timeout of {}",
                    humantime::format_duration(timeout)
                )),
                json: None,
            };
        }
    };
    stop.set(None);
    let json: Option<serde_json::Value> = serde_json::from_slice(&out).ok();
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return Attempt {
                outcome: Outcome::Failed,
                exit_code: None,
                error_kind: Some("wait".into()),
                error: Some(e.to_string()),
                json,
            }
        }
    };
    let code = status.code();
    use std::os::unix::process::ExitStatusExt;
    let outcome = match (code, status.signal()) {
        (Some(0), _) => Outcome::Ok,
        (Some(EXIT_PARTIAL), _) => Outcome::Partial,
        (None, Some(_)) => Outcome::Interrupted,
        _ => Outcome::Failed,
    };
    let error = json.as_ref().and_then(|j| j.get("error")).cloned();
    let error_kind = error.as_ref().map(|e| {
        format!(
            "E{:02} {}",
            e.get("code").and_then(|c| c.as_u64()).unwrap_or(0),
            e.get("kind").and_then(|k| k.as_str()).unwrap_or("error")
        )
    });
    let message = match (&error, outcome) {
        (Some(e), _) => e.get("message").and_then(|m| m.as_str()).map(String::from),
        (None, Outcome::Ok) => None,
        (None, _) => {
            let text = String::from_utf8_lossy(&err);
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.to_string())
                .or_else(|| {
                    Some(match status.signal() {
                        Some(s) => format!("killed by signal {s}"),
                        None => format!("exit {}", code.unwrap_or(-1)),
                    })
                })
        }
    };
    Attempt {
        outcome,
        exit_code: code,
        error_kind: error_kind.or_else(|| {
            (outcome != Outcome::Ok).then(|| match code {
                Some(c) => format!("exit {c}"),
                None => "killed".into(),
            })
        }),
        error: message,
        json,
    }
}
