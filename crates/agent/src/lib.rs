//! The agent that runs custos's schedule (`custos agent`): one long-running process that
//! starts each job of custos.toml at its slots (as a child custos command), keeps each
//! job's state in its state folder and the operation trail, reads the cluster's archiver
//! and the repository, raises and resolves alerts, writes the daily report, and serves
//! `/metrics`, `/healthz`, `/readyz` and a status page.
//!
//! The clock is an argument: with [`ClockMode::Simulated`] the agent jumps from slot to
//! slot (runs take no simulated time) and stops at the end, so a test runs a week of the
//! real schedule against a real repository in minutes.

pub mod alerts;
pub mod audit;
pub mod config;
pub mod http;
pub mod metrics;
pub mod observe;
pub mod page;
pub mod report;
pub mod runner;
pub mod schedule;
pub mod state;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use custos_model::{Error, Result};
use custos_sources::postgres::db::ConnectOptions;

use crate::alerts::{Alerts, Condition};
use crate::config::{AgentConfig, Category};
use crate::observe::{RepoHandle, RepoObs, WalObs};
use crate::runner::{ChildCommand, StopHandle};
use crate::schedule::{JobState, Schedule};
use crate::state::{Outcome, RunRecord, Store};

pub enum ClockMode {
    System,
    /// Jump from slot to slot between `from` and `to`; exit at `to`.
    Simulated {
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    },
}

/// What the agent needs from the CLI besides its configuration.
pub struct AgentContext {
    pub child: ChildCommand,
    pub repo: Arc<RepoHandle>,
    /// The cluster whose archiver is watched (None: no [postgres] configured).
    pub conn: Option<ConnectOptions>,
    /// Builds the configuration again from custos.toml (SIGHUP), or says why not.
    pub reload: Box<dyn Fn() -> Result<AgentConfig> + Send + Sync>,
    pub clock: ClockMode,
    pub host: String,
    /// Printed once the listener is bound (tests and the demo wait for it).
    pub on_listening: Box<dyn Fn(std::net::SocketAddr) + Send + Sync>,
}

#[derive(Default)]
pub struct Observed {
    pub wal: Option<WalObs>,
    pub wal_error: Option<String>,
    pub repo: Option<RepoObs>,
    pub repo_error: Option<String>,
}

/// The state every part reads: the loop writes it, the HTTP handlers render it.
pub struct Shared {
    pub cfg: AgentConfig,
    pub store: Store,
    pub running: BTreeSet<String>,
    pub observed: Observed,
    /// (time, lag seconds) of the last 24 hours.
    pub lag_samples: VecDeque<(DateTime<Utc>, f64)>,
    pub alerts: Alerts,
    pub started: DateTime<Utc>,
    pub now: DateTime<Utc>,
    pub host: String,
    /// Configuration reloads: accepted, refused; and why the last was refused.
    pub reloads: (u64, u64),
    pub reload_error: Option<String>,
    pub stopping: bool,
    /// The clock is simulated: pages show its time.
    pub simulated: bool,
    pub last_report: Option<(String, String)>,
}

impl Shared {
    /// The end and result of the newest verification run.
    pub fn last_verify(&self) -> Option<(DateTime<Utc>, bool)> {
        self.cfg
            .jobs
            .iter()
            .filter(|j| j.verifies)
            .filter_map(|j| self.store.jobs.get(&j.name)?.last.as_ref())
            .max_by_key(|r| r.end)
            .map(|r| (r.end, r.outcome == Outcome::Ok))
    }

    /// The newest restore drill's end and whether it passed.
    pub fn last_drill(&self) -> Option<(DateTime<Utc>, bool)> {
        self.cfg
            .jobs
            .iter()
            .filter(|j| j.drills())
            .filter_map(|j| self.store.jobs.get(&j.name)?.last.as_ref())
            .max_by_key(|r| r.end)
            .map(|r| (r.end, r.outcome == Outcome::Ok))
    }

