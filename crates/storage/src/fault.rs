//! Fault injection for crash-safety tests: a decorator that kills the process with SIGKILL
//! right before its N-th mutating storage operation. SIGKILL cannot be caught, so what is
//! on storage afterwards is exactly what a power cut or OOM kill would leave. Enabled only
//! by `CUSTOS_TEST_KILL_BEFORE_WRITE=N`, which the CLI reads and documents as a test hook.

use std::sync::atomic::{AtomicU64, Ordering};

use custos_model::Result;

use crate::{DynStorage, Entry, PutMode, PutOutcome, Storage};

pub struct KillBeforeWrite {
    inner: DynStorage,
    remaining: AtomicU64,
}

impl KillBeforeWrite {
    pub fn new(inner: DynStorage, n: u64) -> Self {
        KillBeforeWrite {
            inner,
            remaining: AtomicU64::new(n),
        }
    }

    fn tick(&self) {
        if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
            // SAFETY-free: libc::kill on our own pid with a valid signal number.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }
}

impl Storage for KillBeforeWrite {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn put(&self, path: &str, data: &[u8], mode: PutMode) -> Result<PutOutcome> {
        self.tick();
        self.inner.put(path, data, mode)
    }
    fn put_tagged(
        &self,
        path: &str,
        data: bytes::Bytes,
        mode: PutMode,
        tag: Option<&str>,
    ) -> Result<PutOutcome> {
        self.tick();
        self.inner.put_tagged(path, data, mode, tag)
    }
    fn put_checked(&self, path: &str, data: bytes::Bytes, md5: Option<&str>) -> Result<PutOutcome> {
        self.tick();
        self.inner.put_checked(path, data, md5)
    }
    /// Reads are not faulted: as a copy's source this is the store it wraps.
    fn as_remote(&self) -> Option<&crate::remote::RemoteStorage> {
        self.inner.as_remote()
    }
    fn receive(
        &self,
        src: &dyn Storage,
        e: &Entry,
        blake3: Option<&str>,
    ) -> Option<Result<crate::Received>> {
        // A write only when both sides stream (else the caller's put ticks).
        if src.as_remote().is_some() && self.inner.as_remote().is_some() {
            self.tick();
        }
        self.inner.receive(src, e, blake3)
    }
    fn get(&self, path: &str) -> Result<Vec<u8>> {
        self.inner.get(path)
    }
    fn check_writable(&self) -> Result<()> {
        self.inner.check_writable()
    }
    fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.inner.get_range(path, offset, len)
    }
    fn get_prefix(&self, path: &str, n: u64) -> Result<Vec<u8>> {
        self.inner.get_prefix(path, n)
    }
    fn size(&self, path: &str) -> Result<Option<u64>> {
        self.inner.size(path)
    }
    fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        self.inner.list(dir)
    }
    fn list_hex(&self, dir: &str) -> Result<Vec<Entry>> {
        self.inner.list_hex(dir)
    }
    fn list_split(&self, dir: &str, splits: &[String]) -> Result<Vec<Entry>> {
        self.inner.list_split(dir, splits)
    }
    fn delete(&self, path: &str) -> Result<()> {
        self.tick();
        self.inner.delete(path)
    }
    fn permission_findings(&self) -> Result<Vec<String>> {
        self.inner.permission_findings()
    }
    fn object_lock(&self) -> Option<&dyn crate::ObjectLock> {
        self.inner.object_lock()
    }
    fn cold(&self, path: &str) -> Result<Option<crate::Cold>> {
        self.inner.cold(path)
    }
    fn request_restore(&self, path: &str, days: u32) -> Result<bool> {
        self.inner.request_restore(path, days)
    }
}
