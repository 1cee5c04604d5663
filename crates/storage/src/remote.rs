//! Object stores through OpenDAL: S3 and S3-compatible stores (SeaweedFS, Ceph, MinIO),
//! and any other OpenDAL service compiled in (Vercel Blob, Azure Blob).
//!
//! The rest of custos is thread-based; this adapter owns a small tokio runtime and blocks
//! on it, so callers stay synchronous and several threads can run requests at once.

use std::collections::HashMap;
use std::time::Duration;

use custos_model::{Error, Kind, Result};
use futures::TryStreamExt;
use opendal::layers::{RetryLayer, TimeoutLayer};
use opendal::{ErrorKind as OdKind, Operator};

use crate::objectlock::{LockClient, LockMode, Retention, WriteLock};
use crate::{Entry, PutMode, PutOutcome, Storage};

/// How long to wait for an object store, and how often to try again. The defaults make
/// an endpoint that never answers fail in about half a minute (three tries of 10 s), one
/// that refuses connections at once, and leave large transfers their time (each read or
/// write of a body may take 30 s).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// To open a connection.
    pub connect: Duration,
    /// For a request without a body to move (stat, list, delete, the start of a read).
    pub request: Duration,
    /// For each read or write of a body.
    pub io: Duration,
    /// Further tries after a failure that may pass (a timeout, a 5xx).
    pub retries: usize,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(10),
            io: Duration::from_secs(30),
            retries: 2,
        }
    }
}

/// The object store services compiled in, as `<scheme>://` repository locations take them.
pub const SCHEMES: &str = "s3://BUCKET/PREFIX, azblob://, vercel_blob://, fs://, or a local path";

/// S3 settings. Credentials are only ever read from the config file or the environment by
/// the CLI, never from arguments.
#[derive(Clone, Default)]
pub struct S3Options {
    pub bucket: String,
    pub root: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub timeouts: Timeouts,
    /// PEM certificates of the CA(s) that sign the store's TLS certificate, trusted
    /// besides the system's (a private CA); verification is never turned off.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("root", &self.root)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

pub struct RemoteStorage {
    op: Operator,
    rt: tokio::runtime::Runtime,
    location: String,
    timeouts: Timeouts,
    /// Object Lock: the signed requests OpenDAL cannot make, and the dates custos writes.
    lock: Option<(LockClient, WriteLock)>,
    /// S3 requests OpenDAL cannot make (HEAD's storage class, RestoreObject).
    s3: Option<LockClient>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::internal(format!("cannot start I/O runtime: {e}")))
}

/// An HTTP client that also trusts the CA certificates of `ca_pem` (a private CA).
pub(crate) fn client_builder(ca_pem: Option<&[u8]>) -> Result<reqwest::ClientBuilder> {
    let mut b = reqwest::Client::builder();
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
            Error::config(format!(
                "ca_file: no PEM certificate can be read from it ({e})"
            ))
            .hint("ca_file names the PEM file of the CA that signs the store's certificate")
        })?;
        if certs.is_empty() {
            return Err(Error::config("ca_file holds no PEM certificate")
                .hint("ca_file names the PEM file of the CA that signs the store's certificate"));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    Ok(b)
}

fn layered(op: Operator, t: &Timeouts, ca_pem: Option<&[u8]>) -> Result<Operator> {
    // The connection timeout is the HTTP client's: a layer only sees whole operations. So
    // is the wait for each read from the connection, response headers included: OpenDAL
    // counts the wait for a read's response against its (longer) transfer timeout.
    let client = client_builder(ca_pem)?
        .connect_timeout(t.connect)
        .read_timeout(t.request)
        .build()
        .map_err(|e| Error::internal(format!("cannot build the HTTP client: {e}")))?;
    Ok(op
        .layer(opendal::layers::HttpClientLayer::new(
            opendal::raw::HttpClient::with(client),
        ))
        .layer(
            TimeoutLayer::new()
                .with_timeout(t.request)
                .with_io_timeout(t.io),
        )
        .layer(
            RetryLayer::new()
                .with_max_times(t.retries)
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(2))
                .with_jitter(),
        ))
}

