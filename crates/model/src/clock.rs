//! The time custos dates what it records by (trail entries, snapshots, drills, the
//! retention policy's "now").
//!
//! A test hook fixes it, as `CUSTOS_TEST_KILL_BEFORE_WRITE` injects a crash: the
//! environment variable `CUSTOS_TEST_NOW` (RFC 3339), which the agent's simulated clock
//! (`CUSTOS_TEST_CLOCK`) passes to every command it starts, each at its job's slot, so a
//! simulated month leaves a month of dated records. Locks, timeouts and store dates keep
//! the real clock.

use std::sync::Mutex;

use chrono::{DateTime, Utc};

static SIMULATED: Mutex<Option<DateTime<Utc>>> = Mutex::new(None);

/// Now: the simulated time when one is set (in this process, or by `CUSTOS_TEST_NOW`),
/// else the system clock.
pub fn now() -> DateTime<Utc> {
    simulated().unwrap_or_else(Utc::now)
}

/// The simulated time, if any.
pub fn simulated() -> Option<DateTime<Utc>> {
    if let Some(t) = *SIMULATED.lock().unwrap() {
        return Some(t);
    }
    std::env::var("CUSTOS_TEST_NOW")
        .ok()
        .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Sets this process's simulated time (the agent on its test clock).
pub fn set_simulated(t: DateTime<Utc>) {
    *SIMULATED.lock().unwrap() = Some(t);
}

/// `t + d`, or the latest time there is when that lies past it. Times come from stored
/// snapshots (whatever a backup key wrote) and spans from a policy; chrono's `+` panics
/// past its range.
pub fn later(t: DateTime<Utc>, d: chrono::Duration) -> DateTime<Utc> {
    t.checked_add_signed(d).unwrap_or(DateTime::<Utc>::MAX_UTC)
}
