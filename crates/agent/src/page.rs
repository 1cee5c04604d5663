//! The status page (`GET /`) and the daily report's HTML, rendered on the server with
//! minijinja (auto-escaping HTML), with inline SVG charts: readable without JavaScript,
//! refreshing itself. What it shows names jobs, categories, clusters and error kinds;
//! nothing from inside a backup and no secret.

use chrono::{DateTime, Utc};
use minijinja::{context, Environment, Value};

use crate::config::Category;
use crate::report::DailyReport;
use crate::state::Outcome;
use crate::{human, Shared};

fn env() -> Environment<'static> {
    let mut env = Environment::new();
    env.add_template("status.html", include_str!("../templates/status.html"))
        .expect("the status template parses");
    env.add_template("report.html", include_str!("../templates/report.html"))
        .expect("the report template parses");
    env
}

fn when(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let d = (now - t).num_seconds();
    if d >= 0 {
        format!(
            "{} ({} ago)",
            t.format("%Y-%m-%d %H:%M:%S"),
            human(d as u64)
        )
    } else {
        format!(
            "{} (in {})",
            t.format("%Y-%m-%d %H:%M:%S"),
            human((-d) as u64)
        )
    }
}

/// The state of a category: fail when an alert about it (or one of its jobs) holds, warn
/// when its newest point is older than its interval or there is none yet.
fn category_state(s: &Shared, c: &Category, now: DateTime<Utc>) -> (&'static str, Vec<String>) {
    let jobs: Vec<String> = s
        .cfg
        .jobs
        .iter()
        .filter(|j| j.category.as_ref() == Some(&c.name))
        .map(|j| format!("job {}", j.name))
        .collect();
    let subject = format!("category {}", c.name);
    let mut alerts: Vec<String> = s
        .alerts
        .firing
        .values()
        .filter(|f| {
            f.subject == subject
                || jobs.contains(&f.subject)
                || (c.matches.iter().any(|m| m == "postgres") && f.subject.starts_with("cluster "))
        })
        .map(|f| format!("{}: {}", f.alert, f.summary))
        .collect();
    alerts.sort();
    if !alerts.is_empty() {
        return ("fail", alerts);
    }
    let state = match (s.newest_point(c), c.interval) {
        (None, _) => "warn",
        (Some(t), Some(i)) if (now - t).to_std().unwrap_or_default() > i => "warn",
        (Some(_), _) => "ok",
    };
    (state, alerts)
}