impl RemoteStorage {
    pub fn s3(o: &S3Options) -> Result<RemoteStorage> {
        let mut b = opendal::services::S3::default()
            .bucket(&o.bucket)
            .root(&format!("/{}", o.root.trim_matches('/')))
            .region(o.region.as_deref().unwrap_or("us-east-1"))
            .disable_config_load()
            .disable_ec2_metadata();
        if let Some(e) = &o.endpoint {
            b = b.endpoint(e);
        }
        if let Some(k) = &o.access_key_id {
            b = b.access_key_id(k);
        }
        if let Some(k) = &o.secret_access_key {
            b = b.secret_access_key(k);
        }
        if let Some(t) = &o.session_token {
            b = b.session_token(t);
        }
        if o.access_key_id.is_none() {
            b = b.allow_anonymous();
        }
        let op = Operator::new(b).map_err(|e| config_err("s3", e))?.finish();
        let location = format!(
            "s3://{}/{}{}",
            o.bucket,
            o.root.trim_matches('/'),
            o.endpoint
                .as_deref()
                .map(|e| format!(" at {e}"))
                .unwrap_or_default()
        );
        let rt = runtime()?;
        let op = {
            let _guard = rt.enter();
            layered(op, &o.timeouts, o.ca_pem.as_deref())?
        };
        Ok(RemoteStorage {
            op,
            rt,
            location,
            timeouts: o.timeouts,
            lock: None,
            s3: Some(LockClient::new(o, &o.timeouts)?),
        })
    }

    /// This storage on an Object Lock bucket: objects of the kinds `w` names are written
    /// with a retain-until date, and deletes remove every version (or are refused by the
    /// store while a date holds). Fails when the bucket has no Object Lock.
    pub fn with_object_lock(mut self, o: &S3Options, w: WriteLock) -> Result<RemoteStorage> {
        let client = LockClient::new(o, &self.timeouts)?;
        if self.rt.block_on(client.bucket_lock())?.is_none() {
            return Err(Error::config(format!(
                "{}: [object_lock] is set in custos.toml but the bucket `{}` has no Object Lock",
                self.location, o.bucket
            ))
            .hint("Object Lock can only be turned on when a bucket is created: create a bucket with it (`custos bucket-policy` prints the settings) and copy the repository there, or remove [object_lock]"));
        }
        self.lock = Some((client, w));
        Ok(self)
    }

    /// Creates an S3 bucket with Object Lock enabled.
    pub fn create_locked_bucket(o: &S3Options) -> Result<()> {
        let client = LockClient::new(o, &o.timeouts)?;
        runtime()?.block_on(client.create_locked_bucket())
    }

    /// The bucket's Object Lock configuration (`None`: Object Lock is off).
    pub fn bucket_lock(o: &S3Options) -> Result<Option<crate::objectlock::BucketLock>> {
        let client = LockClient::new(o, &o.timeouts)?;
        runtime()?.block_on(client.bucket_lock())
    }

