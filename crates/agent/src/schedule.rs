//! Which jobs are due. A job has a cron expression (UTC; parsed by `croner`, never by
//! hand). The rules an operator relies on:
//! - catch-up: slots missed while the agent was down run once at start (the newest of
//!   them), not once per missed slot;
//! - no overlap: a job still running is not started again; its slot stays due and runs
//!   once when the run ends (slots that passed meanwhile collapse into one);
//! - a failed run never hides the next slot: a slot counts as taken when a run starts,
//!   whatever its result.

use chrono::{DateTime, Utc};
use custos_model::{Error, Result};

/// What time it is: the system clock, or a simulated one in tests.
pub trait Clock {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

#[derive(Debug, Clone)]
pub struct Schedule {
    expr: String,
    cron: croner::Cron,
    /// The zone the expression is read in (None: UTC). Slots are still instants: a
    /// 02:30 job in a zone that skips 02:30 for daylight saving runs at croner's choice
    /// for that day, once.
    zone: Option<chrono_tz::Tz>,
}

impl Schedule {
    /// A cron expression of five fields (minute hour day month weekday), or six with
    /// seconds first; `@daily`, `@hourly` and the like too.
    pub fn parse(expr: &str) -> Result<Schedule> {
        Schedule::parse_in(expr, None)
    }

    /// [`Schedule::parse`] in a named zone (IANA, like "Europe/Berlin"); None is UTC.
    pub fn parse_in(expr: &str, zone: Option<&str>) -> Result<Schedule> {
        let zone = match zone {
            None => None,
            Some(z) => Some(z.parse::<chrono_tz::Tz>().map_err(|_| {
                Error::config(format!("`{z}` is not a time zone"))
                    .hint("an IANA zone name like \"Europe/Berlin\" or \"America/New_York\"; without `zone`, schedules are UTC")
            })?),
        };
        // croner reads an empty list item (`1,,2`, `,`) as no value at all: a field that
        // never matches, which makes every search for the next slot walk thousands of
        // years (found by fuzzing custos.toml).
        if let Some(f) = expr
            .split_whitespace()
            .find(|f| f.split(',').any(str::is_empty))
        {
            return Err(Error::config(format!(
                "`{expr}`: the field `{f}` has an empty item between commas"
            ))
            .hint("list values as 1,15,30; every field needs at least one"));
        }
        let cron = croner::Cron::new(expr)
            .with_seconds_optional()
            .parse()
            .map_err(|e| {
                Error::config(format!("`{expr}` is not a cron expression: {e}"))
                    .hint("five fields: minute hour day-of-month month day-of-week, e.g. \"0 2 * * *\" for 02:00 UTC daily")
            })?;
        let schedule = Schedule {
            expr: expr.to_string(),
            cron,
            zone,
        };
        // A date that never comes (February 30th): a job that would never run is a
        // mistake to say now, not a silence to find out in a year.
        let from = DateTime::<Utc>::from_timestamp(946_684_800, 0).expect("2000-01-01");
        if schedule.next_after(from).is_none() {
            return Err(Error::config(format!("`{expr}` never comes round"))
                .hint("a day that no month has (like 30 2 for February 30th) or a weekday and day that never meet; check the day-of-month and month fields"));
        }
        Ok(schedule)
    }

    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The expression with its zone, as shown to people: `0 2 * * *` or
    /// `0 2 * * * (Europe/Berlin)`.
    pub fn describe(&self) -> String {
        match self.zone {
            Some(z) => format!("{} ({})", self.expr, z.name()),
            None => self.expr.clone(),
        }
    }

    /// The first slot strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self.zone {
            None => self.cron.find_next_occurrence(&t, false).ok(),
            Some(z) => self
                .cron
                .find_next_occurrence(&t.with_timezone(&z), false)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
        }
    }

    /// The newest slot in `(after, now]`, if any: what is due when the last slot taken
    /// was `after`.
    pub fn newest_due(&self, after: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut slot = self.next_after(after)?;
        if slot > now {
            return None;
        }
        // Walk forward to the newest slot not after now; the walk is bounded by the
        // downtime (a minutely job down for a month is 43,200 steps).
        while let Some(next) = self.next_after(slot) {
            if next > now {
                break;
            }
            slot = next;
        }
        Some(slot)
    }
}

/// A job's place in its schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobState {
    /// The newest slot a run was started for.
    pub last_slot: Option<DateTime<Utc>>,
    pub running: bool,
}

