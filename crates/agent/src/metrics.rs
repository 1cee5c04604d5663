//! `/metrics`: the agent's state in the Prometheus text format, through prometheus-client.
//! A registry is built from the state at each scrape: the state is the truth (it survives
//! restarts), the exposition a view of it. Names follow Prometheus conventions: the
//! `custos_` prefix, base units in the name, `_total` on counters. Labels name jobs,
//! data categories, clusters, key ids and WAL segment names: nothing from inside a
//! backup, nothing secret.

use std::sync::atomic::AtomicU64;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::state::Outcome;
use crate::Shared;

type Labels = Vec<(String, String)>;
type G = Family<Labels, Gauge<f64, AtomicU64>>;

fn ts(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn render(s: &Shared, now: DateTime<Utc>) -> String {
    let mut reg = Registry::default();
    let gauge = |reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>| {
        let g = G::default();
        match unit {
            Some(u) => reg.register_with_unit(name, help, u, g.clone()),
            None => reg.register(name, help, g.clone()),
        }
        g
    };
    let set = |g: &G, labels: Labels, v: f64| {
        g.get_or_create(&labels).set(v);
    };

    // Jobs.
    let last_success = gauge(
        &mut reg,
        "custos_job_last_success_timestamp",
        "End of the job's last successful run, Unix time",
        Some(Unit::Seconds),
    );
    let last_failure = gauge(
        &mut reg,
        "custos_job_last_failure_timestamp",
        "End of the job's last failed run, Unix time",
        Some(Unit::Seconds),
    );
    let duration = gauge(
        &mut reg,
        "custos_job_last_duration",
        "Duration of the job's last run, all attempts",
        Some(Unit::Seconds),
    );
    let read = gauge(
        &mut reg,
        "custos_job_last_read",
        "Bytes the job's last run read from its source",
        Some(Unit::Bytes),
    );
    let stored = gauge(
        &mut reg,
        "custos_job_last_stored",
        "Bytes the job's last run added to the repository",
        Some(Unit::Bytes),
    );
    let running = gauge(&mut reg, "custos_job_running", "1 while the job runs", None);
    let next = gauge(
        &mut reg,
        "custos_job_next_run_timestamp",
        "The job's next scheduled slot, Unix time",
        Some(Unit::Seconds),
    );
    let runs = Family::<Labels, Counter>::default();
    reg.register("custos_job_runs", "Runs of the job by result", runs.clone());
    for j in &s.cfg.jobs {
        let lab = l(&[("job", &j.name)]);
        let rec = s.store.jobs.get(&j.name);
        if let Some(t) = rec.and_then(|r| r.last_success) {
            set(&last_success, lab.clone(), ts(t));
        }
        if let Some(t) = rec.and_then(|r| r.last_failure) {
            set(&last_failure, lab.clone(), ts(t));
        }
        if let Some(last) = rec.and_then(|r| r.last.as_ref()) {
            set(&duration, lab.clone(), last.seconds());
            set(&read, lab.clone(), last.bytes_read as f64);
            set(&stored, lab.clone(), last.bytes_stored as f64);
        }
        set(
            &running,
            lab.clone(),
            if s.running.contains(&j.name) {
                1.0
            } else {
                0.0
            },
        );
        if let Some(t) = j.schedule.next_after(now) {
            set(&next, lab.clone(), ts(t));
        }
        for o in Outcome::ALL {
            let n = rec
                .and_then(|r| r.runs.get(o.as_str()))
                .copied()
                .unwrap_or(0);
            runs.get_or_create(&l(&[("job", &j.name), ("result", o.as_str())]))
                .inc_by(n);
        }
    }

    // WAL archiving.
    if let Some(w) = &s.observed.wal {
        let c = s.cfg.cluster.as_str();
        let lag = gauge(
            &mut reg,
            "custos_wal_archive_lag",
            "How long the oldest complete WAL segment has waited to be archived (0: none waits)",
            Some(Unit::Seconds),
        );
        if let Some(v) = w.lag_seconds {
            set(&lag, l(&[("cluster", c)]), v as f64);
        }
        let pending = gauge(
            &mut reg,
            "custos_wal_pending_segments",
            "Complete WAL segments not yet archived",
            None,
        );
        set(&pending, l(&[("cluster", c)]), w.pending as f64);
        let last = gauge(
            &mut reg,
            "custos_wal_last_archived_timestamp",
            "When the archiver last archived a segment, Unix time",
            Some(Unit::Seconds),
        );
        if let Some(t) = w.last_archived_time {
            set(&last, l(&[("cluster", c)]), ts(t));
        }
        let info = gauge(
            &mut reg,
            "custos_wal_last_archived_segment",
            "The newest archived WAL segment, by name (value 1)",
            None,
        );
        if let Some(seg) = &w.last_archived {
            set(&info, l(&[("cluster", c), ("segment", seg)]), 1.0);
        }
        let failing = gauge(
            &mut reg,
            "custos_wal_archiver_failing",
            "1 when the archiver's last attempt failed",
            None,
        );
        set(
            &failing,
            l(&[("cluster", c)]),
            if w.failing { 1.0 } else { 0.0 },
        );
    }

    // Secondaries.
    if !s.cfg.secondaries.is_empty() {
        let lag = gauge(
            &mut reg,
            "custos_secondary_lag",
            "How far the secondary may be behind the primary: time since a copy last left it holding everything the primary held",
            Some(Unit::Seconds),
        );
        let synced = gauge(
            &mut reg,
            "custos_secondary_in_sync_timestamp",
            "When the secondary last held everything the primary held, Unix time",
            Some(Unit::Seconds),
        );
        for (name, _) in &s.cfg.secondaries {
            set(&lag, l(&[("secondary", name)]), s.secondary_lag(name, now));
            if let Some(t) = s.store.secondaries.get(name) {
                set(&synced, l(&[("secondary", name)]), ts(*t));
            }
        }
    }

    // The repository.
    let up = gauge(
        &mut reg,
        "custos_repository_up",
        "1 when the last look at the repository succeeded",
        None,
    );
    set(
        &up,
        vec![],
        if s.observed.repo_error.is_none() && s.observed.repo.is_some() {
            1.0
        } else {
            0.0
        },
    );
    if let Some(r) = &s.observed.repo {
        let i = &r.info.repository;
        let size = gauge(
            &mut reg,
            "custos_repository_size",
            "Bytes of every object in the repository",
            Some(Unit::Bytes),
        );
        set(&size, vec![], i.bytes as f64);
        let objects = gauge(
            &mut reg,
            "custos_repository_objects",
            "Objects in the repository by type",
            None,
        );
        set(&objects, l(&[("type", "pack")]), i.packs as f64);
        set(&objects, l(&[("type", "snapshot")]), i.snapshots as f64);
        set(&objects, l(&[("type", "wal")]), i.wal_files as f64);
        let keys = gauge(
            &mut reg,
            "custos_key_age",
            "Age of each key file and of the data key pair",
            Some(Unit::Seconds),
        );
        for k in &r.keys {
            let id =
                k.id.map(|i| i.to_string())
                    .unwrap_or_else(|| "data-key-pair".into());
            let role = k.role.clone().unwrap_or_else(|| "data".into());
            set(
                &keys,
                l(&[("key", &id), ("role", &role)]),
                (now - k.created).num_seconds().max(0) as f64,
            );
        }
        let looked = gauge(
            &mut reg,
            "custos_repository_observed_timestamp",
            "When the repository was last listed, Unix time",
            Some(Unit::Seconds),
        );
        set(&looked, vec![], ts(r.time));
    }

    // Verification.
    if let Some((t, ok)) = s.last_verify() {
        let v = gauge(
            &mut reg,
            "custos_verify_last_result",
            "1 when the last verification passed, 0 when it failed",
            None,
        );
        set(&v, vec![], if ok { 1.0 } else { 0.0 });
        let at = gauge(
            &mut reg,
            "custos_verify_last_timestamp",
            "End of the last verification, Unix time",
            Some(Unit::Seconds),
        );
        set(&at, vec![], ts(t));
    }

    // Freshness per data category.
    let rpo = gauge(
        &mut reg,
        "custos_rpo",
        "Age of the newest restorable point of the data category (its current RPO)",
        Some(Unit::Seconds),
    );
    for c in &s.cfg.categories {
        if let Some(t) = s.newest_point(c) {
            set(
                &rpo,
                l(&[("category", &c.name)]),
                (now - t).num_seconds().max(0) as f64,
            );
        }
    }

    // Alerts and the agent itself.
    let firing = gauge(
        &mut reg,
        "custos_alerts_firing",
        "Alerts that hold now, by alert",
        None,
    );
    for name in ALERT_NAMES {
        let n = s
            .alerts
            .firing
            .values()
            .filter(|f| f.alert == *name)
            .count();
        set(&firing, l(&[("alert", name)]), n as f64);
    }
    let reloads = Family::<Labels, Counter>::default();
    reg.register(
        "custos_agent_config_reloads",
        "Configuration reloads (SIGHUP) by result",
        reloads.clone(),
    );
    reloads
        .get_or_create(&l(&[("result", "ok")]))
        .inc_by(s.reloads.0);
    reloads
        .get_or_create(&l(&[("result", "refused")]))
        .inc_by(s.reloads.1);
    let start = gauge(
        &mut reg,
        "custos_agent_start_timestamp",
        "When the agent started, Unix time",
        Some(Unit::Seconds),
    );
    set(&start, vec![], ts(s.started));

    let mut out = String::new();
    encode(&mut out, &reg).expect("encoding to a String does not fail");
    out
}

/// The OpenMetrics exposition as the classic Prometheus text format (version 0.0.4),
/// which most scrapers and `promtool check metrics` read: a counter's HELP and TYPE name
/// its `_total` samples, no UNIT lines, no `# EOF`, no empty label sets.
pub fn to_classic(open: &str) -> String {
    let counters: Vec<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len());
    for line in open.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let mut line = line.replace("{} ", " ");
        for c in &counters {
            for p in ["# HELP ", "# TYPE "] {
                let head = format!("{p}{c} ");
                if line.starts_with(&head) {
                    line = format!("{p}{c}_total {}", &line[head.len()..]);
                }
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

pub const ALERT_NAMES: &[&str] = &[
    "wal_archive_lag",
    "job_failed",
    "backup_stale",
    "verify_failed",
    "drill_failed",
    "key_age",
    "repository_unreachable",
    "database_unreachable",
];