    /// The newest point the category can be restored to: for the database the archive's
    /// restorable end (or the newest archived segment), else the newest snapshot; what
    /// the jobs of this agent last produced counts too.
    pub fn newest_point(&self, c: &Category) -> Option<DateTime<Utc>> {
        let mut best: Option<DateTime<Utc>> = None;
        let mut take = |t: DateTime<Utc>| best = Some(best.map_or(t, |b| b.max(t)));
        if let Some(r) = &self.observed.repo {
            for m in &c.matches {
                if m == "postgres" {
                    for cl in &r.info.clusters {
                        take(cl.restorable_until.unwrap_or(cl.newest.time));
                    }
                } else {
                    for s in &r.info.sources {
                        if &s.source == m || &s.kind == m {
                            take(s.newest.time);
                        }
                    }
                }
            }
        }
        if c.matches.iter().any(|m| m == "postgres") {
            if let Some(t) = self
                .observed
                .wal
                .as_ref()
                .and_then(|w| (w.pending == 0).then_some(w.time).or(w.last_archived_time))
            {
                take(t);
            }
        }
        for j in self
            .cfg
            .jobs
            .iter()
            .filter(|j| j.category.as_ref() == Some(&c.name))
        {
            if let Some(t) = self.store.jobs.get(&j.name).and_then(|r| r.last_success) {
                take(t);
            }
        }
        best
    }

    /// How far a secondary may be behind the primary: the time since a copy last left it
    /// in sync (since the agent's state began, if never).
    pub fn secondary_lag(&self, name: &str, now: DateTime<Utc>) -> f64 {
        let t = self
            .store
            .secondaries
            .get(name)
            .copied()
            .unwrap_or(self.store.since);
        (now - t).num_milliseconds().max(0) as f64 / 1000.0
    }

    /// The next slot of any job of the category.
    pub fn next_run(&self, c: &Category, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cfg
            .jobs
            .iter()
            .filter(|j| j.category.as_ref() == Some(&c.name))
            .filter_map(|j| j.schedule.next_after(now))
            .min()
    }

    /// The conditions that hold now.
    pub fn conditions(&self, now: DateTime<Utc>) -> Vec<Condition> {
        let mut out = vec![];
        let cluster = &self.cfg.cluster;
        if let Some(w) = &self.observed.wal {
            let limit = self.cfg.wal_lag_alert.as_secs();
            let lag = w.lag_seconds.unwrap_or(u64::MAX);
            if w.pending > 0 && lag > limit {
                out.push(Condition {
                    alert: "wal_archive_lag".into(),
                    subject: format!("cluster {cluster}"),
                    severity: "critical",
                    summary: format!(
                        "WAL archiving of cluster {cluster} lags: {} file(s) waiting, {} (limit {})",
                        w.pending,
                        if lag == u64::MAX { "none ever archived".to_string() } else { format!("the oldest waiting for {}", human(lag)) },
                        human(limit)
                    ),
                });
            }
        }
        if let Some(e) = &self.observed.wal_error {
            out.push(Condition {
                alert: "database_unreachable".into(),
                subject: format!("cluster {cluster}"),
                severity: "critical",
                summary: format!("the agent cannot read cluster {cluster}'s archiver: {e}"),
            });
        }
        if self.observed.repo_error.is_some() {
            out.push(Condition {
                alert: "repository_unreachable".into(),
                subject: "repository".into(),
                severity: "critical",
                summary: "the repository cannot be read (see the agent's log)".into(),
            });
        }
        for j in &self.cfg.jobs {
            let Some(rec) = self.store.jobs.get(&j.name) else {
                continue;
            };
            let Some(last) = &rec.last else { continue };
            if last.outcome != Outcome::Ok {
                out.push(Condition {
                    alert: if j.verifies {
                        "verify_failed"
                    } else if j.drills() {
                        "drill_failed"
                    } else {
                        "job_failed"
                    }
                    .into(),
                    subject: format!("job {}", j.name),
                    severity: if j.verifies || j.drills() {
                        "critical"
                    } else {
                        "warning"
                    },
                    summary: format!(
                        "job `{}` {} at {} after {} attempt(s){}",
                        j.name,
                        last.outcome.as_str(),
                        last.end.format("%Y-%m-%d %H:%M UTC"),
                        last.attempts,
                        last.error_kind
                            .as_ref()
                            .map(|k| format!(": {k}"))
                            .unwrap_or_default()
                    ),
                });
            }
        }
        for c in &self.cfg.categories {
            let Some(interval) = c.interval else { continue };
            let limit =
                chrono::Duration::from_std(interval.mul_f64(1.5)).unwrap_or(chrono::Duration::MAX);
            let newest = self.newest_point(c);
            let reference = newest.unwrap_or(self.store.since);
            if now - reference > limit {
                out.push(Condition {
                    alert: "backup_stale".into(),
                    subject: format!("category {}", c.name),
                    severity: "warning",
                    summary: match newest {
                        Some(t) => format!(
                            "the newest {} backup is {} old (over 1.5 x its interval of {})",
                            c.name,
                            human((now - t).num_seconds().max(0) as u64),
                            human(interval.as_secs())
                        ),
                        None => format!(
                            "no {} backup yet, {} after the agent started",
                            c.name,
                            human((now - reference).num_seconds().max(0) as u64)
                        ),
                    },
                });
            }
        }
        for (name, limit) in &self.cfg.secondaries {
            let lag = self.secondary_lag(name, now);
            if lag > limit.as_secs_f64() {
                let since = self.store.secondaries.get(name);
                out.push(Condition {
                    alert: "secondary_behind".into(),
                    subject: format!("secondary {name}"),
                    severity: "critical",
                    summary: match since {
                        Some(t) => format!(
                            "the secondary `{name}` has not been in sync with the primary since {} ({} behind, limit {})",
                            t.format("%Y-%m-%d %H:%M UTC"),
                            human(lag as u64),
                            human(limit.as_secs())
                        ),
                        None => format!(
                            "the secondary `{name}` has not been copied to since the agent started {} ago (limit {})",
                            human(lag as u64),
                            human(limit.as_secs())
                        ),
                    },
                });
            }
        }
        if let Some(r) = &self.observed.repo {
            for k in r.keys.iter().filter(|k| k.overdue) {
                let who =
                    k.id.map(|i| format!("key {}", i.short()))
                        .unwrap_or_else(|| "data key pair".into());
                out.push(Condition {
                    alert: "key_age".into(),
                    subject: who.clone(),
                    severity: "warning",
                    summary: format!(
                        "{who} is {} days old, past the crypto-period of {} days",
                        k.age_days,
                        self.cfg.key_max_age.as_secs() / 86400
                    ),
                });
            }
        }
        out
    }
}

