//! Storage moves opaque bytes by path and never sees a key.
//!
//! Every backend implements [`Storage`]; one conformance suite ([`conformance`]) runs
//! against each of them. The repository layer above decides names and write order; this
//! layer guarantees that a successful `put` is durable and that a `CreateOnly` put never
//! replaces an object that exists (the base of write-once objects and of locks).

pub mod conformance;
pub mod fault;
pub mod guard;
pub mod local;
pub mod objectlock;
pub mod remote;
pub mod url;
pub mod vercel;

use custos_model::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Fails with [`PutOutcome::AlreadyExists`] if the path exists; atomic where the
    /// backend supports it (link(2) locally, `If-None-Match: *` on S3).
    CreateOnly,
    /// Replaces any existing object atomically.
    Overwrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    AlreadyExists,
}

/// Reads a listed object of a kind custos keeps small, refusing one the listing (or the
/// read) shows larger than `max` with an integrity error, before reading it when the
/// listing says so: whatever storage holds is hostile input, and a key file or a lock of
/// gigabytes must cost a warning, not the memory of every command that lists them.
pub fn get_listed(storage: &dyn Storage, e: &Entry, max: u64, what: &str) -> Result<Vec<u8>> {
    let too_large = |n: u64| {
        custos_model::Error::integrity(format!(
            "{what} `{}` is {n} bytes, more than custos ever writes ({max}): it was not read",
            e.path
        ))
    };
    if e.size > max {
        return Err(too_large(e.size));
    }
    let b = storage.get(&e.path)?;
    if b.len() as u64 > max {
        return Err(too_large(b.len() as u64));
    }
    Ok(b)
}

/// Reads an object fetched by name (no listing says its size) of a kind custos keeps below
/// `max` bytes: at most `max + 1` bytes are read, and an object larger than `max` is an
/// integrity error that says so. A missing object stays an error of kind `NotFound`.
/// Whatever storage or a key holder wrote there is hostile input: a planted trail entry
/// or WAL object of gigabytes must cost a refusal, not the memory of the command.
pub fn get_bounded(storage: &dyn Storage, path: &str, max: u64, what: &str) -> Result<Vec<u8>> {
    let b = storage.get_prefix(path, max.saturating_add(1))?;
    if b.len() as u64 > max {
        return Err(custos_model::Error::integrity(format!(
            "{what} `{path}` is larger than any custos writes (more than {max} bytes): it was not read"
        )));
    }
    Ok(b)
}

/// A listed object: path relative to the listed folder's parent root, and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub size: u64,
    /// When the object was written, where the store says (S3's LastModified, a file's
    /// mtime): `copy --check` measures a secondary's lag by it.
    pub modified: Option<std::time::SystemTime>,
    /// The MD5 of the object's bytes where the store lists it (S3's ETag of a single
    /// PUT, lowercase hex): `copy` compares it with what the secondary stored.
    pub md5: Option<String>,
}

/// How long to wait before retry `tries` (1, 2, ...) of a request OpenDAL's own retries
/// do not cover (the signed client's writes, a streamed copy): 0.4, 0.8, 1.6, 3.2, 6.4 s at
/// most, plus up to half again at random, so that writers that failed together do not
/// come back together.
pub(crate) fn backoff(tries: usize) -> std::time::Duration {
    let ms = 200u64 << tries.clamp(1, 5);
    std::time::Duration::from_millis(ms + rand::random::<u64>() % (ms / 2 + 1))
}

/// An S3 ETag that is the MD5 of the bytes (32 hex digits, no part count), lowercase.
pub fn etag_md5(etag: &str) -> Option<String> {
    let e = etag.trim_matches('"').to_ascii_lowercase();
    (e.len() == 32 && e.bytes().all(|b| b.is_ascii_hexdigit())).then_some(e)
}

/// The S3 object tag (`key=value`) on packs that hold data blobs only: what a lifecycle
/// rule may move to an archival storage class (`custos bucket-policy`). Packs holding a
/// manifest are not tagged and stay readable at once.
pub const ARCHIVAL_TAG: &str = "custos-tier=archival";

