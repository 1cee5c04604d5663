//! `custos agent` (the long-running process that runs the schedule of custos.toml),
//! `custos alert test` and `custos report daily`. This module turns custos.toml into the
//! agent's configuration: each `[[job]]` into the custos command line it runs, its data
//! category and timeout; `[agent]` and `[[alert]]` into the agent's settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use custos_agent::config::{AgentConfig, Category, JobSpec, SinkSpec};
use custos_agent::schedule::Schedule;
use custos_model::{Error, Result};
use zeroize::Zeroizing;

use crate::context::Ctx;
use crate::settings::{ConfigFile, Settings};

#[derive(Args)]
pub(crate) struct AgentArgs {
    /// Address for /metrics, /healthz, /readyz and the status page [[agent] listen;
    /// default 127.0.0.1:9187]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum AlertCommand {
    /// Send a test alert to every [[alert]] sink of custos.toml
    #[command(after_help = "Example:\n  custos --config /etc/custos/custos.toml alert test")]
    Test,
}

#[derive(Subcommand)]
pub(crate) enum ReportCommand {
    /// Print the daily report the agent stored for a day (default: yesterday, UTC)
    #[command(after_help = "Example:\n  custos report daily --date 2026-12-03 --html report.html")]
    Daily {
        /// The day, YYYY-MM-DD (UTC)
        #[arg(long)]
        date: Option<String>,
        /// Also write its HTML to this file
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
}

fn dur(v: &Option<String>, name: &str, default: Duration) -> Result<Duration> {
    v.as_deref().map_or(Ok(default), |t| {
        humantime::parse_duration(t).map_err(|e| {
            Error::config(format!("[agent] {name} = \"{t}\": {e}"))
                .hint("durations look like 30s, 15m or 4h")
        })
    })
}

/// The shortest interval between two slots of a schedule (over the next few slots).
fn interval(s: &Schedule) -> Option<Duration> {
    let mut t = chrono::Utc::now();
    let mut best: Option<Duration> = None;
    for _ in 0..8 {
        let a = s.next_after(t)?;
        let b = s.next_after(a)?;
        let d = (b - a).to_std().ok()?;
        best = Some(best.map_or(d, |x| x.min(d)));
        t = a;
    }
    best
}

/// custos.toml's jobs, agent settings and sinks as the agent's configuration.
pub(crate) fn agent_config(
    file: &ConfigFile,
    settings: &Settings,
    listen: Option<&str>,
) -> Result<AgentConfig> {
    let a = &file.agent;
    let listen_text = listen
        .map(String::from)
        .or_else(|| a.listen.clone())
        .unwrap_or_else(|| AgentConfig::DEFAULT_LISTEN.into());
    let listen: SocketAddr = listen_text.parse().map_err(|e| {
        Error::config(format!(
            "the agent's listen address `{listen_text}` is not an address: {e}"
        ))
        .hint("an IP address and port, like 127.0.0.1:9187")
    })?;
    let token = match &a.token_file {
        Some(p) => {
            let t = std::fs::read_to_string(p).map_err(|e| {
                Error::config(format!(
                    "cannot read [agent] token_file {}: {e}",
                    p.display()
                ))
            })?;
            let t = t.trim().to_string();
            if t.len() < 16 {
                return Err(Error::config(
                    "the agent's bearer token is shorter than 16 characters",
                )
                .hint("write a long random token, e.g. `openssl rand -hex 32 > token`"));
            }
            Some(Zeroizing::new(t))
        }
        None => None,
    };
    if !listen.ip().is_loopback() && token.is_none() {
        return Err(Error::config(format!(
            "the agent would listen on {listen}, beyond this host, without a bearer token"
        ))
        .hint("set [agent] token_file (scrapers then send `Authorization: Bearer <token>`), or listen on 127.0.0.1"));
    }
    let state_dir = a
        .state_dir
        .clone()
        .or_else(|| settings.cache_dir.as_ref().map(|c| c.join("agent")))
        .ok_or_else(|| {
            Error::config("the agent needs a state folder").hint("set [agent] state_dir")
        })?;

    let mut jobs = vec![];
    for (j, schedule) in file.check_jobs()? {
        let source = file.sources.iter().find(|s| s.name == j.run);
        let (argv, category): (Vec<String>, Option<String>) = match (j.run.as_str(), source) {
            (_, Some(src)) => (
                vec![
                    "backup".into(),
                    "all".into(),
                    "--source".into(),
                    src.name.clone(),
                ],
                Some(src.name.clone()),
            ),
            ("postgres-full", _) => (
                vec![
                    "backup".into(),
                    "postgres".into(),
                    "--type".into(),
                    "full".into(),
                ],
                Some("database".into()),
            ),
            ("postgres-incremental", _) => (
                vec![
                    "backup".into(),
                    "postgres".into(),
                    "--type".into(),
                    "incremental".into(),
                ],
                Some("database".into()),
            ),
            ("config", _) => (
                vec!["backup".into(), "config".into()],
                Some("configuration".into()),
            ),
            ("verify", _) => (vec!["verify".into()], None),
            ("verify-read-data", _) => (vec!["verify".into(), "--read-data".into()], None),
            ("verify-table", _) => (
                if j.args.is_empty() {
                    vec!["verify".into(), "--table".into(), "latest".into()]
                } else {
                    vec!["verify".into(), "--table".into()]
                },
                None,
            ),
            ("forget", _) => (vec!["forget".into()], None),
            ("copy", _) => (vec!["copy".into()], None),
            ("lock-refresh", _) => (vec!["lock".into(), "refresh".into()], None),
            // Drills prove backups; they are not backups of a category.
            ("drill-db", _) => (vec!["drill".into(), "db".into()], None),
            ("drill-vector", _) => (vec!["drill".into(), "vector".into()], None),
            ("drill-files", _) => (vec!["drill".into(), "files".into()], None),
            ("drill-audit-log", _) => (vec!["drill".into(), "audit-log".into()], None),
            ("drill-full", _) => (vec!["drill".into(), "full".into()], None),
            ("prune", _) => (vec!["prune".into()], None),
            (other, None) => {
                return Err(Error::config(format!(
                    "job `{}`: unknown run `{other}`",
                    j.name
                )))
            }
        };
        let mut argv = argv;
        argv.extend(j.args.iter().cloned());
        let timeout = match &j.timeout {
            Some(t) => humantime::parse_duration(t)
                .map_err(|e| Error::config(format!("job `{}`: timeout: {e}", j.name)))?,
            None => Duration::from_secs(6 * 3600),
        };
        jobs.push(JobSpec {
            name: j.name.clone(),
            run: j.run.clone(),
            argv,
            schedule,
            timeout,
            retries: j.retries.unwrap_or(2),
            category: j.category.clone().or(category),
            verifies: j.run.starts_with("verify"),
            exclusive: j.run == "forget" || j.run == "prune",
        });
    }
    // Categories in the order their jobs come, each with what marks its snapshots.
    let mut categories: Vec<Category> = vec![];
    for j in &jobs {
        let Some(name) = &j.category else { continue };
        let mut matches = vec![];
        if j.run.starts_with("postgres-") {
            matches.push("postgres".to_string());
        } else if j.run == "config" {
            for s in file
                .sources
                .iter()
                .filter(|s| crate::commands::config::is_config(&s.kind))
            {
                matches.push(s.name.clone());
            }
        } else if let Some(src) = file.sources.iter().find(|s| s.name == j.run) {
            matches.push(src.name.clone());
            matches.extend(src.paths.iter().cloned());
            matches.extend(src.table.iter().cloned());
        }
        let iv = interval(&j.schedule);
        match categories.iter_mut().find(|c| &c.name == name) {
            Some(c) => {
                for m in matches {
                    if !c.matches.contains(&m) {
                        c.matches.push(m);
                    }
                }
                c.interval = match (c.interval, iv) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            None => categories.push(Category {
                name: name.clone(),
                matches,
                interval: iv,
            }),
        }
    }
    let mut sinks = vec![];
    for (i, s) in file.alerts.iter().enumerate() {
        let which = || format!("[[alert]] #{} (kind = \"{}\")", i + 1, s.kind);
        let url = || -> Result<String> {
            match (&s.url, &s.url_file) {
                (Some(u), None) => Ok(u.clone()),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map(|t| t.trim().to_string())
                    .map_err(|e| {
                        Error::config(format!(
                            "{}: cannot read url_file {}: {e}",
                            which(),
                            f.display()
                        ))
                    }),
                _ => Err(Error::config(format!(
                    "{} needs `url` or `url_file` (one of them)",
                    which()
                ))),
            }
        };
        sinks.push(match s.kind.as_str() {
            "slack" => SinkSpec::Slack { url: url()? },
            "webhook" => SinkSpec::Webhook { url: url()? },
            "command" => SinkSpec::Command {
                command: s
                    .command
                    .clone()
                    .ok_or_else(|| Error::config(format!("{} needs `command`", which())))?,
            },
            k => {
                return Err(Error::config(format!("{}: unknown kind `{k}`", which()))
                    .hint("kind is slack, webhook or command"))
            }
        });
    }
    // Every secondary is watched once a job copies.
    let secondaries = if jobs.iter().any(|j| j.run == "copy") {
        file.secondaries
            .iter()
            .map(|s| Ok((s.name.clone(), settings.secondary_max_lag(s)?)))
            .collect::<Result<Vec<_>>>()?
    } else {
        vec![]
    };
    let report_expr = a.daily_report.clone().unwrap_or_else(|| "5 0 * * *".into());
    Ok(AgentConfig {
        listen,
        token,
        state_dir,
        jobs,
        categories,
        sinks,
        grace: dur(&a.grace, "grace", Duration::from_secs(300))?,
        probe_interval: dur(&a.probe_interval, "probe_interval", Duration::from_secs(30))?,
        repo_probe_interval: dur(
            &a.repository_interval,
            "repository_interval",
            Duration::from_secs(600),
        )?,
        wal_lag_alert: dur(
            &a.wal_lag_alert,
            "wal_lag_alert",
            custos_ops::postgres::check::DEFAULT_MAX_LAG,
        )?,
        alert_repeat: dur(
            &a.alert_repeat,
            "alert_repeat",
            Duration::from_secs(4 * 3600),
        )?,
        retry_base: dur(&a.retry_base, "retry_base", Duration::from_secs(60))?,
        key_max_age: settings.key_max_age()?,
        report_schedule: Schedule::parse(&report_expr)
            .map_err(|e| e.context("[agent] daily_report"))?,
        cluster: file.postgres.name.clone().unwrap_or_else(|| "main".into()),
        secondaries,
    })
}

pub(crate) fn cmd_agent(ctx: &Ctx, args: &AgentArgs) -> Result<i32> {
    let config_path = ctx.settings.config_path().map(PathBuf::from).ok_or_else(|| {
        Error::config("the agent runs the jobs of a config file: none was given")
            .hint("pass --config /etc/custos/custos.toml (write one with `custos config init --profile healthcare --to FILE`)")
    })?;
    let cfg = agent_config(&ctx.settings.file, &ctx.settings, args.listen.as_deref())?;
    if cfg.jobs.is_empty() {
        return Err(Error::config(
            "custos.toml defines no [[job]]: the agent would have nothing to run",
        )
        .hint("add [[job]] entries (see `custos config init --profile healthcare`)"));
    }
    // The repository is checked now, and the password resolved once: children get it in
    // their environment, never in argv.
    let storage = ctx.storage()?;
    storage.check_writable()?;
    custos_repo::Repository::read_config(&storage)?;
    let pw = ctx.settings.password(&ctx.env, "repository password: ")?;
    let probe = custos_repo::Repository::open(storage.clone(), pw.as_bytes(), ctx.open_opts())?;
    drop(probe);
    let mut env: Vec<(String, Zeroizing<String>)> = ctx
        .env
        .secrets()
        .filter(|(k, _)| *k != "CUSTOS_PASSWORD" && *k != "CUSTOS_NEW_PASSWORD")
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    env.push(("CUSTOS_PASSWORD".into(), pw.clone()));
    let exe = std::env::current_exe()
        .map_err(|e| Error::config(format!("cannot find custos's own executable: {e}")))?;
    let opts = ctx.open_opts();
    let opener: custos_agent::observe::Opener = Box::new(move || {
        custos_repo::Repository::open(storage.clone(), pw.as_bytes(), opts.clone())
    });
    let repo = Arc::new(custos_agent::observe::RepoHandle::new(
        opener,
        ctx.settings.cache_dir.clone(),
        ctx.settings.host.clone(),
        ctx.settings.user.clone(),
    ));
    let watch_cluster = cfg.jobs.iter().any(|j| j.run.starts_with("postgres-"))
        || ctx.settings.file.postgres.db_url.is_some()
        || ctx.settings.file.postgres.host.is_some();
    let conn = watch_cluster.then(|| ctx.settings.db(None));
    let listen_flag = args.listen.clone();
    let reload_settings = Settings::resolve(&ctx.env, Some(&config_path), None)?;
    let reload: Box<dyn Fn() -> Result<AgentConfig> + Send + Sync> = Box::new(move || {
        let file = ConfigFile::load(&config_path)?;
        agent_config(&file, &reload_settings, listen_flag.as_deref())
    });
    let clock = match ctx.settings.test_clock()? {
        Some((from, to)) => custos_agent::ClockMode::Simulated { from, to },
        None => custos_agent::ClockMode::System,
    };
    let json = ctx.out.json;
    let actx = custos_agent::AgentContext {
        child: custos_agent::runner::ChildCommand {
            exe,
            global: ctx.settings.child_global(),
            env,
        },
        repo,
        conn,
        reload,
        clock,
        host: ctx.settings.host.clone(),
        on_listening: Box::new(move |addr| {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"listening": addr.to_string(), "pid": std::process::id()})
                );
            } else {
                println!("custos agent (pid {}): listening on http://{addr}/ (status page), /metrics, /healthz, /readyz", std::process::id());
            }
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::config(format!("cannot start the agent's runtime: {e}")))?;
    rt.block_on(custos_agent::run(cfg, actx))?;
    Ok(0)
}

