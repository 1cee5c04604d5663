//! Grandfather-father-son retention, computed and explained.
//!
//! The seed's cleanup script relied on a file-name pattern that never matched; here the
//! decision for every snapshot is computed from its time, and each decision carries the
//! reasons a person can read in `custos forget --dry-run`. The newest snapshot of a group
//! is always kept, whatever the policy says: a policy can never empty a group.

use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
    /// Keep every snapshot younger than this, measured back from the group's newest
    /// snapshot (not from now, so a stalled schedule does not expire the last good backups).
    #[serde(default, with = "opt_duration")]
    pub keep_within: Option<std::time::Duration>,
}

impl RetentionPolicy {
    /// The seed's policy: 30 daily, 12 weekly, 12 monthly, 7 yearly.
    pub fn seed_default() -> Self {
        RetentionPolicy {
            keep_last: 0,
            keep_daily: 30,
            keep_weekly: 12,
            keep_monthly: 12,
            keep_yearly: 7,
            keep_within: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keep_last == 0
            && self.keep_daily == 0
            && self.keep_weekly == 0
            && self.keep_monthly == 0
            && self.keep_yearly == 0
            && self.keep_within.is_none()
    }
}

mod opt_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(
        v: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::time::Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// One snapshot as retention sees it.
#[derive(Debug, Clone)]
pub struct Candidate<T> {
    pub item: T,
    pub time: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision<T> {
    pub item: T,
    pub time: DateTime<Utc>,
    pub keep: bool,
    pub reasons: Vec<String>,
    /// How long the policy will keep it at least, from the picks that are final (a
    /// daily, weekly, monthly or yearly pick once a newer snapshot lies in a later
    /// period, so nothing can take its place; `keep_within` from its own time; a
    /// minimum retention). Object Lock dates its objects by this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_until: Option<DateTime<Utc>>,
}

impl<T> Decision<T> {
    /// Raises [`Decision::kept_until`] to `t`.
    pub fn keep_until(&mut self, t: DateTime<Utc>) {
        self.kept_until = Some(self.kept_until.map_or(t, |u| u.max(t)));
    }
}

/// [`apply`] with a policy of its own for one type of snapshot (PostgreSQL
/// incrementals, marked `true`): the others follow `policy`, these `typed`. Returns
/// decisions newest first.
pub fn apply_by_type<T: Clone>(
    policy: &RetentionPolicy,
    typed: &RetentionPolicy,
    snaps: Vec<(Candidate<T>, bool)>,
) -> Vec<Decision<T>> {
    let (incs, rest): (Vec<_>, Vec<_>) = snaps.into_iter().partition(|(_, t)| *t);
    let mut d = apply(policy, rest.into_iter().map(|(c, _)| c).collect());
    d.extend(
        apply(typed, incs.into_iter().map(|(c, _)| c).collect())
            .into_iter()
            .map(|mut x| {
                x.reasons = x
                    .reasons
                    .into_iter()
                    .map(|r| format!("incremental: {r}"))
                    .collect();
                x
            }),
    );
    d.sort_by_key(|x| std::cmp::Reverse(x.time));
    d
}

/// How long a final pick of the rule `name` keeping `count` periods lasts: `count`
/// periods from the snapshot's time.
fn period_end(name: &str, count: u32, t: DateTime<Utc>) -> DateTime<Utc> {
    match name {
        "daily" => crate::clock::later(t, chrono::Duration::days(i64::from(count))),
        "weekly" => crate::clock::later(t, chrono::Duration::weeks(i64::from(count))),
        "monthly" => t
            .checked_add_months(chrono::Months::new(count))
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
        _ => t
            .checked_add_months(chrono::Months::new(count.saturating_mul(12)))
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    }
}

impl RetentionPolicy {
    /// How long each rule keeps a snapshot it keeps (count-only rules have no span).
    fn spans(&self) -> Vec<chrono::Duration> {
        let t = DateTime::<Utc>::UNIX_EPOCH;
        let mut spans: Vec<chrono::Duration> = [
            ("daily", self.keep_daily),
            ("weekly", self.keep_weekly),
            ("monthly", self.keep_monthly),
            ("yearly", self.keep_yearly),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| period_end(r, n, t) - t)
        .collect();
        spans.extend(
            self.keep_within
                .and_then(|w| chrono::Duration::from_std(w).ok()),
        );
        spans
    }

    /// The shortest time the policy keeps a snapshot a rule keeps: what an object is
    /// locked for when written, before any pick is final. `None`: it keeps by count only.
    pub fn shortest_span(&self) -> Option<chrono::Duration> {
        self.spans().into_iter().min()
    }

    /// The longest time any rule keeps a snapshot.
    pub fn longest_span(&self) -> Option<chrono::Duration> {
        self.spans().into_iter().max()
    }
}

/// Decides, for one group of snapshots (same source), which are kept and why.
/// Returns decisions newest first.
pub fn apply<T: Clone>(policy: &RetentionPolicy, mut snaps: Vec<Candidate<T>>) -> Vec<Decision<T>> {
    snaps.sort_by_key(|c| std::cmp::Reverse(c.time));
    let newest = snaps.first().map(|c| c.time);
    let mut out: Vec<Decision<T>> = snaps
        .iter()
        .map(|c| Decision {
            item: c.item.clone(),
            time: c.time,
            keep: false,
            reasons: vec![],
            kept_until: None,
        })
        .collect();

    type Bucket = fn(&DateTime<Utc>) -> String;
    let rules: [(&str, u32, Bucket); 4] = [
        ("daily", policy.keep_daily, |t| {
            t.format("%Y-%m-%d").to_string()
        }),
        ("weekly", policy.keep_weekly, |t| {
            let w = t.iso_week();
            format!("{}-W{:02}", w.year(), w.week())
        }),
        ("monthly", policy.keep_monthly, |t| {
            t.format("%Y-%m").to_string()
        }),
        ("yearly", policy.keep_yearly, |t| t.format("%Y").to_string()),
    ];
    for (name, count, bucket) in rules {
        let mut last: Option<String> = None;
        let mut used = 0;
        for d in out.iter_mut() {
            if used >= count {
                break;
            }
            let b = bucket(&d.time);
            if last.as_deref() != Some(b.as_str()) {
                d.keep = true;
                d.reasons.push(format!("{name} snapshot for {b}"));
                // The newest period's pick may still be replaced by a later snapshot of
                // that period; every older pick is final.
                if used > 0 {
                    d.keep_until(period_end(name, count, d.time));
                }
                used += 1;
                last = Some(b);
            }
        }
    }
    for (i, d) in out.iter_mut().enumerate() {
        if (i as u32) < policy.keep_last {
            d.keep = true;
            d.reasons
                .push(format!("one of the last {}", policy.keep_last));
        }
        if let (Some(within), Some(newest)) = (policy.keep_within, newest) {
            let age = (newest - d.time).to_std().unwrap_or_default();
            if age <= within {
                d.keep_until(crate::clock::later(
                    d.time,
                    chrono::Duration::from_std(within).unwrap_or(chrono::Duration::MAX),
                ));
                d.keep = true;
                d.reasons.push(format!(
                    "within {} of the newest snapshot",
                    humantime::format_duration(within)
                ));
            }
        }
    }
    if let Some(first) = out.first_mut() {
        if !first.keep {
            first.keep = true;
            first
                .reasons
                .push("newest snapshot of its source (always kept)".into());
        }
    }
    for d in out.iter_mut().filter(|d| !d.keep) {
        d.reasons.push("matched no rule of the policy".into());
    }
    out
}

#[cfg(test)]
mod by_type_tests {
    use super::*;
    use chrono::TimeZone;

    /// The seed's matrix over 60 days: a full at 02:00 daily, an incremental every other
    /// hour. Fulls follow 30 daily / 12 weekly / ...; incrementals 7 days.
    #[test]
    fn hourly_incrementals_are_kept_seven_days_and_fulls_by_the_main_policy() {
        let start = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap();
        let mut snaps = vec![];
        for h in 0..60 * 24 {
            let t = start + chrono::Duration::hours(h);
            let full = h % 24 == 2;
            snaps.push((
                Candidate {
                    item: (h, full),
                    time: t,
                },
                !full,
            ));
        }
        let newest = snaps.last().unwrap().0.time;
        let typed = RetentionPolicy {
            keep_within: Some(std::time::Duration::from_secs(7 * 86400)),
            ..Default::default()
        };
        let d = apply_by_type(&RetentionPolicy::seed_default(), &typed, snaps);
        assert_eq!(d.len(), 60 * 24);
        for x in &d {
            let age = newest - x.time;
            let (_, full) = x.item;
            if full {
                // 30 daily fulls kept; older ones only as the weekly/monthly picks.
                if age < chrono::Duration::days(30) {
                    assert!(x.keep, "{x:?}");
                }
            } else {
                assert_eq!(x.keep, age <= chrono::Duration::days(7), "{x:?}");
                assert!(x.reasons.iter().all(|r| r.starts_with("incremental: ")) || !x.keep);
            }
        }
        // The fulls' monthly picks reach past the daily window: the oldest full is kept.
        assert!(d
            .iter()
            .any(|x| x.item.1 && x.keep && newest - x.time > chrono::Duration::days(30)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn series(days: i64, per_day: i64) -> Vec<Candidate<usize>> {
        let start = Utc.with_ymd_and_hms(2024, 1, 1, 0, 30, 0).unwrap();
        let mut v = vec![];
        for d in 0..days {
            for h in 0..per_day {
                let t = start + Duration::days(d) + Duration::hours(h * 24 / per_day);
                v.push(Candidate {
                    item: v.len(),
                    time: t,
                });
            }
        }
        v
    }

    #[test]
    fn seed_policy_over_three_years_of_hourly_backups() {
        let snaps = series(3 * 366, 4);
        let total = snaps.len();
        let decisions = apply(&RetentionPolicy::seed_default(), snaps);
        assert_eq!(decisions.len(), total);
        let kept: Vec<_> = decisions.iter().filter(|d| d.keep).collect();
        // 30 daily + weekly/monthly/yearly slots that fall outside the daily window; the
        // newest of each day is what daily keeps, so overlaps collapse.
        let days: std::collections::BTreeSet<_> = kept
            .iter()
            .map(|d| d.time.format("%Y-%m-%d").to_string())
            .collect();
        assert_eq!(days.len(), kept.len(), "at most one kept per day");
        assert!(kept.len() >= 30 + 12 - 5 && kept.len() <= 30 + 12 + 12 + 7);
        let newest_day = decisions[0].time.date_naive();
        for i in 0..30 {
            let day = newest_day - Duration::days(i);
            assert!(
                kept.iter().any(|d| d.time.date_naive() == day),
                "day {day} missing"
            );
        }
        let years: std::collections::BTreeSet<_> = kept.iter().map(|d| d.time.year()).collect();
        assert_eq!(years.len(), 4, "2024..2027 each have a yearly snapshot");
        for d in decisions.iter().filter(|d| !d.keep) {
            assert_eq!(d.reasons, vec!["matched no rule of the policy".to_string()]);
        }
    }

    #[test]
    fn times_at_the_calendar_end_and_the_largest_counts_saturate() {
        // Snapshot times are whatever a backup key wrote; counts and spans whatever the
        // policy says. A kept-until date past chrono's range is its last time, not a panic.
        let end = DateTime::<Utc>::MAX_UTC - Duration::days(3);
        let snaps: Vec<Candidate<usize>> = (0..3)
            .map(|i| Candidate {
                item: i,
                time: end + Duration::days(i as i64),
            })
            .collect();
        let policy = RetentionPolicy {
            keep_daily: u32::MAX,
            keep_weekly: u32::MAX,
            keep_monthly: u32::MAX,
            keep_yearly: u32::MAX,
            keep_within: Some(std::time::Duration::MAX),
            ..Default::default()
        };
        let d = apply(&policy, snaps);
        assert!(d.iter().all(|d| d.keep));
        assert!(d
            .iter()
            .filter_map(|d| d.kept_until)
            .all(|u| u == DateTime::<Utc>::MAX_UTC));
    }

    #[test]
    fn newest_always_kept_and_within_measured_from_newest() {
        let snaps = series(10, 1);
        let policy = RetentionPolicy {
            keep_within: Some(std::time::Duration::from_secs(2 * 86400)),
            ..Default::default()
        };
        let d = apply(&policy, snaps);
        let kept: Vec<_> = d.iter().filter(|d| d.keep).map(|d| d.item).collect();
        assert_eq!(kept, vec![9, 8, 7]);
        let empty = apply(&RetentionPolicy::default(), series(3, 1));
        assert_eq!(empty.iter().filter(|d| d.keep).count(), 1);
        assert!(empty[0].reasons[0].contains("always kept"));
    }

    #[test]
    fn policy_parses_from_toml_like_json() {
        let p: RetentionPolicy =
            serde_json::from_str(r#"{"keep_daily":3,"keep_within":"7d"}"#).unwrap();
        assert_eq!(p.keep_daily, 3);
        assert_eq!(
            p.keep_within,
            Some(std::time::Duration::from_secs(7 * 86400))
        );
        assert!(serde_json::from_str::<RetentionPolicy>(r#"{"keep_dayly":3}"#).is_err());
    }
}