/// What [`Storage::receive`] did with one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    Created,
    /// An object of that name was there already (the caller compares).
    AlreadyExists,
    /// The bytes read were not what the name or the listed size says: nothing stored.
    Mismatch,
}

pub trait Storage: Send + Sync {
    /// Where this storage is, for messages (never includes credentials).
    fn location(&self) -> String;
    fn put(&self, path: &str, data: &[u8], mode: PutMode) -> Result<PutOutcome>;
    /// A create-only put for a writer that must know whether *its* object took the name
    /// (a trail entry's number, the repository's config): an object already there holding
    /// exactly these bytes is its own, stored by an earlier try whose answer was lost
    /// (the store carried out the PUT, the connection dropped before it said so, and the
    /// retry met `If-None-Match`), and counts as created. The bytes must be unique to the
    /// writer (a random nonce in them), else two writers could both think they won.
    fn create(&self, path: &str, data: &[u8]) -> Result<PutOutcome> {
        match self.put(path, data, PutMode::CreateOnly)? {
            // One byte more than ours is enough to tell: a planted object of any size
            // costs no more.
            PutOutcome::AlreadyExists if self.get_prefix(path, data.len() as u64 + 1)? == data => {
                Ok(PutOutcome::Created)
            }
            o => Ok(o),
        }
    }
    /// A create-only put whose arrival is checked where the store can say what it
    /// received (S3: the ETag of a single PUT is the MD5 of the bytes it stored).
    /// `copy` writes with it; elsewhere a plain put.
    /// Takes the bytes by reference count: an object store sends them without a copy.
    /// `md5`: the bytes' MD5 when known (the source listed it), else it is computed.
    fn put_checked(&self, path: &str, data: bytes::Bytes, md5: Option<&str>) -> Result<PutOutcome> {
        let _ = md5;
        self.put(path, &data, PutMode::CreateOnly)
    }
    /// A put that also tags the object (`key=value`) where the store has tags (S3);
    /// elsewhere a plain put. Takes the bytes by reference count: an object store sends
    /// them without a copy (a pack upload holds one copy of the pack, not two).
    fn put_tagged(
        &self,
        path: &str,
        data: bytes::Bytes,
        mode: PutMode,
        tag: Option<&str>,
    ) -> Result<PutOutcome> {
        let _ = tag;
        self.put(path, &data, mode)
    }
    /// This storage as an object-store bucket custos signs requests for, if it is one.
    fn as_remote(&self) -> Option<&remote::RemoteStorage> {
        None
    }
    /// Writes the object `e` of `src` here create-only as it is read, without holding it
    /// whole (`copy`), checked against `blake3` when its name is its hash and against the
    /// listed size and MD5. `None`: these two storages cannot (the caller copies through
    /// memory).
    fn receive(
        &self,
        _src: &dyn Storage,
        _e: &Entry,
        _blake3: Option<&str>,
    ) -> Option<Result<Received>> {
        None
    }
    /// Whole object. A missing object is an error of kind `NotFound`.
    fn get(&self, path: &str) -> Result<Vec<u8>>;
    fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// The first `n` bytes of an object, or all of it when it is shorter (see
    /// [`get_bounded`]). A missing object is an error of kind `NotFound`. The default
    /// asks for the size first; backends that can read a prefix in one request do.
    fn get_prefix(&self, path: &str, n: u64) -> Result<Vec<u8>> {
        match self.size(path)? {
            Some(size) if size > n => self.get_range(path, 0, n),
            _ => self.get(path),
        }
    }
    /// Size of an object, or `None` if it does not exist.
    fn size(&self, path: &str) -> Result<Option<u64>>;
    /// Every object under `dir` (recursively), with paths relative to the storage root.
    fn list(&self, dir: &str) -> Result<Vec<Entry>>;
    /// Every object under `dir` whose name there starts with a lowercase hex digit (objects
    /// named by their hash), as [`Storage::list`] gives them. An object store lists the 16
    /// first digits at once rather than page after page of one listing: a listing gives
    /// 1,000 names a page, each page a round trip, and the seed keeps over 50,000
    /// snapshot objects (six years of hourly audit-log exports) that every backup lists.
    fn list_hex(&self, dir: &str) -> Result<Vec<Entry>> {
        let base = format!("{}/", dir.trim_end_matches('/'));
        let mut all = self.list(dir)?;
        all.retain(|e| {
            e.path
                .strip_prefix(&base)
                .and_then(|n| n.bytes().next())
                .is_some_and(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        Ok(all)
    }
    /// As [`Storage::list`], as listings of the ranges between `splits` (keys under `dir`,
    /// sorted) side by side where the store pages its listings (S3: from after one split
    /// to the next, `start-after`): the WAL archive of years, hundreds of pages, in the
    /// time of a few. Any splits give the same answer; good ones (the quantiles of the last
    /// listing) give ranges of even size.
    fn list_split(&self, dir: &str, splits: &[String]) -> Result<Vec<Entry>> {
        let _ = splits;
        self.list(dir)
    }
    /// Removes an object; removing a missing object succeeds.
    fn delete(&self, path: &str) -> Result<()>;
    /// Access-rule findings (a local file readable by others, say). Object stores enforce
    /// access with policies instead, so the default has nothing to report.
    fn permission_findings(&self) -> Result<Vec<String>> {
        Ok(vec![])
    }
    /// Fails, before any work, when this process could not write to the storage (a local
    /// repository of another OS user). Object stores answer with their requests.
    fn check_writable(&self) -> Result<()> {
        Ok(())
    }
    /// Starts reading the objects under `dir` ahead in the background, newest first, until
    /// [`stop_warming`] is called or a quarter of the available memory has been read. A
    /// restore calls it before it derives its key, while the disk is otherwise idle, so its
    /// packs then come from the page cache. Best effort; object stores do nothing (their
    /// reads are not cached).
    fn warm(&self, _dir: &str) {}
    /// Object Lock, when this storage writes with retain-until dates (an S3 bucket with
    /// Object Lock and `[object_lock]` in custos.toml).
    fn object_lock(&self) -> Option<&dyn ObjectLock> {
        None
    }
    /// `Some` when the object sits in an archival storage class (and whether a restored
    /// copy is readable). Stores without such classes: `None`.
    fn cold(&self, _path: &str) -> Result<Option<Cold>> {
        Ok(None)
    }
    /// Asks the store to restore an archived object for `days` (S3 RestoreObject, Standard
    /// tier); false when a restore of it is already under way.
    fn request_restore(&self, path: &str, _days: u32) -> Result<bool> {
        Err(custos_model::Error::new(
            custos_model::Kind::Storage,
            format!(
                "{}: `{path}` cannot be restored from cold storage here",
                self.location()
            ),
        ))
    }
}

/// Reading and extending objects' retention on an Object Lock store.
pub trait ObjectLock: Send + Sync {
    fn mode(&self) -> objectlock::LockMode;
    /// The retention of the object's current version (`None`: none, or no object).
    fn retention(&self, path: &str) -> Result<Option<objectlock::Retention>>;
    /// Moves the object's retain-until date to `until` (never earlier: the store refuses).
    fn extend(&self, path: &str, until: chrono::DateTime<chrono::Utc>) -> Result<()>;
}

/// An object in an archival storage class (S3 GLACIER, DEEP_ARCHIVE), which cannot be
/// read until the store restores a copy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Cold {
    pub class: String,
    pub restore: ColdRestore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ColdRestore {
    /// Nobody asked for it: reads fail.
    NotRequested,
    /// Asked for; the store is bringing it back (hours).
    InProgress,
    /// A restored copy is readable (until its expiry).
    Ready,
}

static STOP_WARMING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ends the read-ahead [`Storage::warm`] started: the restore knows what it needs and
/// reads it itself from here on. For the rest of the process: a command restores once.
pub fn stop_warming() {
    STOP_WARMING.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn warming_stopped() -> bool {
    STOP_WARMING.load(std::sync::atomic::Ordering::Relaxed)
}

pub type DynStorage = std::sync::Arc<dyn Storage>;