pub fn human(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

enum Clock {
    System,
    Sim(DateTime<Utc>, DateTime<Utc>),
}

impl Clock {
    fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Sim(now, _) => *now,
        }
    }
}

/// A run's end, reported by its task.
struct Done {
    record: RunRecord,
    error: Option<String>,
}

/// Runs the agent until SIGTERM (or the end of a simulated period). Returns when every
/// job has ended or been stopped and the state is saved.
pub async fn run(cfg: AgentConfig, ctx: AgentContext) -> Result<()> {
    let mut clock = match ctx.clock {
        ClockMode::System => Clock::System,
        ClockMode::Simulated { from, to } => Clock::Sim(from, to),
    };
    let start = clock.now();
    let mut store = Store::open(&cfg.state_dir, start)?;
    // A run the state says was going on: the agent died during it. It counts as
    // interrupted and, if the job has retries, runs again now.
    let mut rerun: Vec<(String, DateTime<Utc>)> = vec![];
    for (name, rec) in store.jobs.clone() {
        if let Some(since) = rec.running_since {
            let slot = rec.last_slot.unwrap_or(since);
            store.finish(
                RunRecord {
                    job: name.clone(),
                    slot,
                    start: since,
                    end: since,
                    outcome: Outcome::Interrupted,
                    attempts: 1,
                    exit_code: None,
                    error_kind: Some("interrupted".into()),
                    bytes_read: 0,
                    bytes_stored: 0,
                    snapshots: vec![],
                    in_sync: Default::default(),
                },
                Some("the agent stopped while the job ran".into()),
            )?;
            if cfg.jobs.iter().any(|j| j.name == name && j.retries > 0) {
                rerun.push((name, slot));
            }
        }
    }
    // A job new to this state folder starts at its next slot, not with a catch-up run.
    for j in &cfg.jobs {
        store
            .jobs
            .entry(j.name.clone())
            .or_insert_with(|| state::JobRecord {
                last_slot: Some(start),
                ..Default::default()
            });
    }
    store.save()?;
    store.compact_history()?;

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| {
            Error::config(format!("the agent cannot listen on {}: {e}", cfg.listen))
                .hint("choose another address with --listen or [agent] listen")
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::config(e.to_string()))?;
    let shared = Arc::new(Mutex::new(Shared {
        cfg,
        store,
        running: BTreeSet::new(),
        observed: Observed::default(),
        lag_samples: VecDeque::new(),
        alerts: Alerts::default(),
        started: start,
        now: start,
        host: ctx.host.clone(),
        reloads: (0, 0),
        reload_error: None,
        stopping: false,
        simulated: matches!(clock, Clock::Sim(..)),
        last_report: None,
    }));
    tokio::spawn(http::serve(listener, shared.clone(), ctx.repo.clone()));
    (ctx.on_listening)(addr);
    tracing::info!("agent listening on {addr}");

    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| Error::config(e.to_string()))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| Error::config(e.to_string()))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(|e| Error::config(e.to_string()))?;
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<Done>();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stops: BTreeMap<String, StopHandle> = BTreeMap::new();
    let child = Arc::new(ctx.child);
    let trail = Arc::new(observe::TrailQueue::start(ctx.repo.clone()));
    let sim_now = Arc::new(Mutex::new(start));
    let mut next_wal_probe = start;
    let mut next_repo_probe = start;
    let mut last_report_slot: Option<DateTime<Utc>> = None;

    loop {
        let now = clock.now();
        *sim_now.lock().unwrap() = now;
        if matches!(clock, Clock::Sim(..)) {
            custos_model::clock::set_simulated(now);
        }
        // Start what is due.
        let starts = {
            let mut s = shared.lock().unwrap();
            s.now = now;
            let schedules: Vec<Schedule> = s.cfg.jobs.iter().map(|j| j.schedule.clone()).collect();
            let states: Vec<JobState> = s
                .cfg
                .jobs
                .iter()
                .map(|j| JobState {
                    last_slot: s.store.jobs.get(&j.name).and_then(|r| r.last_slot),
                    running: s.running.contains(&j.name),
                })
                .collect();
            let mut due: Vec<(usize, DateTime<Utc>)> =
                schedule::due(&schedules, &states, s.store.since, now);
            for (name, slot) in rerun.drain(..) {
                if let Some(i) = s.cfg.jobs.iter().position(|j| j.name == name) {
                    if !due.iter().any(|(d, _)| *d == i) {
                        due.push((i, slot));
                    }
                }
            }
            // Maintenance (forget, prune) runs alone: it removes snapshots a running
            // backup may be building on. When one is due, nothing new starts until it
            // has run; it starts once the jobs running have ended.
            let exclusive_running = s
                .cfg
                .jobs
                .iter()
                .any(|j| j.exclusive && s.running.contains(&j.name));
            let exclusive_due = due.iter().any(|(i, _)| s.cfg.jobs[*i].exclusive);
            let mut others_running = !s.running.is_empty();
            let mut starts = vec![];
            for (i, slot) in due {
                let spec = s.cfg.jobs[i].clone();
                if exclusive_running
                    || (exclusive_due && !spec.exclusive)
                    || (spec.exclusive && others_running)
                {
                    continue;
                }
                others_running = true;
                let rec = s.store.jobs.entry(spec.name.clone()).or_default();
                rec.last_slot = Some(rec.last_slot.map_or(slot, |l| l.max(slot)));
                rec.running_since = Some(now);
                s.running.insert(spec.name.clone());
                starts.push((spec, slot));
            }
            if !starts.is_empty() {
                s.store.save()?;
            }
            (s.cfg.retry_base, starts)
        };
        let (retry_base, starts) = starts;
        for (spec, slot) in starts {
            tracing::info!(
                "job `{}`: starting (slot {})",
                spec.name,
                slot.format("%Y-%m-%d %H:%M:%S")
            );
            let stop = StopHandle::default();
            stops.insert(spec.name.clone(), stop.clone());
            let (tx, child, stop_rx, sim_now) = (
                done_tx.clone(),
                child.clone(),
                stop_rx.clone(),
                sim_now.clone(),
            );
            let sim = matches!(clock, Clock::Sim(..));
            // Spawned on this thread's runtime (current-thread): the child's parent-death
            // signal follows this thread, which lives as long as the agent.
            tokio::spawn(async move {
                let now = move || {
                    if sim {
                        *sim_now.lock().unwrap()
                    } else {
                        Utc::now()
                    }
                };
                let (record, error) =
                    runner::run_job(&spec, &child, slot, retry_base, &stop, &stop_rx, &now).await;
                let _ = tx.send(Done { record, error });
            });
        }

        // Probes.
        let (probe_interval, repo_interval, key_max_age) = {
            let s = shared.lock().unwrap();
            (
                s.cfg.probe_interval,
                s.cfg.repo_probe_interval,
                s.cfg.key_max_age,
            )
        };
        if now >= next_wal_probe {
            if let Some(conn) = ctx.conn.clone() {
                let r = tokio::time::timeout(
                    Duration::from_secs(20),
                    tokio::task::spawn_blocking(move || observe::observe_wal(&conn)),
                )
                .await;
                let mut s = shared.lock().unwrap();
                match r {
                    Ok(Ok(Ok(w))) => {
                        let lag = w.lag_seconds.map(|l| l as f64).unwrap_or(f64::NAN);
                        s.lag_samples.push_back((now, lag));
                        while s
                            .lag_samples
                            .front()
                            .is_some_and(|(t, _)| now - *t > chrono::Duration::hours(24))
                        {
                            s.lag_samples.pop_front();
                        }
                        s.observed.wal = Some(w);
                        s.observed.wal_error = None;
                    }
                    Ok(Ok(Err(e))) => {
                        s.observed.wal_error =
                            Some(format!("E{:02} {}", e.kind.code(), e.kind.name()))
                    }
                    _ => s.observed.wal_error = Some("no answer within 20s".into()),
                }
            }
            next_wal_probe = now + chrono::Duration::from_std(probe_interval).unwrap_or_default();
        }
        if now >= next_repo_probe {
            let repo = ctx.repo.clone();
            let r = tokio::task::spawn_blocking(move || observe::observe_repo(&repo, key_max_age))
                .await;
            let mut s = shared.lock().unwrap();
            match r {
                Ok(Ok(o)) => {
                    s.observed.repo = Some(o);
                    s.observed.repo_error = None;
                }
                Ok(Err(e)) => {
                    tracing::warn!("the repository cannot be read: {}", e.message);
                    s.observed.repo_error =
                        Some(format!("E{:02} {}", e.kind.code(), e.kind.name()));
                }
                Err(e) => s.observed.repo_error = Some(e.to_string()),
            }
            next_repo_probe = now + chrono::Duration::from_std(repo_interval).unwrap_or_default();
        }

        // Alerts.
        let notes = {
            let mut s = shared.lock().unwrap();
            let conds = s.conditions(now);
            let (repeat, host) = (s.cfg.alert_repeat, s.host.clone());
            let notes = s.alerts.evaluate(&conds, now, repeat, &host);
            (s.cfg.sinks.clone(), notes)
        };
        let (sinks, notes) = notes;
        for n in notes {
            tracing::warn!("alert {}: {} ({})", n.status, n.summary, n.subject);
            if !n.repeat {
                let touched = serde_json::json!({"alert": n.alert, "subject": n.subject, "status": n.status, "severity": n.severity, "since": n.since});
                trail.send(&format!("agent alert {}", n.status), touched, "ok");
            }
            let sinks = sinks.clone();
            tokio::spawn(async move {
                alerts::send(&sinks, &n).await;
            });
        }

        // The daily report of the day before.
        let report_slot = {
            let s = shared.lock().unwrap();
            s.cfg
                .report_schedule
                .newest_due(last_report_slot.unwrap_or(start), now)
        };
        if let Some(slot) = report_slot {
            last_report_slot = Some(slot);
            let day = (slot - chrono::Duration::days(1)).date_naive();
            let (shared2, repo) = (shared.clone(), ctx.repo.clone());
            let r = tokio::task::spawn_blocking(move || report::write_daily(&shared2, &repo, day))
                .await;
            match r {
                Ok(Ok(rep)) => {
                    let sinks = shared.lock().unwrap().cfg.sinks.clone();
                    let n = report::notification(&rep, &ctx.host, now);
                    tokio::spawn(async move {
                        alerts::send(&sinks, &n).await;
                    });
                }
                Ok(Err(e)) => tracing::warn!(
                    "the daily report for {day} could not be written: {}",
                    e.message
                ),
                Err(e) => tracing::warn!("the daily report for {day} failed: {e}"),
            }
        }

        // Sleep until something happens.
        let wake = {
            let s = shared.lock().unwrap();
            let mut w: Vec<DateTime<Utc>> = s
                .cfg
                .jobs
                .iter()
                .filter(|j| !s.running.contains(&j.name))
                .filter_map(|j| j.schedule.next_after(now))
                .collect();
            // A simulated clock jumps from slot to slot: probes run at those jumps only.
            if !matches!(clock, Clock::Sim(..)) {
                if ctx.conn.is_some() {
                    w.push(next_wal_probe);
                }
                w.push(next_repo_probe);
            }
            if let Some(t) = s.cfg.report_schedule.next_after(now) {
                w.push(t);
            }
            w.into_iter().min()
        };
        let idle = shared.lock().unwrap().running.is_empty();
        let sleep: Duration = match &mut clock {
            Clock::System => wake
                .map(|w| (w - Utc::now()).to_std().unwrap_or_default())
                .unwrap_or(Duration::from_secs(60))
                .min(Duration::from_secs(60)),
            Clock::Sim(t, end) => {
                if idle {
                    match wake {
                        Some(w) if w <= *end => {
                            *t = w.max(*t);
                            Duration::ZERO
                        }
                        _ => break,
                    }
                } else {
                    Duration::from_secs(3600)
                }
            }
        };
        if sleep.is_zero() {
            // Let the tasks just spawned make progress, then loop.
            tokio::task::yield_now().await;
            if matches!(clock, Clock::Sim(..)) {
                continue;
            }
        }
        tokio::select! {
            d = done_rx.recv() => {
                if let Some(d) = d {
                    finished(&shared, &trail, &mut stops, d);
                    next_repo_probe = next_repo_probe.min(clock.now());
                }
            }
            _ = tokio::time::sleep(sleep) => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                let mut s = shared.lock().unwrap();
                match (ctx.reload)() {
                    Ok(new) => {
                        if new.listen != s.cfg.listen {
                            tracing::warn!("[agent] listen changed: it takes effect at the next start");
                        }
                        for j in &new.jobs {
                            s.store.jobs.entry(j.name.clone()).or_insert_with(|| state::JobRecord { last_slot: Some(now), ..Default::default() });
                        }
                        let listen = s.cfg.listen;
                        s.cfg = AgentConfig { listen, ..new };
                        s.reloads.0 += 1;
                        s.reload_error = None;
                        tracing::warn!("configuration reloaded: {} job(s)", s.cfg.jobs.len());
                    }
                    Err(e) => {
                        s.reloads.1 += 1;
                        let msg = format!("{}{}", e.message, e.hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default());
                        tracing::error!("configuration reload refused, the running configuration stays: {msg}");
                        s.reload_error = Some(msg);
                    }
                }
            }
        }
    }

    // Stop: no new runs; running ones get the grace period, then are stopped.
    let grace = {
        let mut s = shared.lock().unwrap();
        s.stopping = true;
        s.cfg.grace
    };
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + grace;
    let mut signalled = false;
    while !shared.lock().unwrap().running.is_empty() {
        let until = if signalled {
            deadline + Duration::from_secs(15)
        } else {
            deadline
        };
        tokio::select! {
            d = done_rx.recv() => if let Some(d) = d { finished(&shared, &trail, &mut stops, d) },
            _ = tokio::time::sleep_until(until) => {
                if signalled {
                    stops.values().for_each(|s| s.signal(libc::SIGKILL));
                } else {
                    tracing::warn!("grace period over: stopping {} running job(s)", stops.len());
                    stops.values().for_each(|s| s.signal(libc::SIGTERM));
                    signalled = true;
                }
            }
        }
    }
    shared.lock().unwrap().store.save()?;
    trail.flush(Duration::from_secs(60));
    tracing::info!("agent stopped");
    Ok(())
}

