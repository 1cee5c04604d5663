//! S3 Object Lock: writes that carry a retain-until date, reading and extending an
//! object's retention, and deletes of every version of an object.
//!
//! OpenDAL has no Object Lock options, so these requests are signed here with the same
//! signer it uses (reqsign, AWS Signature V4) and sent with the same HTTP client crate.
//! An Object Lock bucket is versioned: a plain DELETE only hides an object behind a
//! delete marker and frees nothing, so custos deletes each version by its id, and the
//! store refuses that while the version's retain-until date has not passed.

use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use custos_model::{Error, Kind, Result};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use crate::PutOutcome;

/// GOVERNANCE: a user with `s3:BypassGovernanceRetention` may still delete early (custos
/// never asks to). COMPLIANCE: nobody can, the account's root user included, until the
/// date passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    Governance,
    Compliance,
}

impl LockMode {
    pub fn as_s3(&self) -> &'static str {
        match self {
            LockMode::Governance => "GOVERNANCE",
            LockMode::Compliance => "COMPLIANCE",
        }
    }
    fn from_s3(s: &str) -> Option<LockMode> {
        match s.trim() {
            "GOVERNANCE" => Some(LockMode::Governance),
            "COMPLIANCE" => Some(LockMode::Compliance),
            _ => None,
        }
    }
}

impl std::str::FromStr for LockMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<LockMode> {
        LockMode::from_s3(&s.to_ascii_uppercase()).ok_or_else(|| {
            Error::config(format!(
                "unknown Object Lock mode `{s}`: it is `governance` or `compliance`"
            ))
        })
    }
}

/// An object version's retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Retention {
    pub mode: LockMode,
    pub until: DateTime<Utc>,
}

/// What custos asks of an Object Lock bucket when it writes: the mode, and how long each
/// kind of object is retained from its write (by the first component of its path;
/// objects of no listed kind, locks and key files among them, get no date).
#[derive(Debug, Clone)]
pub struct WriteLock {
    pub mode: LockMode,
    pub spans: Vec<(String, Duration)>,
}

impl WriteLock {
    pub fn span_for(&self, path: &str) -> Option<Duration> {
        let top = path.trim_start_matches('/').split('/').next()?;
        self.spans.iter().find(|(p, _)| p == top).map(|(_, d)| *d)
    }
}