pub(crate) fn cmd_alert(ctx: &Ctx, cmd: &AlertCommand) -> Result<i32> {
    match cmd {
        AlertCommand::Test => {
            let cfg = agent_config(&ctx.settings.file, &ctx.settings, None)?;
            if cfg.sinks.is_empty() {
                return Err(Error::config("custos.toml defines no [[alert]] sink")
                    .hint("add [[alert]] kind = \"webhook\", url = \"...\" (see docs/config.md)"));
            }
            let now = chrono::Utc::now();
            let n = custos_agent::alerts::Notification {
                status: "test".into(),
                alert: "test".into(),
                subject: "custos alert test".into(),
                severity: "info".into(),
                summary: format!(
                    "a test alert from custos on {}: the sinks work",
                    ctx.settings.host
                ),
                since: now,
                at: now,
                host: ctx.settings.host.clone(),
                repeat: false,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Error::config(e.to_string()))?;
            let failed = rt.block_on(custos_agent::alerts::send(&cfg.sinks, &n));
            if failed.is_empty() {
                println!("test alert sent to {} sink(s)", cfg.sinks.len());
                Ok(0)
            } else {
                Err(Error::new(
                    custos_model::Kind::Check,
                    format!(
                        "{} of {} sink(s) failed: {}",
                        failed.len(),
                        cfg.sinks.len(),
                        failed.join("; ")
                    ),
                )
                .hint("check each [[alert]] url or command"))
            }
        }
    }
}

