//! Alerts: conditions the agent evaluates after every probe and every run, and the
//! notifications they cause. An alert fires once when its condition starts to hold, is
//! sent again every `alert_repeat` while it holds, and sends one "resolved" when it
//! clears. Its text names a job, a cluster, a data category or a key id: never a file in
//! a backup, a row or a secret (errors are shown by code and kind; the message stays in
//! the agent's private state and log).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::SinkSpec;

/// A condition that holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// `wal_archive_lag`, `job_failed`, `backup_stale`, `verify_failed`, `drill_failed`, `key_age`,
    /// `repository_unreachable`, `database_unreachable`.
    pub alert: String,
    /// What it is about: `cluster main`, `job files-hourly`, `category database`.
    pub subject: String,
    pub severity: &'static str,
    pub summary: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Firing {
    pub alert: String,
    pub subject: String,
    pub severity: String,
    pub summary: String,
    pub since: DateTime<Utc>,
    pub last_sent: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Notification {
    /// `firing`, `resolved` or `test`.
    pub status: String,
    pub alert: String,
    pub subject: String,
    pub severity: String,
    pub summary: String,
    pub since: DateTime<Utc>,
    pub at: DateTime<Utc>,
    pub host: String,
    /// True for the repeats of an alert that still holds.
    pub repeat: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Alerts {
    pub firing: BTreeMap<String, Firing>,
}

fn key(alert: &str, subject: &str) -> String {
    format!("{alert}/{subject}")
}

impl Alerts {
    /// What to send, given the conditions that hold now.
    pub fn evaluate(
        &mut self,
        conditions: &[Condition],
        now: DateTime<Utc>,
        repeat: Duration,
        host: &str,
    ) -> Vec<Notification> {
        let mut out = vec![];
        let note = |f: &Firing, status: &str, repeat: bool| Notification {
            status: status.into(),
            alert: f.alert.clone(),
            subject: f.subject.clone(),
            severity: f.severity.clone(),
            summary: f.summary.clone(),
            since: f.since,
            at: now,
            host: host.into(),
            repeat,
        };
        let repeat = chrono::Duration::from_std(repeat).unwrap_or(chrono::Duration::MAX);
        for c in conditions {
            match self.firing.get_mut(&key(&c.alert, &c.subject)) {
                Some(f) => {
                    f.summary = c.summary.clone();
                    if now - f.last_sent >= repeat {
                        f.last_sent = now;
                        out.push(note(f, "firing", true));
                    }
                }
                None => {
                    let f = Firing {
                        alert: c.alert.clone(),
                        subject: c.subject.clone(),
                        severity: c.severity.into(),
                        summary: c.summary.clone(),
                        since: now,
                        last_sent: now,
                    };
                    out.push(note(&f, "firing", false));
                    self.firing.insert(key(&c.alert, &c.subject), f);
                }
            }
        }
        let cleared: Vec<String> = self
            .firing
            .keys()
            .filter(|k| !conditions.iter().any(|c| &key(&c.alert, &c.subject) == *k))
            .cloned()
            .collect();
        for k in cleared {
            let f = self.firing.remove(&k).expect("listed");
            out.push(note(&f, "resolved", false));
        }
        out
    }
}

/// The body a Slack-compatible webhook shows.
pub fn slack_text(n: &Notification) -> String {
    let mark = match n.status.as_str() {
        "resolved" => "RESOLVED",
        "test" => "TEST",
        "report" => "REPORT",
        _ => "FIRING",
    };
    format!(
        "[{mark}] custos on {}: {} ({}, {}) since {}",
        n.host,
        n.summary,
        n.alert,
        n.subject,
        n.since.format("%Y-%m-%d %H:%M UTC")
    )
}

/// Sends one notification to every sink; returns the sinks that failed, with why (the
/// next evaluation does not resend: a sink that is down is itself visible on the page
/// and in the log).
pub async fn send(sinks: &[SinkSpec], n: &Notification) -> Vec<String> {
    let mut failed = vec![];
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => return vec![format!("http client: {e}")],
    };
    for s in sinks {
        let r = match s {
            SinkSpec::Slack { url } => {
                post(&client, url, &serde_json::json!({"text": slack_text(n)})).await
            }
            SinkSpec::Webhook { url } => {
                post(&client, url, &serde_json::to_value(n).expect("serializes")).await
            }
            SinkSpec::Command { command } => run_hook(command, n).await,
        };
        if let Err(e) = r {
            tracing::warn!("alert sink failed: {e}");
            failed.push(e);
        }
    }
    failed
}

async fn post(client: &reqwest::Client, url: &str, body: &serde_json::Value) -> Result<(), String> {
    // The URL of a webhook is a secret of sorts (Slack's carry their token): errors name
    // its host only.
    let host = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(String::from))
        .unwrap_or_else(|| "?".into());
    let r = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("webhook at {host}: {}", e.without_url()))?;
    if !r.status().is_success() {
        return Err(format!("webhook at {host} answered {}", r.status()));
    }
    Ok(())
}

async fn run_hook(command: &str, n: &Notification) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("/bin/sh")
        .args(["-c", command])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("alert command: cannot start: {e}"))?;
    let body = serde_json::to_vec(n).expect("serializes");
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&body).await;
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .map_err(|_| "alert command: no exit after 30s".to_string())?
        .map_err(|e| format!("alert command: {e}"))?;
    if !status.success() {
        return Err(format!("alert command exited {status}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(a: &str) -> Condition {
        Condition {
            alert: a.into(),
            subject: "cluster main".into(),
            severity: "critical",
            summary: "lag".into(),
        }
    }

    #[test]
    fn fires_once_repeats_and_resolves() {
        let mut a = Alerts::default();
        let t0 = Utc::now();
        let rep = Duration::from_secs(3600);
        let n = a.evaluate(&[cond("x")], t0, rep, "h");
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].status, "firing");
        assert!(a
            .evaluate(&[cond("x")], t0 + chrono::Duration::minutes(30), rep, "h")
            .is_empty());
        let n = a.evaluate(&[cond("x")], t0 + chrono::Duration::minutes(61), rep, "h");
        assert_eq!((n.len(), n[0].repeat), (1, true));
        let n = a.evaluate(&[], t0 + chrono::Duration::minutes(70), rep, "h");
        assert_eq!(n[0].status, "resolved");
        assert_eq!(n[0].since, t0);
        assert!(a
            .evaluate(&[], t0 + chrono::Duration::minutes(80), rep, "h")
            .is_empty());
    }
}