    /// A put through the signed client, when it must carry what OpenDAL cannot send: a
    /// retain-until date (Object Lock) or a tag. `None`: OpenDAL's put will do.
    fn signed_put(
        &self,
        path: &str,
        data: bytes::Bytes,
        create_only: bool,
        tag: Option<&str>,
    ) -> Option<Result<PutOutcome>> {
        let r = self.lock.as_ref().and_then(|(_, w)| {
            w.span_for(path).map(|d| Retention {
                mode: w.mode,
                until: chrono::Utc::now()
                    + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX),
            })
        });
        let c = match (&self.lock, &self.s3) {
            (Some((c, _)), _) => c,
            (None, Some(c)) if tag.is_some() => c,
            _ => return None,
        };
        Some(self.rt.block_on(c.put(path, data, create_only, r, tag)))
    }

    /// The date a write of `path` carries on this storage (Object Lock), if any.
    fn retention_for(&self, path: &str) -> Option<Retention> {
        self.lock.as_ref().and_then(|(_, w)| {
            w.span_for(path).map(|d| Retention {
                mode: w.mode,
                until: chrono::Utc::now()
                    + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX),
            })
        })
    }

    /// The signed client of this bucket (the Object Lock one when there is one).
    fn client(&self) -> Option<&LockClient> {
        self.lock.as_ref().map(|(c, _)| c).or(self.s3.as_ref())
    }

    /// One object from `src` into this bucket as it is read (`copy`): the GET's body is
    /// the PUT's, hashed on the way; the last piece is held back until the whole has been
    /// checked against `blake3` (when the name is the hash) and the listed size, so a
    /// damaged object is never completed on this side (the PUT is cut short, which the
    /// store discards). Tags the source has go along. `None` when either side is not S3.
    fn stream_from(
        &self,
        src: &RemoteStorage,
        e: &Entry,
        blake3: Option<&str>,
    ) -> Option<Result<crate::Received>> {
        let (from, to) = (src.client()?, self.client()?);
        let retention = self.retention_for(&e.path);
        // An Object Lock write must name its MD5 before the body: only when listed.
        if retention.is_some() && e.md5.is_none() {
            return None;
        }
        let attempt = || async {
            let resp = from.get_stream(&e.path).await?;
            if let Some(n) = resp.content_length() {
                if n != e.size {
                    return Err(Error::new(
                        Kind::Conflict,
                        format!(
                            "{}: `{}` changed while it was copied ({} bytes listed, {n} read)",
                            src.location, e.path, e.size
                        ),
                    ));
                }
            }
            // Stores that do not say how many tags an object has (SeaweedFS) are asked
            // for the tags of packs, the only objects custos tags.
            let tagged = match resp
                .headers()
                .get("x-amz-tagging-count")
                .and_then(|v| v.to_str().ok())
            {
                Some(n) => n.trim() != "0",
                None => e.path.starts_with("data/"),
            };
            let tag = if tagged {
                from.tagging(&e.path).await?
            } else {
                None
            };
            let verdict = std::sync::Arc::new(std::sync::Mutex::new(None));
            let body = checked_body(resp, e.size, blake3.map(str::to_string), verdict.clone());
            let r = to
                .put_stream(
                    &e.path,
                    reqwest::Body::wrap_stream(body),
                    e.size,
                    e.md5.as_deref(),
                    retention,
                    tag.as_deref(),
                )
                .await;
            if let Some(false) = *verdict.lock().unwrap() {
                return Ok(crate::Received::Mismatch);
            }
            let (outcome, etag) = r?;
            if let (Some(stored), Some(sent)) = (etag, e.md5.as_deref()) {
                if stored != sent {
                    return Err(Error::integrity(format!(
                        "{}: the store holds other bytes under `{}` than were sent (MD5 {stored}, sent {sent})",
                        self.location, e.path
                    ))
                    .hint("the object was damaged on the way or by the store; delete it there and run the command again"));
                }
            }
            Ok(match outcome {
                PutOutcome::Created => crate::Received::Created,
                PutOutcome::AlreadyExists => crate::Received::AlreadyExists,
            })
        };
        Some(self.rt.block_on(async {
            let mut tries = 0;
            loop {
                match attempt().await {
                    Err(err) if err.kind == Kind::Storage && tries < self.timeouts.retries => {
                        tries += 1;
                        tracing::debug!(
                            "{}: retrying the copy of `{}`: {}",
                            self.location,
                            e.path,
                            err.message
                        );
                        tokio::time::sleep(crate::backoff(tries)).await;
                    }
                    r => return r,
                }
            }
        }))
    }

    /// The object's S3 tags (`k=v&k=v`), `None` when it has none.
    pub fn tags(&self, path: &str) -> Result<Option<String>> {
        let c = self.client().ok_or_else(|| {
            Error::new(
                Kind::Storage,
                format!("{}: this store has no tags", self.location),
            )
        })?;
        self.rt.block_on(c.tagging(path))
    }

    /// Any OpenDAL service by scheme name, configured by key/value options.
    pub fn service(
        scheme: &str,
        options: HashMap<String, String>,
        timeouts: Timeouts,
    ) -> Result<RemoteStorage> {
        let unknown = || {
            Error::config(format!("unknown storage scheme `{scheme}://`"))
                .hint(format!("a repository location is one of: {SCHEMES}"))
        };
        let s: opendal::Scheme = scheme.parse().map_err(|_| unknown())?;
        let op = Operator::via_iter(s, options).map_err(|e| match e.kind() {
            OdKind::Unsupported => unknown(),
            _ => config_err(scheme, e),
        })?;
        let rt = runtime()?;
        let op = {
            let _guard = rt.enter();
            layered(op, &timeouts, None)?
        };
        Ok(RemoteStorage {
            op,
            rt,
            location: format!("{scheme}://"),
            timeouts,
            lock: None,
            s3: None,
        })
    }

    /// Every object whose key starts with `prefix` (a folder's when it ends in `/`).
    async fn list_prefix(&self, prefix: &str) -> std::result::Result<Vec<Entry>, opendal::Error> {
        let mut lister = self.op.lister_with(prefix).recursive(true).await?;
        let mut out = vec![];
        while let Some(e) = lister.try_next().await? {
            if e.metadata().is_dir() {
                continue;
            }
            out.push(entry_of(&e));
        }
        Ok(out)
    }

    fn err(&self, path: &str, e: opendal::Error) -> Error {
        let detail = chain(&e).to_lowercase();
        if let Some(t) = untrusted(&self.location, &detail) {
            return t;
        }
        if detail.contains("timeout") || detail.contains("timed out") {
            let t = &self.timeouts;
            return Error::new(
                Kind::Storage,
                format!(
                    "{}: the store did not answer in time while accessing `{path}` ({} tr{}; connect {} s, request {} s, transfer {} s)",
                    self.location,
                    t.retries + 1,
                    if t.retries == 0 { "y" } else { "ies" },
                    t.connect.as_secs_f64(),
                    t.request.as_secs_f64(),
                    t.io.as_secs_f64()
                ),
            )
            .hint("check the endpoint URL and that the store is up and reachable from here; the waits are set by connect_timeout, timeout, io_timeout and retries in [storage] of custos.toml");
        }
        map_err(&self.location, path, e)
    }
}