pub(crate) fn cmd_report(ctx: &Ctx, cmd: &ReportCommand) -> Result<i32> {
    let ReportCommand::Daily { date, html } = cmd;
    let day = match date {
        Some(d) => chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").map_err(|e| {
            Error::config(format!("--date {d}: {e}")).hint("a day looks like 2026-12-03")
        })?,
        None => (chrono::Utc::now() - chrono::Duration::days(1)).date_naive(),
    };
    let repo = ctx.open()?;
    let tag = format!("date={day}");
    let snap = repo
        .snapshots_checked()?
        .0
        .into_iter()
        .filter(|s| s.summary.source == custos_agent::report::REPORT_SOURCE && s.summary.tags.contains(&tag))
        .max_by_key(|s| s.summary.time)
        .ok_or_else(|| {
            Error::new(custos_model::Kind::NotFound, format!("no daily report for {day} in the repository"))
                .hint("the agent writes one each day after midnight UTC ([agent] daily_report); `custos snapshots --source custos-report-daily` lists them")
        })?;
    let mut buf = vec![];
    custos_ops::restore::restore_stream(&repo, &snap, &mut buf)?;
    let doc: serde_json::Value = serde_json::from_slice(&buf).map_err(|e| {
        Error::new(
            custos_model::Kind::Integrity,
            format!("the report of {day} is not a report: {e}"),
        )
    })?;
    ctx.touch(serde_json::json!({"report": day, "snapshot": snap.id}));
    if let Some(p) = html {
        let h = doc.get("html").and_then(|h| h.as_str()).unwrap_or_default();
        std::fs::write(p, h)
            .map_err(|e| Error::config(format!("cannot write {}: {e}", p.display())))?;
    }
    let rep: custos_agent::report::DailyReport =
        serde_json::from_value(doc.get("report").cloned().unwrap_or_default()).map_err(|e| {
            Error::new(
                custos_model::Kind::Integrity,
                format!("the report of {day} is malformed: {e}"),
            )
        })?;
    // A day with missed or failed runs, or a WAL gap, exits 20 (for scripts and tickets).
    let code = if rep.ok() {
        0
    } else {
        custos_model::Kind::Check.exit_code()
    };
    if ctx.out.json {
        ctx.out.json(&rep);
        return Ok(code);
    }
    println!(
        "daily report {} from {} (snapshot {})",
        rep.date,
        rep.host,
        snap.id.short()
    );
    println!(
        "{:<24} {:<22} {:>9} {:>7} {:>4} {:>6}",
        "job", "runs", "scheduled", "started", "ok", "failed"
    );
    for j in &rep.jobs {
        println!(
            "{:<24} {:<22} {:>9} {:>7} {:>4} {:>6}",
            j.job, j.run, j.scheduled, j.started, j.ok, j.failed
        );
    }
    if let Some(c) = &rep.continuity {
        println!(
            "archive of cluster {}: {} gap(s), largest lag seen {}",
            c.cluster,
            c.gaps.len(),
            c.max_lag_seconds
                .map(|l| custos_agent::human(l as u64))
                .unwrap_or_else(|| "none".into())
        );
    }
    for f in &rep.failures {
        println!(
            "failed: {} {} at {} ({})",
            f.job,
            f.outcome,
            f.end.format("%H:%M:%S"),
            f.error.as_deref().unwrap_or("")
        );
    }
    println!("open alerts: {}", rep.open_alerts.len());
    Ok(code)
}