/// Signed requests to one bucket, for what OpenDAL does not do.
pub struct LockClient {
    http: reqwest::Client,
    /// `<endpoint>/<bucket>`, path-style as OpenDAL addresses a custom endpoint.
    base: String,
    /// The repository's prefix in the bucket, without slashes at either end.
    root: String,
    signer: reqsign::AwsV4Signer,
    cred: Option<reqsign::AwsCredential>,
    location: String,
    /// How many times a buffered write is tried again after a dropped connection, a
    /// throttling answer (503 SlowDown, 429) or a server error (5xx).
    retries: usize,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LockConfiguration {
    object_lock_enabled: Option<String>,
    rule: Option<LockRule>,
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LockRule {
    default_retention: Option<DefaultRetention>,
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DefaultRetention {
    mode: Option<String>,
    days: Option<u32>,
    years: Option<u32>,
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RetentionXml {
    mode: Option<String>,
    retain_until_date: Option<String>,
}
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct VersionsXml {
    #[serde(default)]
    version: Vec<VersionXml>,
    #[serde(default)]
    delete_marker: Vec<VersionXml>,
    is_truncated: Option<bool>,
    next_key_marker: Option<String>,
    next_version_id_marker: Option<String>,
}
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct VersionXml {
    key: String,
    version_id: String,
}

/// The bucket's Object Lock configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BucketLock {
    /// The default retention the store puts on objects written without a date.
    pub default: Option<(LockMode, String)>,
}

/// Percent-encodes a key for a URL path (S3's rules: unreserved characters and `/` stay).
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn encode_query(v: &str) -> String {
    encode_key(v).replace('/', "%2F")
}

fn hex_bytes(h: &str) -> Option<Vec<u8>> {
    h.len()
        .is_multiple_of(2)
        .then(|| {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
                .collect()
        })
        .flatten()
}

fn md5_b64(data: &[u8]) -> String {
    use md5::Digest;
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(data))
}

/// S3's error code from an error response body (`<Code>...</Code>`).
fn error_code(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    s.split_once("<Code>")
        .and_then(|(_, r)| r.split_once("</Code>"))
        .map(|(c, _)| c.to_string())
        .unwrap_or_default()
}

pub fn format_date(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A failed request that trying again may not meet: no answer, throttling, a server
/// error.
struct Transient(Error);

impl LockClient {
    pub fn new(
        o: &crate::remote::S3Options,
        timeouts: &crate::remote::Timeouts,
    ) -> Result<LockClient> {
        let http = crate::remote::client_builder(o.ca_pem.as_deref())?
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.io.max(timeouts.request) * 4)
            .build()
            .map_err(|e| Error::internal(format!("cannot build the HTTP client: {e}")))?;
        let region = o.region.as_deref().unwrap_or("us-east-1");
        let endpoint = o
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let cred = o.access_key_id.as_ref().map(|k| reqsign::AwsCredential {
            access_key_id: k.clone(),
            secret_access_key: o.secret_access_key.clone().unwrap_or_default(),
            session_token: o.session_token.clone(),
            expires_in: None,
        });
        Ok(LockClient {
            http,
            base: format!("{}/{}", endpoint.trim_end_matches('/'), o.bucket),
            root: o.root.trim_matches('/').to_string(),
            signer: reqsign::AwsV4Signer::new("s3", region),
            cred,
            location: format!("s3://{}/{}", o.bucket, o.root.trim_matches('/')),
            retries: timeouts.retries,
        })
    }

    fn key(&self, path: &str) -> String {
        let path = path.trim_start_matches('/');
        if self.root.is_empty() {
            path.to_string()
        } else {
            format!("{}/{path}", self.root)
        }
    }

    fn url(&self, key: Option<&str>, query: &str) -> String {
        let mut u = self.base.clone();
        u.push('/');
        if let Some(k) = key {
            u.push_str(&encode_key(k));
        }
        if !query.is_empty() {
            u.push('?');
            u.push_str(query);
        }
        u
    }

    /// A signed request; the response as it arrives (its body not read yet). `len`: the
    /// body's length, sent as Content-Length (a streamed body must declare it).
    async fn request(
        &self,
        method: Method,
        url: String,
        headers: &[(&str, String)],
        body: reqwest::Body,
        len: u64,
    ) -> Result<reqwest::Response> {
        let mut req = self.http.request(method.clone(), &url);
        if method != Method::HEAD && method != Method::GET {
            req = req.header("content-length", len.to_string());
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let mut req = req
            .body(body)
            .build()
            .map_err(|e| Error::internal(format!("cannot build a request: {e}")))?;
        if let Some(c) = &self.cred {
            self.signer
                .sign(&mut req, c)
                .map_err(|e| Error::internal(format!("cannot sign a request: {e}")))?;
        }
        self.http.execute(req).await.map_err(|e| {
            let detail = custos_model::error::chain(&e);
            crate::remote::untrusted(&self.location, &detail).unwrap_or_else(|| {
                Error::new(
                    Kind::Storage,
                    format!("{}: cannot reach the store ({e})", self.location),
                )
                .hint("check the endpoint URL and that the object store is running and reachable; then retry")
            })
        })
    }

    async fn send(
        &self,
        method: Method,
        url: String,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, Bytes)> {
        let len = body.len() as u64;
        let resp = self
            .request(method, url, headers, reqwest::Body::from(body), len)
            .await?;
        let status = resp.status();
        let h = resp.headers().clone();
        let b = resp.bytes().await.map_err(|e| {
            Error::new(
                Kind::Storage,
                format!("{}: the store's answer broke off ({e})", self.location),
            )
        })?;
        Ok((status, h, b))
    }

    /// An S3 XML answer, or an error naming what it was and that custos cannot read it.
    fn xml<T: serde::de::DeserializeOwned>(&self, body: &[u8], what: &str) -> Result<T> {
        quick_xml::de::from_reader(body).map_err(|e| {
            Error::new(
                Kind::Storage,
                format!("{}: {what} custos cannot read: {e}", self.location),
            )
        })
    }

    fn failed(&self, what: &str, path: &str, status: StatusCode, body: &[u8]) -> Error {
        let code = error_code(body);
        if status == StatusCode::FORBIDDEN && (code == "AccessDenied" || code.is_empty()) {
            return Error::new(
                Kind::Storage,
                format!("{}: the store refused to {what} `{path}` (access denied)", self.location),
            )
            .hint("check the credentials and that the bucket policy grants the Object Lock actions `custos bucket-policy` lists");
        }
        Error::new(
            Kind::Storage,
            format!(
                "{}: the store refused to {what} `{path}`: {} {}",
                self.location,
                status.as_u16(),
                if code.is_empty() {
                    "(no error code)".to_string()
                } else {
                    code
                }
            ),
        )
    }

    /// The bucket's Object Lock configuration, or `None` when Object Lock is off.
    pub async fn bucket_lock(&self) -> Result<Option<BucketLock>> {
        let (st, _, body) = self
            .send(
                Method::GET,
                self.url(None, "object-lock="),
                &[],
                Bytes::new(),
            )
            .await?;
        if st == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !st.is_success() {
            return Err(self.failed(
                "read the Object Lock configuration of",
                "(bucket)",
                st,
                &body,
            ));
        }
        let c: LockConfiguration = self.xml(&body, "an Object Lock configuration")?;
        if c.object_lock_enabled.as_deref() != Some("Enabled") {
            return Ok(None);
        }
        let default = c.rule.and_then(|r| r.default_retention).and_then(|d| {
            let mode = LockMode::from_s3(d.mode.as_deref()?)?;
            let span = match (d.days, d.years) {
                (Some(n), _) => format!("{n} days"),
                (_, Some(n)) => format!("{n} years"),
                _ => return None,
            };
            Some((mode, span))
        });
        Ok(Some(BucketLock { default }))
    }

    /// A create-only (or replacing) write with a retain-until date and a tag; with a date,
    /// Content-MD5 too (the store checks the bytes it received; Object Lock requires it).
    pub async fn put(
        &self,
        path: &str,
        data: Bytes,
        create_only: bool,
        lock: Option<Retention>,
        tag: Option<&str>,
    ) -> Result<PutOutcome> {
        use md5::Digest;
        // Object Lock writes must carry Content-MD5 (S3 refuses them without). Other
        // writes through this client (tagged data packs) go as OpenDAL's do: the pack is
        // named by its BLAKE3 and sealed by AEAD, which every read checks; hashing every
        // pack a second time was the S3 backup's largest CPU cost after compression.
        let md5 = lock.map(|_| crate::remote::hex_lower(&md5::Md5::digest(&data)));
        let len = data.len() as u64;
        let mut tries = 0;
        loop {
            let body = reqwest::Body::from(data.clone());
            match self
                .put_body(path, body, len, md5.as_deref(), create_only, lock, tag)
                .await
            {
                Err(Transient(e)) if tries < self.retries => {
                    tries += 1;
                    tracing::debug!("{}: retrying `{path}`: {}", self.location, e.message);
                    tokio::time::sleep(crate::backoff(tries)).await;
                }
                // A create-only write that the store carried out but whose answer was
                // lost is found again by its retry (412): the object is there, as sent
                // (the store checked Content-MD5 the first time).
                Err(Transient(e)) => return Err(e.context(format!("after {} tries", tries + 1))),
                Ok(r) => return r.map(|(o, _)| o),
            }
        }
    }

    /// A read whose body streams (`copy`): the response once the store answered with the
    /// object. A missing object is an error of kind `NotFound`.
    pub(crate) async fn get_stream(&self, path: &str) -> Result<reqwest::Response> {
        let resp = self
            .request(
                Method::GET,
                self.url(Some(&self.key(path)), ""),
                &[],
                reqwest::Body::from(Bytes::new()),
                0,
            )
            .await?;
        let st = resp.status();
        if st.is_success() {
            return Ok(resp);
        }
        let body = resp.bytes().await.unwrap_or_default();
        if st == StatusCode::NOT_FOUND {
            return Err(Error::new(
                Kind::NotFound,
                format!("{}: `{path}` does not exist", self.location),
            ));
        }
        if error_code(&body) == "InvalidObjectState" {
            return Err(crate::remote::archived(&self.location, path));
        }
        Err(self.failed("read", path, st, &body))
    }

    /// The object's tags as a `x-amz-tagging` value (`k=v&k=v`), `None` when it has none.
    pub(crate) async fn tagging(&self, path: &str) -> Result<Option<String>> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Tagging {
            tag_set: Option<TagSet>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct TagSet {
            #[serde(default)]
            tag: Vec<Tag>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Tag {
            key: String,
            value: String,
        }
        let (st, _, body) = self
            .send(
                Method::GET,
                self.url(Some(&self.key(path)), "tagging="),
                &[],
                Bytes::new(),
            )
            .await?;
        if !st.is_success() {
            return Err(self.failed("read the tags of", path, st, &body));
        }
        let t: Tagging = self.xml(&body, &format!("the tags of `{path}`"))?;
        let tags: Vec<String> = t
            .tag_set
            .map(|s| s.tag)
            .unwrap_or_default()
            .into_iter()
            .map(|t| format!("{}={}", encode_query(&t.key), encode_query(&t.value)))
            .collect();
        Ok((!tags.is_empty()).then(|| tags.join("&")))
    }

    /// A create-only write whose body streams (`copy`): `len` bytes, Content-MD5 from
    /// `md5` (hex) when known, a retain-until date and a tag as [`LockClient::put`].
    /// Returns the outcome and the MD5 the store says it stored (a single PUT's ETag).
    pub(crate) async fn put_stream(
        &self,
        path: &str,
        body: reqwest::Body,
        len: u64,
        md5: Option<&str>,
        lock: Option<Retention>,
        tag: Option<&str>,
    ) -> Result<(PutOutcome, Option<String>)> {
        // `copy` tries the whole object again (a new GET), not this PUT alone.
        self.put_body(path, body, len, md5, true, lock, tag)
            .await
            .unwrap_or_else(|Transient(e)| Err(e))
    }

    /// Every PUT of this client: `len` bytes of `body`, Content-MD5 from `md5` (hex) when
    /// known, create-only or replacing, with a retain-until date and a tag. Returns the
    /// outcome and the MD5 the store says it stored (a single PUT's ETag); the outer error
    /// is one a new try may not meet (no answer, throttling, a server error).
    #[allow(clippy::too_many_arguments)]
    async fn put_body(
        &self,
        path: &str,
        body: reqwest::Body,
        len: u64,
        md5: Option<&str>,
        create_only: bool,
        lock: Option<Retention>,
        tag: Option<&str>,
    ) -> std::result::Result<Result<(PutOutcome, Option<String>)>, Transient> {
        let mut h = vec![];
        if create_only {
            h.push(("if-none-match", "*".to_string()));
        }
        if let Some(m) = md5.and_then(hex_bytes) {
            h.push((
                "content-md5",
                base64::engine::general_purpose::STANDARD.encode(m),
            ));
        }
        if let Some(t) = tag {
            h.push(("x-amz-tagging", t.to_string()));
        }
        if let Some(r) = lock {
            h.push(("x-amz-object-lock-mode", r.mode.as_s3().into()));
            h.push(("x-amz-object-lock-retain-until-date", format_date(r.until)));
        }
        let resp = match self
            .request(
                Method::PUT,
                self.url(Some(&self.key(path)), ""),
                &h,
                body,
                len,
            )
            .await
        {
            Ok(r) => r,
            Err(e) if e.kind == Kind::Storage => return Err(Transient(e)),
            Err(e) => return Ok(Err(e)),
        };
        let st = resp.status();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::etag_md5);
        let body = resp.bytes().await.unwrap_or_default();
        if st == StatusCode::PRECONDITION_FAILED {
            return Ok(Ok((PutOutcome::AlreadyExists, None)));
        }
        if !st.is_success() {
            let code = error_code(&body);
            if code == "BadDigest" {
                return Ok(Err(Error::integrity(format!(
                    "{}: the store received other bytes under `{path}` than were sent",
                    self.location
                ))
                .hint("the data was damaged on the way; run the command again")));
            }
            let e = self.failed("store", path, st, &body);
            if st == StatusCode::SERVICE_UNAVAILABLE
                || st == StatusCode::TOO_MANY_REQUESTS
                || code == "SlowDown"
            {
                return Err(Transient(e.hint(crate::remote::THROTTLED)));
            }
            if st.is_server_error() {
                return Err(Transient(e));
            }
            return Ok(Err(e));
        }
        Ok(Ok((PutOutcome::Created, etag)))
    }

    /// The retention of the object's current version, `None` when it has none (or the
    /// object does not exist).
    pub async fn retention(&self, path: &str) -> Result<Option<Retention>> {
        let (st, _, body) = self
            .send(
                Method::GET,
                self.url(Some(&self.key(path)), "retention="),
                &[],
                Bytes::new(),
            )
            .await?;
        if st == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !st.is_success() {
            return Err(self.failed("read the retention of", path, st, &body));
        }
        let r: RetentionXml = self.xml(&body, &format!("a retention of `{path}`"))?;
        let (Some(mode), Some(until)) = (
            r.mode.as_deref().and_then(LockMode::from_s3),
            r.retain_until_date
                .as_deref()
                .and_then(|d| DateTime::parse_from_rfc3339(d.trim()).ok()),
        ) else {
            return Ok(None);
        };
        Ok(Some(Retention {
            mode,
            until: until.with_timezone(&Utc),
        }))
    }

    /// Sets the object's retention (the store refuses to shorten a date or to weaken
    /// COMPLIANCE, and custos never asks it to).
    pub async fn set_retention(&self, path: &str, r: Retention) -> Result<()> {
        let xml = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>{}</Mode><RetainUntilDate>{}</RetainUntilDate></Retention>",
            r.mode.as_s3(),
            format_date(r.until)
        );
        let body = Bytes::from(xml);
        let h = [
            ("content-md5", md5_b64(&body)),
            ("content-type", "application/xml".into()),
        ];
        let (st, _, b) = self
            .send(
                Method::PUT,
                self.url(Some(&self.key(path)), "retention="),
                &h,
                body,
            )
            .await?;
        if !st.is_success() {
            return Err(self.failed("extend the retention of", path, st, &b));
        }
        Ok(())
    }

    /// Every version (and delete marker) of exactly this object.
    async fn versions(&self, path: &str) -> Result<Vec<String>> {
        let key = self.key(path);
        let mut out = vec![];
        let mut marker: Option<(String, String)> = None;
        loop {
            let mut q = format!("prefix={}&versions=", encode_query(&key));
            if let Some((k, v)) = &marker {
                q.push_str(&format!(
                    "&key-marker={}&version-id-marker={}",
                    encode_query(k),
                    encode_query(v)
                ));
            }
            let (st, _, body) = self
                .send(Method::GET, self.url(None, &q), &[], Bytes::new())
                .await?;
            if !st.is_success() {
                return Err(self.failed("list the versions of", path, st, &body));
            }
            let v: VersionsXml = self.xml(&body, "a version listing")?;
            out.extend(
                v.version
                    .into_iter()
                    .chain(v.delete_marker)
                    .filter(|x| x.key == key)
                    .map(|x| x.version_id),
            );
            match (v.is_truncated, v.next_key_marker, v.next_version_id_marker) {
                (Some(true), Some(k), Some(id)) => marker = Some((k, id)),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Deletes every version of the object. A version still under retention is refused
    /// by the store: the error names the object and its date.
    pub async fn delete_all_versions(&self, path: &str) -> Result<()> {
        for vid in self.versions(path).await? {
            let q = format!("versionId={}", encode_query(&vid));
            let (st, _, body) = self
                .send(
                    Method::DELETE,
                    self.url(Some(&self.key(path)), &q),
                    &[],
                    Bytes::new(),
                )
                .await?;
            if st.is_success() || st == StatusCode::NOT_FOUND {
                continue;
            }
            if st == StatusCode::FORBIDDEN || error_code(&body).contains("Lock") {
                let until = self.retention(path).await.ok().flatten();
                return Err(Error::new(
                    Kind::Storage,
                    format!(
                        "{}: the store refused to delete `{path}`: it is under Object Lock{}",
                        self.location,
                        until
                            .map(|r| format!(" ({}) until {}", r.mode.as_s3(), format_date(r.until)))
                            .unwrap_or_default()
                    ),
                )
                .hint("nothing can delete it before that date; forget and prune skip such objects and say until when they are kept"));
            }
            return Err(self.failed("delete", path, st, &body));
        }
        Ok(())
    }

    /// The object's archival state from HEAD: `x-amz-storage-class` GLACIER or
    /// DEEP_ARCHIVE (GLACIER_IR and the others read at once), and `x-amz-restore`.
    pub async fn cold(&self, path: &str) -> Result<Option<crate::Cold>> {
        let (st, h, body) = self
            .send(
                Method::HEAD,
                self.url(Some(&self.key(path)), ""),
                &[],
                Bytes::new(),
            )
            .await?;
        if st == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !st.is_success() {
            return Err(self.failed("look at", path, st, &body));
        }
        let class = h
            .get("x-amz-storage-class")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("STANDARD")
            .to_string();
        if class != "GLACIER" && class != "DEEP_ARCHIVE" {
            return Ok(None);
        }
        let restore = match h.get("x-amz-restore").and_then(|v| v.to_str().ok()) {
            None => crate::ColdRestore::NotRequested,
            Some(v) if v.contains("ongoing-request=\"true\"") => crate::ColdRestore::InProgress,
            Some(_) => crate::ColdRestore::Ready,
        };
        Ok(Some(crate::Cold { class, restore }))
    }

    /// Asks the store to bring an object in a cold storage class back for `days`.
    /// Returns false when a restore of it is already under way.
    pub async fn request_restore(&self, path: &str, days: u32) -> Result<bool> {
        let xml = format!(
            "<RestoreRequest xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Days>{days}</Days><GlacierJobParameters><Tier>Standard</Tier></GlacierJobParameters></RestoreRequest>"
        );
        let body = Bytes::from(xml);
        let h = [("content-md5", md5_b64(&body))];
        let (st, _, b) = self
            .send(
                Method::POST,
                self.url(Some(&self.key(path)), "restore="),
                &h,
                body,
            )
            .await?;
        if st == StatusCode::CONFLICT || error_code(&b) == "RestoreAlreadyInProgress" {
            return Ok(false);
        }
        if !st.is_success() {
            return Err(self.failed("restore from cold storage", path, st, &b));
        }
        Ok(true)
    }

    /// Creates the bucket with Object Lock enabled (tests and `bucket-policy --create`).
    pub async fn create_locked_bucket(&self) -> Result<()> {
        let h = [("x-amz-bucket-object-lock-enabled", "true".to_string())];
        let (st, _, b) = self
            .send(Method::PUT, self.url(None, ""), &h, Bytes::new())
            .await?;
        if !st.is_success() {
            return Err(self.failed("create the bucket", "(bucket)", st, &b));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_and_spans_found_by_kind() {
        assert_eq!(encode_key("db/data/ab/x y+z"), "db/data/ab/x%20y%2Bz");
        assert_eq!(encode_query("db/wal/1"), "db%2Fwal%2F1");
        let w = WriteLock {
            mode: LockMode::Governance,
            spans: vec![("data".into(), Duration::from_secs(60))],
        };
        assert_eq!(w.span_for("data/ab/cd"), Some(Duration::from_secs(60)));
        assert_eq!(w.span_for("locks/x"), None);
        assert_eq!(
            error_code(b"<Error><Code>AccessDenied</Code></Error>"),
            "AccessDenied"
        );
        assert_eq!(
            "compliance".parse::<LockMode>().unwrap(),
            LockMode::Compliance
        );
        assert!("forever".parse::<LockMode>().is_err());
    }
}