/// A listed object as OpenDAL gives it.
fn entry_of(e: &opendal::Entry) -> Entry {
    Entry {
        path: e.path().trim_start_matches('/').to_string(),
        size: e.metadata().content_length(),
        modified: e
            .metadata()
            .last_modified()
            .map(std::time::SystemTime::from),
        md5: e.metadata().etag().and_then(crate::etag_md5),
    }
}

/// The body of a streamed copy: the pieces of `resp` as they arrive, every one but the
/// last passed on at once; the last only once the whole is `size` bytes and hashes to
/// `blake3` (when given). Otherwise the stream ends in an error, which cuts the PUT
/// short, and `verdict` says false.
fn checked_body(
    resp: reqwest::Response,
    size: u64,
    blake3: Option<String>,
    verdict: std::sync::Arc<std::sync::Mutex<Option<bool>>>,
) -> impl futures::Stream<Item = std::result::Result<bytes::Bytes, std::io::Error>> {
    struct State<S> {
        inner: S,
        held: Option<bytes::Bytes>,
        hasher: blake3::Hasher,
        n: u64,
        done: bool,
    }
    let st = State {
        inner: Box::pin(resp.bytes_stream()),
        held: None,
        hasher: blake3::Hasher::new(),
        n: 0,
        done: false,
    };
    futures::stream::unfold(st, move |mut s| {
        let blake3 = blake3.clone();
        let verdict = verdict.clone();
        async move {
            use futures::StreamExt;
            if s.done {
                return None;
            }
            loop {
                match s.inner.next().await {
                    Some(Ok(piece)) => {
                        s.hasher.update(&piece);
                        s.n += piece.len() as u64;
                        if let Some(prev) = s.held.replace(piece) {
                            return Some((Ok(prev), s));
                        }
                    }
                    Some(Err(e)) => {
                        s.done = true;
                        return Some((Err(std::io::Error::other(e)), s));
                    }
                    None => {
                        s.done = true;
                        let whole = s.n == size
                            && blake3
                                .as_deref()
                                .is_none_or(|h| s.hasher.finalize().to_hex().as_str() == h);
                        *verdict.lock().unwrap() = Some(whole);
                        if !whole {
                            return Some((
                                Err(std::io::Error::other("the object does not match its name")),
                                s,
                            ));
                        }
                        return s.held.take().map(|b| (Ok(b), s));
                    }
                }
            }
        }
    })
}