/// The runs to start now: for each job (by index) the slot it runs for. `since` is when
/// the agent first knew the jobs (a job that never ran is not owed slots before it).
pub fn due(
    schedules: &[Schedule],
    states: &[JobState],
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Vec<(usize, DateTime<Utc>)> {
    schedules
        .iter()
        .zip(states)
        .enumerate()
        .filter(|(_, (_, st))| !st.running)
        .filter_map(|(i, (s, st))| {
            s.newest_due(st.last_slot.unwrap_or(since), now)
                .map(|slot| (i, slot))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn t(d: u32, h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, d, h, m, 0).unwrap()
    }

    /// Steps a simulated clock minute by minute; runs take `run_minutes`.
    fn simulate(
        schedules: &[Schedule],
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        run_minutes: i64,
        down: Option<(DateTime<Utc>, DateTime<Utc>)>,
    ) -> Vec<(usize, DateTime<Utc>, DateTime<Utc>)> {
        let mut states = vec![JobState::default(); schedules.len()];
        let mut ends: Vec<Option<DateTime<Utc>>> = vec![None; schedules.len()];
        let mut runs = vec![];
        let mut now = from;
        while now <= to {
            let up = down.is_none_or(|(a, b)| now < a || now >= b);
            for (i, end) in ends.iter_mut().enumerate() {
                if end.is_some_and(|e| e <= now) {
                    *end = None;
                    states[i].running = false;
                }
            }
            if up {
                for (i, slot) in due(schedules, &states, from, now) {
                    states[i].last_slot = Some(slot);
                    states[i].running = true;
                    ends[i] = Some(now + Duration::minutes(run_minutes));
                    runs.push((i, slot, now));
                }
            }
            now += Duration::minutes(1);
        }
        runs
    }

    #[test]
    fn a_simulated_week_runs_the_seed_matrix() {
        let hourly = Schedule::parse("0 * * * *").unwrap();
        let daily = Schedule::parse("0 2 * * *").unwrap();
        let weekly = Schedule::parse("0 3 * * SUN").unwrap();
        let runs = simulate(&[hourly, daily, weekly], t(1, 0, 30), t(8, 0, 30), 5, None);
        let count = |j| runs.iter().filter(|r| r.0 == j).count();
        assert_eq!(count(0), 168);
        assert_eq!(count(1), 7);
        assert_eq!(count(2), 1);
        // Every run starts at its slot.
        assert!(runs.iter().all(|(_, slot, at)| slot == at));
    }

    #[test]
    fn missed_slots_run_once_at_start() {
        let hourly = Schedule::parse("0 * * * *").unwrap();
        // Down from 10:30 to 15:30: slots 11..15 missed, one run at 15:30 for 15:00.
        let runs = simulate(
            std::slice::from_ref(&hourly),
            t(1, 9, 30),
            t(1, 17, 30),
            5,
            Some((t(1, 10, 30), t(1, 15, 30))),
        );
        let at: Vec<_> = runs.iter().map(|r| (r.1, r.2)).collect();
        assert_eq!(
            at,
            vec![
                (t(1, 10, 0), t(1, 10, 0)),
                (t(1, 15, 0), t(1, 15, 30)),
                (t(1, 16, 0), t(1, 16, 0)),
                (t(1, 17, 0), t(1, 17, 0)),
            ]
        );
    }

    #[test]
    fn a_long_run_is_not_overlapped_and_its_missed_slots_collapse() {
        let every_15 = Schedule::parse("*/15 * * * *").unwrap();
        // Each run takes 40 minutes: it never overlaps itself, and after each run the
        // newest missed slot runs at once.
        let runs = simulate(&[every_15], t(1, 0, 1), t(1, 3, 0), 40, None);
        for w in runs.windows(2) {
            assert!(w[1].2 >= w[0].2 + Duration::minutes(40), "{runs:?}");
        }
        assert_eq!(runs[0].1, t(1, 0, 15));
        assert_eq!(runs[1], (0, t(1, 0, 45), t(1, 0, 55)));
    }

    #[test]
    fn a_named_zone_moves_the_slot_and_follows_daylight_saving() {
        let berlin = Schedule::parse_in("0 2 * * *", Some("Europe/Berlin")).unwrap();
        // Winter: 02:00 in Berlin is 01:00 UTC; summer: 00:00 UTC.
        assert_eq!(berlin.next_after(t(1, 12, 0)), Some(t(2, 1, 0)));
        let july = Utc.with_ymd_and_hms(2026, 7, 1, 12, 0, 0).unwrap();
        assert_eq!(
            berlin.next_after(july),
            Some(Utc.with_ymd_and_hms(2026, 7, 2, 0, 0, 0).unwrap())
        );
        assert_eq!(berlin.describe(), "0 2 * * * (Europe/Berlin)");
        let e = Schedule::parse_in("0 2 * * *", Some("Mars/Olympus")).unwrap_err();
        assert!(e.message.contains("not a time zone"), "{}", e.message);
    }

    #[test]
    fn a_bad_expression_is_one_clear_error() {
        let e = Schedule::parse("0 25 * * *").unwrap_err();
        assert!(
            e.message.contains("`0 25 * * *` is not a cron expression"),
            "{}",
            e.message
        );
        assert!(Schedule::parse("@daily").is_ok());
        // Found by fuzzing custos.toml: an empty list item matched nothing, and finding
        // the next slot took seconds; a date that never comes was accepted silently.
        let e = Schedule::parse("3 1 ,,, * * 2").unwrap_err();
        assert!(e.message.contains("empty item"), "{}", e.message);
        let e = Schedule::parse("0 0 1,,15 * *").unwrap_err();
        assert!(e.message.contains("empty item"), "{}", e.message);
        let e = Schedule::parse("0 0 30 2 *").unwrap_err();
        assert!(e.message.contains("never comes round"), "{}", e.message);
        assert!(
            Schedule::parse("0 0 29 2 *").is_ok(),
            "leap days come round"
        );
        assert!(Schedule::parse("0 0 31 1,3 *").is_ok());
    }
}
