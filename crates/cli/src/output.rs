//! Printing: human text or one JSON document per command, progress bars on a terminal
//! (a line every few seconds on stderr otherwise, a JSON event with --json, so a cron
//! log or a CI job shows a long backup moving), and the error format with its stable code.

use std::io::IsTerminal;
use std::sync::Mutex;

use custos_model::Error;
use custos_ops::Progress;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

pub struct Out {
    pub json: bool,
    pub quiet: bool,
}

impl Out {
    pub fn json<T: Serialize>(&self, v: &T) {
        println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
    }

    pub fn progress(&self) -> Box<dyn Progress> {
        if self.quiet {
            Box::new(custos_ops::NoProgress)
        } else if self.json || !std::io::stderr().is_terminal() {
            let every = std::env::var("CUSTOS_PROGRESS_SECONDS")
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .filter(|s| *s >= 0.0)
                .unwrap_or(5.0);
            Box::new(Lines {
                json: self.json,
                every: std::time::Duration::from_secs_f64(every),
                state: Mutex::new(None),
            })
        } else {
            Box::new(Bar(Mutex::new(None)))
        }
    }
}

/// Progress as a line on stderr every `every` (and when a phase ends): text, or with
/// `--json` one JSON object per line (`{"progress": {...}}`); stdout keeps the one result.
struct Lines {
    json: bool,
    every: std::time::Duration,
    state: Mutex<Option<LineState>>,
}

struct LineState {
    phase: String,
    total: Option<u64>,
    done: u64,
    start: std::time::Instant,
    printed: std::time::Instant,
}

impl Lines {
    fn print(&self, s: &LineState, finished: bool) {
        let secs = s.start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            s.done as f64 / secs
        } else {
            0.0
        };
        if self.json {
            let v = serde_json::json!({"progress": {
                "phase": s.phase, "done": s.done, "total": s.total,
                "elapsed_seconds": (secs * 10.0).round() / 10.0,
                "per_second": rate.round(), "finished": finished,
            }});
            eprintln!("{v}");
            return;
        }
        let of = match s.total {
            Some(t) if t > 0 => format!(
                " of {} ({:.0}%)",
                custos_model::ByteSize(t),
                s.done as f64 * 100.0 / t as f64
            ),
            _ => String::new(),
        };
        let eta = match s.total {
            Some(t) if !finished && rate > 0.0 && t > s.done => {
                format!(", about {:.0} s left", (t - s.done) as f64 / rate)
            }
            _ => String::new(),
        };
        eprintln!(
            "custos: {} {}{of}, {} after {:.0} s{}{eta}",
            s.phase,
            custos_model::ByteSize(s.done),
            mb_per_s(s.done, (secs * 1000.0) as u64),
            secs,
            if finished { ", done" } else { "" }
        );
    }
}

impl Progress for Lines {
    fn start(&self, phase: &str, total: Option<u64>) {
        let now = std::time::Instant::now();
        *self.state.lock().unwrap() = Some(LineState {
            phase: phase.to_string(),
            total,
            done: 0,
            start: now,
            printed: now,
        });
    }
    fn add(&self, n: u64) {
        let mut g = self.state.lock().unwrap();
        if let Some(s) = g.as_mut() {
            s.done += n;
            if s.printed.elapsed() >= self.every {
                s.printed = std::time::Instant::now();
                self.print(s, false);
            }
        }
    }
    fn finish(&self) {
        if let Some(s) = self.state.lock().unwrap().take() {
            // A phase that ended before the first line says nothing: short work is quiet.
            if s.start.elapsed() >= self.every {
                self.print(&s, true);
            }
        }
    }
}

struct Bar(Mutex<Option<ProgressBar>>);

impl Progress for Bar {
    fn start(&self, phase: &str, total: Option<u64>) {
        let pb = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{prefix:>8} {spinner} {bytes} {bytes_per_sec}")
                    .expect("valid template"),
            ),
        };
        pb.set_prefix(phase.to_string());
        *self.0.lock().unwrap() = Some(pb);
    }
    fn add(&self, n: u64) {
        if let Some(pb) = &*self.0.lock().unwrap() {
            pb.inc(n);
        }
    }
    fn finish(&self) {
        if let Some(pb) = self.0.lock().unwrap().take() {
            pb.finish_and_clear();
        }
    }
}

/// Prints an error: always a human line on stderr; with --json also a document on stdout.
pub fn error(e: &Error, json: bool) {
    eprintln!(
        "custos: error E{:02} ({}): {}",
        e.kind.code(),
        e.kind.name(),
        e.message
    );
    if let Some(h) = &e.hint {
        eprintln!("  hint: {h}");
    }
    if json {
        #[derive(Serialize)]
        struct J<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            code: u16,
            kind: &'a str,
            message: &'a str,
            hint: Option<&'a str>,
            retryable: bool,
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&J {
                error: Inner {
                    code: e.kind.code(),
                    kind: e.kind.name(),
                    message: &e.message,
                    hint: e.hint.as_deref(),
                    retryable: e.kind.retryable()
                }
            })
            .expect("serializable")
        );
    }
}

pub fn mb_per_s(bytes: u64, ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    format!("{:.0} MB/s", bytes as f64 / 1e6 / (ms as f64 / 1000.0))
}