fn config_err(scheme: &str, e: opendal::Error) -> Error {
    Error::config(format!("cannot configure {scheme} storage: {}", e.kind()))
        .hint("check the storage settings in custos.toml")
}

/// A TLS handshake that failed on the store's certificate: said as such, with what to do.
pub(crate) fn untrusted(location: &str, detail: &str) -> Option<Error> {
    let d = detail.to_ascii_lowercase();
    let tls = [
        "certificate",
        "unknownissuer",
        "invalid peer",
        "tls handshake",
        "bad signature",
    ];
    let at = tls.iter().filter_map(|w| d.find(w)).min()?;
    // The TLS library's reason: from the cause that names it to the end.
    let reason = detail[..at]
        .rfind(": ")
        .map_or(detail, |i| &detail[i + 2..])
        .trim();
    Some({
        Error::new(
            Kind::Storage,
            format!("{location}: the store's TLS certificate is not trusted ({reason})"),
        )
        .hint("if the store's certificate is signed by a private CA, name that CA's PEM file as ca_file in [storage.s3] (or the secondary's section); check that the endpoint's host name is the one in the certificate. custos never skips verification")
    })
}

/// An error with every cause under it (the HTTP client's reason is a cause, not the text).
fn chain(e: &opendal::Error) -> String {
    custos_model::error::chain(e)
}

pub(crate) fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A read of an object in an archival storage class.
pub(crate) fn archived(location: &str, path: &str) -> Error {
    Error::new(
        Kind::Storage,
        format!("{location}: `{path}` is archived in a cold storage class (GLACIER or DEEP_ARCHIVE) and cannot be read until the store restores it"),
    )
    .hint("run the restore again with --request-cold: custos asks the store to bring back every archived object it needs at once (S3 RestoreObject; a Standard retrieval takes 3-5 hours from GLACIER, up to 12 from DEEP_ARCHIVE) and says when to run it again; GLACIER_IR as the cold class (`custos bucket-policy --cold-class`) avoids the wait")
}

/// What to do about a store that throttles (503 SlowDown, 429).
pub(crate) const THROTTLED: &str = "the store is throttling requests: raise retries in [storage] of custos.toml, spread the jobs over time, or ask the provider for a higher request rate; the next run stores only what is missing";

pub fn map_err(location: &str, path: &str, e: opendal::Error) -> Error {
    let detail = chain(&e);
    if detail.contains("NoSuchBucket") {
        let bucket = location
            .strip_prefix("s3://")
            .and_then(|l| l.split('/').next())
            .unwrap_or("?");
        return Error::new(
            Kind::Storage,
            format!("{location}: the bucket `{bucket}` does not exist"),
        )
        .hint("create the bucket (your store's console, or `aws s3 mb s3://BUCKET`), or correct the bucket in CUSTOS_REPO / [repository] url");
    }
    if detail.contains("InvalidObjectState") {
        return archived(location, path);
    }
    match e.kind() {
        OdKind::NotFound => Error::new(Kind::NotFound, format!("{location}: `{path}` does not exist")),
        OdKind::PermissionDenied => Error::new(
            Kind::Storage,
            format!("{location}: access to `{path}` was denied"),
        )
        .hint("check the access key and secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or custos.toml) and the bucket policy"),
        OdKind::ConfigInvalid => Error::config(format!("{location}: invalid storage configuration: {e}")),
        OdKind::RateLimited => Error::new(
            Kind::Storage,
            format!("{location}: the store kept throttling requests (503 SlowDown) while accessing `{path}`, through every retry"),
        )
        .hint(THROTTLED),
        _ => {
            let detail = e.to_string();
            let denied = detail.contains("SignatureDoesNotMatch")
                || detail.contains("InvalidAccessKeyId")
                || detail.contains("AccessDenied")
                || detail.contains("Forbidden");
            if denied {
                Error::new(Kind::Storage, format!("{location}: the store refused the credentials"))
                    .hint("check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the [storage] section of custos.toml)")
            } else {
                Error::new(Kind::Storage, format!("{location}: cannot reach the store while accessing `{path}` ({})", e.kind()))
                    .hint("check the endpoint URL and that the object store is running and reachable; then retry")
            }
        }
    }
}

