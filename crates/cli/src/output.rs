//! Printing: human text or one JSON document per command, progress bars on a terminal,
//! and the error format with its stable code.

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
        if self.json || self.quiet || !std::io::stderr().is_terminal() {
            Box::new(custos_ops::NoProgress)
        } else {
            Box::new(Bar(Mutex::new(None)))
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