/// A run ended: its state, its trail entry.
fn finished(
    shared: &Arc<Mutex<Shared>>,
    trail: &observe::TrailQueue,
    stops: &mut BTreeMap<String, StopHandle>,
    d: Done,
) {
    let name = d.record.job.clone();
    stops.remove(&name);
    let record = d.record.clone();
    {
        let mut s = shared.lock().unwrap();
        s.running.remove(&name);
        let stopping = s.stopping;
        let mut rec = d.record;
        if stopping && rec.outcome != Outcome::Ok && rec.exit_code.is_none() {
            rec.outcome = Outcome::Interrupted;
        }
        if let Err(e) = s.store.finish(rec, d.error) {
            tracing::error!("{}", e.message);
        }
    }
    tracing::info!(
        "job `{name}`: {} after {:.1}s ({} attempt(s))",
        record.outcome.as_str(),
        record.seconds(),
        record.attempts
    );
    let touched = serde_json::json!({
        "job": record.job, "slot": record.slot, "start": record.start, "end": record.end,
        "attempts": record.attempts, "bytes": record.bytes_read, "bytes_stored": record.bytes_stored,
        "snapshots": record.snapshots,
    });
    let result = match (&record.outcome, &record.error_kind) {
        (Outcome::Ok, _) => "ok".to_string(),
        (o, Some(k)) => format!("{} ({k})", o.as_str()),
        (o, None) => o.as_str().to_string(),
    };
    trail.send("agent job", touched, &result);
}