impl Storage for RemoteStorage {
    fn as_remote(&self) -> Option<&RemoteStorage> {
        Some(self)
    }

    fn receive(
        &self,
        src: &dyn Storage,
        e: &Entry,
        blake3: Option<&str>,
    ) -> Option<Result<crate::Received>> {
        self.stream_from(src.as_remote()?, e, blake3)
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn put(&self, path: &str, data: &[u8], mode: PutMode) -> Result<PutOutcome> {
        self.put_tagged(path, bytes::Bytes::copy_from_slice(data), mode, None)
    }

    fn put_tagged(
        &self,
        path: &str,
        data: bytes::Bytes,
        mode: PutMode,
        tag: Option<&str>,
    ) -> Result<PutOutcome> {
        // The signed client when a write carries a date (Object Lock) or a tag; OpenDAL
        // otherwise. Either sends `data` as it is: no copy.
        if let Some(r) = self.signed_put(path, data.clone(), mode == PutMode::CreateOnly, tag) {
            return r;
        }
        let r = self.rt.block_on(async {
            match mode {
                PutMode::Overwrite => self.op.write(path, data).await,
                PutMode::CreateOnly => self.op.write_with(path, data).if_not_exists(true).await,
            }
        });
        match r {
            Ok(_) => Ok(PutOutcome::Created),
            Err(e) if e.kind() == OdKind::ConditionNotMatch => Ok(PutOutcome::AlreadyExists),
            Err(e) => Err(self.err(path, e)),
        }
    }

    fn put_checked(&self, path: &str, data: bytes::Bytes, md5: Option<&str>) -> Result<PutOutcome> {
        // With Object Lock every write carries Content-MD5: the store checks the bytes.
        if let Some(r) = self.signed_put(path, data.clone(), true, None) {
            return r;
        }
        let sent = data.clone();
        let r = self
            .rt
            .block_on(async { self.op.write_with(path, sent).if_not_exists(true).await });
        let meta = match r {
            Ok(m) => m,
            Err(e) if e.kind() == OdKind::ConditionNotMatch => {
                return Ok(PutOutcome::AlreadyExists)
            }
            Err(e) => return Err(self.err(path, e)),
        };
        // A multipart or encrypted object's ETag is not its MD5 (it has a dash, or is
        // not 32 hex digits): nothing to compare then.
        if let Some(etag) = meta.etag().and_then(crate::etag_md5) {
            use md5::Digest;
            let sent = match md5 {
                Some(m) => m.to_string(),
                None => hex_lower(&md5::Md5::digest(&data)),
            };
            if etag != sent {
                return Err(Error::integrity(format!(
                    "{}: the store holds other bytes under `{path}` than were sent (MD5 {etag}, sent {sent})",
                    self.location
                ))
                .hint("the object was damaged on the way or by the store; delete it there and run the command again"));
            }
        }
        Ok(PutOutcome::Created)
    }

    fn get(&self, path: &str) -> Result<Vec<u8>> {
        // Into one buffer as the pieces arrive, each dropped once appended: not all the
        // pieces and then their copy (twice the object at once).
        self.rt
            .block_on(async {
                let mut out = Vec::new();
                let r = self.op.reader(path).await?;
                r.read_into(&mut out, ..).await?;
                Ok::<_, opendal::Error>(out)
            })
            .map_err(|e| self.err(path, e))
    }

    fn get_range(&self, path: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        // Into one buffer of the right size as the pieces arrive: a restore holds one copy
        // of each pack span it fetches, not the pieces and then their copy.
        let buf = self
            .rt
            .block_on(async {
                let mut out = Vec::with_capacity(len as usize);
                let r = self.op.reader(path).await?;
                r.read_into(&mut out, offset..offset + len).await?;
                Ok::<_, opendal::Error>(out)
            })
            .map_err(|e| self.err(path, e))?;
        if buf.len() as u64 != len {
            return Err(Error::integrity(format!(
                "{}: `{path}` is shorter than indexed",
                self.location
            )));
        }
        Ok(buf)
    }

    fn get_prefix(&self, path: &str, n: u64) -> Result<Vec<u8>> {
        // One GET of the range `0..n`: the store sends no more than that, and the whole of
        // a shorter object. OpenDAL reads a short answer to a range as an error, raised
        // once the body has ended as the store declared it ("reader got too little
        // data", persistent, not retried): what came before it is the whole object (the
        // conformance suite holds this to the pinned version). An empty object has no
        // byte 0 (416): its size tells.
        let got = self.rt.block_on(async {
            let mut out = Vec::new();
            let mut pieces = self.op.reader(path).await?.into_stream(0..n).await?;
            loop {
                match pieces.try_next().await {
                    Ok(Some(piece)) => out.extend_from_slice(&piece.to_bytes()),
                    Ok(None) => return Ok(out),
                    Err(e)
                        if e.kind() == OdKind::Unexpected
                            && e.to_string().contains("reader got too little data") =>
                    {
                        return Ok(out)
                    }
                    Err(e) => return Err(e),
                }
            }
        });
        match got {
            Ok(b) => Ok(b),
            Err(e) if e.kind() != OdKind::NotFound && self.size(path)? == Some(0) => Ok(vec![]),
            Err(e) => Err(self.err(path, e)),
        }
    }

    fn size(&self, path: &str) -> Result<Option<u64>> {
        match self.rt.block_on(self.op.stat(path)) {
            Ok(m) => Ok(Some(m.content_length())),
            Err(e) if e.kind() == OdKind::NotFound => Ok(None),
            Err(e) => Err(self.err(path, e)),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<Entry>> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let r = self.rt.block_on(self.list_prefix(&prefix));
        match r {
            Ok(mut v) => {
                v.sort_by(|a, b| a.path.cmp(&b.path));
                Ok(v)
            }
            Err(e) if e.kind() == OdKind::NotFound => Ok(vec![]),
            Err(e) => Err(self.err(dir, e)),
        }
    }

    fn list_hex(&self, dir: &str) -> Result<Vec<Entry>> {
        let base = dir.trim_end_matches('/');
        let prefixes: Vec<String> = (0..16u8).map(|d| format!("{base}/{d:x}")).collect();
        let r = self.rt.block_on(futures::future::try_join_all(
            prefixes.iter().map(|p| self.list_prefix(p)),
        ));
        match r {
            Ok(parts) => {
                let mut v: Vec<Entry> = parts.into_iter().flatten().collect();
                v.sort_by(|a, b| a.path.cmp(&b.path));
                Ok(v)
            }
            Err(e) if e.kind() == OdKind::NotFound => Ok(vec![]),
            Err(e) => Err(self.err(dir, e)),
        }
    }

    fn list_split(&self, dir: &str, splits: &[String]) -> Result<Vec<Entry>> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        let mut splits: Vec<&str> = splits
            .iter()
            .map(String::as_str)
            .filter(|s| s.starts_with(&prefix))
            .collect();
        splits.sort_unstable();
        splits.dedup();
        // Range i: the keys after split i-1, up to and including split i.
        let ranges = (0..=splits.len()).map(|i| {
            let after = i.checked_sub(1).map(|j| splits[j]);
            let upto = splits.get(i).copied();
            let prefix = &prefix;
            async move {
                let mut l = self.op.lister_with(prefix).recursive(true);
                if let Some(a) = after {
                    l = l.start_after(a);
                }
                let mut lister = l.await?;
                let mut out = vec![];
                while let Some(e) = lister.try_next().await? {
                    let path = e.path().trim_start_matches('/');
                    if upto.is_some_and(|u| path > u) {
                        break;
                    }
                    if e.metadata().is_dir() {
                        continue;
                    }
                    out.push(entry_of(&e));
                }
                Ok::<_, opendal::Error>(out)
            }
        });
        match self.rt.block_on(futures::future::try_join_all(ranges)) {
            Ok(parts) => {
                let mut v: Vec<Entry> = parts.into_iter().flatten().collect();
                v.sort_by(|a, b| a.path.cmp(&b.path));
                v.dedup_by(|a, b| a.path == b.path);
                Ok(v)
            }
            Err(e) if e.kind() == OdKind::NotFound => Ok(vec![]),
            Err(e) => Err(self.err(dir, e)),
        }
    }

    fn delete(&self, path: &str) -> Result<()> {
        if let Some((c, w)) = &self.lock {
            return match self.rt.block_on(c.delete_all_versions(path)) {
                // An object custos does not date (a lock, a key file) that a bucket's
                // default retention holds anyway: hidden behind a delete marker, the only
                // delete the store allows, until its date passes.
                Err(e) if w.span_for(path).is_none() && e.message.contains("under Object Lock") => {
                    self.rt
                        .block_on(self.op.delete(path))
                        .map_err(|e| self.err(path, e))
                }
                r => r,
            };
        }
        match self.rt.block_on(self.op.delete(path)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == OdKind::NotFound => Ok(()),
            Err(e) => Err(self.err(path, e)),
        }
    }
    fn object_lock(&self) -> Option<&dyn crate::ObjectLock> {
        self.lock.as_ref().map(|_| self as &dyn crate::ObjectLock)
    }
    fn cold(&self, path: &str) -> Result<Option<crate::Cold>> {
        match &self.s3 {
            Some(c) => self.rt.block_on(c.cold(path)),
            None => Ok(None),
        }
    }
    fn request_restore(&self, path: &str, days: u32) -> Result<bool> {
        match &self.s3 {
            Some(c) => self.rt.block_on(c.request_restore(path, days)),
            None => Err(Error::new(
                Kind::Storage,
                format!(
                    "{}: `{path}` cannot be restored from cold storage here",
                    self.location
                ),
            )),
        }
    }
}

impl crate::ObjectLock for RemoteStorage {
    fn mode(&self) -> LockMode {
        self.lock
            .as_ref()
            .map(|(_, w)| w.mode)
            .unwrap_or(LockMode::Governance)
    }
    fn retention(&self, path: &str) -> Result<Option<Retention>> {
        let (c, _) = self.lock.as_ref().ok_or_else(no_lock)?;
        self.rt.block_on(c.retention(path))
    }
    fn extend(&self, path: &str, until: chrono::DateTime<chrono::Utc>) -> Result<()> {
        let (c, w) = self.lock.as_ref().ok_or_else(no_lock)?;
        self.rt.block_on(c.set_retention(
            path,
            Retention {
                mode: w.mode,
                until,
            },
        ))
    }
}

fn no_lock() -> Error {
    Error::internal("Object Lock requests on a storage without Object Lock")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An archived object's read is answered 403 InvalidObjectState (as S3 formats it,
    /// OpenDAL keeps the code in the error): said as what it is, with the way out.
    #[test]
    fn a_cold_object_is_named_with_the_restore_path_not_a_denial() {
        let e = opendal::Error::new(
            OdKind::PermissionDenied,
            "S3Error { code: \"InvalidObjectState\", message: \"The operation is not valid for the object's storage class\" }",
        );
        let err = map_err("s3://b/p", "data/ab/x", e);
        assert!(
            err.message.contains("cold storage class") && err.message.contains("data/ab/x"),
            "{}",
            err.message
        );
        assert!(err.hint.unwrap().contains("--request-cold"));
    }
}