/// 30 days of a job's runs: one column a day, green for runs that succeeded, red above
/// them for those that did not.
fn history_svg(s: &Shared, job: &str, now: DateTime<Utc>) -> String {
    let today = now.date_naive();
    let days: Vec<(u32, u32)> = (0..30)
        .rev()
        .map(|back| {
            let d = today - chrono::Duration::days(back);
            let runs = s
                .store
                .history
                .iter()
                .filter(|r| r.job == job && r.end.date_naive() == d);
            runs.fold((0, 0), |(ok, bad), r| {
                if r.outcome == Outcome::Ok {
                    (ok + 1, bad)
                } else {
                    (ok, bad + 1)
                }
            })
        })
        .collect();
    let max = days.iter().map(|(a, b)| a + b).max().unwrap_or(0).max(1) as f64;
    let (w, h) = (6.0, 24.0);
    let mut out = r##"<svg class="history" width="180" height="24" viewBox="0 0 180 24" role="img" aria-label="runs per day, last 30 days"><rect width="180" height="24" fill="#f3f4f6"/>"##.to_string();
    for (i, (ok, bad)) in days.iter().enumerate() {
        let x = i as f64 * w;
        let hok = *ok as f64 / max * h;
        let hbad = *bad as f64 / max * h;
        if *ok > 0 {
            out.push_str(&format!(r##"<rect x="{x:.1}" y="{:.1}" width="5" height="{hok:.1}" fill="#16a34a"><title>{ok} ok</title></rect>"##, h - hok));
        }
        if *bad > 0 {
            out.push_str(&format!(r##"<rect class="failed" x="{x:.1}" y="{:.1}" width="5" height="{hbad:.1}" fill="#dc2626"><title>{bad} failed</title></rect>"##, h - hok - hbad));
        }
    }
    out.push_str("</svg>");
    out
}

/// The WAL lag of the last 24 hours as a line, with the alert threshold dashed.
fn lag_svg(s: &Shared, now: DateTime<Utc>) -> String {
    let (w, h) = (720.0, 90.0);
    let limit = s.cfg.wal_lag_alert.as_secs_f64();
    let max = s
        .lag_samples
        .iter()
        .map(|(_, l)| *l)
        .filter(|l| l.is_finite())
        .fold(limit * 1.2, f64::max)
        .max(1.0);
    let x = |t: DateTime<Utc>| w - ((now - t).num_seconds() as f64 / 86400.0 * w).clamp(0.0, w);
    let y = |l: f64| h - (l / max * h).clamp(0.0, h);
    let points: Vec<String> = s
        .lag_samples
        .iter()
        .filter(|(_, l)| l.is_finite())
        .map(|(t, l)| format!("{:.1},{:.1}", x(*t), y(*l)))
        .collect();
    format!(
        r##"<svg id="lag-chart" width="720" height="90" viewBox="0 0 720 90" role="img" aria-label="WAL archive lag, last 24 hours"><rect width="720" height="90" fill="#fff" stroke="#e4e7ec"/><line x1="0" x2="720" y1="{ly:.1}" y2="{ly:.1}" stroke="#dc2626" stroke-dasharray="4 3"/><polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="{}"/><text x="4" y="12" font-size="10" fill="#6b7280">{}</text><text x="4" y="86" font-size="10" fill="#6b7280">24 h ago</text><text x="690" y="86" font-size="10" fill="#6b7280">now</text></svg>"##,
        points.join(" "),
        human(max as u64),
        ly = y(limit),
    )
}

pub fn status_html(s: &Shared, now: DateTime<Utc>) -> String {
    let verify = match s.last_verify() {
        Some((t, true)) => format!("passed {}", when(t, now)),
        Some((t, false)) => format!("FAILED {}", when(t, now)),
        None => "none yet".into(),
    };
    let drill = match s.last_drill() {
        Some((t, true)) => format!("passed {}", when(t, now)),
        Some((t, false)) => format!("FAILED {}", when(t, now)),
        None => "none yet".into(),
    };
    let categories: Vec<Value> = s
        .cfg
        .categories
        .iter()
        .map(|c| {
            let (state, alerts) = category_state(s, c, now);
            let newest = s.newest_point(c);
            context! {
                name => c.name,
                state => state,
                last_good => newest.map(|t| when(t, now)).unwrap_or_else(|| "none yet".into()),
                rpo => newest.map(|t| human((now - t).num_seconds().max(0) as u64)).unwrap_or_else(|| "unknown".into()),
                next_run => s.next_run(c, now).map(|t| when(t, now)).unwrap_or_else(|| "not scheduled".into()),
                alerts => alerts,
            }
        })
        .collect();
    let jobs: Vec<Value> = s
        .cfg
        .jobs
        .iter()
        .map(|j| {
            let rec = s.store.jobs.get(&j.name);
            let last = rec.and_then(|r| r.last.as_ref());
            let state = if s.running.contains(&j.name) {
                "running"
            } else {
                match last.map(|l| l.outcome) {
                    Some(Outcome::Ok) => "ok",
                    Some(_) => "fail",
                    None => "unknown",
                }
            };
            context! {
                name => j.name,
                run => j.run,
                schedule => j.schedule.describe(),
                state => if state == "running" { "ok" } else { state },
                last => match last {
                    Some(l) => format!("{} {}{}", l.outcome.as_str(), when(l.end, now), l.error_kind.as_ref().map(|k| format!(", {k}")).unwrap_or_default()),
                    None => "never".into(),
                } + if state == "running" { " · running now" } else { "" },
                next => j.schedule.next_after(now).map(|t| when(t, now)).unwrap_or_default(),
                svg => Value::from_safe_string(history_svg(s, &j.name, now)),
            }
        })
        .collect();
    let wal = s.observed.wal.as_ref().map(|w| {
        context! {
            cluster => s.cfg.cluster,
            lag_seconds => w.lag_seconds,
            lag => w.lag_seconds.map(human).unwrap_or_else(|| "never archived".into()),
            pending => w.pending,
            last => w.last_archived.clone().unwrap_or_else(|| "none".into()),
            limit => human(s.cfg.wal_lag_alert.as_secs()),
            svg => Value::from_safe_string(lag_svg(s, now)),
        }
    });
    let secondaries: Vec<Value> = s
        .cfg
        .secondaries
        .iter()
        .map(|(name, limit)| {
            let lag = s.secondary_lag(name, now);
            context! {
                name => name,
                state => if lag > limit.as_secs_f64() { "fail" } else { "ok" },
                synced => s.store.secondaries.get(name).map(|t| when(*t, now)).unwrap_or_else(|| format!("never copied to since the agent started {}", when(s.store.since, now))),
                lag => human(lag as u64),
                limit => human(limit.as_secs()),
            }
        })
        .collect();
    let alerts: Vec<Value> = s
        .alerts
        .firing
        .values()
        .map(|f| context! { alert => f.alert, subject => f.subject, severity => f.severity, since => when(f.since, now), summary => f.summary })
        .collect();
    let repository = match (&s.observed.repo, &s.observed.repo_error) {
        (_, Some(e)) => format!("cannot be read: {e}"),
        (Some(r), None) => format!(
            "{} in {} pack(s), {} snapshot(s), {} WAL file(s); looked at {}",
            custos_model::size::ByteSize(r.info.repository.bytes),
            r.info.repository.packs,
            r.info.repository.snapshots,
            r.info.repository.wal_files,
            when(r.time, now)
        ),
        (None, None) => "not read yet".into(),
    };
    let fail = alerts.len();
    let warn = categories
        .iter()
        .filter(|c| {
            c.get_attr("state")
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .as_deref()
                == Some("warn")
        })
        .count();
    let (overall, headline) = if fail > 0 {
        ("fail", format!("{fail} alert(s) hold"))
    } else if warn > 0 {
        (
            "warn",
            format!(
                "{warn} categor{} not fresh yet",
                if warn == 1 { "y is" } else { "ies are" }
            ),
        )
    } else {
        ("ok", "all data is backed up on schedule".to_string())
    };
    env()
        .get_template("status.html")
        .expect("registered")
        .render(context! {
            host => s.host,
            now => now.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            started => s.started.format("%Y-%m-%d %H:%M UTC").to_string(),
            refresh => 30,
            overall => overall,
            headline => headline,
            reload_error => s.reload_error,
            categories => categories,
            verify => verify,
            drill => drill,
            wal => wal,
            secondaries => secondaries,
            jobs => jobs,
            alerts => alerts,
            repository => repository,
        })
        .unwrap_or_else(|e| {
            format!(
                "<!DOCTYPE html><title>custos</title><p>the status page failed to render: {}</p>",
                minijinja::HtmlEscape(&e.to_string())
            )
        })
}

pub fn report_html(r: &DailyReport) -> String {
    let verdict = if r.ok() {
        "every scheduled run started and succeeded; the archive is continuous".to_string()
    } else {
        format!(
            "{} scheduled run(s) missed, {} failure(s), {} WAL gap(s)",
            r.missed(),
            r.failures.len(),
            r.continuity.as_ref().map_or(0, |c| c.gaps.len())
        )
    };
    env()
        .get_template("report.html")
        .expect("registered")
        .render(context! {
            r => r,
            ok => r.ok(),
            verdict => verdict,
            max_lag => r.continuity.as_ref().and_then(|c| c.max_lag_seconds).map(|l| human(l as u64)).unwrap_or_else(|| "none".into()),
        })
        .unwrap_or_else(|e| format!("report failed to render: {e}"))
}
