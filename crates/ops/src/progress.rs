//! Progress reporting, implemented by the CLI (a bar on a terminal, nothing otherwise).

pub trait Progress: Send + Sync {
    /// Starts a phase; `total` in bytes (or items) if known.
    fn start(&self, phase: &str, total: Option<u64>);
    fn add(&self, n: u64);
    fn finish(&self);
}

pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: Option<u64>) {}
    fn add(&self, _: u64) {}
    fn finish(&self) {}
}
